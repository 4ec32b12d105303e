"""One process (world size 1): SchedulePPLL's argument checks, each printed as 'ok <case>'."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from ppll_ext.errors import ConfigError
from ppll_ext.pipelining import SchedulePPLL


def expect(case: str, needle: str, fn) -> None:
    try:
        fn()
    except ConfigError as exc:
        assert needle in str(exc), (case, str(exc))
        print(f"ok {case}: {exc}", flush=True)
        return
    raise AssertionError(f"{case}: no ConfigError")


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    mod, aux = nn.Linear(4, 4), nn.Linear(4, 3)
    first = PipelineStage(mod, stage_index=0, num_stages=2, device=torch.device("cpu"))
    last = PipelineStage(mod, stage_index=0, num_stages=1, device=torch.device("cpu"))
    ce = nn.CrossEntropyLoss()
    both = torch.optim.SGD(list(mod.parameters()) + list(aux.parameters()), lr=0.1)
    expect("aux missing", "needs an aux_head",
           lambda: SchedulePPLL(first, 2, ce, aux_head=None, optimizer=both))
    expect("aux on last", "pass aux_head=None",
           lambda: SchedulePPLL(last, 2, ce, aux_head=aux, optimizer=both))
    expect("optimizer misses aux", "does not cover",
           lambda: SchedulePPLL(first, 2, ce, aux_head=aux, optimizer=torch.optim.SGD(mod.parameters(), lr=0.1)))
    schedule = SchedulePPLL(last, 4, ce, optimizer=both)
    expect("batch not divisible", "not divisible by n_microbatches",
           lambda: schedule.step(torch.randn(6, 4), target=torch.zeros(6, dtype=torch.int64)))
    losses: list[torch.Tensor] = []
    schedule.step(torch.randn(8, 4), target=torch.zeros(8, dtype=torch.int64), losses=losses)
    assert len(losses) == 4 and schedule.block.steps == 1
    print("ok single-stage step", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
