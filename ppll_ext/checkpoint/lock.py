"""The lock of a run directory (`.ppll.lock`: pid, host, process start, time), held as a context manager by the
process that commits its checkpoints, and the settling of interrupted saves when a run takes it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from ppll_ext.checkpoint.layout import INDEX, TMP_DIR, is_count, verify
from ppll_ext.errors import CheckpointError, ConfigError
from ppll_ext.paths import unwritable

log = logging.getLogger(__name__)

LOCK = ".ppll.lock"
"""The lock file of a run directory, held by the process that commits its checkpoints for the whole run."""


def _process(pid: int) -> tuple[bool, str | None]:
    """(whether process `pid` runs, its start time in clock ticks since boot; None where /proc cannot tell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass  # it exists, under another user
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True, None
    return fields[0] != "Z", fields[19]


def _read_lock(path: Path) -> dict | None:
    """The lock file's holder {pid, host, started, since}, None without one; a lock being written is waited for."""
    for _ in range(10):
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            time.sleep(0.05)  # created by another run that has not written it yet
            continue
        if (isinstance(holder, dict) and is_count(holder.get("pid")) and holder["pid"] > 0
                and isinstance(holder.get("host"), str) and isinstance(holder.get("since"), str)
                and "started" in holder and isinstance(holder["started"], (str, type(None)))):
            return holder
        break
    raise CheckpointError(f"{str(path)!r} is not a ppll lock (JSON with pid, host, started, since); if no run uses "
                          f"{str(path.parent)!r}, delete it", key="train.save_dir")


def _stale_lock(path: Path) -> dict | None:
    """The holder of the lock at `path` if its run is dead; None without a lock; CheckpointError while a live run
    (or a run on another host, which cannot be checked from here) holds it."""
    holder = _read_lock(path)
    if holder is None:
        return None
    who = f"pid {holder['pid']} on host {holder['host']}, started {holder['since']}"
    if holder["host"] != socket.gethostname():
        raise CheckpointError(f"{str(path.parent)!r} is locked by a run on another host ({who}); if that run has "
                              f"ended, delete {str(path)!r}, else choose another train.save_dir", key="train.save_dir")
    running, started = _process(holder["pid"])
    if running and (holder["started"] is None or started is None or started == holder["started"]):
        raise CheckpointError(f"{str(path.parent)!r} is in use by another run ({who}); wait for it to end or choose "
                              f"another train.save_dir", key="train.save_dir")
    return holder


def check_run_dir(save_dir: str | Path) -> None:
    """ConfigError unless `save_dir` is, or can be created as, a writable folder; CheckpointError while a live run
    holds its lock. Checked before any training, so a bad run directory never fails a run after its epochs."""
    root = Path(save_dir).absolute()
    reason = unwritable(root)
    if reason is not None:
        raise ConfigError(f"train.save_dir={str(save_dir)!r} cannot be used: {reason}; choose another "
                          f"train.save_dir", key="train.save_dir")
    _stale_lock(root / LOCK)


@dataclass
class RunLock:
    """The lock on a run directory, held by the process that commits its checkpoints (see lock_run); as a context
    manager (`with lock_run(save_dir):`) it is released when the block ends, however it ends."""

    path: Path
    holder: dict
    created_dir: bool

    def release(self) -> None:
        """Remove the lock while it is still this process's, and the run directory if this run created it and left
        it empty (idempotent)."""
        with suppress(FileNotFoundError, CheckpointError):
            if _read_lock(self.path) == self.holder:
                self.path.unlink()
        if self.created_dir:
            with suppress(OSError):
                self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run(save_dir: str | Path) -> RunLock:
    """Lock run directory `save_dir` (created if need be) for this process, the one that commits its checkpoints:
    refused while another live run holds it, a dead run's lock taken over with a message. Then the step-N.tmp
    folders of interrupted saves are settled (no live run can be writing them). Use it as `with lock_run(save_dir):`
    so it is released in one place."""
    check_run_dir(save_dir)
    root = Path(save_dir)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process(os.getpid())[1],
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            stale = _stale_lock(path)
            if stale is not None:
                _take_over(path, stale)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine) + "\n")
        break
    else:
        raise CheckpointError(f"{str(path)!r} was taken by other runs starting at the same time; choose another "
                              f"train.save_dir", key="train.save_dir")
    _finish_interrupted(root)
    return RunLock(path, mine, created)


def _finish_interrupted(root: Path) -> None:
    """Settle the step-N.tmp folders of interrupted saves in run directory `root` (no live run writes them): one
    that is complete (its index written, every file verified) and has no step-N beside it was killed between the
    index and the rename, so the rename is done now and nothing saved is lost; the others are removed."""
    removed = []
    for tmp in sorted(p for p in root.iterdir() if TMP_DIR.match(p.name) and p.is_dir() and not p.is_symlink()):
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        try:
            status = verify(tmp) if (tmp / INDEX).is_file() and not final.exists() else None
        except CheckpointError:
            status = None
        if status and set(status.values()) == {"ok"}:
            os.replace(tmp, final)
            log.warning("%s: completed the save of %s that was interrupted before its rename (every file verified)",
                        root, final.name)
            continue
        shutil.rmtree(tmp)
        removed.append(tmp.name)
    if removed:
        log.info("removed %s from %s: folders of interrupted saves, never loaded", ", ".join(removed), root)


def _take_over(path: Path, holder: dict) -> None:
    """Remove the stale lock of `holder` at `path`, saying so; a lock another run has put there meanwhile stays."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run took it over first
    if _read_lock(aside) != holder:  # that other run's fresh lock: put it back
        os.rename(aside, path)
        return
    aside.unlink()
    log.warning("taking over the lock of %s: its run (pid %d on host %s, started %s) is no longer running",
                path.parent, holder["pid"], holder["host"], holder["since"])
