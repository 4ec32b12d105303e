"""A 3-stage ppll_ext.deepspeed pipeline on the digits that trains until it is killed (reliability tests).

    deepspeed --num_gpus 3 tests/dist/reliability_deepspeed.py

Rank 0 prints `training` once the pipeline has trained a few steps. A stage whose training fails prints one
`ppll: error: stage S (rank R) failed: ...` line on stderr and exits with status 1 at once, as `ppll train` does.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed_train import digits
from torch import nn

from ppll_ext.deepspeed import LocalPipelineModule, initialize

CONFIG = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "steps_per_print": 10**9,
}


def layers() -> list[nn.Module]:
    """A tiny CNN for 8x8 digits as a layer list (same weights on every rank)."""
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(8 * 64, 10)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="timeout_s of the links")
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    rank = dist.get_rank()
    x, y = digits()
    net = LocalPipelineModule(layers(), num_stages=dist.get_world_size(), loss_fn=nn.CrossEntropyLoss(),
                              aux_heads="conv", example_input=x[:2], aux_hidden=16, partition_method="uniform")
    engine, *_ = initialize(model=net, config=CONFIG, model_parameters=[p for p in net.parameters()],
                            timeout_s=args.timeout)
    stage = engine.stage_id
    try:
        for step in itertools.count():
            at = (step * 32) % (len(x) - 32)
            data = iter([(x[at + i:at + i + 16], y[at + i:at + i + 16]) for i in (0, 16)])
            engine.train_batch(data if stage == 0 else None)
            if step == 3 and rank == 0:
                print("training", flush=True)
    except Exception as exc:  # any failure: say which stage failed and why, then leave without teardown
        print(f"ppll: error: stage {stage} (rank {rank}) failed: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        os._exit(1)


if __name__ == "__main__":
    main()
