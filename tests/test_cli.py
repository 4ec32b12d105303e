"""The `ppll` command end to end: its own code path in this process (main), and as a user runs it (real
subprocesses) where the process's exit and output are the point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import run

from ppll_ext.cli import main
from ppll_ext.config import ModelConfig
from ppll_ext.core.partition import parameter_counts
from ppll_ext.models import build_model

REPO = Path(__file__).resolve().parents[1]


def ppll(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -c 'from ppll_ext.cli import entry; entry()' ...` (what the `ppll` script runs) and capture its
    output."""
    return run([sys.executable, "-c", "from ppll_ext.cli import entry; entry()", *args], timeout=timeout)


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """`ppll args` through the CLI's own code path in this process: (exit code, stdout, stderr) as a subprocess's
    would be."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["ppll", *args], rc, out, err)


def test_train_tiny_config_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {name: resnet8, width: 8}\ndata: {name: digits, train_subset: 600}\n"
                   "local: {stages: 3, aux: mlp-sr, runtime: sequential}\ntrain: {epochs: 3, batch_size: 50}\n")
    res = in_process(capsys, "train", "--config", str(cfg), "--set", "optim.lr=0.1", "--set", "train.progress=false")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 3
    assert any("summary: method=local runtime=sequential stages=3" in line for line in lines)
    acc = [line for line in lines if "test accuracy" in line][0]
    assert float(acc.split()[2]) > 0.25
    assert "aux heads (early exit)" in acc and float(acc.split()[-2]) > 0.5


def test_train_bp_method(capsys: pytest.CaptureFixture[str]) -> None:
    res = in_process(capsys, "train", "--set", "train.method=bp", "--set", "train.epochs=1", "--set",
                     "data.train_subset=300", "--set", "train.progress=false")
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


def test_partition_prints_and_writes_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ppll partition`: the profiled split of a small config, each stage's layers and times."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {name: resnet8, width: 8}\ndata: {name: digits}\n"
                   "local: {stages: 3, partition: profile}\ntrain: {batch_size: 32}\n")
    out = tmp_path / "plans" / "split.json"
    res = in_process(capsys, "partition", "--config", str(cfg), "--set", "local.micro_batches=2", "--json", str(out))
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["model"] == "resnet8" and doc["method"] == "profile" and doc["rows"] == 16
    assert [s["first_layer"] for s in doc["stages"]] == doc["boundaries"][:-1] and len(doc["stages"]) == 3
    assert [n for s in doc["stages"] for n in s["layers"]] == ["conv1+bn1", "layer1.0", "layer2.0", "layer3.0", "fc"]
    assert doc["bottleneck_s"] == max(s["total_s"] for s in doc["stages"]) > 0
    lines = res.stdout.splitlines()
    assert f"start layers {doc['starts']}" in lines[0]
    rows = [line.split() for line in lines[2:5]]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    for row, stage in zip(rows, doc["stages"]):
        assert row[2] == f"{stage['params']:,}" and stage["layers"][0] in " ".join(row)
        assert row[7] == f"{stage['share_of_bottleneck']:.0%}"
    assert lines[5].startswith("bottleneck: stage ") and lines[-1] == f"wrote {out}"


def test_partition_without_timing(capsys: pytest.CaptureFixture[str]) -> None:
    """The default job's model (ResNet-8 on 8x8 digits) cut uniformly: layers and parameters, no times."""
    assert main(["partition", "--set", "local.stages=3", "--set", "local.partition=uniform", "--no-time"]) == 0
    lines = capsys.readouterr().out.splitlines()
    layers = build_model(ModelConfig(name="resnet8"), in_channels=1, image_size=8, num_classes=10).layers
    assert "start layers 0,2,4" in lines[0]
    assert lines[2].split()[:3] == ["0", "0-1", f"{sum(parameter_counts(layers[:2])):,}"]
    assert all("not timed" in line for line in lines[2:5]) and lines[5].startswith("not timed")


@pytest.mark.parametrize("args, needle", [
    (["--set", "local.stages=40"], "local.stages=40 is larger than the model's 5 layers"),
    (["--set", "local.stages=3", "--set", "local.partition=0,4,2"], "start layers must begin at 0 and strictly"),
    (["--set", "model.name=resnet9000"], "model.name='resnet9000'"),
    (["--json", "."], "--json '.' cannot be written"),
])
def test_partition_bad_input_is_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["partition", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppll: error:") and needle in err[0], err


def test_partition_bad_input_in_a_real_process() -> None:
    res = ppll("partition", "--set", "local.stages=0", timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["ppll: error: local.stages=0 must be at least 1 (command line: --set "
                                               "local.stages=...)"]
