"""Run under `torchrun --nproc_per_node K`: local learning on batches whose sequence length changes from step to
step, one stage per rank, over the processes runtime or SchedulePPLL.

    torchrun --nproc_per_node 2 tests/dist/varlen_torchrun.py --mode runtime --model gpt2 --micro 2 --out OUT
    torchrun --nproc_per_node 2 tests/dist/varlen_torchrun.py --mode schedule --model llama --out OUT

runtime: ProcessRunner trains on varlen_cases.batches() (lengths 32, 48, 17, ...) and evaluates on batches of
other lengths (rank 0 writes the result to OUT/eval.json). schedule: SchedulePPLL (2 micro-batches) trains on the
same whole batches (`step(x, target=y)`), then on steps given as micro-batches of different lengths
(`step(arg_mbs=..., target_mbs=...)`, the last stage passing target_mbs too and checking the outputs it gets
back: merged, or one per micro-batch where their lengths differ). Each rank writes its block's trained
tensors to OUT/stage<k>.safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.pipelining import PipelineStage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from varlen_cases import batches, build, eval_batches, micro_steps, weights  # noqa: E402

from ppll_ext.pipelining import SchedulePPLL  # noqa: E402
from ppll_ext.runtime import ProcessRunner  # noqa: E402


def run_runtime(block: torch.nn.Module, micro: int, rank: int, out: Path) -> None:
    """Train and evaluate through the processes runtime (rank 0 feeds the batches)."""
    runner = ProcessRunner(block, micro_batches=micro, timeout_s=120)
    runner.train_segment(batches() if rank == 0 else None)
    result = runner.evaluate(eval_batches() if rank == 0 else None)
    runner.close()
    if rank == 0:
        (out / "eval.json").write_text(json.dumps({"loss": result.loss, "aux_loss": result.aux_loss}))


def run_schedule(block: torch.nn.Module, rank: int, world: int) -> None:
    """Train through SchedulePPLL: whole batches, then steps of micro-batches with different lengths."""
    stage = PipelineStage(block.body, stage_index=rank, num_stages=world, device=torch.device("cpu"))
    schedule = SchedulePPLL(stage, n_microbatches=2, loss_fn=block.loss_fn, aux_head=block.aux,
                            optimizer=block.optimizer, lr_scheduler=block.lr_scheduler, timeout_s=120)
    for x, y in batches():
        if rank == 0:
            schedule.step(x, target=y)
        elif rank == world - 1:
            out = schedule.step(target=y)
            assert out.shape[:2] == y.shape, (out.shape, y.shape)  # the micro-batch outputs merged
        else:
            schedule.step()
    for micro in micro_steps():
        if rank == 0:
            schedule.step(arg_mbs=[(x,) for x, _ in micro], target_mbs=[y for _, y in micro])
        elif rank == world - 1:
            out = schedule.step(target_mbs=[y for _, y in micro])
            want = [y.shape for _, y in micro]
            if len(set(want)) > 1:  # lengths differ: one output per micro-batch
                assert [o.shape[:2] for o in out] == want, ([o.shape for o in out], want)
            else:
                assert out.shape[:2] == (sum(s[0] for s in want), want[0][1]), (out.shape, want)
        else:
            schedule.step()
    schedule.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("runtime", "schedule"), required=True)
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    block = build(args.model, world, args.micro)[rank]
    if args.mode == "runtime":
        run_runtime(block, args.micro, rank, out)
    else:
        run_schedule(block, rank, world)
    save_file(weights(block), str(out / f"stage{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
