"""Throughput of the PPLL runtimes against sequential local learning and backprop, side by side.

Every method trains the same model on the same CIFAR-10-shaped batches (synthetic pixels: this
measures speed, not accuracy) in a fresh process with one torch thread per process; methods are
interleaved (A B C D, A B C D, ...) so machine drift hits all of them alike, and the median of
the repeats is reported with ratios.

    python benchmarks/runtime_bench.py                    # ResNet-32 and ViT, K=2, 3 repeats
    python benchmarks/runtime_bench.py --quick            # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

from ppll_ext.build import build_blocks, build_bp_block, build_layered, stage_boundaries
from ppll_ext.config import Config, load_config
from ppll_ext.runtime import SequentialRunner
from ppll_ext.runtime.launch import init_distributed
from ppll_ext.runtime.processes import ProcessRunner
from ppll_ext.runtime.threads import ThreadRunner

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("bp", "sequential", "threads", "processes")
MODELS = {
    "resnet32": ["model.name=resnet32", "local.aux=conv"],
    "vit": ["model.name=vit", "model.patch_size=4", "model.depth=6", "model.hidden_dim=192", "model.heads=3",
            "model.mlp_dim=384", "local.aux=vit", "optim.name=adamw", "optim.lr=0.001"],
}


def bench_config(model: str, method: str, stages: int, batch: int, partition: str = "profile") -> Config:
    """The job every method runs: `model` cut into `stages` blocks, one torch thread per process."""
    runtime = "sequential" if method == "bp" else method
    return load_config(None, [*MODELS[model], f"local.stages={stages}", f"local.runtime={runtime}",
                              f"local.partition={partition}",
                              f"train.method={'bp' if method == 'bp' else 'local'}", f"train.batch_size={batch}",
                              "train.threads=1", "data.name=cifar10"])


def synthetic_batches(n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` CIFAR-10-shaped batches (normalised noise, random labels)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def profiled_partition(model: str, stages: int, batch: int) -> str:
    """Cut the model once by measured layer + aux-head time (one thread), so every method uses the same split."""
    torch.set_num_threads(1)
    cfg = bench_config(model, "sequential", stages, batch)
    layered = build_layered(cfg, in_channels=3, image_size=32, num_classes=10)
    example = synthetic_batches(1, batch, seed=1)[0][0]
    return ",".join(str(b) for b in stage_boundaries(cfg, layered, example)[:-1])


def worker(model: str, method: str, stages: int, batch: int, warmup: int, steps: int, partition: str) -> dict | None:
    """Train `warmup` then `steps` mini-batches with `method`; returns timing on the driving process."""
    cfg = bench_config(model, method, stages, batch, partition)
    torch.set_num_threads(1)
    rank = 0
    if method == "processes":
        rank, _, _ = init_distributed(stages, "cpu", 300.0)
    torch.manual_seed(cfg.train.seed)
    layered = build_layered(cfg, in_channels=3, image_size=32, num_classes=10)
    example = synthetic_batches(1, 8, seed=1)[0][0]
    total = warmup + steps
    if method == "bp":
        blocks = {0: build_bp_block(cfg, layered, total_steps=total)}
        boundaries = [0, len(layered.layers)]
    else:
        boundaries, blocks = build_blocks(cfg, layered, example, total_steps=total,
                                          stages=[rank] if method == "processes" else None)
    ordered = [blocks[k] for k in sorted(blocks)]
    if method == "threads":
        runner = ThreadRunner(ordered, cfg.local.micro_batches, cfg.local.queue_depth)
    elif method == "processes":
        runner = ProcessRunner(ordered[0], micro_batches=cfg.local.micro_batches, queue_depth=cfg.local.queue_depth)
    else:
        runner = SequentialRunner(ordered, cfg.local.micro_batches)
    if rank != 0:
        runner.serve()
        torch.distributed.destroy_process_group()
        return None
    runner.train_epoch(synthetic_batches(warmup, batch, seed=2))
    timed = runner.train_epoch(synthetic_batches(steps, batch, seed=3))
    if not isinstance(runner, SequentialRunner):
        runner.close()
    if method == "processes":
        torch.distributed.destroy_process_group()
    busy = [s.busy_s / max(timed.seconds, 1e-9) for s in timed.stages]
    return {"samples_per_s": timed.samples_per_s, "seconds": timed.seconds, "boundaries": boundaries,
            "busy_fraction": busy}


def run_method(model: str, method: str, stages: int, batch: int, warmup: int, steps: int, partition: str) -> dict:
    """Run one measurement in fresh process(es); torchrun for the processes runtime."""
    args = ["--worker", method, "--model", model, "--stages", str(stages), "--batch-size", str(batch),
            "--warmup", str(warmup), "--steps", str(steps), "--partition", partition]
    script = str(Path(__file__).resolve())
    if method == "processes":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stages}", script,
               *args]
    else:
        cmd = [sys.executable, script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{model}/{method} failed:\n{res.stderr[-2000:]}")
    line = [x for x in res.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    """Parse arguments; as a worker, print one JSON line; otherwise run the comparison and write results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not for the record)")
    p.add_argument("--out", default=str(RESULTS / "runtime"), help="file stem of the JSON / Markdown results")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--partition", default="profile", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        result = worker(a.model, a.worker, a.stages, a.batch_size, a.warmup, a.steps, a.partition)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    if a.quick:
        a.steps, a.warmup, a.repeats = 6, 2, 3
    runs: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in METHODS} for m in a.models}
    for model in a.models:
        partition = profiled_partition(model, a.stages, a.batch_size)
        print(f"{model}: stages start at layers {partition} (profiled)", flush=True)
        for rep in range(a.repeats):
            for method in METHODS:
                r = run_method(model, method, a.stages, a.batch_size, a.warmup, a.steps, partition)
                runs[model][method].append(r)
                print(f"{model:9s} rep {rep + 1}/{a.repeats} {method:10s} {r['samples_per_s']:8.1f} samples/s",
                      flush=True)
    write_results(runs, a)


def write_results(runs: dict[str, dict[str, list[dict]]], a: argparse.Namespace) -> None:
    """Print the table and write <out>.json and <out>.md."""
    rows = []
    for model, by_method in runs.items():
        med = {m: statistics.median(r["samples_per_s"] for r in rs) for m, rs in by_method.items()}
        for method, rs in by_method.items():
            rows.append({
                "model": model, "method": method, "median_samples_per_s": med[method],
                "runs": [r["samples_per_s"] for r in rs],
                "vs_sequential_ll": med[method] / med["sequential"], "vs_bp": med[method] / med["bp"],
                "boundaries": rs[-1]["boundaries"],
                "busy_fraction": [round(b, 3) for b in rs[-1]["busy_fraction"]],
            })
    meta = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "python": platform.python_version(), "stages": a.stages,
        "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
        "command": "python benchmarks/runtime_bench.py " + " ".join(sys.argv[1:]),
        "data": "synthetic CIFAR-10-shaped batches (3x32x32, 10 classes)",
        "processes": "bp / sequential / threads: 1 process; processes: K processes (torchrun, gloo); 1 torch "
                     "thread per process",
    }
    header = "| model | method | samples/s (median) | runs | x sequential LL | x BP | stage busy |"
    lines = [header, "|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['median_samples_per_s']:.1f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['runs'])} | {r['vs_sequential_ll']:.2f} | "
                     f"{r['vs_bp']:.2f} | {', '.join(f'{b:.0%}' for b in r['busy_fraction'])} |")
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    md = [f"# PPLL runtime throughput ({meta['date']})", "", f"Command: `{meta['command']}`", "",
          f"Machine: {meta['machine']}; torch {meta['torch']}; Python {meta['python']}. {meta['processes']}. "
          f"K = {a.stages}, batch {a.batch_size}, {a.steps} timed steps after {a.warmup} warm-up, "
          f"{a.repeats} interleaved repeats, median. Data: {meta['data']}.", "", table, ""]
    out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
