"""PPLL in one process: one thread per stage, bounded `queue.Queue`s between neighbours.

Stage k runs on `devices[k]` (all "cpu", or cuda:0..K-1). torch releases the GIL inside its
kernels, so stages really run in parallel; any stage's exception stops every stage and is
raised in the caller, naming the stage. Between GPUs a stage copies its output to the next
stage's device on a copy stream of its own, so the copy overlaps its local backward pass.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from ppll_ext import trace
from ppll_ext.core import LocalBlock, payload
from ppll_ext.errors import PipelineError
from ppll_ext.runtime.base import (
    EpochStats,
    EvalResult,
    Report,
    Saver,
    SaveRequest,
    attempt_save,
    eval_messages,
    eval_result,
    first_failure,
    train_messages,
)
from ppll_ext.runtime.stage import NATIVE_CALLS, StageStream, StageWorker
from ppll_ext.transport import Kind, Msg

_POLL_S = 0.05


class _Stopped(Exception):
    """Raised inside a stage thread when another stage failed: unwinds quietly."""


def _device_copier(src: torch.device, dst: torch.device) -> Callable[[Msg], Msg]:
    """How stage outputs on `src` reach `dst`: unchanged on one device (or the CPU); between GPUs copied on a side
    stream of `src`, which waits for the compute stream and which `dst`'s stream waits for (torch's cross-device
    copy does that), the source kept alive for the copy by record_stream."""
    if src == dst or src.type != "cuda" or dst.type != "cuda":
        return lambda msg: msg
    side = torch.cuda.Stream(device=src)

    def move(msg: Msg) -> Msg:
        if msg.x is None:
            return msg
        side.wait_stream(torch.cuda.current_stream(src))
        with torch.cuda.stream(side):
            x, y = payload.to(msg.x, dst, non_blocking=True), msg.y.to(dst, non_blocking=True)
        for t in [*payload.flatten(msg.x)[0], msg.y]:
            if t.device == src:
                t.record_stream(side)
        return Msg(msg.kind, x, y, msg.micro_batches, msg.step)

    return move


class ThreadRunner:
    """Streams micro-batches through stage threads; same interface as SequentialRunner."""

    def __init__(self, blocks: list[LocalBlock], micro_batches: int = 1, queue_depth: int = 2,
                 timeout_s: float = 300.0, saver: Saver | None = None) -> None:
        self.blocks = blocks
        self.saver = saver
        self.micro_batches = micro_batches
        self.timeout_s = timeout_s
        self._inboxes: list[queue.Queue[Msg]] = [queue.Queue(maxsize=queue_depth) for _ in blocks]
        self._reports: queue.Queue[Report] = queue.Queue()
        self._failure: tuple[int, BaseException] | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run_stage, args=(k,), name=f"ppll-stage-{k}", daemon=True)
            for k in range(len(blocks))
        ]
        for t in self._threads:
            t.start()

    def _check(self, what: str, started: float) -> None:
        if self._failure is not None:
            k, exc = self._failure
            raise PipelineError(f"stage {k} failed: {type(exc).__name__}: {exc}",
                                key=getattr(exc, "key", None)) from exc
        if self._stop.is_set():
            raise _Stopped
        if time.monotonic() - started > self.timeout_s:
            raise PipelineError(f"{what} made no progress for {self.timeout_s:.0f} s; "
                                f"a stage is stuck (raise local.timeout_s if a step really takes this long)")

    def _put(self, q: queue.Queue[Msg], msg: Msg, what: str) -> None:
        try:
            q.put_nowait(msg)
            return
        except queue.Full:
            pass
        started, waited = time.monotonic(), time.perf_counter()
        while True:
            try:
                q.put(msg, timeout=_POLL_S)
                break
            except queue.Full:
                self._check(what, started)
        trace.current().complete("wait-out", None, waited)

    def _inbox(self, k: int) -> Iterator[Msg]:
        q = self._inboxes[k]
        while True:
            started = time.monotonic()
            while True:
                try:
                    yield q.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    self._check(f"stage {k} waiting for input from " + (f"stage {k - 1}" if k else "the data feed"),
                                started)

    def _run_stage(self, k: int) -> None:
        block = self.blocks[k]
        nxt = self._inboxes[k + 1] if k + 1 < len(self.blocks) else None
        send: Callable[[Msg], None] | None = None
        if nxt is not None:
            move = _device_copier(block.device, self.blocks[k + 1].device)

            def send(msg: Msg) -> None:
                self._put(nxt, move(msg), f"stage {k} sending to stage {k + 1}")
        def report(r: Report) -> None:
            self._reports.put(attempt_save(lambda: self.saver(block, r.step), k, f"stage {k}")
                              if isinstance(r, SaveRequest) else r)

        try:
            stream = StageStream(k, len(self.blocks), NATIVE_CALLS, inbox=self._inbox(k), send=send)
            StageWorker(block, stream).serve(report)
        except _Stopped:
            return
        except BaseException as exc:  # any failure must stop the pipeline and reach the caller
            if self._failure is None:
                self._failure = (k, exc)
            self._stop.set()

    def _feed(self, messages: Iterable[Msg]) -> None:
        for msg in messages:
            self._put(self._inboxes[0], msg, "feeding stage 0")

    def _collect(self) -> list[Report]:
        reports: list[Report] = []
        started = time.monotonic()
        while len(reports) < len(self.blocks):
            try:
                reports.append(self._reports.get(timeout=_POLL_S))
            except queue.Empty:
                self._check("waiting for the stages' reports", started)
        return sorted(reports, key=lambda r: r.index)

    def train_segment(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      on_batch: Callable[[int], None] | None = None) -> EpochStats:
        """Stream a stretch of training (an epoch, or the segment of it up to a checkpoint) through the pipeline;
        returns once every stage has finished it."""
        start = time.perf_counter()
        self._feed(train_messages(batches, self.micro_batches, on_batch))
        stats = self._collect()
        return EpochStats(time.perf_counter() - start, stats[0].samples, stats)  # type: ignore[union-attr]

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> EvalResult:
        """Pipelined evaluation: each stage scores its own classifier (aux head or final layer)."""
        self._feed(eval_messages(batches))
        return eval_result(self._collect())  # type: ignore[arg-type]

    def checkpoint(self, step: int) -> list:
        """Send CHECKPOINT(step) down the pipeline; each stage thread saves when it gets there. A stage that could not
        write its part fails the pipeline once every stage has finished writing (the caller may then discard the
        step's folder)."""
        self._feed([Msg(Kind.CHECKPOINT, step=step)])
        reports = self._collect()
        failure = first_failure(reports)
        if failure is not None:
            self._stop.set()
            raise failure.error()
        return reports

    def close(self) -> None:
        """Stop the stage threads (after they finish what they hold)."""
        if self._failure is None and not self._stop.is_set():
            self._feed([Msg(Kind.STOP)])
            self._join()
        self._stop.set()

    def _join(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._failure is not None:
                self._check("stopping", time.monotonic())

