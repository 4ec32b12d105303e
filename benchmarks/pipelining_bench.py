"""SchedulePPLL against torch's ScheduleGPipe and Schedule1F1B on the same stages, micro-batches and batch.

Two processes (torchrun, gloo) x one torch thread; the model's layer list is cut once by measured
time (the same cut for every schedule); methods are interleaved and the median of the repeats is
reported. Stock schedules step every stage's optimizer after each `step()` (a flush per step);
SchedulePPLL steps each stage on its own and streams.

    python benchmarks/pipelining_bench.py             # ResNet-32 and ViT, 3 repeats
    python benchmarks/pipelining_bench.py --quick
    python benchmarks/pipelining_bench.py --device cuda     # one GPU per process, NCCL (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import machine, ratio_rows, run_json, torchrun_cmd, write_results
from memprobe import StageProbe, rows, tensors_in, watch_links
from probe import TorchStageProbe, gather, peak_rss_mb
from runtime_bench import ALL_MODELS, MODELS, bench_config, model_shape, profiled_partition, synthetic_batches
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ppll_ext import trace
from ppll_ext.build import build_layered, make_optimizer
from ppll_ext.core import build_aux_head, make_loss
from ppll_ext.pipelining import SchedulePPLL
from ppll_ext.runtime import shutdown

METHODS = ("gpipe", "1f1b", "ppll")


class Contiguous(nn.Module):
    """gloo sends only contiguous tensors; torchvision's ViT blocks return a transposed view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def worker(model: str, method: str, batch: int, micro: int, warmup: int, steps: int, partition: str,
           trace_path: str | None = None, memory: bool = False, device_kind: str = "cpu") -> dict | None:
    """This rank's stage of `model` trained with `method`; rank 0 returns the timing (and writes the trace), and
    with `memory` every stage's StageMemory (memprobe). On `device_kind` "cuda" each rank drives
    cuda:LOCAL_RANK over NCCL and also reports its peak CUDA bytes."""
    if device_kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    with shutdown.closing_group():  # links closed, barrier, group destroyed, also on errors
        if trace_path:
            trace.start()
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        cfg = bench_config(model, "processes", world, batch, partition)
        shape = model_shape(model)
        layered = build_layered(cfg, **shape)
        bounds = [int(b) for b in partition.split(",")] + [len(layered.layers)]
        stage_mod = nn.Sequential(layered.sequential(bounds[rank], bounds[rank + 1]), Contiguous()).to(device)
        stage = PipelineStage(stage_mod, stage_index=rank, num_stages=world, device=device)
        loss_fn = make_loss(cfg.task)
        if method == "ppll":
            aux = None
            if rank < world - 1:
                with torch.no_grad():
                    example = synthetic_batches(1, 2, seed=1, model=model)[0][0]
                    h = layered.sequential(0, bounds[rank + 1]).eval()(example)
                aux = build_aux_head(cfg.local.aux, h, shape["num_classes"], hidden=cfg.local.aux_hidden).to(device)
            params = list(stage_mod.parameters()) + (list(aux.parameters()) if aux is not None else [])
            optimizer = make_optimizer(cfg.optim, params)
            schedule = SchedulePPLL(stage, n_microbatches=micro, loss_fn=loss_fn, aux_head=aux, optimizer=optimizer)
        else:
            optimizer = make_optimizer(cfg.optim, stage_mod.parameters())
            cls = ScheduleGPipe if method == "gpipe" else Schedule1F1B
            schedule = cls(stage, n_microbatches=micro, loss_fn=loss_fn)
            probe = TorchStageProbe(stage, rank)
        mem = None
        if memory:
            mem = _memory_probe(method, stage, schedule, optimizer)

        def busy_s() -> float:
            return schedule._worker.stats.busy_s if method == "ppll" else probe.busy_s

        def on_device(data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(x.to(device), y.to(device)) for x, y in data]

        def run(data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
            dist.barrier()
            start = time.perf_counter()
            for x, y in data:
                if rank == 0:
                    schedule.step(x, target=y)
                elif rank == world - 1:
                    schedule.step(target=y)
                else:
                    schedule.step()
                if method != "ppll":
                    started = time.perf_counter()
                    optimizer.step()
                    optimizer.zero_grad()
                    probe.record("step", started)
            if method == "ppll":
                schedule.flush()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            return time.perf_counter() - start

        with mem.meter if mem is not None else contextlib.nullcontext():  # a process per stage: all its saves
            run(on_device(synthetic_batches(warmup, batch, seed=2, model=model)))
            if mem is not None:
                mem.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            busy_before = busy_s()
            seconds = run(on_device(synthetic_batches(steps, batch, seed=3, model=model)))
        cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        per_rank = gather(((busy_s() - busy_before) / seconds, peak_rss_mb(), mem.result() if mem else None, cuda_peak))
        if trace_path:
            trace.finish(trace_path, dist.group.WORLD, f"{model}: torch {method}, K={world}, M={micro}")
        if rank != 0:
            return None
        out = {"samples_per_s": steps * batch / seconds, "seconds": seconds, "boundaries": bounds,
               "busy_fraction": [b for b, _, _, _ in per_rank], "peak_rss_mb": [m for _, m, _, _ in per_rank]}
        if device.type == "cuda":
            out["cuda_peak_mib"] = [c for _, _, _, c in per_rank]
        if memory:
            out["memory"] = rows(m for _, _, m, _ in per_rank)
        return out


def _memory_probe(method: str, stage: PipelineStage, schedule: Any, optimizer: torch.optim.Optimizer
                  ) -> StageProbe:
    """This stage's memory probe. SchedulePPLL: its block (stage module + aux head), its links' in-flight and
    posted buffers. GPipe / 1F1B: the stage module; buffers = the stage's receive buffers (activations and
    gradients, allocated for every micro-batch), its forward cache (outputs and inputs kept for backward) and
    its last-stage output chunks, sampled after every forward and backward chunk."""
    if method == "ppll":
        mem = StageProbe(schedule.block, optimizer)
        watch_links(mem, schedule._stream.sender, schedule._stream.receiver)
        schedule.block.train_step = mem.after(schedule.block.train_step)
        schedule._worker._train_step = schedule.block.train_step
        return mem
    mem = StageProbe(stage.submod, optimizer)
    mem.add_buffers(lambda: tensors_in([stage.args_recv_info, stage.grad_recv_info, stage.fwd_cache,
                                        stage.output_chunks]))
    stage.forward_one_chunk = mem.after(stage.forward_one_chunk)
    stage.backward_one_chunk = mem.after(stage.backward_one_chunk)
    return mem


def main() -> None:
    """Parse arguments; as a worker print one JSON line, otherwise run the comparison and write results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not for the record)")
    p.add_argument("--out", default="pipelining", help="file stem of the results under benchmarks/results/")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one GPU per process over NCCL (needs 2 GPUs); the split is still profiled on the CPU")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(ALL_MODELS), help=argparse.SUPPRESS)
    p.add_argument("--partition", help=argparse.SUPPRESS)
    p.add_argument("--trace", help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        result = worker(a.model, a.worker, a.batch_size, a.microbatches, a.warmup, a.steps, a.partition, a.trace,
                        a.memory, a.device)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    if a.quick:
        a.steps, a.warmup = 6, 2
    if a.device == "cuda" and torch.cuda.device_count() < 2:
        p.error(f"--device cuda needs 2 CUDA GPUs (one per stage; NCCL refuses two ranks on one GPU), this machine "
                f"has {torch.cuda.device_count()}; run without --device for the CPU comparison")
    script = str(Path(__file__).resolve())
    runs: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in METHODS} for m in a.models}
    for model in a.models:
        partition = profiled_partition(model, 2, a.batch_size // a.microbatches)
        print(f"{model}: stages start at layers {partition} (profiled)", flush=True)
        for rep in range(a.repeats):
            for method in METHODS:
                args = ["--worker", method, "--model", model, "--batch-size", str(a.batch_size), "--microbatches",
                        str(a.microbatches), "--warmup", str(a.warmup), "--steps", str(a.steps), "--partition",
                        partition, "--device", a.device]
                r = run_json(torchrun_cmd(2, script, *args), what=f"{model}/{method}")[0]
                runs[model][method].append(r)
                print(f"{model:9s} rep {rep + 1}/{a.repeats} {method:6s} {r['samples_per_s']:8.1f} samples/s",
                      flush=True)
    meta = {**machine(), "device": a.device, "batch_size": a.batch_size, "microbatches": a.microbatches,
            "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats}
    transport = "NCCL) x 1 GPU each" if a.device == "cuda" else "gloo) x 1 torch thread"
    note = (f"2 processes (torchrun, {transport}, the same 2 stages for every schedule; batch "
            f"{a.batch_size}, {a.microbatches} micro-batches, {a.steps} timed steps after {a.warmup} warm-up, "
            f"{a.repeats} interleaved repeats, median. Data: synthetic CIFAR-10-shaped batches.")
    baselines = ["gpipe", "1f1b"]
    write_results(a.out, "SchedulePPLL vs torch pipelining schedules", note, ratio_rows(runs, baselines), baselines,
                  meta)


if __name__ == "__main__":
    main()
