"""What every benchmark shares: running a measurement in fresh processes, medians, ratio tables, results files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def run_json(*cmds: list[str], what: str, timeout: float = 1800) -> list[dict]:
    """Run the commands at the same time (one torch thread per process); the last JSON line each printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{err[-3000:]}")
        results.append(json.loads([x for x in out.splitlines() if x.startswith("{")][-1]))
    return results


def torchrun_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N script args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def machine() -> dict:
    """Where and with what the numbers were measured."""
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


def write_results(stem: str, title: str, note: str, rows: list[dict], baselines: list[str], meta: dict) -> str:
    """Print and write <stem>.json and <stem>.md (title, command, conditions, table); returns the table."""
    head = ["model", "method", "samples/s (median)", "runs", *[f"x {b}" for b in baselines], "stage busy"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|" + "---:|" * len(baselines) + "---|"]
    for r in rows:
        busy = ", ".join(f"{b:.0%}" for b in r.get("busy_fraction", []))
        ratios = " | ".join(f"{r[f'x_{b}']:.2f}" for b in baselines)
        lines.append(f"| {r['model']} | {r['method']} | {r['median_samples_per_s']:.1f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['runs'])} | {ratios} | {busy} |")
    table = "\n".join(lines)
    print(table)
    out = RESULTS / stem
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    md = [f"# {title} ({meta['date']})", "", f"Command: `{meta['command']}`", "",
          f"Machine: {meta['machine']}; torch {meta['torch']}; Python {meta['python']}. {note}", "", table, ""]
    out.with_suffix(".md").write_text("\n".join(md))
    return table
