"""Stopping a launched process tree completely: launchers start workers in sessions of their own, and ninja runs
each compiler in its own process group, so killing the launcher's process group is not enough."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


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


MONITOR_S = 2
"""torchrun's worker-monitor interval: surviving stages have this long to notice a dead neighbour and say so
before torchrun tears them down."""

def env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    return kids


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
    return found[0] if found else None


def started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): tells a process from a later one with the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def vm_rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Launch:
    """A launcher command run in its own session; stdout/stderr lines are collected with their arrival time."""

    def __init__(self, cmd: list[str], env: dict[str, str], timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=REPO, start_new_session=True)
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self.seen: dict[int, str | None] = {}
        self.pids: dict[int, int] = {}
        """{rank: pid} of the stage processes, once `stages()` found them."""
        self._readers = [threading.Thread(target=self._read, args=(s, d), daemon=True)
                         for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream: IO[str], into: list[tuple[float, str]]) -> None:
        for line in stream:
            into.append((time.monotonic(), line.rstrip("\n")))

    @property
    def stdout(self) -> str:
        return "\n".join(line for _, line in self.out)

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.err)

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"launch timed out\n{self.stdout[-2000:]}\n{self.stderr[-4000:]}")
        return left

    def wait_for(self, pattern: str, stream: str = "out") -> tuple[float, str]:
        """(arrival time, line) of the first line matching `pattern`; fails if the launch ends or times out first."""
        lines = self.out if stream == "out" else self.err
        regex = re.compile(pattern)
        while True:
            ended = self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)
            for t, line in list(lines):
                if regex.search(line):
                    return t, line
            if ended:
                pytest.fail(f"launch ended (rc {self.proc.returncode}) before {pattern!r}\n{self.stdout[-2000:]}\n"
                            f"{self.stderr[-4000:]}")
            self.left()
            time.sleep(0.02)

    def descendants(self) -> set[int]:
        kids, found, todo = children(), set(), [self.proc.pid]
        while todo:
            for child in kids.get(todo.pop(), []):
                found.add(child)
                todo.append(child)
        return found

    def stages(self, n: int) -> dict[int, int]:
        """{rank: pid} of the n stage processes: the launcher's topmost descendants with RANK set."""
        while True:
            kids, found, todo = children(), {}, [self.proc.pid]
            while todo:
                for child in kids.get(todo.pop(), []):
                    rank = rank_of(child)
                    if rank is not None and alive(child):
                        found[rank] = child
                    else:
                        todo.append(child)
            self.seen.update({pid: started(pid) for pid in found.values()})
            if len(found) == n:
                self.pids = found
                return found
            self.left()
            time.sleep(0.05)

    def finish(self) -> int:
        """Wait for the launcher to exit; its return code."""
        try:
            self.proc.wait(timeout=self.left())
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher did not exit\n{self.stdout[-2000:]}\n{self.stderr[-4000:]}")
        for t in self._readers:
            t.join(timeout=5)
        return self.proc.returncode

    def close(self) -> None:
        """Kill every process the launcher started (stages run in sessions of their own) and its session."""
        mine = {**self.seen, **{pid: started(pid) for pid in self.descendants()}}
        for pid, since in mine.items():
            if since is not None and started(pid) == since:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def torchrun(nproc: int, args: list[str], timeout: float = 120, fault: str | None = None) -> Launch:
    """`python -m torch.distributed.run ... -m ppll_ext.train args` (what `ppll train` spawns, monitored faster);
    with `fault`, tests/faults.py installs it in every rank and runs `ppll train args`."""
    entry = ["-m", "ppll_ext.train"] if fault is None else [str(REPO / "tests" / "faults.py"), fault, "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--monitor-interval={MONITOR_S}", *entry, *args]
    return Launch(cmd, env(), timeout)


def deepspeed_launch(nproc: int, script: Path, *args: str, timeout: float = 150) -> Launch:
    """The real `deepspeed` launcher on CPU, on a free port."""
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    return Launch(cmd, env(), timeout)
