"""Every change ppll_ext makes to torch's functions, in this one module; each is made once, when first asked for.

- `torch.distributed.pipelining.schedules.get_schedule_class` also knows the schedules registered here
  (`register_schedule`; ppll_ext.pipelining registers SchedulePPLL as "PPLL" when it is imported), so config-driven
  trainers (torchtitan's `pipeline_parallel_schedule = "PPLL"`) find it by name. torch builds its name -> class map
  inside the function's body, so there is no table to add to: instead the function object keeps its identity and
  gets a new body (its `__code__`) that looks the name up among the registered schedules (case-insensitive, as
  torch does) and otherwise runs torch's original body, kept as a copy. A reference to the function taken before
  ppll_ext.pipelining was imported (`from torch.distributed.pipelining.schedules import get_schedule_class` at the
  top of a script) therefore knows "PPLL" too, whatever the order of the imports.
- `torch.distributed.destroy_process_group` runs a hook first when it destroys the default group
  (`before_destroy_default_group`; runtime/shutdown.py closes the open links of SchedulePPLL and
  LocalPipelineEngine there). The module attribute is wrapped: a script that took a reference to the function before
  the first link owner registered calls torch's own (its links are then closed at interpreter exit).
- `torch.distributed.pipelining.schedules._wait_batch_p2p` (where torch's stock schedules wait for their
  point-to-point work) reports each wait's start and end to the hooks given to `on_p2p_wait` (the benchmarks' probe of
  GPipe / 1F1B stages times them); installed on the first hook, a no-op otherwise.
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

_ppll_extra_schedules: dict[str, type] = {}
"""Registered schedules by lower-case name; the same dict object is put into torch's schedules module, where the new
body of get_schedule_class reads it."""


def _ppll_torch_get_schedule_class(schedule_name: str) -> type:
    """Stands for torch's original get_schedule_class body (installed in torch's schedules module under this name);
    never called here."""
    raise NotImplementedError(schedule_name)


def _get_schedule_class(schedule_name: str) -> type:
    """The body get_schedule_class runs once patched: a registered schedule, else torch's original lookup. It runs
    with the globals of torch's schedules module, where `_patch_get_schedule_class` put both names it reads."""
    registered = _ppll_extra_schedules.get(schedule_name.lower())
    if registered is not None:
        return registered
    return _ppll_torch_get_schedule_class(schedule_name)


def _patch_get_schedule_class() -> None:
    """Give torch's get_schedule_class its new body (once: a second call finds the copy of the original in place)."""
    from torch.distributed.pipelining import schedules

    if hasattr(schedules, "_ppll_torch_get_schedule_class"):
        return
    fn = schedules.get_schedule_class
    original = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    schedules._ppll_torch_get_schedule_class = original
    schedules._ppll_extra_schedules = _ppll_extra_schedules
    fn.__code__ = _get_schedule_class.__code__


def register_schedule(name: str, cls: type) -> None:
    """Make torch's `get_schedule_class(name)` (any case) return `cls`."""
    _patch_get_schedule_class()
    _ppll_extra_schedules[name.lower()] = cls


_destroy_hooks: list[Callable[[], None]] = []


def before_destroy_default_group(hook: Callable[[], None]) -> None:
    """Run `hook()` each time `torch.distributed.destroy_process_group()` destroys the default group, before it does
    (the wrap is installed once, on the first hook; a hook that raises still lets the group be destroyed)."""
    if not _destroy_hooks:
        original = dist.destroy_process_group

        @functools.wraps(original)
        def destroy_process_group(group: Any = None) -> None:
            try:
                if group is None or group is dist.group.WORLD:
                    for each in _destroy_hooks:
                        each()
            finally:
                original(group)

        dist.destroy_process_group = destroy_process_group
    _destroy_hooks.append(hook)


_p2p_wait_hooks: list[Callable[[float, float], None]] = []


def on_p2p_wait(hook: Callable[[float, float], None]) -> None:
    """Call `hook(start, end)` (time.perf_counter() seconds) after each wait of torch's stock schedules for their
    point-to-point work (the wrap of schedules._wait_batch_p2p is installed once, on the first hook)."""
    if not _p2p_wait_hooks:
        from torch.distributed.pipelining import schedules

        original = schedules._wait_batch_p2p

        @functools.wraps(original)
        def _wait_batch_p2p(work: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(work)
            finally:
                end = time.perf_counter()
                for each in _p2p_wait_hooks:
                    each(start, end)

        schedules._wait_batch_p2p = _wait_batch_p2p
    _p2p_wait_hooks.append(hook)
