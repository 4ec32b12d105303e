"""Count the calls that would synchronise host and device on a GPU, and say where they came from.

`install()` wraps `Tensor.item`, `tolist`, `cpu`, `__float__`, `__int__` and `__bool__`; every call made inside the
stage loop (`StageWorker.handle` or a link's send / receive) is recorded as *hot* unless a logging point is on the
stack (reading losses back at a report, the non-finite check, evaluation), in which case it is recorded as
*logging*. On the CPU these calls cost nothing, but each is a stall on a GPU, so the training stream must make none.

In processes a launcher starts: run this file instead of `-m ppll_ext.train`; it installs the counter, runs the `ppll`
command line with the remaining arguments and prints `syncs rank R: hot H logging L` (and the first hot call's
stack) at exit.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import torch

METHODS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")
LOOP = {("stage.py", "handle"), ("links.py", "_receive"), ("links.py", "send")}
"""(file, function) frames that mark the stage loop's per-message path."""
LOGGING_POINTS = {"settle", "check_health", "eval_step", "_gather"}
"""Functions where reading device values back is the point: reports, the non-finite check, evaluation."""

hot: list[list[str]] = []
logging_calls: list[list[str]] = []
_lock = threading.Lock()
_inside = threading.local()


def _where() -> tuple[bool, bool, list[str]]:
    stack = traceback.extract_stack()[:-2]  # without _where and the wrapper
    frames = [(os.path.basename(f.filename), f.name) for f in stack]
    in_loop = any(fr in LOOP for fr in frames)
    at_logging_point = any(name in LOGGING_POINTS for _, name in frames)
    return in_loop, at_logging_point, [f"{f.filename}:{f.lineno} {f.name}" for f in stack[-8:]]


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not getattr(_inside, "busy", False):
            _inside.busy = True
            try:
                in_loop, at_logging_point, where = _where()
                if in_loop:
                    with _lock:
                        (logging_calls if at_logging_point else hot).append([f"Tensor.{name}", *where])
            finally:
                _inside.busy = False
        return original(self, *args, **kwargs)

    return counted


def install() -> Callable[[], None]:
    """Wrap the synchronising Tensor methods; returns a function that restores them."""
    originals = {name: getattr(torch.Tensor, name) for name in METHODS}
    for name, fn in originals.items():
        setattr(torch.Tensor, name, _wrap(name, fn))

    def restore() -> None:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)

    return restore


def clear() -> None:
    """Forget the calls recorded so far."""
    hot.clear()
    logging_calls.clear()


def _report() -> None:
    rank = os.environ.get("RANK", "0")
    print(f"syncs rank {rank}: hot {len(hot)} logging {len(logging_calls)}", flush=True)
    if hot:
        print(f"first hot call on rank {rank}: " + " <- ".join(reversed(hot[0])), flush=True)


if __name__ == "__main__":
    install()
    atexit.register(_report)
    from ppll_ext.cli import main

    sys.exit(main(sys.argv[1:]))
