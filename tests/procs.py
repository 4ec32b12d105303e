"""Stopping a launched process tree completely: launchers start workers in sessions of their own, and ninja runs
each compiler in its own process group, so killing the launcher's process group is not enough."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil
import pytest


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process below it (whatever its session or group), then reap `proc`."""
    with contextlib.suppress(psutil.NoSuchProcess):
        below = psutil.Process(proc.pid).children(recursive=True)
        for p in below:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def communicate(proc: subprocess.Popen, timeout: float, what: str) -> subprocess.CompletedProcess:
    """Wait for `proc` (text pipes); past `timeout` its whole tree is killed and the test fails with its output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"{what} timed out after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
