"""PPLL through ppll_ext's DeepSpeed adapter against stock DeepSpeed pipeline parallelism (PipelineModule +
TrainSchedule, i.e. 1F1B) on the same layers, cut, micro-batches, batch and optimizer.

Both run under the real `deepspeed` launcher, 2 processes x 1 torch thread, gloo on CPU, with the same ds_config
(ppll_ext.bench.worker.DS_CONFIG: the hyper-parameters of configs/deepspeed/ppll.json and stock_1f1b.json; the batch
size and gradient_accumulation_steps = micro-batches are set per run). Methods are interleaved and the median of
the repeats is reported with the ratio. The runs are ppll_ext.bench's workers
(`deepspeed --module ppll_ext.bench.worker --method ds-ppll|ds-1f1b`).

    python benchmarks/deepspeed_bench.py            # ResNet-32 and ViT, 3 repeats
    python benchmarks/deepspeed_bench.py --quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ppll_ext.bench.driver import Work, machine, measure, ratio_rows, write_results
from ppll_ext.bench.models import MODELS, profiled_partition

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("ds-1f1b", "ds-ppll")


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
    p.add_argument("--out", default="deepspeed", help="file stem of the results under benchmarks/results/")
    a = p.parse_args()
    if a.quick:
        a.steps, a.warmup, a.repeats = 6, 2, 1
    runs: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in METHODS} for m in a.models}
    for model in a.models:
        partition = profiled_partition(model, 2, a.batch_size // a.microbatches)
        print(f"{model}: stages start at layers {partition} (profiled)", flush=True)
        work = Work(model, 2, a.batch_size, partition, a.microbatches, a.warmup, a.steps)
        for rep in range(a.repeats):
            for method in METHODS:
                r = measure(method, work)
                runs[model][method].append(r)
                print(f"  repeat {rep + 1}/{a.repeats} {method:8s} {r['samples_per_s']:7.1f} samples/s", flush=True)
    rows = ratio_rows(runs, ["ds-1f1b"])
    note = (f"2 processes x 1 thread under the deepspeed launcher (gloo), batch {a.batch_size}, "
            f"{a.microbatches} micro-batches (gradient_accumulation_steps), {a.steps} timed train_batch calls "
            f"after {a.warmup} warm-up, median of {a.repeats} interleaved repeats; the same layers and cut for "
            f"both; AdamW (torch), clipping 1.0 (stock: global norm over stages; PPLL: per stage).")
    print(write_results(RESULTS / a.out, "PPLL (DeepSpeed adapter) vs stock DeepSpeed 1F1B", note, rows,
                        ["ds-1f1b"], machine()))


if __name__ == "__main__":
    main()
