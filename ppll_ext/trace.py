"""Pipeline traces: every stage's forward, send, backward, optimizer step and waits as a Chrome-trace JSON.

Tracing is off unless `start()` installs a `Tracer` for this process; until then `current()` is a
`NullTracer` whose methods do nothing, so the stage loop pays one no-op call per event. The file opens in
Perfetto (ui.perfetto.dev) or chrome://tracing and is what `ppll plot` draws.

Clock: wall-clock microseconds, taken as `time.perf_counter()` plus an offset to `time.time()` fixed at
`start()`, so events of different processes on one machine share a time axis (across nodes, as far as the
hosts' clocks agree). In the processes runtime every rank records its own events and `finish()` gathers
them on rank 0, which writes the one file.

A torch.distributed.pipelining script traces SchedulePPLL the same way: `trace.start()` before building the
schedule, `trace.finish("out.json", dist.group.WORLD)` on every rank at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from ppll_ext.core.block import LocalBlock
from ppll_ext.paths import write_atomically

KINDS = ("forward", "send", "backward", "step", "wait-in", "wait-out", "eval")
"""Event names the runtimes record; `ppll plot` colours them in this order."""
CATEGORY = {"forward": "compute", "backward": "compute", "step": "compute", "send": "comm", "wait-in": "wait",
            "wait-out": "wait", "wait": "wait", "eval": "eval"}
MAX_EVENTS = 2_000_000
"""Events kept per process (about 200 MB of JSON); later events are counted as dropped."""

Event = tuple[str, int, float, float, int | None]
"""(name, stage, start, end, micro-batch number) with perf_counter times."""
TrainStep = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class NullTracer:
    """The disabled recorder: every method is a no-op."""

    enabled = False

    def bind(self, stage: int) -> None:
        """Attribute events recorded in this thread without an explicit stage to `stage`."""

    def complete(self, name: str, stage: int | None, start: float, end: float | None = None,
                 micro: int | None = None) -> None:
        """Record a finished event from perf_counter time `start` to `end` (default: now)."""

    def span(self, name: str, stage: int | None = None) -> contextlib.AbstractContextManager:
        """Context manager recording its body as one event."""
        return contextlib.nullcontext()

    def train_step(self, block: LocalBlock) -> TrainStep:
        """`block.train_step`, recording forward / send / backward / step when enabled."""
        return block.train_step


class Tracer(NullTracer):
    """Records complete events in memory; thread-safe (list appends), one per process."""

    enabled = True

    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self.offset = time.time() - time.perf_counter()
        self.events: list[Event] = []
        self.dropped = 0
        self.max_events = max_events
        self._local = threading.local()
        self._hooks: list = []

    def bind(self, stage: int) -> None:
        self._local.stage = stage

    def complete(self, name: str, stage: int | None, start: float, end: float | None = None,
                 micro: int | None = None) -> None:
        end = time.perf_counter() if end is None else end
        stage = getattr(self._local, "stage", None) if stage is None else stage
        if stage is None:
            return
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        self.events.append((name, stage, start, end, micro))

    @contextlib.contextmanager
    def span(self, name: str, stage: int | None = None) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.complete(name, stage, start)

    def train_step(self, block: LocalBlock) -> TrainStep:
        # The optimizer's step pre-hook marks where the local backward ends and the step begins.
        stepped: list[float | None] = [None]
        if block.optimizer is not None:
            self._hooks.append(block.optimizer.register_step_pre_hook(
                lambda *_: stepped.__setitem__(0, time.perf_counter())))
        counter = itertools.count()

        def traced(x: torch.Tensor, y: torch.Tensor, n_micro: int = 1,
                   on_output: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            micro, start = next(counter), time.perf_counter()
            marks = [start, start]

            def emit(out: torch.Tensor) -> None:
                marks[0] = time.perf_counter()
                if on_output is not None:
                    on_output(out)
                marks[1] = time.perf_counter()

            stepped[0] = None
            result = block.train_step(x, y, n_micro, on_output=emit)
            end = time.perf_counter()
            step_start = stepped[0] if stepped[0] is not None else end
            self.complete("forward", block.index, start, marks[0], micro)
            if on_output is not None and not block.is_last:
                self.complete("send", block.index, marks[0], marks[1], micro)
            self.complete("backward", block.index, marks[1], step_start, micro)
            if stepped[0] is not None:
                self.complete("step", block.index, step_start, end, micro)
            return result

        return traced

    def detach(self) -> None:
        """Remove the optimizer hooks this tracer installed."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def records(self) -> list[dict]:
        """This process's events as JSON-ready dicts with absolute wall-clock microseconds."""
        out = []
        for name, stage, start, end, micro in self.events:
            ev = {"name": name, "cat": CATEGORY.get(name, "other"), "ph": "X", "ts": (start + self.offset) * 1e6,
                  "dur": max(0.0, end - start) * 1e6, "pid": stage, "tid": 0}
            if micro is not None:
                ev["args"] = {"mb": micro}
            out.append(ev)
        return out


_NULL = NullTracer()
_current: NullTracer = _NULL


def current() -> NullTracer:
    """This process's recorder: the active Tracer after `start()`, else the no-op one."""
    return _current


def start(max_events: int = MAX_EVENTS) -> Tracer:
    """Install a new Tracer for this process (runtimes created afterwards record into it)."""
    global _current
    _current = Tracer(max_events)
    return _current


def stop() -> None:
    """Uninstall the active tracer (its optimizer hooks too) without writing anything."""
    global _current
    if isinstance(_current, Tracer):
        _current.detach()
    _current = _NULL


def build_trace(records: list[dict], title: str = "", meta: dict | None = None) -> dict:
    """A Chrome-trace document: events shifted to start at 0, sorted, one named process row per stage."""
    t0 = min((r["ts"] for r in records), default=0.0)
    events = sorted(({**r, "ts": r["ts"] - t0} for r in records), key=lambda r: (r["pid"], r["ts"], -r["dur"]))
    stages = sorted({r["pid"] for r in records})
    head = [{"name": "process_name", "ph": "M", "pid": k, "tid": 0, "args": {"name": f"stage {k}"}} for k in stages]
    head += [{"name": "process_sort_index", "ph": "M", "pid": k, "tid": 0, "args": {"sort_index": k}}
             for k in stages]
    return {"traceEvents": head + events, "displayTimeUnit": "ms",
            "otherData": {"title": title, "t0_unix_s": t0 / 1e6, **(meta or {})}}


def write_trace(path: str | os.PathLike, records: list[dict], title: str = "", meta: dict | None = None) -> Path:
    """Write `records` as a Chrome-trace JSON at `path` (atomically, only onto a regular file or a new name:
    paths.write_atomically); returns the path."""
    text = json.dumps(build_trace(records, title, meta))
    return write_atomically(path, lambda tmp: tmp.write_text(text), f"trace file {str(path)!r}", example="trace.json")


def finish(path: str | os.PathLike, group: dist.ProcessGroup | None = None, title: str = "",
           meta: dict | None = None) -> Path | None:
    """Write the active tracer's events to `path` and stop tracing; returns the path where written.

    With `group` (every rank of a multi-process pipeline must call this), the ranks' events are gathered on
    global rank 0, which alone writes the file (the others return None).
    """
    tracer = _current
    records = tracer.records() if isinstance(tracer, Tracer) else []
    dropped = tracer.dropped if isinstance(tracer, Tracer) else 0
    stop()
    if group is not None:
        parts: list | None = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
        dist.gather_object((records, dropped), parts, dst=0, group=group)
        if parts is None:
            return None
        records = [r for rs, _ in parts for r in rs]
        dropped = sum(d for _, d in parts)
    return write_trace(path, records, title, {**(meta or {}), "dropped_events": dropped})
