"""Ending a stage's links before its process group goes, whichever way a script ends.

A stage posts its next receive ahead and keeps sends in flight (transport/links.py). A user's script for
SchedulePPLL or the DeepSpeed adapter may simply return after its last step, or call
`torch.distributed.destroy_process_group()` as torch's tutorials do, while a faster first stage is still ahead of
the last one. Destroying the group then drops the messages still in flight and leaves a receive posted on it. So
every link owner (SchedulePPLL, LocalPipelineEngine) registers here, and its `close()` (end marker down the
pipeline, wait until it is taken) runs

- when the script calls it,
- else just before `torch.distributed.destroy_process_group()` destroys the default group (the function is wrapped
  once, on the first registration, by ppll_ext.torch_patches; a script that imported the function itself before
  ppll_ext misses the wrap),
- else at interpreter exit (atexit), while the group still exists.

`close()` also checks that every stage made the same calls (transport/links.py `end_stream`) and raises
PipelineError on every stage when they did not. Raised in `destroy_process_group()`, the error propagates from it
(after the group is destroyed). At interpreter exit an exception cannot change the exit code, so the error is logged
as one line and the process ends with `os._exit(EXIT_ERROR)` (2) after flushing its logs and output: the exit
handlers registered before ppll_ext's are skipped (the run failed). A process already ending on an error (an
uncaught exception, or one being handled where the group is destroyed) closes with `failed=True`: the later stages
learn that this stage failed, and its exit code stays as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Protocol

import torch.distributed as dist

from ppll_ext import torch_patches
from ppll_ext.errors import EXIT_ERROR, PipelineError

log = logging.getLogger(__name__)


class Closable(Protocol):
    """A link owner: `close()` ends its streams and is idempotent."""

    def close(self, failed: bool = False) -> None:
        """End the owner's streams (end marker down the pipeline, posted receive completed); PipelineError when the
        stages made different calls. `failed`: this process stopped on an error (tell the later stages, raise
        nothing about the calls)."""


_open: dict[int, Closable] = {}
"""Registered owners not closed yet, by id. Held strongly: a schedule that went out of scope with its links open
(a script's `main()` returned) must still end them at exit."""
_installed = False


def close_all(reason: str, failed: bool = False) -> None:
    """Close every registered, still-open link owner (`reason` names the moment); raises the first PipelineError
    once all are closed. With `failed` (the process is ending on an error) a failure is logged, not raised."""
    first: PipelineError | None = None
    for key, owner in list(_open.items()):
        _open.pop(key, None)
        if not dist.is_initialized():
            log.warning("%s: the process group is already gone; %s could not end its links", reason,
                        type(owner).__name__)
            continue
        try:
            owner.close(failed=failed)
        except PipelineError as exc:
            if failed:
                log.warning("%s: %s could not end its links cleanly: %s", reason, type(owner).__name__, exc)
            first = first or exc
    if first is not None and not failed:
        raise first


def _failing(at_exit: bool) -> bool:
    """True while the process ends on an error: an exception is being handled, or (`at_exit`) one went uncaught (the
    interpreter records it in sys.last_value before it runs the exit handlers)."""
    return sys.exc_info()[1] is not None or (at_exit and getattr(sys, "last_value", None) is not None)


def _close_at_exit() -> None:
    """The exit hook: close what is still open; on PipelineError log it and end the process with EXIT_ERROR (an
    exception raised here would be printed and ignored, leaving the exit code 0)."""
    try:
        close_all("exit", failed=_failing(at_exit=True))
    except PipelineError as exc:
        log.error("%s", exc)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EXIT_ERROR)


def forget(owner: Closable) -> None:
    """`owner` closed itself: nothing left to do for it at destroy or exit."""
    _open.pop(id(owner), None)


def _install() -> None:
    """Have destroy_process_group close the open links first (ppll_ext.torch_patches) and register the exit hook,
    once."""
    global _installed
    if _installed:
        return
    _installed = True
    torch_patches.before_destroy_default_group(
        lambda: close_all("destroy_process_group", failed=_failing(at_exit=False)))
    atexit.register(_close_at_exit)


def register(owner: Closable) -> None:
    """Make sure `owner.close()` runs before the default process group is destroyed or the process exits."""
    _install()
    _open[id(owner)] = owner


@contextlib.contextmanager
def closing_group() -> Iterator[None]:
    """The body of a multi-process entry point: afterwards every open link owner is closed, then on success a barrier
    and `destroy_process_group()`; on an error the group is destroyed too (no barrier: a peer may be gone) and the
    error propagates. Nothing is left posted or in flight when the process exits."""
    ok = False
    try:
        yield
        ok = True
    finally:
        if dist.is_initialized():
            try:
                close_all("end of run", failed=not ok)
                if ok:
                    dist.barrier()
            finally:
                dist.destroy_process_group()
