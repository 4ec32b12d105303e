"""Deliberate failures for tests, installed through ppll_ext.hooks (library code reads no fault settings).

In a test's own process: `faults.install("1:4:nan")` (and `faults.clear()` afterwards). In processes a
launcher starts: run this file instead of `-m ppll_ext.train`, e.g.
`torchrun --nproc_per_node 2 tests/faults.py 1:5:raise train --set ...`; it installs the fault, runs the
`ppll` command line with the remaining arguments, then removes the fault.

SPEC = stage:step:kind with kind raise | kill | nan (while the stage trains step `step`: raise an error, SIGKILL
its own process, or make its local loss NaN), kill-in-save (SIGKILL while the stage writes the checkpoint of
step `step`, after its model shard and before its training state) or full-in-save (at that moment, fill the file
system the checkpoint is written to, as another program would: the stage's next write finds the disk full).
"""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
from pathlib import Path

import torch

from ppll_ext import hooks

KINDS = ("raise", "kill", "nan", "kill-in-save", "full-in-save")


class FaultyLoss(torch.nn.Module):
    """A block's own loss function, with the fault at step `step` of that block."""

    def __init__(self, block: torch.nn.Module, step: int, kind: str) -> None:
        super().__init__()
        self.inner = block.loss_fn
        self.kind = kind
        self.step = step
        self.due = lambda: block.training and block.steps == step  # a closure: the block is no child of its loss

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.inner(out, y)
        if not self.due():
            return loss
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "raise":
            raise RuntimeError(f"fault injected at step {self.step}")
        return loss * math.nan


def install(spec: str) -> None:
    """Install the fault `spec` (stage:step:kind) in this process."""
    stage_text, step_text, kind = spec.split(":")
    stage, step = int(stage_text), int(step_text)
    if kind not in KINDS:
        raise ValueError(f"fault {spec!r}: the kind must be one of {', '.join(KINDS)}")
    if kind in ("kill-in-save", "full-in-save"):
        def on_shard(folder: Path, index: int) -> None:
            if index == stage and folder.name == f"step-{step:06d}.tmp":
                if kind == "full-in-save":
                    fill(folder.parent)
                else:
                    os.kill(os.getpid(), signal.SIGKILL)

        hooks.on_shard_written(on_shard)
        return

    def on_stage(block: torch.nn.Module) -> None:
        if block.index == stage:
            block.loss_fn = FaultyLoss(block, step, kind)

    hooks.on_stage_start(on_stage)


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to its last byte with one new file there (returned)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        for block in (1 << 16, 1):  # big blocks, then the last bytes
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def clear() -> None:
    """Remove every installed fault."""
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
