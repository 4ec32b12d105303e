"""The `ppll` command end to end, as a user runs it (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppll_ext.cli import main

REPO = Path(__file__).resolve().parents[1]


def ppll(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m ppll_ext.cli ...` (what the `ppll` script runs) and capture its output."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", "from ppll_ext.cli import entry; entry()", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_train_tiny_config_end_to_end(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {name: resnet8, width: 8}\ndata: {name: digits, train_subset: 600}\n"
                   "local: {stages: 3, aux: mlp-sr, runtime: sequential}\ntrain: {epochs: 3, batch_size: 50}\n")
    res = ppll("train", "--config", str(cfg), "--set", "optim.lr=0.1", "--set", "train.progress=false")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 3
    assert any("summary: method=local runtime=sequential stages=3" in line for line in lines)
    acc = [line for line in lines if "test accuracy" in line][0]
    assert float(acc.split()[2]) > 0.25
    assert "aux heads (early exit)" in acc and float(acc.split()[-2]) > 0.5


def test_train_bp_method(tmp_path: Path) -> None:
    res = ppll("train", "--set", "train.method=bp", "--set", "train.epochs=1", "--set", "data.train_subset=300",
               "--set", "train.progress=false")
    assert res.returncode == 0, res.stderr
    assert "summary: method=bp" in res.stdout


@pytest.mark.parametrize("args, needle", [
    (["--set", "data.name=cifar10", "--set", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--set", "model.name=resnet9000"], "model.name='resnet9000'"),
    (["--set", "local.aux=magic"], "local.aux='magic'"),
    (["--set", "train.epoch=3"], "did you mean train.epochs"),
    (["--set", "local.stages=40"], "local.stages=40"),
    (["--set", "train.batch_size=10", "--set", "local.micro_batches=3"], "not divisible"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    (["--set", "train.stop_at_step=0"], "train.stop_at_step=0 is not after the starting step 0 (a new run)"),
    (["--runtime", "sequential", "--set", "train.stop_at_step=0"], "train.stop_at_step=0 is not after"),
])
def test_bad_input_is_one_clear_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's own code path in this process (a subprocess would only add start-up time)."""
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppll: error:") and needle in err[0], err


def test_bad_yaml_in_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: resnet8\n  oops: [\n")
    res = ppll("train", "--config", str(bad), timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"ppll: error: config file {str(bad)!r} is not valid YAML at line 2; "
                                               f"fix the syntax"]


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (REPO / "README.md").read_text()
