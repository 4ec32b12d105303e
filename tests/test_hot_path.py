"""The stage loop makes no host-device synchronisation per micro-batch (issue 18, item 5).

On the CPU nothing really synchronises, so the tests count the calls that would on a GPU (`Tensor.item`, `tolist`,
`cpu`, `__float__`, `__int__`, `__bool__`, see tests/syncs.py) made inside the stage loop, and require every one of
them to sit at a logging point: a report's read-back of the losses, the non-finite check (every `check_every`
steps), evaluation.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pytest
import syncs
from procs import LAST, env, plan

from ppll_ext.config import load_config
from ppll_ext.train import run_training

REPO = Path(__file__).resolve().parents[1]
STEPS = 23
"""Optimizer steps of one epoch of the default job (digits, batch 64)."""


def _checks(calls: list[list[str]]) -> int:
    return sum(any(frame.endswith(" check_health") for frame in call) for call in calls)


@pytest.mark.parametrize("check_every", [0, 8])
def test_threads_stage_loop_reads_back_only_at_logging_points(check_every: int) -> None:
    """The default job on the threads runtime (K = 3 stages, 2 micro-batches per step): no hot call at all, and the
    non-finite flag is read once every `check_every` steps per stage (0 = every step on the CPU) plus once per
    report."""
    cfg = load_config(None, ["local.runtime=threads", "local.micro_batches=2", "train.epochs=1",
                             "train.progress=false", f"train.check_every={check_every}"])
    syncs.clear()
    restore = syncs.install()
    try:
        run_training(cfg, out=io.StringIO())
    finally:
        restore()
    assert syncs.hot == [], "\n".join(" <- ".join(reversed(c)) for c in syncs.hot[:3])
    every = check_every or 1
    reports = 2  # EPOCH_END and EVAL_END
    stages = cfg.local.stages
    assert _checks(syncs.logging_calls) == stages * (STEPS // every + reports)


T2 = plan("torchrun", 2)
"""The torchrun launch of 2 processes that runs the stage loop under tests/syncs.py, with other modules' cases:
last, since syncs.py counts until the process exits."""
T2.add("syncs", "train", "--set", "local.stages=2", "--set", "train.epochs=1", "--set", "train.progress=false",
       "--set", "train.check_every=8", "--set", "local.micro_batches=2", script=REPO / "tests" / "syncs.py",
       order=LAST)


def test_processes_stage_loop_reads_back_only_at_logging_points(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same under torchrun with the processes runtime: links and stage loop of every rank make no hot call,
    and both ranks did read back at their logging points (so the counter was live). (The counts are printed when
    each process exits, after its last case: they land in the launch's output.)"""
    ran = T2.launch(tmp_path_factory)
    ran.ok("syncs")
    res = ran.launch
    assert res.returncode == 0, res.stderr[-3000:]
    counts = {int(r): (int(h), int(n)) for r, h, n in re.findall(r"syncs rank (\d): hot (\d+) logging (\d+)",
                                                                   res.stdout)}
    assert sorted(counts) == [0, 1], res.stdout[-3000:]
    assert all(h == 0 for h, _ in counts.values()), res.stdout[-3000:]
    assert all(n > 0 for _, n in counts.values()), res.stdout[-3000:]


def test_gpu_check_without_a_gpu_is_one_line_and_exit_1() -> None:
    """benchmarks/gpu_check.sh is valid bash and, on a machine without CUDA, says so in one line and fails."""
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 1 and res.stdout == "", (res.stdout, res.stderr)
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "no CUDA device" in res.stderr, res.stderr
