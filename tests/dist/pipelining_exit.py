"""A SchedulePPLL script that ends right after its last step(), with a fast first stage and a slow last one.

    torchrun --nproc_per_node 3 tests/dist/pipelining_exit.py --steps 6 --end return|destroy|uneven

`--end return` just returns (no close, no destroy_process_group); `--end destroy` calls
`dist.destroy_process_group()` as torch's tutorials do. The first stage is far ahead of the last when it ends; every
rank must still exit 0 with every step trained. Each rank prints "rank R trained N steps" as its last line.

`--end uneven`: the last rank makes one step() call fewer than the others, then every rank calls close() and prints
"rank R close: <error>"; then, on new schedules, the last rank makes one step() call more, which raises there, and
the others end their script as they would have: rank 0 returns (the exit hook closes), the middle ranks call
destroy_process_group(). Every rank must end non-zero with one error line.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from ppll_ext.errors import PipelineError
from ppll_ext.pipelining import SchedulePPLL


class Slow(nn.Module):
    """A linear layer whose forward also sleeps: the last stage lags far behind the first."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.lin = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.lin(x)


def build(rank: int, world: int) -> SchedulePPLL:
    """This rank's stage of the pipeline (the last one slow) and its schedule."""
    torch.manual_seed(rank)
    last = rank == world - 1
    stage_mod = Slow(0.05) if last else nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    aux = None if last else nn.Linear(32, 10)
    params = list(stage_mod.parameters()) + (list(aux.parameters()) if aux is not None else [])
    stage = PipelineStage(stage_mod, stage_index=rank, num_stages=world, device=torch.device("cpu"))
    return SchedulePPLL(stage, n_microbatches=2, loss_fn=nn.functional.cross_entropy, aux_head=aux,
                        optimizer=torch.optim.SGD(params, lr=0.1), timeout_s=60)


def train(schedule: SchedulePPLL, rank: int, world: int, steps: int) -> None:
    """`steps` step() calls on the same data on every rank."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        if rank == 0:
            schedule.step(x, target=y)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--end", choices=("return", "destroy", "uneven"), default="return")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    last = rank == world - 1
    schedule = build(rank, world)
    if args.end == "uneven":
        train(schedule, rank, world, args.steps - last)
        try:
            schedule.close()
            print(f"rank {rank} close: no error", flush=True)
        except PipelineError as exc:
            print(f"rank {rank} close: {exc}", flush=True)
        schedule = build(rank, world)
        train(schedule, rank, world, args.steps + last)  # raises on the last rank
    else:
        train(schedule, rank, world, args.steps)
    print(f"rank {rank} trained {schedule.block.steps} steps", flush=True)
    if args.end == "destroy" or (args.end == "uneven" and rank > 0):
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
