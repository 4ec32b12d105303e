"""The one stage protocol seen through its three adapters: ranks that make different numbers of calls.

    torchrun --nproc-per-node 2 tests/dist/protocol_worker.py OUT

Runs, in turn, the native processes runtime (`ProcessRunner`), `SchedulePPLL` and DeepSpeed's `LocalPipelineEngine`
with rank 1 making one call more than rank 0 (and, for the two with no report exchange at markers, one fewer), each
on fresh links, and writes OUT/rank{R}.json: {"<adapter> <case>": the error message this rank raised, or null}.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ppll_ext.core import LocalBlock

STEPS, MICRO, SIZE = 2, 2, 4


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(MICRO * SIZE, 6, generator=gen), torch.randint(0, 3, (MICRO * SIZE,), generator=gen))
            for _ in range(STEPS + 1)]


def layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(6, 6), nn.Linear(6, 3)]


def block(rank: int) -> LocalBlock:
    body, aux = layers()[rank], (nn.Linear(6, 3) if rank == 0 else None)
    params = [*body.parameters(), *(aux.parameters() if aux is not None else [])]
    return LocalBlock(body, aux, nn.functional.cross_entropy, index=rank, optimizer=torch.optim.SGD(params, lr=0.1))


def caught(run: Callable[[], None]) -> str | None:
    """The error `run` raised (its message), None if it returned."""
    try:
        run()
    except Exception as exc:  # every adapter raises PipelineError; the test checks the text
        return str(exc)
    return None


def native(rank: int, calls: int) -> None:
    """ProcessRunner: rank 0 makes STEPS train_segment calls of one batch each, rank 1 `calls`."""
    from ppll_ext.runtime import ProcessRunner

    runner = ProcessRunner(block(rank), micro_batches=MICRO)
    try:
        for batch in data()[:STEPS if rank == 0 else calls]:
            runner.train_segment([batch] if rank == 0 else None)
    finally:
        runner.close()


def schedule(rank: int, calls: int) -> None:
    """SchedulePPLL on a fresh group: rank 0 makes STEPS step() calls, rank 1 `calls`."""
    from torch.distributed.pipelining import PipelineStage

    from ppll_ext.pipelining import SchedulePPLL

    b = block(rank)
    stage = PipelineStage(b.body, rank, 2, torch.device("cpu"), group=dist.new_group([0, 1]))
    sched = SchedulePPLL(stage, n_microbatches=MICRO, loss_fn=b.loss_fn, aux_head=b.aux, optimizer=b.optimizer)
    try:
        for x, y in data()[:STEPS if rank == 0 else calls]:
            sched.step(x, target=y) if rank == 0 else sched.step()
    finally:
        sched.close()


def deepspeed_adapter(rank: int, calls: int) -> None:
    """LocalPipelineEngine: rank 0 makes STEPS train_batch calls, rank 1 `calls`."""
    from ppll_ext.deepspeed import LocalPipelineModule, initialize

    torch.manual_seed(1)
    net = LocalPipelineModule(layers(), num_stages=2, loss_fn=nn.functional.cross_entropy,
                              aux_heads=[nn.Linear(6, 3)], partition_method="0,1")
    config = {"train_micro_batch_size_per_gpu": SIZE, "gradient_accumulation_steps": MICRO, "steps_per_print": 1000}
    params = [p for p in net.parameters() if p.requires_grad]
    engine, *_ = initialize(model=net, optimizer=torch.optim.SGD(params, lr=0.1), config=config)
    try:
        for x, y in data()[:STEPS if rank == 0 else calls]:
            engine.train_batch(iter(zip(x.tensor_split(MICRO), y.tensor_split(MICRO), strict=True))
                               if rank == 0 else None)
    finally:
        engine.close()


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    import deepspeed

    from ppll_ext.deepspeed import release_shm_buffer

    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_buffer()
    rank = dist.get_rank()
    cases: dict[str, Callable[[int, int], None]] = {"native": native, "schedule": schedule,
                                                    "deepspeed": deepspeed_adapter}
    errors = {}
    for name, run in cases.items():
        errors[f"{name} more"] = caught(lambda run=run: run(rank, STEPS + 1))
        if name != "native":  # its ranks exchange reports at every marker: a rank with fewer calls stalls that
            errors[f"{name} fewer"] = caught(lambda run=run: run(rank, STEPS - 1))
    from ppll_ext.config import load_config
    from ppll_ext.train import run_training

    # A library call raises on its rank, also inside a multi-process run (only `ppll train` ends the process).
    cfg = load_config(None, ["local.runtime=processes", f"train.resume={out / 'no-such-run'}"])
    errors["run_training"] = caught(lambda: run_training(cfg))
    (out / f"rank{rank}.json").write_text(json.dumps(errors))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
