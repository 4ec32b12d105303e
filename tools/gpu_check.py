"""The GPU check (run it through benchmarks/gpu_check.sh): what a machine with CUDA GPUs must show.

1. The runtime-equivalence tests on CUDA (tests/test_runtime.py with PPLL_TEST_DEVICE=cuda): sequential local learning
   against the threads runtime, its stages spread over the GPUs (stage k on cuda:k mod #GPUs), bit for bit; with at
   least 3 GPUs also the processes runtime over NCCL, one GPU per stage.
2. The sync-free hot path on the GPU: the default job trained with the threads runtime on CUDA, its stage loop
   counted by tests/syncs.py (no host read per micro-batch).
3. With at least 2 GPUs, a short bench: PPLL (SchedulePPLL) vs torch's 1F1B and GPipe, 2 processes over NCCL, one
   GPU each (benchmarks/pipelining_bench.py --device cuda). NCCL refuses two ranks on one GPU, so one GPU skips it.

Writes benchmarks/results/gpu.md (and the bench's own gpu-pipelining.json / .md); exits 1 when something failed, and
with one "no CUDA device" line and status 1 where there is no GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENCE = ["tests/test_runtime.py::test_reference_actually_trains",
               "tests/test_runtime.py::test_threads_equal_sequential"]
HOT_PATH = ("import io, sys; sys.path.insert(0, 'tests'); import syncs; from ppll_ext.config import load_config; "
            "from ppll_ext.train import run_training; restore = syncs.install(); "
            "run_training(load_config(None, ['local.runtime=threads', 'train.device=cuda', 'train.epochs=1', "
            "'train.progress=false']), out=io.StringIO()); restore(); "
            "print(f'hot {len(syncs.hot)} logging {len(syncs.logging_calls)}'); sys.exit(1 if syncs.hot else 0)")


def _run(title: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run one check; its command, exit status, seconds and the tail of its output."""
    print(f"gpu_check: {title} ...", flush=True)
    began = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                             env={**os.environ, **(env or {})})
        code, out = res.returncode, (res.stdout + res.stderr)
    except subprocess.TimeoutExpired as exc:
        code, out = 124, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    seconds = time.perf_counter() - began
    print(f"gpu_check: {title}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s", flush=True)
    shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    return {"title": title, "command": f"{shown} {' '.join(cmd)}".strip(), "code": code, "seconds": seconds,
            "tail": "\n".join(str(out).strip().splitlines()[-25:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "gpu.md"), help="the Markdown report")
    p.add_argument("--steps", type=int, default=20, help="timed steps per bench repeat")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); run "
              f"benchmarks/gpu_check.sh on a machine with an NVIDIA GPU", file=sys.stderr)
        return 1
    n = torch.cuda.device_count()
    gpus = [torch.cuda.get_device_name(i) for i in range(n)]
    py = sys.executable
    checks = [_run("equivalence tests on CUDA", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EQUIVALENCE,
                                                 *(["tests/test_runtime.py::test_processes_equal_sequential"]
                                                   if n >= 3 else [])],
                   1800, {"PPLL_TEST_DEVICE": "cuda"}),
              _run("no host read per micro-batch on CUDA (threads runtime, default job)", [py, "-c", HOT_PATH], 600)]
    if n >= 2:
        checks.append(_run("PPLL vs 1F1B vs GPipe on 2 GPUs", [
            py, "benchmarks/pipelining_bench.py", "--device", "cuda", "--models", "resnet32", "gpt2", "--repeats", "3",
            "--steps", str(args.steps), "--out", "gpu-pipelining"], 1800))
    lines = ["# GPU check", "", f"`bash benchmarks/gpu_check.sh` on {n} x {', '.join(sorted(set(gpus)))}, torch "
             f"{torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}.", ""]
    if n < 2:
        lines += ["One GPU: the PPLL vs 1F1B vs GPipe bench needs two (NCCL refuses two ranks on one GPU) and was not "
                  "run.", ""]
    for c in checks:
        verdict = "passed" if c["code"] == 0 else f"FAILED (exit {c['code']})"
        lines += [f"## {c['title']}: {verdict}, {c['seconds']:.0f} s", "", f"    {c['command']}", "", "```",
                  c["tail"], "```", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    failed = [c["title"] for c in checks if c["code"] != 0]
    print(f"gpu_check: wrote {out}; " + (f"FAILED: {', '.join(failed)}" if failed else "every check passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
