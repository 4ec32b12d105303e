"""Training curves: metrics.jsonl and TensorBoard events written by a run, read back with the real libraries, and
`ppll plot --curves` drawing two runs; a full disk under the curves."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import faults
import numpy as np
import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppll_ext.cli import main
from ppll_ext.runtime import EpochStats, EvalResult, StageStats
from ppll_ext.train.metrics import MetricsLog

TINY = ["--set", "model.name=resnet8", "--set", "model.width=4", "--set", "data.train_subset=256",
        "--set", "train.epochs=2", "--set", "train.progress=false", "--runtime", "sequential"]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_curves_resume_appends_and_plot_compares_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """8 steps of K=2 local learning: a step record per step with both stages' losses, an eval record per epoch,
    TensorBoard scalars equal to them; resuming at step 6 replaces steps 7-8 (same values, no duplicates); a fresh
    BP run in a folder with old curves sets them aside; the plot of both runs is a PNG of the figure's size."""
    run = tmp_path / "ppll"
    assert main(["train", *TINY, "--save-dir", str(run), "--set", "train.save_every=2"]) == 0
    first = _records(run)
    steps = [r for r in first if r["kind"] == "step"]
    evals = [r for r in first if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(len(r["loss"]) == 2 and len(r["lr"]) == 2 and r["samples_per_s"] > 0 for r in steps)
    assert [(r["step"], r["epoch"], len(r["aux_accuracy"])) for r in evals] == [(4, 0, 1), (8, 1, 1)]
    assert steps[0]["lr"][0] > steps[-1]["lr"][0]  # the schedule decays

    assert main(["train", *TINY, "--save-dir", str(run), "--set", f"train.resume={run / 'step-000006'}"]) == 0
    resumed = _records(run)
    assert [r["step"] for r in resumed if r["kind"] == "step"] == list(range(1, 9))
    assert [r["step"] for r in resumed if r["kind"] == "eval"] == [4, 8]
    assert [r["loss"] for r in resumed if r["kind"] == "step"] == [r["loss"] for r in steps]
    times = [r["time_s"] for r in resumed]
    assert times == sorted(times)

    acc = EventAccumulator(str(run))
    acc.Reload()
    for k in range(2):
        tb = {e.step: e.value for e in acc.Scalars(f"loss/stage{k}")}
        assert sorted(tb) == list(range(1, 9))
        assert [tb[r["step"]] for r in resumed if r["kind"] == "step"] == pytest.approx(
            [r["loss"][k] for r in resumed if r["kind"] == "step"], rel=1e-6)
    tb_acc = {e.step: e.value for e in acc.Scalars("eval/accuracy")}
    assert tb_acc == pytest.approx({r["step"]: r["accuracy"] for r in resumed if r["kind"] == "eval"}, rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/aux0_accuracy")] == [4, 8]

    bp = tmp_path / "bp"
    bp.mkdir()
    (bp / "metrics.jsonl").write_text("not json\n")
    assert main(["train", *TINY, "--set", "train.method=bp", "--set", f"train.log_dir={bp}"]) == 0
    assert [len(r["loss"]) for r in _records(bp) if r["kind"] == "step"] == [1] * 8
    assert len(list((bp / "superseded").glob("metrics.jsonl.*"))) == 1

    png = tmp_path / "curves.png"
    assert main(["plot", "--curves", str(run), str(bp / "metrics.jsonl"), "--out", str(png)]) == 0
    image = imread(png)
    assert image.shape[:2] == (935, 1430) and np.ptp(image) > 0

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert main(["plot", "--curves", str(tmp_path / "empty"), "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl" in err[0] and "holds no metrics" in err[0]


def test_curves_on_a_full_disk_warn_once_and_training_goes_on(tmpfs: Callable[..., Path],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Once the log folder's file system is full, appending step and evaluation records logs one warning naming the
    folder and the fix, then nothing more: the run goes on (a checkpoint save fails the run with its own line)."""
    disk = tmpfs("disk", "64k")
    curves = MetricsLog(disk, 0, "classification")
    faults.fill(disk)
    stage = StageStats(0, step_loss=[1.0], step_lr=[0.1], step_end_s=[time.perf_counter()])
    curves.steps(0, 0, EpochStats(1.0, 10, [stage]))
    curves.evaluation(1, 0, EvalResult(0.5, 1.0, [], 10, []))
    curves.close()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("ppll_ext")] == [
        f"no space left on the device of {disk}: metrics.jsonl is not written any further; free space there or set "
        f"train.log_dir elsewhere"]
