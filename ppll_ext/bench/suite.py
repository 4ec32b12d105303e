"""`ppll bench`: every training method on the same work, side by side, plus a short accuracy run.

Throughput: each method trains the same model split (profiled once per model), the same synthetic
CIFAR-10-shaped batches, batch size and micro-batches, in fresh processes with one torch thread per
process (except "bp-2t"); the methods are interleaved (A B C ..., A B C ...) so machine drift hits all
alike, and the median of the repeats is reported with ratios to sequential local learning and to torch's
1F1B (and to stock DeepSpeed 1F1B when it ran). Each run is `python -m ppll_ext.bench.worker` (under
torchrun or the deepspeed launcher where the method needs them), which writes its result as JSON; the
last repeat of PPLL processes, SchedulePPLL, GPipe and 1F1B also records a pipeline trace (Gantt chart).

Accuracy (with --data-root, the CIFAR-10 image-folder tree): ResNet-32, K = 4, a fixed short budget,
test accuracy of BP, sequential LL and PPLL processes, and every aux head's early-exit accuracy.

Language-model quality (when gpt2 is among the models): configs/gpt2_tiny_text.yaml's job (the same
token budget for all), validation perplexity per epoch of BP, sequential LL and PPLL processes with
`lm` and `lm-blocks` aux heads, and every aux head's early-exit perplexity (curves: lm-perplexity.png).
Both are `ppll train` runs, read back from the metrics.jsonl each writes.

    ppll bench                                   # the full run (writes RESULTS.md, bench.json, PNGs in --out)
    ppll bench --quick --data-root DIR           # a smoke run (files named *-quick*, not for the record)
    ppll bench --models gpt2 --batch-size 32 --out lm-results   # the language model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from ppll_ext import logs
from ppll_ext.bench.driver import PAIRED, Work, deepspeed_missing, measure, worker_env
from ppll_ext.bench.models import ACCURACY_JOB, ALL_MODELS, LM_JOB, LM_MODELS, MODELS, describe_plan, profiled_plan
from ppll_ext.bench.report import METHODS, Section, adapters_section, evaluate_targets, markdown, summarise
from ppll_ext.errors import BenchError
from ppll_ext.train.metrics import read_metrics

log = logging.getLogger(__name__)
WORKER_METHOD = {"bp-1t": ("bp", 1), "bp-2t": ("bp", 2), "sequential": ("sequential", 1),
                 "ppll-threads": ("threads", 1), "ppll-processes": ("processes", 1), "2x-sequential": (PAIRED, 1),
                 "ppll-torch": ("ppll-torch", 1), "gpipe": ("gpipe", 1), "1f1b": ("1f1b", 1),
                 "ds-ppll": ("ds-ppll", 1), "ds-1f1b": ("ds-1f1b", 1)}
"""Each method of the report: worker.py's method (or the driver's 2x-sequential) and its torch threads."""
TRACED = ("ppll-processes", "ppll-torch", "gpipe", "1f1b")
DEFAULT_OUT = "bench-results"
"""Where results go unless --out says otherwise (relative to the working directory)."""


def train_run(job: list[str], overrides: list[str], what: str) -> tuple[list[dict], float]:
    """`python -m ppll_ext.train --set job... --set overrides...` in a fresh process: the records of the
    metrics.jsonl it writes, and its wall seconds."""
    with tempfile.TemporaryDirectory(prefix="ppll-bench-train-") as curves:
        cmd = [sys.executable, "-m", "ppll_ext.train",
               *[a for o in [*job, *overrides, f"train.log_dir={curves}"] for a in ("--set", o)]]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(one_thread=False))
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"{what} failed (exit code {proc.returncode}: {last}); rerun its command to see the "
                             f"whole output: {' '.join(cmd)}")
        return read_metrics(curves), wall


def _last(records: list[dict], kind: str) -> dict:
    """The last record of `kind` ("step" or "eval")."""
    found = [r for r in records if r["kind"] == kind]
    if not found:
        raise BenchError(f"the training run's metrics.jsonl holds no {kind} record; it stopped before its first "
                         f"{'evaluation' if kind == 'eval' else 'step'}")
    return found[-1]


def accuracy_result(records: list[dict]) -> dict:
    """Test accuracy and every aux head's early-exit accuracy at the last evaluation, the last epoch's samples/s and
    the run's seconds at that evaluation, from a run's metrics.jsonl records."""
    ev = _last(records, "eval")
    return {"accuracy": ev["accuracy"], "aux_accuracy": ev["aux_accuracy"],
            "samples_per_s": _last(records, "step")["samples_per_s"], "seconds": ev["time_s"]}


def lm_result(records: list[dict], tokens_per_sample: int) -> dict:
    """Validation perplexity and token accuracy of the model and its aux heads at the last evaluation, the curves of
    every evaluation (epoch, perplexity), the last epoch's tokens/s and the run's seconds, from a language-model
    run's metrics.jsonl records."""
    ev = _last(records, "eval")
    evals = [r for r in records if r["kind"] == "eval"]
    return {"perplexity": ev["perplexity"], "token_accuracy": ev["accuracy"], "aux_perplexity": ev["aux_perplexity"],
            "aux_token_accuracy": ev["aux_accuracy"], "curve": [[r["epoch"] + 1, r["perplexity"]] for r in evals],
            "aux_curves": [[[r["epoch"] + 1, r["aux_perplexity"][k]] for r in evals]
                           for k in range(len(ev["aux_perplexity"]))],
            "tokens_per_s": _last(records, "step")["samples_per_s"] * tokens_per_sample, "seconds": ev["time_s"]}


def lm_quality_runs(quick: bool) -> dict:
    """configs/gpt2_tiny_text.yaml's job (K = 2, byte-level pydoc text) at one token budget: BP, sequential LL and
    PPLL processes with lm and lm-blocks heads; validation perplexity per epoch of the model and every aux head."""
    budget = {"train_subset": 300, "test_subset": 20, "epochs": 1} if quick else \
        {"train_subset": None, "test_subset": None, "epochs": 4}
    common = [f"data.train_subset={budget['train_subset'] or 'null'}",
              f"data.test_subset={budget['test_subset'] or 'null'}", f"train.epochs={budget['epochs']}",
              "train.progress=false"]
    # BP uses both cores (2 threads); the local-learning runs one thread per stage (sequential: 1 process).
    variants = {"bp": ["train.method=bp", "train.threads=2"],
                "sequential (lm)": ["local.runtime=sequential", "local.aux=lm"],
                "ppll-processes (lm)": ["local.aux=lm"],
                "ppll-processes (lm-blocks)": ["local.aux=lm-blocks"]}
    config, job = LM_JOB
    seq_len = int(next(o.split("=")[1] for o in job if o.startswith("data.seq_len=")))
    out = {"model": "gpt2", "config": config, **budget, "overrides": common, "runs": {}}
    for name, extra in variants.items():
        records, wall = train_run(job, [*common, *extra], f"language-model run {name}")
        r = out["runs"][name] = {**lm_result(records, seq_len), "wall_s": wall, "overrides": extra}
        log.info("lm quality %-28s val ppl %.3f aux [%s] (%.0f s)", name, r["perplexity"],
                 ", ".join(f"{v:.3f}" for v in r["aux_perplexity"]), r["wall_s"])
    return out


def plot_lm_curves(lm: dict, out: Path) -> Path:
    """Validation perplexity per epoch of every method and aux head."""
    from ppll_ext.plot import plot_curves

    series: dict[str, list[tuple[float, float]]] = {}
    for name, r in lm["runs"].items():
        series[name] = [tuple(p) for p in r["curve"]]
        for k, curve in enumerate(r["aux_curves"]):
            series[f"{name} aux head {k}"] = [tuple(p) for p in curve]
    return plot_curves(series, out, xlabel="epoch", ylabel="validation perplexity", log_y=True,
                       title=f"{lm['model']} on pydoc bytes ({lm['config']}): the same token budget for every method")


def accuracy_runs(data_root: str, quick: bool) -> dict:
    """ResNet-32, K = 4, CIFAR-10 image folder: BP, sequential LL and PPLL processes for a fixed short budget."""
    budget = {"train_subset": 1000, "test_subset": 500, "epochs": 1} if quick else \
        {"train_subset": 10000, "test_subset": None, "epochs": 3}
    common = ["data.name=imagefolder", f"data.root={data_root}", f"data.train_subset={budget['train_subset']}",
              f"data.test_subset={budget['test_subset'] or 'null'}", f"train.epochs={budget['epochs']}",
              "train.progress=false", "local.partition=parameters", "local.stages=4"]
    # One thread per process everywhere: sequential LL and PPLL then train the very same weights, and a busy
    # neighbour on the machine cannot stall an OpenMP team.
    variants = {"bp": ["train.method=bp", "train.threads=1"],
                "sequential": ["local.runtime=sequential", "train.threads=1"],
                "ppll-processes": ["local.runtime=processes"]}
    config, job = ACCURACY_JOB
    out = {"model": "resnet32", "stages": 4, "config": config, **budget,
           "overrides": [o.replace(data_root, "CIFAR10_DIR") for o in common], "runs": {}}
    for name, extra in variants.items():
        records, wall = train_run(job, [*common, *extra], f"accuracy run {name}")
        r = out["runs"][name] = {**accuracy_result(records), "wall_s": wall, "overrides": extra}
        log.info("accuracy %-15s test %.4f aux [%s] (%.0f s)", name, r["accuracy"],
                 ", ".join(f"{v:.4f}" for v in r["aux_accuracy"]), r["wall_s"])
    return out


def versions() -> dict:
    """Where and with what the numbers were measured (ppll_ext: the git commit of a source checkout, else the
    installed version)."""
    source = Path(__file__).resolve().parents[2]
    commit = ""
    if (source / ".git").exists():  # not the commit of some other repository an installed package sits in
        try:
            commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": _version("deepspeed"),
            "ppll_ext_commit": commit or f"{_version('ppll_ext')} (installed)"}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def render(out: Path, suffix: str, sections: Sequence[Section]) -> int:
    """Rewrite RESULTS{suffix}.md from bench{suffix}.json, targets re-evaluated, without measuring anything."""
    source = out / f"bench{suffix}.json"
    if not source.is_file():
        raise BenchError(f"--render: no {source}; give the --out folder of an earlier run (and --quick for a quick "
                         f"one's files)")
    doc = json.loads(source.read_text())
    doc["targets"] = evaluate_targets(doc["throughput"], doc["accuracy"], doc.get("lm_quality"))
    (out / f"RESULTS{suffix}.md").write_text(markdown(doc, out, sections))
    log.info("rewrote %s from %s", out / f"RESULTS{suffix}.md", source)
    return 0


def parser(prog: str, default_out: str) -> argparse.ArgumentParser:
    """The command line of `ppll bench` (and of benchmarks/bench.py, whose results go to benchmarks/results)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, 3 steps, ResNet-32 only unless "
                   "--models is given, small accuracy budget (results files named *-quick*)")
    p.add_argument("--models", help=f"comma-separated, from {','.join(ALL_MODELS)} (default: {','.join(MODELS)}; "
                   f"--quick: resnet32)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: all; --quick: "
                   f"all but 2x-sequential)")
    p.add_argument("--repeats", type=int, help="interleaved repeats per method (default 3; --quick 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, help="timed steps per run (default 12; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per run (default 3; --quick 1)")
    p.add_argument("--k4", action="store_true", help="also sequential LL and PPLL processes with K = 4 "
                   "(4 processes on this machine's cores: oversubscribed where there are fewer than 4)")
    p.add_argument("--data-root", help="CIFAR-10 image-folder tree (train/ and test/) for the accuracy runs; "
                   "without it the accuracy part is skipped")
    p.add_argument("--out", default=default_out, help=f"results folder (default {default_out})")
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite RESULTS.md from the bench.json "
                   "in --out (after a change to the report's wording)")
    return p


def main(argv: list[str] | None = None, *, prog: str = "ppll bench", default_out: str = DEFAULT_OUT,
         sections: Sequence[Section] = (adapters_section,)) -> int:
    """Run the benchmark; writes bench.json, RESULTS.md, traces and PNGs under --out (with -quick in the names).
    `sections`: what RESULTS.md of a full run adds from other results in --out."""
    logs.configure()
    p = parser(prog, default_out)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.render:
        return render(out, "-quick" if a.quick else "", sections)
    began = time.perf_counter()
    models = a.models.split(",") if a.models else (["resnet32"] if a.quick else list(MODELS))
    methods = a.methods.split(",") if a.methods else [m for m in METHODS if not (a.quick and m == "2x-sequential")]
    for name, given, known in (("--models", models, ALL_MODELS), ("--methods", methods, METHODS)):
        unknown = [v for v in given if v not in known]
        if unknown:
            p.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    batch, micro = a.batch_size, a.microbatches
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    steps = a.steps if a.steps is not None else (3 if a.quick else 12)
    repeats = a.repeats or (1 if a.quick else 3)
    if batch % micro:
        p.error(f"--batch-size {batch} must be a multiple of --microbatches {micro}")
    suffix = "-quick" if a.quick else ""
    (out / "traces").mkdir(parents=True, exist_ok=True)
    skipped = ""
    why = deepspeed_missing() if any(m.startswith("ds-") for m in methods) else ""
    if why:
        skipped = f"ds-ppll and ds-1f1b: {why}"
        log.warning("skipping %s", skipped)
        methods = [m for m in methods if not m.startswith("ds-")]
    if a.data_root is None:
        log.info("accuracy part skipped: give --data-root DIR (the CIFAR-10 image-folder tree with train/ and test/)")
    elif not (Path(a.data_root) / "train").is_dir():
        p.error(f"--data-root {a.data_root!r} has no train/ folder; point it at the CIFAR-10 image-folder tree")

    plan = [(model, method, 2) for model in models for method in methods]
    if a.k4:
        plan += [(model, f"{method}-k4", 4) for model in models for method in ("sequential", "ppll-processes")]
    plans = {}
    for model in models:
        for k in sorted({k for _, _, k in plan}):
            plans[(model, k)] = profiled_plan(model, k, batch // micro)
            log.info("%s: K=%d %s", model, k, describe_plan(plans[(model, k)]))
    runs: dict[str, dict[str, list[dict]]] = {m: {} for m in models}
    traces: dict[str, list[str]] = {m: [] for m in models}
    for rep in range(repeats):
        for model, method, k in plan:
            base = method.removesuffix("-k4")
            trace_path = None
            if rep == repeats - 1 and method in TRACED:
                trace_path = str((out / "traces" / f"{model}-{method}{suffix}.json").absolute())
                traces[model].append(trace_path)
            work = Work(model, k, batch, plans[(model, k)].starts, micro, warmup, steps)
            worker_method, threads = WORKER_METHOD[base]
            r = measure(worker_method, work, threads=threads, trace=trace_path)
            runs[model].setdefault(method, []).append(r)
            log.info("%-9s rep %d/%d %-18s %8.1f samples/s (%.0f s)", model, rep + 1, repeats, method,
                     r["samples_per_s"], time.perf_counter() - began)
    rows = summarise(runs)
    accuracy = accuracy_runs(a.data_root, a.quick) if a.data_root else None
    lm = lm_quality_runs(a.quick) if any(m in LM_MODELS for m in models) else None

    from ppll_ext.plot import plot_bench, plot_traces

    given = sys.argv[1:] if argv is None else argv
    command = " ".join([prog, *given])
    if a.data_root:  # no machine paths in committed results
        command = command.replace(a.data_root, "CIFAR10_DIR")
    doc = {"meta": {**versions(), "quick": a.quick, "command": command,
                    "stages": 2, "batch": batch, "micro": micro, "steps": steps,
                    "warmup": warmup, "repeats": repeats, "skipped": skipped,
                    "partitions": {f"{m} K={k}": p.starts for (m, k), p in plans.items()},
                    "plans": {f"{m} K={k}": p.to_dict() for (m, k), p in plans.items()}},
           "throughput": rows, "accuracy": accuracy, "lm_quality": lm, "targets": evaluate_targets(rows, accuracy, lm),
           "traces": {m: [os.path.relpath(t, out.absolute()) for t in ts] for m, ts in traces.items()}}
    bench_json = out / f"bench{suffix}.json"
    bench_json.write_text(json.dumps(doc, indent=2) + "\n")
    doc["pictures"] = [f"throughput{suffix}.png"]
    plot_bench(bench_json, out / doc["pictures"][0])
    if lm is not None:
        doc["pictures"].append(f"lm-perplexity{suffix}.png")
        plot_lm_curves(lm, out / doc["pictures"][-1])
    for model, paths in traces.items():
        if paths:
            doc["pictures"].append(f"gantt-{model}{suffix}.png")
            plot_traces(paths, out / doc["pictures"][-1])
    doc["meta"]["wall_s"] = time.perf_counter() - began
    bench_json.write_text(json.dumps(doc, indent=2) + "\n")
    render(out, suffix, sections)
    log.info("wrote %s, %s and %s in %.1f min", bench_json, out / f"RESULTS{suffix}.md", ", ".join(doc["pictures"]),
             doc["meta"]["wall_s"] / 60)
    return 0
