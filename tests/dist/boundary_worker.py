"""Several tensors per stage boundary, pipelined: one launch trains both models of tests/boundary_cases.py.

    torchrun --nproc-per-node K tests/dist/boundary_worker.py OUT K          # processes runtime, then SchedulePPLL
    deepspeed --num_gpus K tests/dist/boundary_worker.py OUT K --deepspeed   # the DeepSpeed adapter

Each rank writes OUT/{engine}-{model}-K{K}-stage{rank}.safetensors: its stage's tensors named as
`boundary_cases.stage_tensors` names them, for the test to compare with sequential local learning.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boundary_cases as cases  # noqa: E402

MODELS = ("llama", "cnn")


def save(out: Path, engine: str, name: str, k: int, tensors: dict[str, torch.Tensor]) -> None:
    save_file({n: t.contiguous() for n, t in tensors.items()},
              str(out / f"{engine}-{name}-K{k}-stage{dist.get_rank()}.safetensors"))


def processes(out: Path, name: str, k: int) -> None:
    """The native processes runtime: rank 0 feeds the mini-batches, every rank trains its stage."""
    from ppll_ext.runtime import ProcessRunner

    block = cases.blocks(name, k, stages=[dist.get_rank()])[0]
    runner = ProcessRunner(block, micro_batches=cases.MICRO)
    runner.train_segment(cases.build(name).batches if dist.get_rank() == 0 else None)
    runner.close()
    save(out, "processes", name, k, cases.stage_tensors(name, k, block))


def schedule(out: Path, name: str, k: int) -> None:
    """SchedulePPLL over a PipelineStage of each rank's layers; the first stage's inputs are spread as step()'s."""
    from torch.distributed.pipelining import PipelineStage

    from ppll_ext.pipelining import SchedulePPLL

    rank = dist.get_rank()
    block = cases.blocks(name, k, stages=[rank])[0]
    stage = PipelineStage(block.body, rank, k, torch.device("cpu"))
    sched = SchedulePPLL(stage, n_microbatches=cases.MICRO, loss_fn=block.loss_fn, aux_head=block.aux,
                         optimizer=block.optimizer)
    for x, y in cases.build(name).batches:
        if rank == 0:
            sched.step(*(x if isinstance(x, tuple) else (x,)), target=y)
        else:
            sched.step()
    sched.close()
    save(out, "schedule", name, k, cases.stage_tensors(name, k, block))


def deepspeed_adapter(out: Path, name: str, k: int) -> None:
    """LocalPipelineModule + LocalPipelineEngine: DeepSpeed's layers take one tuple / dict, as DeepSpeed passes it."""
    from ppll_ext.deepspeed import LocalPipelineModule, initialize

    case, cut = cases.build(name), cases.CUTS[name][k]
    net = LocalPipelineModule(case.layers, num_stages=k, loss_fn=case.loss, aux_heads=cases.aux_heads(name, k),
                              partition_method=",".join(str(c) for c in cut[:-1]))
    params = [p for p in net.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": cases.SIZE, "gradient_accumulation_steps": cases.MICRO,
              "gradient_clipping": 0.0, "steps_per_print": 1000, "zero_optimization": {"stage": 0}}
    engine, *_ = initialize(model=net, optimizer=torch.optim.SGD(params, lr=cases.LR, momentum=0.9),
                            config=config)
    for x, y in case.batches:
        tensors = list(x) if isinstance(x, tuple) else [x]
        parts = [t.tensor_split(cases.MICRO) for t in tensors]
        micro = [((tuple(p[i] for p in parts) if isinstance(x, tuple) else parts[0][i]), ym)
                 for i, ym in enumerate(y.tensor_split(cases.MICRO))]
        engine.train_batch(iter(micro) if engine.stage_id == 0 else None)
    engine.close()
    block = engine.block
    start = cut[engine.stage_id]
    tensors = {}
    for key, v in engine.module.state_dict().items():
        head, rest = key.split(".", 1)
        tensors[f"aux.{rest}" if head == "aux_head" else f"{int(head)}.{rest}"] = v.detach().clone()
    assert all(int(n.split(".")[0]) >= start for n in tensors if not n.startswith("aux.")), block.index
    save(out, "deepspeed", name, k, tensors)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]  # the deepspeed launcher adds --local_rank=N
    out, k = Path(args[0]), int(args[1])
    torch.set_num_threads(1)
    if "--deepspeed" in sys.argv:
        import deepspeed

        from ppll_ext.deepspeed import release_shm_buffer

        deepspeed.init_distributed()
        release_shm_buffer()
        for name in MODELS:
            deepspeed_adapter(out, name, k)
    else:
        dist.init_process_group("gloo")
        for name in MODELS:
            processes(out, name, k)
            schedule(out, name, k)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
