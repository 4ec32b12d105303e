"""The driver side of every benchmark: one measurement of a method in fresh process(es) (worker.py under the right
launcher, one torch thread per process), its result read from the JSON file the run writes, the conditions of a
run, and the ratio tables and results files of the focused benchmarks."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from ppll_ext.bench.worker import DEEPSPEED, NATIVE, TORCH
from ppll_ext.errors import BenchError

WORKER = "ppll_ext.bench.worker"
PAIRED = "2x-sequential"
"""Two independent sequential LL copies at once, their throughputs added: the most two processes can do on this
machine with no dependency between them (the ceiling of a 2-stage pipeline here)."""
METHODS = (*NATIVE, *TORCH, *DEEPSPEED, PAIRED)


@dataclass(frozen=True)
class Work:
    """What one measurement trains: `model` cut at `partition` into `stages`, `warmup` untimed then `steps` timed
    batches of `batch` samples in `micro` micro-batches."""

    model: str
    stages: int
    batch: int
    partition: str = "profile"
    micro: int = 1
    warmup: int = 3
    steps: int = 12


def worker_args(method: str, w: Work, *, threads: int = 1, trace: str | None = None, memory: bool = False,
                checkpoint: bool = False, device: str = "cpu") -> list[str]:
    """worker.py's arguments for `method` on `w` (no --result: run_workers adds it)."""
    return ["--method", method, "--model", w.model, "--stages", str(w.stages), "--batch-size", str(w.batch),
            "--microbatches", str(w.micro), "--warmup", str(w.warmup), "--steps", str(w.steps), "--partition",
            w.partition, "--threads", str(threads), *(["--trace", trace] if trace else []),
            *(["--memory"] if memory else []), *(["--checkpoint-activations"] if checkpoint else []),
            *(["--device", device] if device != "cpu" else [])]


def python_cmd(*args: str) -> list[str]:
    """The worker in one process."""
    return [sys.executable, "-m", WORKER, *args]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """The worker under `torchrun --standalone --nproc_per_node nproc`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", WORKER,
            *args]


def deepspeed_launcher() -> Path:
    """The `deepspeed` launcher installed beside this Python."""
    return Path(sys.executable).with_name("deepspeed")


def deepspeed_missing() -> str:
    """Why the DeepSpeed methods cannot run here, or "" when they can."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        return f"DeepSpeed cannot be imported ({exc}); pip install deepspeed"
    if not deepspeed_launcher().is_file():
        return f"no deepspeed launcher at {deepspeed_launcher()}; reinstall deepspeed in this environment"
    return ""


def deepspeed_cmd(nproc: int, *args: str) -> list[str]:
    """The worker under the deepspeed launcher, `nproc` processes on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(deepspeed_launcher()), "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
            str(port), "--module", WORKER, *args]


def command(method: str, w: Work, **options: object) -> list[str]:
    """The launch command of one run of worker.py's `method` on `w` (options: worker_args's)."""
    args = worker_args(method, w, **options)
    if method in DEEPSPEED:
        return deepspeed_cmd(w.stages, *args)
    if method in TORCH or method == "processes":
        return torchrun_cmd(w.stages, *args)
    if method in NATIVE:
        return python_cmd(*args)
    raise BenchError(f"unknown benchmark method {method!r}; choose from {', '.join(METHODS)}")


def worker_env(one_thread: bool = True) -> dict[str, str]:
    """The environment of the runs: DeepSpeed on the CPU, this process's ppll_ext first on the path (a run imports
    the same code as its driver, wherever it is started from) and, with `one_thread`, one OpenMP thread."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}
    return {**env, "OMP_NUM_THREADS": "1"} if one_thread else env


def run_workers(*cmds: list[str], what: str, timeout: float = 1800) -> list[dict]:
    """Run worker commands at the same time, each told (--result) where to write its JSON; the results, in order.
    BenchError naming the run and a file with its output when one fails or writes no result."""
    tmp = Path(tempfile.mkdtemp(prefix="ppll-bench-"))
    results = [tmp / f"result{i}.json" for i in range(len(cmds))]
    logs = [(tmp / f"stdout{i}.log", tmp / f"stderr{i}.log") for i in range(len(cmds))]
    procs = []
    for cmd, result, (out, err) in zip(cmds, results, logs, strict=True):
        with out.open("w") as fo, err.open("w") as fe:
            procs.append(subprocess.Popen([*cmd, "--result", str(result)], stdout=fo, stderr=fe, text=True,
                                          env=worker_env()))
    failed = ""
    for proc, result, (_, err) in zip(procs, results, logs, strict=True):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
        if not failed and (code != 0 or not result.is_file()):
            why = (f"timed out after {timeout:.0f} s" if code == "timeout" else f"exit code {code}" if code
                   else "no result written")
            last = (err.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            failed = f"{what} failed ({why}; last line: {last}); its output is in {err.parent}"
    if failed:
        raise BenchError(failed)
    out = [json.loads(r.read_text()) for r in results]
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def measure(method: str, w: Work, *, threads: int = 1, trace: str | None = None, memory: bool = False,
            checkpoint: bool = False, device: str = "cpu", timeout: float = 1800) -> dict:
    """One measurement of `method` (worker.py's, or 2x-sequential) on `w` in fresh process(es): the result the run
    wrote (samples/s, seconds, boundaries, busy fractions, peak RSS per process; with `memory` every stage's)."""
    options = {"threads": threads, "trace": trace, "memory": memory, "checkpoint": checkpoint, "device": device}
    if method == PAIRED:
        cmd = command("sequential", w, **{**options, "trace": None})
        both = run_workers(cmd, cmd, what=f"{w.model}/{method}", timeout=timeout)
        return {**both[0], "samples_per_s": sum(r["samples_per_s"] for r in both), "busy_fraction": [],
                "peak_rss_mb": [m for r in both for m in r["peak_rss_mb"]]}
    return run_workers(command(method, w, **options), what=f"{w.model}/{method}", timeout=timeout)[0]


def machine() -> dict:
    """Where and with what the numbers were measured (the focused benchmarks' meta)."""
    return {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "python": platform.python_version(),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])}


def ratio_rows(runs: dict[str, dict[str, list[dict]]], baselines: list[str]) -> list[dict]:
    """One row per (model, method): median samples/s, the runs, and ratios to each baseline method's median."""
    rows = []
    for model, by_method in runs.items():
        med = {m: statistics.median(r["samples_per_s"] for r in rs) for m, rs in by_method.items()}
        for method, rs in by_method.items():
            row = {"model": model, "method": method, "median_samples_per_s": med[method],
                   "runs": [r["samples_per_s"] for r in rs]}
            row.update({f"x_{b}": med[method] / med[b] for b in baselines})
            row.update({k: v for k, v in rs[-1].items() if k not in ("samples_per_s", "seconds")})
            rows.append(row)
    return rows


def write_results(stem: Path, title: str, note: str, rows: list[dict], baselines: list[str], meta: dict) -> str:
    """Write <stem>.json and <stem>.md (title, command, conditions, table); returns the table."""
    head = ["model", "method", "samples/s (median)", "runs", *[f"x {b}" for b in baselines], "stage busy"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|" + "---:|" * len(baselines) + "---|"]
    for r in rows:
        busy = ", ".join(f"{b:.0%}" for b in r.get("busy_fraction", []))
        ratios = " | ".join(f"{r[f'x_{b}']:.2f}" for b in baselines)
        lines.append(f"| {r['model']} | {r['method']} | {r['median_samples_per_s']:.1f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['runs'])} | {ratios} | {busy} |")
    table = "\n".join(lines)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    md = [f"# {title} ({meta['date']})", "", f"Command: `{meta['command']}`", "",
          f"Machine: {meta['machine']}; torch {meta['torch']}; Python {meta['python']}. {note}", "", table, ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    return table
