"""The run directory: one live run at a time (lock), an earlier run's later checkpoints moved aside instead of
pruned in place of this run's, leftovers of interrupted saves removed, a bad --save-dir refused before training, a
disk without room for two checkpoints refused before training and a disk that fills up failing a save cleanly.

Runs are real `ppll train` runs of a tiny ResNet-8 in this process (sequential runtime: no start-up cost)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import faults
import pytest

from ppll_ext import checkpoint as ckpt
from ppll_ext import hooks
from ppll_ext.cli import main as cli_main
from ppll_ext.config import load_config
from ppll_ext.errors import CheckpointError
from ppll_ext.train import run_training

TINY = ["model.name=resnet8", "model.width=4", "local.partition=uniform", "local.stages=2", "train.progress=false",
        "train.threads=1", "data.train_subset=320", "data.test_subset=100", "train.batch_size=32",
        "local.runtime=sequential"]
"""10 steps per epoch."""


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def train(*overrides: str) -> str:
    """A run of TINY with `overrides` in this process; what it printed."""
    out = io.StringIO()
    run_training(load_config(None, [*TINY, *overrides]), out=out)
    return out.getvalue()


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("ppll_ext")]


def test_resume_before_later_checkpoints_moves_them_aside_and_keeps_its_own(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Resumed from step 10 in a folder that also holds step 20 (saved later by the first run), a run saving steps 12
    and 14 with keep=1 keeps step 14: step 20 was moved to superseded/ before training (not deleted), so pruning
    removes only the older ones and `--resume run` picks step 14. Leftovers of interrupted saves go too: a
    step-N.tmp folder when the lock is taken, and stale files (another K's shards, *.part) in the folder of the very
    step being saved when it is committed."""
    caplog.set_level(logging.INFO, logger="ppll_ext")
    run = tmp_path / "run"
    train("train.epochs=2", f"train.save_dir={run}", "train.save_every=10", "train.keep=5")
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000010", "step-000020"]
    later = {p.relative_to(run).as_posix(): p.read_bytes() for p in (run / "step-000020").rglob("*") if p.is_file()}
    leftover = run / "step-000016.tmp"
    (leftover / ckpt.STATE_DIR).mkdir(parents=True)
    (leftover / ckpt.shard_name(0, 3)).write_bytes(b"half a shard")

    def plant_stale(folder: Path, stage: int) -> None:
        """What a K = 3 run killed while saving step 12 would have left in step-000012.tmp."""
        if folder.name == "step-000012.tmp" and stage == 0:
            (folder / ckpt.shard_name(2, 3)).write_bytes(b"stale")
            (folder / ckpt.STATE_DIR).mkdir(exist_ok=True)
            (folder / ckpt.STATE_DIR / "stage-2.json").write_text("{}")
            (folder / ckpt.STATE_DIR / "stage-2.safetensors.part").write_bytes(b"partial")

    remove = hooks.on_shard_written(plant_stale)
    try:
        printed = train("train.epochs=2", f"train.save_dir={run}", f"train.resume={run / 'step-000010'}",
                        "train.save_every=2", "train.stop_at_step=14", "train.keep=1")
    finally:
        remove()
    assert [line for line in printed.splitlines() if line.startswith("checkpoint saved")] == [
        f"checkpoint saved: {run / 'step-000012'}", f"checkpoint saved: {run / 'step-000014'}"]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000014"] and (run / ckpt.SUPERSEDED).is_dir()
    moved = run / ckpt.SUPERSEDED / "step-000020"
    assert {f"step-000020/{p.relative_to(moved).as_posix()}": p.read_bytes()
            for p in moved.rglob("*") if p.is_file()} == later
    assert ckpt.resolve(run).name == "step-000014"
    assert set(ckpt.verify(run / "step-000014").values()) == {"ok"}  # only its own files, none unlisted
    assert not any(ckpt.shard_name(2, 3) in p.name or p.name.endswith(".part") for p in run.rglob("*"))
    notes = messages(caplog)
    assert f"removed step-000016.tmp from {run}: folders of interrupted saves, never loaded" in notes, notes
    assert (f"this run is at step 10: moved the later checkpoint(s) step-000020 of an earlier run to "
            f"{run / ckpt.SUPERSEDED} (not deleted)") in notes, notes
    (run / "step-000020").mkdir()  # superseded a second time: kept beside the first, under another name
    ckpt.supersede(run, 14)
    assert sorted(p.name for p in (run / ckpt.SUPERSEDED).iterdir()) == ["step-000020", "step-000020.2"]
    assert ("step-000012.tmp: removed 3 file(s) an interrupted earlier save left there (model-00003-of-00003"
            ".safetensors, training_state/stage-2.json, training_state/stage-2.safetensors.part)") in notes, notes


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _lock(folder: Path, **changes: object) -> Path:
    """The lock file this process would write into `folder`, with `changes`, left there."""
    own = ckpt.lock_run(folder)
    own.release()
    (folder / ckpt.LOCK).write_text(json.dumps({**own.holder, **changes}))
    return folder / ckpt.LOCK


def test_a_second_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """While a run trains, its run directory holds its lock and a second `ppll train` into it fails with one line
    before training (in-process runtimes at the lock, the processes runtime already in the parent before torchrun
    starts); the lock goes when the run ends. A lock whose process is gone, or whose pid now belongs to a later
    process, is taken over with a message; one from another host is refused with the way to remove it."""
    run = tmp_path / "run"
    seen: list[tuple[dict, int, list[str]]] = []

    def second_run(block: object) -> None:
        if not seen:
            holder = json.loads((run / ckpt.LOCK).read_text())
            capsys.readouterr()
            rc = cli_main(["train", *sets(*TINY, "train.epochs=1"), "--save-dir", str(run)])
            seen.append((holder, rc, capsys.readouterr().err.strip().splitlines()))

    remove = hooks.on_stage_start(second_run)
    try:
        train("train.epochs=1", f"train.save_dir={run}")
    finally:
        remove()
    holder, rc, err = seen[0]
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"ppll: error: {str(run)!r} is in use by another run (pid {os.getpid()} on host "
                      f"{socket.gethostname()}, started {holder['since']}); wait for it to end or choose another "
                      f"train.save_dir (command line: --save-dir or --set train.save_dir=...)")
    assert not (run / ckpt.LOCK).exists() and ckpt.resolve(run).name == "step-000010"

    # the processes runtime: the parent refuses before it starts torchrun (this process holds the lock)
    held = ckpt.lock_run(run)
    try:
        capsys.readouterr()
        rc = cli_main(["train", "--runtime", "processes", *sets(*TINY[:-1], "train.epochs=1"), "--save-dir", str(run)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "is in use by another run" in err[0], err
    finally:
        held.release()
    assert not (run / ckpt.LOCK).exists()

    caplog.set_level(logging.INFO, logger="ppll_ext")
    dead = _dead_pid()
    for stale in ({"pid": dead}, {"started": "1"}):  # a dead process; a live pid of a later process
        lock = _lock(run, **stale, since="yesterday")
        caplog.clear()
        ckpt.lock_run(run).release()
        pid = stale.get("pid", os.getpid())
        assert messages(caplog) == [f"taking over the lock of {run}: its run (pid {pid} on host "
                                    f"{socket.gethostname()}, started yesterday) is no longer running"]
        assert not lock.exists()
    lock = _lock(run, host="elsewhere", pid=dead)
    with pytest.raises(CheckpointError, match=rf"locked by a run on another host \(pid {dead} on host elsewhere, "
                                              rf"started .*\); if that run has ended, delete {str(lock)!r}"):
        ckpt.lock_run(run)
    lock.write_text("not a lock")
    with pytest.raises(CheckpointError, match="is not a ppll lock"):
        ckpt.lock_run(run)


def test_a_save_dir_that_cannot_hold_checkpoints_fails_before_training(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A --save-dir that is a file (or lies under one, or is not writable) is one error line before any training,
    in the in-process runtimes and in the parent of the processes runtime."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # /proc refuses new folders even to root (who passes any permission check), so the probe is a real one
    cases = [(blocker, "is a file"), (blocker / "run", "is a file"), (Path("/proc/ppll-run"), "is not writable")]
    for save_dir, needle in cases:
        for runtime in ("sequential", "processes"):
            rc = cli_main(["train", "--runtime", runtime, *sets(*TINY[:-1], "train.epochs=1"),
                           "--save-dir", str(save_dir)])
            out, err = capsys.readouterr()
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and needle in lines[0], (runtime, lines)
            assert lines[0].startswith(f"ppll: error: train.save_dir={str(save_dir)!r} cannot be used: ")
            assert "training" not in out


def test_a_disk_too_small_is_refused_before_training_and_a_full_disk_fails_a_save_in_one_line(
        tmp_path: Path, tmpfs: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    """On a file system without room for two checkpoints the run is one error line with the numbers before any
    training. On one that fills up during the save of step 10 (stage 0 has written its shard), the run ends with one
    line naming the run directory and the fix; step 5 is intact (`ppll verify` says ok) and nothing of step 10 is
    left; the same with the stages in threads (which all finish writing before the step's folder goes). The estimate
    the first line gives is within 10% of the checkpoint really written."""
    small = tmpfs("small", "200k")
    rc = cli_main(["train", *sets(*TINY, "train.epochs=1"), "--save-dir", str(small / "run")])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    refused = re.fullmatch(rf"ppll: error: train\.save_dir='{small / 'run'}' has (\d+) kB free, but one checkpoint of "
                           rf"this run takes about (\d+) kB and saving needs room for two \(the new one is written "
                           rf"before the previous one is removed\); free space there or choose another train\.save_dir "
                           rf"\(command line: --save-dir or --set train\.save_dir=\.\.\.\)", lines[0])
    assert refused, lines
    free, estimate = (int(n) * 1000 for n in refused.groups())
    assert 190_000 < free <= shutil.disk_usage(small).free < 2 * estimate, (free, estimate)
    assert "training" not in out and list(small.iterdir()) == []

    disk = tmpfs("disk", "2m")
    remove = faults.hooks.on_shard_written(lambda folder, stage: folder.name == "step-000010.tmp" and stage == 0
                                           and faults.fill(disk))
    try:
        for runtime, prefix in (("sequential", ""), ("threads", "stage 0 failed: CheckpointError: ")):
            run = disk / runtime
            rc = cli_main(["train", *sets(*TINY, "train.epochs=1"), "--runtime", runtime, "--save-dir", str(run),
                           "--save-every", "5"])
            out, err = capsys.readouterr()
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1, (runtime, lines)
            assert re.fullmatch(rf"ppll: error: {prefix}no space left on the device of '{run}' while saving "
                                rf"step-000010 \(\d+ B free\): the latest complete checkpoint, step-000005, is intact; "
                                rf"free space there \(or choose another train\.save_dir\) and resume from it \(command "
                                rf"line: --save-dir or --set train\.save_dir=\.\.\.\)", lines[0]), (runtime, lines)
            assert f"checkpoint saved: {run / 'step-000005'}" in out and "step-000010" not in out, (runtime, out)
            assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-000005"], runtime
            assert not [p for p in run.rglob("*") if p.name.endswith((".part", ".tmp"))], runtime
            (disk / "filler").unlink()
            assert cli_main(["verify", str(run)]) == 0
            verified = capsys.readouterr().out.splitlines()
            assert verified and all(line.startswith("ok ") for line in verified), (runtime, verified)
    finally:
        remove()
    written = sum(p.stat().st_size for p in (disk / "sequential" / "step-000005").rglob("*") if p.is_file())
    assert abs(estimate - written) < written / 10, (estimate, written)
