"""Ending a stage's links before its process group goes, whichever way a script ends.

A stage posts its next receive ahead and keeps sends in flight (transport/links.py). A user's script for
SchedulePPLL or the DeepSpeed adapter may simply return after its last step, or call
`torch.distributed.destroy_process_group()` as torch's tutorials do, while a faster first stage is still ahead of
the last one. Destroying the group then drops the messages still in flight and leaves a receive posted on it. So
every link owner (SchedulePPLL, LocalPipelineEngine) registers here, and its `close()` (end marker down the
pipeline, wait until it is taken) runs

- when the script calls it,
- else just before `torch.distributed.destroy_process_group()` destroys the default group (the function is wrapped
  once, on the first registration; a script that imported the function itself before ppll_ext misses the wrap),
- else at interpreter exit (atexit), while the group still exists.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import torch.distributed as dist

from ppll_ext.errors import PipelineError

log = logging.getLogger(__name__)


class Closable(Protocol):
    """A link owner: `close()` ends its streams and is idempotent."""

    def close(self) -> None:
        """End the owner's streams (end marker down the pipeline, posted receive completed)."""


_open: dict[int, Closable] = {}
"""Registered owners not closed yet, by id. Held strongly: a schedule that went out of scope with its links open
(a script's `main()` returned) must still end them at exit."""
_installed = False


def close_all(reason: str) -> None:
    """Close every registered, still-open link owner; a failure is logged, not raised, when the
    process is ending anyway (`reason` names the moment)."""
    for key, owner in list(_open.items()):
        _open.pop(key, None)
        if not dist.is_initialized():
            log.warning("%s: the process group is already gone; %s could not end its links", reason,
                        type(owner).__name__)
            continue
        try:
            owner.close()
        except PipelineError as exc:
            log.warning("%s: %s could not end its links cleanly: %s", reason, type(owner).__name__, exc)


def forget(owner: Closable) -> None:
    """`owner` closed itself: nothing left to do for it at destroy or exit."""
    _open.pop(id(owner), None)


def _install() -> None:
    """Wrap torch.distributed.destroy_process_group (once) and register the exit hook."""
    global _installed
    if _installed:
        return
    _installed = True
    original = dist.destroy_process_group

    @functools.wraps(original)
    def destroy_process_group(group: Any = None) -> None:
        if group is None or group is dist.group.WORLD:
            close_all("destroy_process_group")
        original(group)

    dist.destroy_process_group = destroy_process_group
    atexit.register(close_all, "exit")


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
                close_all("end of run")
                if ok:
                    dist.barrier()
            finally:
                dist.destroy_process_group()
