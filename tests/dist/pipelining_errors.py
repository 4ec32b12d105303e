"""One process (world size 1): SchedulePPLL's argument checks, each printed as 'ok <case>'."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, schedules

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
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.int64)
    expect("aux missing", "needs an aux head", lambda: SchedulePPLL(first, 2, ce, optimizer=both).step(x, target=y))
    expect("aux on last", "pass aux_head=None",
           lambda: SchedulePPLL(last, 2, ce, aux_head=aux, optimizer=both))
    expect("optimizer misses aux", "does not cover",
           lambda: SchedulePPLL(first, 2, ce, aux_head=aux, optimizer=torch.optim.SGD(mod.parameters(), lr=0.1))
           .step(x, target=y))
    expect("no optimizer", "has no optimizer", lambda: SchedulePPLL(last, 2, ce).step(x, target=y))
    expect("first stage without target", "the first stage needs the targets",
           lambda: SchedulePPLL(last, 2, ce, optimizer=both).step(x))
    expect("list of stages", "one stage per rank", lambda: SchedulePPLL([first, last], 2, ce))
    for case, kwargs, needle in [
        ("no micro-batches", {"n_microbatches": 0}, "n_microbatches=0 must be an integer >= 1"),
        ("negative micro-batches", {"n_microbatches": -2}, "n_microbatches=-2 must be an integer >= 1"),
        ("queue_depth 0", {"n_microbatches": 2, "queue_depth": 0}, "queue_depth=0 must be an integer >= 1"),
        ("timeout_s 0", {"n_microbatches": 2, "timeout_s": 0}, "timeout_s=0 must be a number of seconds > 0"),
    ]:
        expect(case, needle, lambda kw=kwargs: SchedulePPLL(first, loss_fn=ce, aux_head=aux, optimizer=both, **kw))
    expect("arg_mbs length", "has 1 entries but n_microbatches=2",
           lambda: SchedulePPLL(last, 2, ce, optimizer=both).step(arg_mbs=[(x,)], target_mbs=[y]))
    schedule = SchedulePPLL(last, 4, ce)
    schedule.optimizer = both  # attached after construction, as torchtitan builds optimizers
    expect("batch not divisible", "not divisible by n_microbatches",
           lambda: schedule.step(torch.randn(6, 4), target=torch.zeros(6, dtype=torch.int64)))
    losses: list[torch.Tensor] = []
    out = schedule.step(x, target=y, losses=losses)
    assert len(losses) == 4 and schedule.block.steps == 1 and out.shape == (8, 4), (len(losses), out.shape)
    assert schedule.step(arg_mbs=[(xm,) for xm in x.chunk(4)], target_mbs=list(y.chunk(4)),
                         return_outputs=False) is None and schedule.block.steps == 2
    print("ok single-stage step", flush=True)
    expect("optimizer after the first step", "before the first step", lambda: setattr(schedule, "optimizer", both))

    before = {k: v.clone() for k, v in mod.state_dict().items()}
    moments = [v.clone() for st in both.state.values() for v in st.values() if torch.is_tensor(v)]
    eval_losses: list[torch.Tensor] = []
    out = schedule.eval(x, target=y, losses=eval_losses)
    assert out.shape == (8, 4) and len(eval_losses) == 4 and schedule.block.steps == 2
    assert all(torch.equal(before[k], v) for k, v in mod.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(moments, [v for st in both.state.values() for v in st.values()
                                                            if torch.is_tensor(v)], strict=True))
    assert torch.allclose(torch.stack(eval_losses).mean(), ce(mod(x), y))
    print("ok eval changes nothing and returns the output", flush=True)

    assert schedules.get_schedule_class("PPLL") is SchedulePPLL and schedules.get_schedule_class("ppll") is SchedulePPLL
    assert schedules.get_schedule_class("GPipe") is schedules.ScheduleGPipe
    print("ok get_schedule_class", flush=True)

    # targets of any shape: token ids (N, T) with torchtitan's loss form, and soft (float) targets
    lm = nn.Linear(4, 11)
    lm_opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    tokens = SchedulePPLL(PipelineStage(lm, stage_index=0, num_stages=1, device=torch.device("cpu")), 2,
                          lambda pred, labels: F.cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1)),
                          optimizer=lm_opt)
    out = tokens.step(torch.randn(4, 5, 4), target=torch.randint(0, 11, (4, 5)))
    assert out.shape == (4, 5, 11), out.shape
    soft = SchedulePPLL(PipelineStage(lm, stage_index=0, num_stages=1, device=torch.device("cpu")), 2, ce,
                        optimizer=lm_opt)
    assert soft.step(torch.randn(4, 4), target=torch.softmax(torch.randn(4, 11), -1)).shape == (4, 11)
    print("ok token and soft targets", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
