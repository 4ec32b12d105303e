"""The one stage loop every pipelined transport runs.

A stage consumes an ordered stream of messages (training micro-batches, evaluation batches and
in-band control markers), forwards its detached output downstream as soon as its forward pass is
done, then trains on its own loss. Control markers travel in the same stream, so a stage never
waits on anything but its input and room in its output. Training micro-batches make no host read of
device values: losses and the non-finite flag are read back at the control markers (evaluation
batches, which count correct predictions on the host, are not on that path).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from ppll_ext import hooks, trace
from ppll_ext.core import LocalBlock
from ppll_ext.runtime.base import EvalCounts, Report, SaveRequest, StageStats, current_lr
from ppll_ext.transport import Kind, Msg

Send = Callable[[Msg], None]
_LOGGING_POINTS = (Kind.EPOCH_END, Kind.EVAL_END, Kind.CHECKPOINT)
"""Markers at which a stage reads its device-side state back (non-finite flag, losses): the only host reads of
the training stream."""


class StageWorker:
    """Handles one message at a time for one block; `send` is None on the last stage.

    Control messages are passed on first, then reported: EPOCH_END -> StageStats, EVAL_END ->
    EvalCounts, CHECKPOINT (step in the n_micro field) -> SaveRequest.
    """

    def __init__(self, block: LocalBlock, send: Send | None, device: torch.device | None = None,
                 per_step: bool = True) -> None:
        self.block = block
        self._send = send
        self.device = device or block.device
        self.per_step = per_step
        """Record per-step curves in `stats` (False where no EPOCH_END ever collects them, e.g. SchedulePPLL)."""
        self.stats = StageStats(block.index, per_step=per_step)
        self.counts = EvalCounts(block.index)
        self.last_loss: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None
        self.tracer = trace.current()
        self.tracer.bind(block.index)
        self._train_step = self.tracer.train_step(block)
        hooks.stage_started(block)

    def _emit(self, msg: Msg) -> None:
        if self._send is None:
            return
        start = time.perf_counter()
        self._send(msg)
        self.stats.wait_out_s += time.perf_counter() - start

    def handle(self, msg: Msg) -> Report | None:
        """Process one message; returns this stage's report at EPOCH_END / EVAL_END / CHECKPOINT, else None."""
        start = time.perf_counter()
        waited = self.stats.wait_out_s
        report: Report | None = None
        if msg.kind is Kind.TRAIN:
            x, y = msg.x.to(self.device, non_blocking=True), msg.y.to(self.device, non_blocking=True)
            steps, lr = self.block.steps, current_lr(self.block)
            out, loss = self._train_step(
                x, y, msg.n_micro, on_output=lambda out: self._emit(Msg(Kind.TRAIN, out, y, msg.n_micro))
            )
            self.last_loss, self.last_output = loss, out
            self.stats.add_loss(loss, len(y))
            if self.block.steps != steps:
                self.stats.end_step(lr)
            self.stats.steps = self.block.steps
        elif msg.kind is Kind.EVAL:
            if self.block.training:
                self.block.eval()
            x, y = msg.x.to(self.device, non_blocking=True), msg.y.to(self.device, non_blocking=True)
            with self.tracer.span("eval", self.block.index):
                h, s = self.block.eval_step(x, y)
            self._emit(Msg(Kind.EVAL, h, y, msg.n_micro))
            self.counts.add(s, len(y))
            self.last_loss, self.last_output = torch.tensor(s.loss_sum / max(1, s.loss_count)), h
        else:
            self._emit(msg)
        self.stats.busy_s += time.perf_counter() - start - (self.stats.wait_out_s - waited)
        if msg.kind in _LOGGING_POINTS:
            self.block.check_health()
        if msg.kind is Kind.EPOCH_END:
            report, self.stats = self.stats.settle(), StageStats(self.block.index, per_step=self.per_step)
        elif msg.kind is Kind.EVAL_END:
            self.block.train()
            report, self.counts = self.counts, EvalCounts(self.block.index)
        elif msg.kind is Kind.CHECKPOINT:
            report = SaveRequest(self.block.index, msg.n_micro)
        return report

    def serve(self, inbox: Iterator[Msg], on_report: Callable[[Report], None], until: Kind = Kind.STOP) -> Kind:
        """Consume `inbox` until a message of kind `until` (or STOP), passing every report to `on_report`."""
        while True:
            start = time.perf_counter()
            msg = next(inbox)
            self.stats.wait_in_s += time.perf_counter() - start
            self.tracer.complete("wait-in", self.block.index, start)
            report = self.handle(msg)
            if report is not None:
                on_report(report)
            if msg.kind is until or msg.kind is Kind.STOP:
                return msg.kind
