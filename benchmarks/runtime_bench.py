"""Throughput of the PPLL runtimes against sequential local learning and backprop, side by side.

Every method trains the same model on the same CIFAR-10-shaped batches (synthetic pixels: this
measures speed, not accuracy; random byte-level token ids for the GPT-2) in a fresh process with
one torch thread per process; methods are interleaved (A B C D, A B C D, ...) so machine drift
hits all of them alike, and the median of the repeats is reported with ratios. "2x-sequential"
runs two independent copies of sequential LL at once and adds their throughputs: the most two
processes can do on this machine with no dependency between them, i.e. the ceiling of a 2-stage
pipeline here. The runs are ppll_ext.bench's workers (`python -m ppll_ext.bench.worker`).

    python benchmarks/runtime_bench.py                    # ResNet-32 and ViT, K=2, 3 repeats
    python benchmarks/runtime_bench.py --quick            # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ppll_ext.bench.driver import Work, machine, measure, ratio_rows, write_results
from ppll_ext.bench.models import MODELS, describe_plan, profiled_plan

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("bp", "sequential", "threads", "processes", "2x-sequential")


def main() -> None:
    """Run the comparison and write results/<out>.{json,md}."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not for the record)")
    p.add_argument("--out", default="runtime", help="file stem of the results under benchmarks/results/")
    a = p.parse_args()
    if a.quick:
        a.steps, a.warmup, a.repeats = 6, 2, 3
    runs: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in METHODS} for m in a.models}
    for model in a.models:
        plan = profiled_plan(model, a.stages, a.batch_size)
        print(f"{model}: {describe_plan(plan)}", flush=True)
        work = Work(model, a.stages, a.batch_size, plan.starts, 1, a.warmup, a.steps)
        for rep in range(a.repeats):
            for method in METHODS:
                r = measure(method, work)
                runs[model][method].append(r)
                print(f"{model:9s} rep {rep + 1}/{a.repeats} {method:10s} {r['samples_per_s']:8.1f} samples/s",
                      flush=True)
    meta = {**machine(), "stages": a.stages, "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup,
            "repeats": a.repeats}
    note = (f"bp / sequential / threads: 1 process; processes: {a.stages} processes (torchrun, gloo); 1 torch thread "
            f"per process. K = {a.stages}, batch {a.batch_size}, {a.steps} timed steps after {a.warmup} warm-up, "
            f"{a.repeats} interleaved repeats, median. Data: synthetic CIFAR-10-shaped batches.")
    baselines = ["sequential", "bp"]
    print(write_results(RESULTS / a.out, "PPLL runtime throughput", note, ratio_rows(runs, baselines), baselines,
                        meta))


if __name__ == "__main__":
    main()
