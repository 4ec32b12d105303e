"""No process of a run outlives the process the user started.

Launchers start each worker in a session of its own (torchrun) or behind a middle process (the deepspeed runner's
`deepspeed.launcher.launch`), so when the launcher is killed outright (OOM killer, job scheduler, closed terminal)
nothing reaches the workers: they would re-parent to PID 1 and keep training. Every stage process therefore watches
the chain of launcher processes above it (`watch_launchers`) and exits when one of them is gone; and the torchrun
that `ppll train` spawns dies with `ppll train` through a parent-death signal (`die_with_parent`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

LAUNCHER_MODULES: tuple[str, ...] = (
    "torch.distributed.run", "torch.distributed.launch", "deepspeed.launcher.launch", "deepspeed.launcher.runner",
    "accelerate.commands.launch", "accelerate.commands.accelerate_cli", "ppll_ext", "ppll_ext.train",
    "ppll_ext.runtime.torchrun")
"""`python -m MODULE` processes that launch (or are) a ppll_ext run: the chain a stage process watches."""
LAUNCHER_SCRIPTS: tuple[str, ...] = ("torchrun", "deepspeed", "accelerate", "ppll")
"""Console scripts of those launchers (`/venv/bin/torchrun ...` runs as `python /venv/bin/torchrun ...`)."""
POLL_S = 0.5
"""How often a stage process checks that its launchers are alive."""
EXIT_ORPHANED = 143
"""Exit code of a stage process whose launcher is gone (as if it had been sent SIGTERM)."""
_PR_SET_PDEATHSIG = 1
_watching = threading.Event()


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _identity(pid: int) -> str | None:
    """The process's start time (clock ticks after boot): with the pid, one process, even after pid reuse."""
    fields = _stat(pid)
    return fields[19] if fields is not None and fields[0] != "Z" else None


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields is not None else 0


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def is_launcher(argv: list[str]) -> bool:
    """True for the command line of torchrun, the deepspeed launchers, accelerate launch or ppll itself."""
    head = argv[:4]
    if "-m" in head and head.index("-m") + 1 < len(argv):
        return argv[head.index("-m") + 1] in LAUNCHER_MODULES
    return any(Path(arg).name in LAUNCHER_SCRIPTS for arg in argv[:2])


def launcher_chain(pid: int | None = None) -> list[tuple[int, str, str]]:
    """(pid, identity, name) of the launcher processes above `pid` (default: this process), nearest first: the
    unbroken run of launcher ancestors, ending below the first process that is not one (a shell, a test)."""
    chain = []
    current = _parent(os.getpid() if pid is None else pid)
    while current > 1 and is_launcher(argv := _argv(current)):
        identity = _identity(current)
        if identity is None:
            break
        chain.append((current, identity, " ".join(Path(a).name for a in argv[:4])))
        current = _parent(current)
    return chain


def watch_launchers() -> bool:
    """Exit this process (code 143) within POLL_S of the death of any launcher above it; once per process.

    Returns whether a watch runs (False when no launcher started this process)."""
    if _watching.is_set():
        return True
    chain = launcher_chain()
    if not chain:
        return False
    _watching.set()
    threading.Thread(target=_watch, args=(chain,), name="ppll-launcher-watch", daemon=True).start()
    return True


def _watch(chain: list[tuple[int, str, str]]) -> None:
    while True:
        for pid, identity, name in chain:
            if _identity(pid) != identity:
                rank = os.environ.get("RANK", "?")
                log.error("rank %s: its launcher %r (pid %d) is gone; stopping this process", rank, name, pid)
                for handler in logging.getLogger("ppll_ext").handlers:
                    handler.flush()
                sys.stderr.flush()
                os._exit(EXIT_ORPHANED)
        threading.Event().wait(POLL_S)


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; elsewhere the stage processes'
    watch still ends the run), and send it at once if `parent`, the process that started this one, is already
    gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
