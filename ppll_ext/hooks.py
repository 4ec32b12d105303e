"""Observation points that tests and tools install: functions called at fixed points of training.

Library code never reads fault-injection settings from the environment; a test that wants a stage to
fail, stall or produce a NaN installs a hook here (in its own process, or in a wrapper script that the
launcher starts) and the stage loop, the DeepSpeed adapter and the checkpoint writer call it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

StageHook = Callable[[Any], None]
"""Called with a LocalBlock when a stage starts training it (every engine, every runtime)."""
ShardHook = Callable[[Path, int], None]
"""Called with (checkpoint folder being written, stage index) after a stage's model shard is on disk."""

_stage_hooks: list[StageHook] = []
_shard_hooks: list[ShardHook] = []


def on_stage_start(fn: StageHook) -> Callable[[], None]:
    """Install `fn`; returns a function that removes it again."""
    _stage_hooks.append(fn)
    return lambda: _stage_hooks.remove(fn)


def on_shard_written(fn: ShardHook) -> Callable[[], None]:
    """Install `fn`; returns a function that removes it again."""
    _shard_hooks.append(fn)
    return lambda: _shard_hooks.remove(fn)


def stage_started(block: Any) -> None:
    """Run the installed stage hooks on `block` (called by every engine when a stage starts)."""
    for fn in list(_stage_hooks):
        fn(block)


def shard_written(folder: Path, stage: int) -> None:
    """Run the installed shard hooks (called by the checkpoint writer)."""
    for fn in list(_shard_hooks):
        fn(folder, stage)


def clear() -> None:
    """Remove every installed hook."""
    _stage_hooks.clear()
    _shard_hooks.clear()
