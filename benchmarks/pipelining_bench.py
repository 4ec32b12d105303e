"""SchedulePPLL against torch's ScheduleGPipe and Schedule1F1B on the same stages, micro-batches and batch.

Two processes (torchrun, gloo) x one torch thread; the model's layer list is cut once by measured
time (the same cut for every schedule); methods are interleaved and the median of the repeats is
reported. Stock schedules step every stage's optimizer after each `step()` (a flush per step);
SchedulePPLL steps each stage on its own and streams. The runs are ppll_ext.bench's workers
(`torchrun -m ppll_ext.bench.worker --method gpipe|1f1b|ppll-torch`).

    python benchmarks/pipelining_bench.py             # ResNet-32 and ViT, 3 repeats
    python benchmarks/pipelining_bench.py --quick
    python benchmarks/pipelining_bench.py --device cuda     # one GPU per process, NCCL (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ppll_ext.bench.driver import Work, machine, measure, ratio_rows, write_results
from ppll_ext.bench.models import MODELS, profiled_partition

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {"gpipe": "gpipe", "1f1b": "1f1b", "ppll": "ppll-torch"}
"""The results' method names and the workers'."""


def main() -> None:
    """Run the comparison and write results/<out>.{json,md}."""
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
    a = p.parse_args()
    if a.quick:
        a.steps, a.warmup = 6, 2
    if a.device == "cuda" and torch.cuda.device_count() < 2:
        p.error(f"--device cuda needs 2 CUDA GPUs (one per stage; NCCL refuses two ranks on one GPU), this machine "
                f"has {torch.cuda.device_count()}; run without --device for the CPU comparison")
    runs: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in METHODS} for m in a.models}
    for model in a.models:
        partition = profiled_partition(model, 2, a.batch_size // a.microbatches)
        print(f"{model}: stages start at layers {partition} (profiled)", flush=True)
        work = Work(model, 2, a.batch_size, partition, a.microbatches, a.warmup, a.steps)
        for rep in range(a.repeats):
            for method, worker_method in METHODS.items():
                r = measure(worker_method, work, device=a.device)
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
    print(write_results(RESULTS / a.out, "SchedulePPLL vs torch pipelining schedules", note,
                        ratio_rows(runs, baselines), baselines, meta))


if __name__ == "__main__":
    main()
