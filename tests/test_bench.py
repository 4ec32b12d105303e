"""The benchmark harness (ppll_ext/bench): `ppll bench` from an installed package outside the source tree, its
results JSON and the report built from it, a failed run's one-line error, and the benchmark jobs equal to the
configs/ files they stand for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppll_ext.bench import driver, models, suite, worker
from ppll_ext.config import load_config
from ppll_ext.errors import BenchError

REPO = Path(__file__).resolve().parents[1]


def test_ppll_bench_runs_from_an_installed_package(tmp_path: Path) -> None:
    """ppll_ext copied alone onto the path (no benchmarks/, no configs/), run from an empty folder: one quick method
    at two steps writes bench.json under --out from its worker's JSON, and RESULTS.md is built from that JSON."""
    site, work = tmp_path / "site", tmp_path / "work"
    shutil.copytree(REPO / "ppll_ext", site / "ppll_ext")
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu"}
    res = subprocess.run([sys.executable, "-m", "ppll_ext", "bench", "--models", "resnet8", "--methods", "sequential",
                          "--repeats", "1", "--warmup", "1", "--steps", "2", "--batch-size", "16", "--microbatches",
                          "2", "--out", "results"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = work / "results"
    assert sorted(p.name for p in work.iterdir()) == ["results"]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["command"].startswith("ppll bench --models resnet8")
    assert doc["meta"]["ppll_ext_commit"].endswith("(installed)")  # the copy outside any git checkout ran
    (row,) = doc["throughput"]
    assert (row["model"], row["method"], len(row["runs"])) == ("resnet8", "sequential", 1)
    assert row["median_samples_per_s"] > 0 and len(row["busy_fraction"]) == 2 and row["peak_rss_mb"][0] > 0
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| resnet8 | sequential | {row['median_samples_per_s']:.1f} |" in (out / "RESULTS.md").read_text()
    # The table comes from the JSON: change the JSON, render again, and the table follows.
    row["median_samples_per_s"] = 12345.6
    (out / "bench.json").write_text(json.dumps(doc))
    assert suite.main(["--render", "--out", str(out)]) == 0
    assert "| resnet8 | sequential | 12345.6 |" in (out / "RESULTS.md").read_text()


def test_a_failed_run_is_one_line_naming_its_output(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as err:
        driver.run_workers([sys.executable, "-c", "import sys; print('starting'); sys.exit('no such model: x')"],
                           what="resnet8/sequential")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("resnet8/sequential failed (exit code 1; last line: no such model: x)")
    folder = Path(message.rsplit("its output is in ", 1)[1])
    assert (folder / "stdout0.log").read_text() == "starting\n"
    shutil.rmtree(folder)
    with pytest.raises(BenchError, match="no result written"):
        driver.run_workers([sys.executable, "-c", "pass"], what="nothing")
    with pytest.raises(BenchError, match="unknown benchmark method 'pipedream'"):
        driver.command("pipedream", driver.Work("resnet8", 2, 16))


def test_benchmark_jobs_equal_the_config_files_they_stand_for() -> None:
    """The jobs `ppll bench` carries as --set values (an installed package has no configs/) are the experiment
    files its report names, and both DeepSpeed methods' ds_config holds configs/deepspeed's hyper-parameters."""
    folder = ["data.name=imagefolder", "data.root=CIFAR10_DIR"]  # the accuracy runs' data, set by the benchmark
    for (path, job), data in ((models.ACCURACY_JOB, folder), (models.LM_JOB, [])):
        assert load_config(None, [*job, *data]).to_dict() == load_config(str(REPO / path), data).to_dict(), path
    per_run = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print")
    for name in ("ppll.json", "stock_1f1b.json"):
        conf = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
        assert {k: v for k, v in conf.items() if k not in per_run} == worker.DS_CONFIG, name
