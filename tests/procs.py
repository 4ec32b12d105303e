"""Launching processes from tests, in one place: the environment every launched process gets, launchers run to
completion or watched line by line, families of cases run in one launch (tests/dist/family.py), and stopping a
launched process tree completely (launchers start workers in sessions of their own, and ninja runs each compiler in
its own process group, so killing the launcher's process group is not enough)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
    """The environment of every launched process: this tree's ppll_ext, DeepSpeed on the CPU, one thread per
    process, no launcher variables inherited from the test's own process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def run(cmd: list[str], timeout: float = 300, what: str | None = None, **extra: str) -> subprocess.CompletedProcess:
    """Run `cmd` (a launcher, a script) in the repository with env(**extra), in its own session, to completion;
    past `timeout` its whole process tree is killed and the test fails with its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra),
                            cwd=REPO, start_new_session=True)
    return communicate(proc, timeout, what or Path(cmd[0]).name)


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


def torchrun_cmd(nproc: int) -> list[str]:
    """`torchrun --standalone --nproc_per_node nproc` (a script and its arguments follow)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def deepspeed_cmd(nproc: int, port: int) -> list[str]:
    """The real `deepspeed` launcher on CPU on `port` (a script and its arguments follow)."""
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(port)]


def assert_no_shm_left(port: int) -> None:
    """DeepSpeed's CPU comm op leaves a ~66 MB /dev/shm buffer per rank behind; LocalPipelineModule removes it."""
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for f in left:
        f.unlink()
    assert not left, f"shared-memory buffers left behind: {[f.name for f in left]}"


FAMILY = REPO / "tests" / "dist" / "family.py"


@dataclass
class CaseRun:
    """One case of a family launch: per rank its exit status, stdout and stderr."""

    name: str
    rc: dict[int, int]
    out: dict[int, str]
    err: dict[int, str]

    @property
    def stdout(self) -> str:
        """Every rank's stdout, rank 0's first."""
        return "".join(self.out[r] for r in sorted(self.out))

    @property
    def stderr(self) -> str:
        """Every rank's stderr, rank 0's first."""
        return "".join(self.err[r] for r in sorted(self.err))


class Family:
    """The cases of one launch of tests/dist/family.py, by name; a case that failed or never ran fails the test that
    asks for it, with the output that says why. `root`: the folder the cases wrote their files to."""

    def __init__(self, names: list[str], folder: Path, nproc: int, launch: subprocess.CompletedProcess,
                 root: Path | None = None) -> None:
        self.names, self.folder, self.nproc, self.launch = names, folder, nproc, launch
        self.root = root or folder

    def ok(self, *names: str) -> None:
        """Fail the test unless every one of `names` ran and exited 0 on every rank."""
        for name in names:
            self[name]

    def __getitem__(self, name: str) -> CaseRun:
        case = self._read(name)
        if case is not None and all(case.rc.get(r) == 0 for r in range(self.nproc)):
            return case
        if case is not None:
            pytest.fail(f"case {name} exited {case.rc} (by rank):\n{case.stdout[-2000:]}\n{case.stderr[-4000:]}")
        failed = next((c for c in map(self._read, self.names) if c is not None and any(c.rc.values())), None)
        why = (f"the family stopped at case {failed.name}, which exited {failed.rc} (by rank):\n"
               f"{failed.stderr[-4000:]}" if failed else f"the launch exited {self.launch.returncode}")
        pytest.fail(f"case {name} did not run: {why}\n{self.launch.stdout[-2000:]}\n{self.launch.stderr[-4000:]}")

    def _read(self, name: str) -> CaseRun | None:
        folder = self.folder / name
        rcs = {r: folder / f"rank{r}.rc" for r in range(self.nproc)}
        if not any(p.exists() for p in rcs.values()):
            return None
        text = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return CaseRun(name, {r: int(p.read_text()) for r, p in rcs.items() if p.exists()},
                       {r: text(folder / f"rank{r}.out") for r in range(self.nproc)},
                       {r: text(folder / f"rank{r}.err") for r in range(self.nproc)})


def family(launcher: list[str], nproc: int, cases: list[dict], folder: Path, timeout: float = 480,
           root: Path | None = None, **extra: str) -> Family:
    """Run `cases` ({"name", "script" or "module", "args"}) in one launch of tests/dist/family.py by `launcher`
    (which starts `nproc` processes), one after another in every process, their output kept in `folder`; their
    results by name. Past `timeout` (below pytest's 600 s per test, so that the whole process tree is killed here)
    the test fails with the launch's output."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "family.json"
    plan.write_text(json.dumps({"out": str(folder), "cases": cases}))
    res = run([*launcher, str(FAMILY), str(plan)], timeout=timeout, what=f"family {folder.name}", **extra)
    return Family([c["name"] for c in cases], folder, nproc, res, root)


LATE, LAST = 1, 2
"""Plan.add orders: cases that change the process for the cases after them run late; a case whose end must be the
process's end (a script that returns without leaving the process group, or reports at exit) runs last."""


class Plan:
    """A family of multi-process cases gathered from every collected test module, run in ONE launch the first time a
    test asks for it (`launch`). Modules add their cases when they are imported (collection precedes every test);
    "{root}" in a case's arguments stands for the family's folder, where the cases write what the tests read.
    `launcher`: "torchrun" (torchrun --standalone) or "deepspeed" (launch/deepspeed.sh, the shipped wrapper of the
    deepspeed launcher, on a free port; no DeepSpeed shared-memory buffer may be left behind)."""

    def __init__(self, launcher: str, nproc: int) -> None:
        self.launcher, self.nproc = launcher, nproc
        self.cases: list[tuple[int, int, dict]] = []
        self.files: dict[str, str] = {}
        self._ran: Family | None = None
        self._failure: str | None = None

    def add(self, name: str, *args: object, script: Path | str | None = None, module: str | None = None,
            order: int = 0) -> None:
        """Add case `name`: `script` (a path) or `module` (run as `python -m`) with `args`, in `order` (0, LATE or
        LAST; a family has at most one LAST case)."""
        assert name not in {c["name"] for _, _, c in self.cases}, f"two cases named {name!r}"
        assert order != LAST or all(o != LAST for o, _, _ in self.cases), f"{name}: the family has a last case"
        target = {"script": str(script)} if script is not None else {"module": module}
        self.cases.append((order, len(self.cases), {"name": name, **target, "args": [str(a) for a in args]}))

    def write(self, name: str, text: str) -> None:
        """Have file `name` (relative to "{root}") hold `text` when the family starts."""
        self.files[name] = text

    def launch(self, tmp_path_factory: pytest.TempPathFactory) -> Family:
        """The family's results: launched at the first call, the same ones afterwards."""
        if self._failure is not None:
            pytest.fail(self._failure)
        if self._ran is None:
            try:
                self._ran = self._launch(tmp_path_factory)
            except BaseException as exc:  # a launch that failed or timed out fails every test asking for it at once
                self._failure = f"the {self.launcher} family of {self.nproc} processes failed: {exc}"
                raise
        return self._ran

    def _launch(self, tmp_path_factory: pytest.TempPathFactory) -> Family:
        root = tmp_path_factory.mktemp(f"{self.launcher}{self.nproc}")
        for name, text in self.files.items():
            (root / name).write_text(text)
        cases = [json.loads(json.dumps(c).replace("{root}", str(root)))
                 for _, _, c in sorted(self.cases, key=lambda c: c[:2])]
        port = free_port()
        if self.launcher == "deepspeed":
            cmd, extra = [str(REPO / "launch" / "deepspeed.sh"), str(self.nproc)], {"MASTER_PORT": str(port)}
        else:
            cmd, extra = torchrun_cmd(self.nproc), {}
        ran = family(cmd, self.nproc, cases, root / "logs", root=root, **extra)
        if self.launcher == "deepspeed":
            assert_no_shm_left(port)
        return ran


PLANS: dict[tuple[str, int], Plan] = {}


def plan(launcher: str, nproc: int) -> Plan:
    """The one family of `launcher` (torchrun, deepspeed) with `nproc` processes that every test module adds to."""
    return PLANS.setdefault((launcher, nproc), Plan(launcher, nproc))
