"""A forced fp16 gradient overflow for tests, installed through ppll_ext.hooks (as tests/faults.py installs faults).

SPEC = stage:step: while stage `stage` trains step `step`, the gradient of its first parameter becomes infinite (its
loss stays finite), as an fp16 overflow makes it. In a test's own process: `overflow.install("1:3")` (and
`overflow.clear()` afterwards); in processes a launcher starts, run this file instead of `-m ppll_ext.train`, e.g.
`torchrun --nproc_per_node 2 tests/overflow.py 1:3 train --set ...`; it installs the overflow, runs the `ppll`
command line with the remaining arguments, then removes the overflow.
"""

from __future__ import annotations

import math
import sys

import torch

from ppll_ext import hooks


def install(spec: str) -> None:
    """Install the overflow `spec` (stage:step) in this process."""
    stage, step = (int(v) for v in spec.split(":"))

    def on_stage(block: torch.nn.Module) -> None:
        if block.index != stage:
            return
        param = next(p for p in block.parameters() if p.requires_grad)

        def overflow(grad: torch.Tensor) -> torch.Tensor:
            return torch.full_like(grad, math.inf) if block.training and block.steps == step else grad

        param.register_hook(overflow)

    hooks.on_stage_start(on_stage)


def clear() -> None:
    """Remove every installed hook."""
    hooks.clear()


if __name__ == "__main__":
    # the deepspeed launcher puts --local_rank=N first; the rank comes from the environment as well
    argv = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    install(argv[0])
    from ppll_ext.cli import main

    try:
        sys.exit(main(argv[1:]))
    finally:
        clear()  # tests/dist/family.py runs more cases in this process
