"""A SchedulePPLL script that ends right after its last step(), with a fast first stage and a slow last one.

    torchrun --nproc_per_node 3 tests/dist/pipelining_exit.py --steps 6 --end return|destroy

`--end return` just returns (no close, no destroy_process_group); `--end destroy` calls
`dist.destroy_process_group()` as torch's tutorials do. The first stage is far ahead of the last when it ends; every
rank must still exit 0 with every step trained. Each rank prints "rank R trained N steps" as its last line.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--end", choices=("return", "destroy"), default="return")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    last = rank == world - 1
    stage_mod = Slow(0.05) if last else nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    aux = None if last else nn.Linear(32, 10)
    params = list(stage_mod.parameters()) + (list(aux.parameters()) if aux is not None else [])
    stage = PipelineStage(stage_mod, stage_index=rank, num_stages=world, device=torch.device("cpu"))
    schedule = SchedulePPLL(stage, n_microbatches=2, loss_fn=nn.functional.cross_entropy, aux_head=aux,
                            optimizer=torch.optim.SGD(params, lr=0.1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        x, y = torch.randn(8, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        if rank == 0:
            schedule.step(x, target=y)
        elif last:
            schedule.step(target=y)
        else:
            schedule.step()
    print(f"rank {rank} trained {schedule.block.steps} steps", flush=True)
    if args.end == "destroy":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
