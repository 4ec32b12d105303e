"""Pipeline traces (`ppll train --trace`), `ppll plot`, and the benchmark harness's pure parts."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import faults
import pytest
from procs import plan, run

from ppll_ext import cli, trace
from ppll_ext.config import load_config
from ppll_ext.train import run_training

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=resnet8", "model.width=8", "data.name=digits", "data.train_subset=256", "data.test_subset=100",
        "train.epochs=1", "train.batch_size=64", "local.micro_batches=2", "train.progress=false"]


T2 = plan("torchrun", 2)
"""The torchrun launch of 2 processes that runs test_processes_trace_and_plot's training, with other modules'
cases."""
T2.add("trace_processes", "train", "--runtime", "processes", "--trace", "{root}/trace_processes.json",
       *[a for o in TINY for a in ("--set", o)], module="ppll_ext")


def check_trace(path: Path, stages: int, senders: int) -> list[dict]:
    """Assert the Chrome-trace invariants; returns the complete events."""
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {k: f"stage {k}" for k in range(stages)}
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all({"name", "cat", "ts", "dur", "pid", "tid"} <= e.keys() for e in spans)
    for k in range(stages):
        mine = [e for e in spans if e["pid"] == k]
        kinds = {e["name"] for e in mine}
        assert {"forward", "backward", "step"} <= kinds, (k, kinds)
        assert ("send" in kinds) == (k < senders)
        # Top-level events of a stage never overlap (a wait for queue room nests inside its send).
        top = sorted((e for e in mine if e["name"] != "wait-out"), key=lambda e: e["ts"])
        for a, b in zip(top, top[1:]):
            assert b["ts"] >= a["ts"] + a["dur"] - 1.0, (a, b)
        # Per micro-batch: forward, then send, then backward.
        by_mb: dict[int, dict[str, float]] = defaultdict(dict)
        for e in mine:
            if e["name"] in ("forward", "send", "backward"):
                by_mb[e["args"]["mb"]][e["name"]] = e["ts"]
        assert len(by_mb) == 4 * 2  # 256 images / batch 64, 2 micro-batches each
        for t in by_mb.values():
            assert t["forward"] <= t.get("send", t["forward"]) <= t["backward"]
    return spans


def test_processes_trace_and_plot(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`ppll train --runtime processes --trace` with 2 stage processes (under torchrun): the trace of both, and its
    plot."""
    ran = T2.launch(tmp_path_factory)
    out = ran.root / "trace_processes.json"
    res = ran["trace_processes"]
    assert f"trace written: {out}" in res.stdout
    spans = check_trace(out, stages=2, senders=1)
    assert any(e["name"] == "wait-in" and e["pid"] == 1 for e in spans)
    png = tmp_path / "gantt.png"
    assert cli.main(["plot", str(out), str(out), "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_threads_and_sequential_traces(tmp_path: Path) -> None:
    """Both runtimes trace every stage; the sequential run's --trace is a symlink to an earlier trace file: the file
    it points to is replaced, the link stays a link."""
    earlier = tmp_path / "earlier.json"
    earlier.write_text("{}")
    (tmp_path / "sequential.json").symlink_to(earlier)
    for runtime in ("threads", "sequential"):
        path = tmp_path / f"{runtime}.json"
        cfg = load_config(None, [*TINY, f"local.runtime={runtime}", "local.stages=3", f"train.trace={path}"])
        run_training(cfg, out=io.StringIO())
        check_trace(path, stages=3, senders=2 if runtime == "threads" else 0)
        assert not trace.current().enabled
    assert (tmp_path / "sequential.json").is_symlink() and check_trace(earlier, stages=3, senders=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.json", "sequential.json", "threads.json"]


def special_files(folder: Path) -> dict[Path, tuple[str, Path]]:
    """A character device (mknod, with /dev/full's numbers: a write there fails, a read gives zeros), a FIFO, a UNIX
    socket and a symlink to the device, made in `folder` (never the system's): path -> (what a message calls it,
    the file the path leads to)."""
    device = folder / "full"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError as exc:
        pytest.skip(f"needs a device node of its own, and mknod was refused (it needs root): {exc}")
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    sock = folder / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
    link = folder / "link"
    link.symlink_to(device)
    return {device: ("a character device", device), fifo: ("a FIFO", fifo), sock: ("a socket", sock),
            link: ("a character device", device)}


def test_no_output_is_written_over_a_device_fifo_or_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--trace (in-process and in the parent of the processes runtime), plot --out, partition --json, export and
    import-deepspeed OUT, --save-dir and the curves (metrics.jsonl) each refuse a device node, FIFO or socket (or a
    symlink to one) with one line before any work, and leave it as it was."""
    nodes = special_files(tmp_path)
    before = {p: os.lstat(p) for p in nodes}
    train = ["train", *[a for o in [*TINY, "local.stages=2"] for a in ("--set", o)]]
    missing = str(tmp_path / "missing")  # an input that would fail next if the output were not checked first
    for path, (kind, target) in nodes.items():
        via = f" (the symlink {str(path)!r} points there)" if path.is_symlink() else ""
        refusal = f"{str(target)!r} is {kind}{via}, which ppll never writes over; give a regular file or a new path"
        commands = {
            f"train.trace={str(path)!r} cannot be written: {refusal}": [
                [*train, "--runtime", runtime, "--trace", str(path)] for runtime in ("sequential", "processes")],
            f"--out {str(path)!r} cannot be written: {refusal}": [["plot", missing, "--out", str(path)]],
            f"--json {str(path)!r} cannot be written: {refusal}": [["partition", "--no-time", "--json", str(path)]],
            f"output {str(path)!r} cannot be used: {str(target)!r} is {kind}; give a folder to write into": [
                ["export", missing, str(path)], ["import-deepspeed", missing, str(path)]],
            f"train.save_dir={str(path)!r} cannot be used: {str(target)!r} is {kind}; choose another "
            f"train.save_dir": [[*train, "--runtime", runtime, "--save-dir", str(path)]
                                for runtime in ("sequential", "processes")],
        }
        for message, argvs in commands.items():
            for argv in argvs:
                rc = cli.main(argv)
                out, err = capsys.readouterr()
                lines = err.strip().splitlines()
                assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"ppll: error: {message}"), (argv, lines)
                assert out == "", (argv, out)
    logs = tmp_path / "logs"
    logs.mkdir()
    os.mkfifo(logs / "metrics.jsonl")  # opened for the curves, it would block the run
    rc = cli.main([*train, "--runtime", "sequential", "--set", f"train.log_dir={logs}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.splitlines() == [
        f"ppll: error: the training curves {str(logs / 'metrics.jsonl')!r} (train.log_dir) cannot be written: "
        f"{str(logs / 'metrics.jsonl')!r} is a FIFO, which ppll never writes over; give a regular file or a new path "
        f"(command line: --set train.log_dir=...)"]
    after = {p: os.lstat(p) for p in nodes}
    assert all((a.st_mode, a.st_rdev, a.st_ino, a.st_mtime_ns) == (b.st_mode, b.st_rdev, b.st_ino, b.st_mtime_ns)
               for a, b in zip(before.values(), after.values())), (before, after)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "full", "link", "logs", "sock"]


def test_disabled_tracer_is_a_no_op() -> None:
    tracer = trace.current()
    assert not tracer.enabled
    tracer.complete("forward", 0, 0.0, 1.0)
    with tracer.span("eval", 0):
        pass


def test_plot_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"traceEvents": []}')
    assert cli.main(["plot", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "no complete ('X') events" in capsys.readouterr().err
    assert cli.main(["plot", "--out", str(tmp_path / "x.png")]) == 2


@pytest.fixture
def bench():
    from ppll_ext.bench import report

    return report


def test_bench_summary_and_targets(bench) -> None:
    runs = {"vit": {"sequential": [{"samples_per_s": v} for v in (100, 90, 110)],
                    "1f1b": [{"samples_per_s": v} for v in (120, 130, 125)],
                    "ppll-processes": [{"samples_per_s": v, "busy_fraction": [0.9, 0.8], "peak_rss_mb": [500, 400]}
                                       for v in (195, 180, 170)]}}
    rows = {r["method"]: r for r in bench.summarise(runs)}
    assert rows["ppll-processes"]["median_samples_per_s"] == 180
    assert rows["ppll-processes"]["x_sequential"] == pytest.approx(1.8)
    assert rows["ppll-processes"]["x_ds-1f1b"] is None
    assert rows["ppll-processes"]["busy_fraction"] == [0.9, 0.8]
    acc = {"model": "resnet32", "runs": {"sequential": {"accuracy": 0.50}, "ppll-processes": {"accuracy": 0.49}}}
    targets = {t["target"]: t for t in bench.evaluate_targets(list(rows.values()), acc)}
    assert targets["PPLL processes / sequential LL >= 1.9"]["met"] is False
    assert targets["PPLL processes / torch 1F1B >= 1.3"]["met"] is True
    assert targets["PPLL processes / stock DeepSpeed 1F1B >= 1.3"]["met"] is None
    assert targets["|accuracy PPLL - sequential LL| <= 1.5 points"]["met"] is True
    assert targets["PPLL processes / 2 independent copies (ceiling) >= 0.95"]["met"] is None
    runs["vit"]["2x-sequential"] = [{"samples_per_s": 185}]
    runs["vit"]["ppll-torch"] = [{"samples_per_s": 172, "busy_fraction": [0.9, 0.9], "peak_rss_mb": [1, 1]}]
    targets = {t["target"]: t for t in bench.evaluate_targets(bench.summarise(runs), None)}
    assert targets["PPLL processes / 2 independent copies (ceiling) >= 0.95"]["value"] == pytest.approx(180 / 185)
    assert targets["PPLL processes / 2 independent copies (ceiling) >= 0.95"]["met"] is True
    assert targets["SchedulePPLL / PPLL processes (native runtime) >= 0.95"]["met"] is True  # 172 / 180
    assert targets["SchedulePPLL / 2 independent copies (ceiling) >= 0.95"]["met"] is False  # 172 / 185
    assert targets["DeepSpeed PPLL / PPLL processes (native runtime) >= 0.95"]["met"] is None


def test_bench_shows_predicted_stage_times_beside_measured_busy(bench) -> None:
    from ppll_ext.core.partition import plan_from_costs
    from ppll_ext.core.profile import LayerCosts

    plan = plan_from_costs(LayerCosts([0.03, 0.05, 0.04], [0.0, 0.01, 0.02, 0.0], [0.0, 0.001, 0.001, 0.0]), 2)
    rows = [{"model": "resnet32", "method": "ppll-processes", "busy_fraction": [0.93, 0.96]}]
    lines = bench.predicted_stages({"resnet32 K=2": plan.to_dict()}, rows)
    assert lines[-1] == "| resnet32 K=2 | 0,1 | 41.0 (46%), 90.0 (100%) | 93%, 96% |"  # 30+10+1 | 50+40
    assert bench.predicted_stages({}, rows) == []


def test_bench_reads_the_training_summary_from_metrics() -> None:
    from ppll_ext.bench.suite import accuracy_result

    records = [{"kind": "step", "step": 1, "epoch": 0, "time_s": 30.0, "loss": [2.1] * 4, "lr": [0.1] * 4,
                "samples_per_s": 175.0},
               {"kind": "eval", "step": 1, "epoch": 0, "time_s": 31.0, "loss": 1.9, "accuracy": 0.3,
                "aux_loss": [2.0] * 3, "aux_accuracy": [0.2] * 3},
               {"kind": "step", "step": 2, "epoch": 1, "time_s": 59.0, "loss": [1.8] * 4, "lr": [0.05] * 4,
                "samples_per_s": 180.2},
               {"kind": "eval", "step": 2, "epoch": 1, "time_s": 60.5, "loss": 1.6, "accuracy": 0.412,
                "aux_loss": [1.9, 1.8, 1.7], "aux_accuracy": [0.301, 0.35, 0.4]}]
    assert accuracy_result(records) == {"accuracy": 0.412, "aux_accuracy": [0.301, 0.35, 0.4],
                                        "samples_per_s": 180.2, "seconds": 60.5}


def test_bench_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--quick" in out and "bench-results" in out


def test_plot_bench_bars(tmp_path: Path) -> None:
    rows = [{"model": m, "method": k, "median_samples_per_s": v, "runs": [v - 5, v, v + 5]}
            for m in ("resnet32", "vit") for k, v in (("sequential", 100.0), ("ppll-processes", 190.0))]
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({"throughput": rows}))
    png = tmp_path / "bars.png"
    assert cli.main(["plot", "--bench", str(bench_json), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_schedule_ppll_trace_has_the_runtime_events(tmp_path: Path) -> None:
    """SchedulePPLL (the pipelining benchmark's worker under torchrun) traces like the native runtime: forward,
    send, backward, step per stage, and the last stage's waits for input as "wait-in"."""
    out = tmp_path / "torch.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ppll_ext.bench.worker", "--method", "ppll-torch", "--model", "resnet8",
           "--batch-size", "16", "--microbatches", "2", "--warmup", "1", "--steps", "3", "--partition", "0,3",
           "--trace", str(out)]
    res = run(cmd, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    spans = check_trace(out, stages=2, senders=1)
    assert any(e["name"] == "wait-in" and e["pid"] == 1 for e in spans)


def test_an_output_file_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(
        tmpfs: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`ppll partition --json` onto a full file system: one line naming the folder and the fix, exit code 2, and no
    temporary file left beside the target (the same writer writes traces, plots and the curves' rewrite)."""
    disk = tmpfs("disk", "64k")
    faults.fill(disk)
    target = disk / "split.json"
    rc = cli.main(["partition", "--no-time", "--json", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"ppll: error: --json {str(target)!r} cannot be written: no space left on the device "
                               f"of {str(disk)!r} (0 B free); free space there or choose another path"], err
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
