"""benchmarks/tta_bench.py: training seconds read back from a real run's metrics.jsonl, time to an accuracy."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from ppll_ext.config import load_config
from ppll_ext.train.metrics import read_metrics
from ppll_ext.train.run import run_training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tta(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.delitem(sys.modules, "tta_bench", raising=False)
    import tta_bench

    return tta_bench


def test_training_seconds_exclude_evaluation_and_follow_segments(tmp_path: Path, tta) -> None:
    """2 epochs of 300 digits in batches of 64 (a short last batch), checkpoints cutting epochs into segments: the
    second epoch's training seconds read from metrics.jsonl equal 300 / that epoch's samples/s as the run measured
    it, and training seconds stay below the wall time, which includes the evaluations."""
    cfg = load_config(None, ["model.name=resnet8", "model.width=4", "data.train_subset=300", "train.batch_size=64",
                             "train.epochs=2", "train.progress=false", "local.runtime=sequential",
                             f"train.save_dir={tmp_path}", "train.save_every=3"])
    summary = run_training(cfg, out=io.StringIO())
    evals = tta.evaluations(read_metrics(tmp_path), 300, 64)
    assert [(e["epoch"], e["step"]) for e in evals] == [(1, 5), (2, 10)]
    assert evals[1]["train_s"] - evals[0]["train_s"] == pytest.approx(300 / summary.samples_per_s, rel=1e-3)
    assert all(0 < e["train_s"] < e["wall_s"] for e in evals)
    assert evals[-1]["accuracy"] == pytest.approx(summary.accuracy)
    assert [tta.batch_samples(step, 300, 64) for step in range(1, 11)] == [64, 64, 64, 64, 44] * 2


def test_time_to_threshold_first_evaluation_and_interpolation(tta) -> None:
    """The first evaluation at or above the threshold gives the time; the interpolated time lies between it and the
    evaluation before; a threshold never reached gives None."""
    evals = [{"epoch": 1, "train_s": 100.0, "accuracy": 0.5}, {"epoch": 2, "train_s": 200.0, "accuracy": 0.65},
             {"epoch": 3, "train_s": 300.0, "accuracy": 0.72}]
    t60 = tta.time_to(evals, 0.60)
    assert (t60["train_s"], t60["epoch"]) == (200.0, 2)
    assert 100.0 < t60["interpolated_s"] < 200.0
    assert t60["interpolated_s"] == pytest.approx(100.0 + (0.60 - 0.5) / (0.65 - 0.5) * 100.0, abs=0.1)
    assert tta.time_to(evals, 0.72)["epoch"] == 3
    assert tta.time_to(evals, 0.80) is None


def test_missing_data_is_one_clear_error(tmp_path: Path, tta) -> None:
    """A data root without the tarball or an image-folder tree: ConfigError naming the path and --data-root."""
    with pytest.raises(tta.ConfigError, match=r"no CIFAR-10 at .*--data-root"):
        tta.find_data(str(tmp_path), tmp_path / "cache")


def test_1f1b_is_ppll_train_with_torchs_1f1b_schedule(tmp_path: Path, tta) -> None:
    """The 1f1b method runs `ppll train --set local.engine=torch --set local.schedule=1F1B` like the other methods (its
    curves, checkpoints and resume are the training loop's: tests/test_torch_engine.py): 2 processes, end to end,
    --microbatches micro-batches, a checkpoint per epoch, resumed from the run folder."""
    s = tta.Settings("resnet20", 2, 128, 4, 0.1, 5e-4, 0, 1000, 500, "0,4")
    overrides = s.overrides(tmp_path / "cifar10", tmp_path / "cache")
    for resume in (False, True):
        cmd = tta.command("1f1b", s, overrides, tmp_path / "run", resume)
        assert cmd[:4] == [sys.executable, "-m", "ppll_ext", "train"]
        sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        assert {"local.engine=torch", "local.schedule=1F1B", "local.micro_batches=4"} <= set(sets)
        assert cmd[cmd.index("--save-every") + 1] == "8" and ("--resume" in cmd) == resume
        cfg = load_config(None, sets)
        assert cfg.local.placement().ranks == 2 and cfg.local.placement().end_to_end
    assert not tta.has_checkpoint(tmp_path / "run")
