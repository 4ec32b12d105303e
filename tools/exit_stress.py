"""Exit stress: run every multi-process entry point many times and count the runs that end abnormally.

A process that still has a thread or point-to-point work alive in gloo when it exits can be killed by the C++
runtime ("terminate called without an active exception", SIGABRT) after all its Python code ran; it happens in
some runs only, so one pass of the test suite does not show it. This script runs each entry point `--runs` times in
a row, keeps every rank's stderr apart (torchrun's --log-dir/--redirects, the deepspeed launcher's
--enable_each_rank_log; `ppll train` runs torchrun itself, so its ranks share one stream) and reports, per entry
point, the runs that failed and which rank aborted.

    python tools/exit_stress.py                     # 20 runs of each entry point (about 25 min here)
    python tools/exit_stress.py --runs 3 --entries ppll-torch,script

Not part of the test suite (it takes long and measures a rate); results in benchmarks/results/exit_stress.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ppll_ext.bench.driver import WORKER, machine

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ABORT = re.compile(r"terminate called|SIGABRT|core dumped|Signal 6 ")
BENCH = ["--model", "vit", "--batch-size", "32", "--microbatches", "4", "--warmup", "1", "--steps", "3",
         "--partition", "0,4"]
TINY = ["model.name=resnet8", "model.width=8", "data.name=digits", "data.train_subset=256", "data.test_subset=100",
        "train.epochs=1", "train.batch_size=64", "local.micro_batches=2", "train.progress=false"]


def _torchrun(logs: Path, target: list[str], *args: str) -> list[str]:
    """torchrun on 2 processes, each rank's stdout and stderr in its own file under `logs` (`target`: [script] or
    ["-m", module])."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--log-dir", str(logs), "--redirects", "3", *target, *args]


def _deepspeed(logs: Path, module: str, *args: str) -> list[str]:
    """The deepspeed launcher on 2 processes running `module`, each rank's output in its own file under `logs`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "--enable_each_rank_log", str(logs), "--module", module, *args]


ENTRIES: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "train": ("`ppll train` (processes runtime, 2 stages, tiny digits job)",
              lambda logs: [sys.executable, "-c", "from ppll_ext.cli import entry; entry()", "train", "--runtime",
                            "processes", *[a for o in TINY for a in ("--set", o)]]),
    "processes": (f"PPLL processes benchmark worker ({WORKER}, vit)",
                  lambda logs: _torchrun(logs, ["-m", WORKER], "--method", "processes", "--stages", "2", *BENCH)),
    "ppll-torch": (f"SchedulePPLL benchmark worker ({WORKER}, vit)",
                   lambda logs: _torchrun(logs, ["-m", WORKER], "--method", "ppll-torch", *BENCH)),
    "ds-ppll": (f"DeepSpeed PPLL benchmark worker ({WORKER}, vit)",
                lambda logs: _deepspeed(logs, WORKER, "--method", "ds-ppll", *BENCH)),
    "script": ("SchedulePPLL user script (tests/dist/pipelining_ppll.py)",
               lambda logs: _torchrun(logs, [str(REPO / "tests" / "dist" / "pipelining_ppll.py")], "--steps",
                                      "6", "--microbatches", "2")),
}


def rank_streams(logs: Path) -> dict[str, str]:
    """Each rank's captured output under `logs` (torchrun: .../attempt_0/<rank>/stderr.log; deepspeed:
    <time>_rank<r>.log), keyed "rank r"."""
    streams: dict[str, str] = {}
    for path in sorted(logs.rglob("*.log")):
        m = re.search(r"_rank(\d+)\.log$", path.name) or re.search(r"/(\d+)/std(?:err|out)\.log$", str(path))
        if m:
            key = f"rank {m.group(1)}"
            streams[key] = streams.get(key, "") + path.read_text(errors="replace")
    return streams


def one_run(entry: str, timeout: float) -> dict:
    """One launch of `entry`: exit code, seconds, and the ranks whose output shows an abort."""
    with tempfile.TemporaryDirectory(prefix="ppll-stress-") as tmp:
        logs = Path(tmp) / "logs"
        cmd = ENTRIES[entry][1](logs)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
            rc, out = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
        streams = {"launcher": out, **rank_streams(logs)}
        aborted = sorted(name for name, text in streams.items() if ABORT.search(text))
        tail = "" if rc == 0 and not aborted else (streams.get(aborted[0], out) if aborted else out)[-1500:]
        return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "aborted": aborted, "tail": tail}


def report(results: dict[str, list[dict]], meta: dict) -> str:
    """The Markdown table: runs, failures and aborts per entry point, with the ranks that aborted."""
    lines = ["# Exit stress", "", f"Command: `{meta['command']}` ({meta['date']}; {meta['minutes']:.1f} min; "
             f"torch {meta['torch']}, {meta['machine']}).", "",
             "| entry point | runs | exit != 0 | aborts | ranks that aborted | median s |",
             "|---|---:|---:|---:|---|---:|"]
    for entry, runs in results.items():
        bad = [r for r in runs if r["rc"] != 0]
        aborts = [r for r in runs if r["aborted"]]
        ranks = sorted({a for r in aborts for a in r["aborted"]})
        secs = sorted(r["seconds"] for r in runs)
        lines.append(f"| {ENTRIES[entry][0]} | {len(runs)} | {len(bad)} | {len(aborts)} | {', '.join(ranks) or '–'} "
                     f"| {secs[len(secs) // 2]:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="launches per entry point (default 20)")
    p.add_argument("--entries", default=",".join(ENTRIES), help=f"comma-separated, from {','.join(ENTRIES)}")
    p.add_argument("--timeout", type=float, default=300, help="seconds one launch may take")
    p.add_argument("--out", default=str(RESULTS / "exit_stress"), help="results stem (.json and .md are added)")
    a = p.parse_args()
    entries = [e for e in a.entries.split(",") if e]
    unknown = [e for e in entries if e not in ENTRIES]
    if unknown or a.runs < 1:
        p.error(f"unknown entry point(s) {unknown}: choose from {','.join(ENTRIES)}" if unknown else
                "--runs must be at least 1")
    began = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for entry in entries:
        for i in range(a.runs):
            r = one_run(entry, a.timeout)
            results.setdefault(entry, []).append(r)
            flag = "ok" if r["rc"] == 0 and not r["aborted"] else f"FAILED (exit {r['rc']}, aborted: {r['aborted']})"
            print(f"{entry:12s} run {i + 1}/{a.runs}: {flag} in {r['seconds']:.0f} s", flush=True)
            if r["tail"]:
                print(r["tail"], flush=True)
    meta = {**machine(), "minutes": (time.perf_counter() - began) / 60, "runs": a.runs}
    text = report(results, meta)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(text)
    print(text)
    bad = sum(1 for runs in results.values() for r in runs if r["rc"] != 0 or r["aborted"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
