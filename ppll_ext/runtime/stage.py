"""The one stage loop every pipelined transport runs.

A stage consumes an ordered stream of messages (training micro-batches, evaluation batches and
in-band control markers), forwards its detached output downstream as soon as its forward pass is
done, then trains on its own loss. Control markers travel in the same stream, so a stage never
waits on anything but its input and room in its output.
"""

from __future__ import annotations

import enum
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ppll_ext.core import LocalBlock
from ppll_ext.runtime import trace
from ppll_ext.runtime.base import StageStats, split_micro


class Kind(enum.IntEnum):
    """Message kinds; the value is what travels in the wire header."""

    TRAIN = 1
    EVAL = 2
    EPOCH_END = 3
    EVAL_END = 4
    STOP = 5
    CHECKPOINT = 6


@dataclass
class Msg:
    """A unit of the stage stream: a (micro-)batch with its labels, or a control marker."""

    kind: Kind
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    n_micro: int = 1

    @property
    def is_data(self) -> bool:
        """True for messages that carry tensors."""
        return self.kind in (Kind.TRAIN, Kind.EVAL)


@dataclass
class EvalCounts:
    """One stage's evaluation report: correct predictions of its classifier and summed loss."""

    index: int
    correct: int = 0
    loss: float = 0.0
    samples: int = 0


@dataclass
class SaveRequest:
    """A stage reached CHECKPOINT(step): everything before it is trained, nothing after it has started."""

    index: int
    step: int


Report = StageStats | EvalCounts | SaveRequest
Send = Callable[[Msg], None]


def train_messages(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], micro_batches: int,
                   on_batch: Callable[[int], None] | None = None) -> Iterator[Msg]:
    """The first stage's input for one epoch: every mini-batch cut into micro-batches, then EPOCH_END."""
    for x, y in batches:
        micro = split_micro(x, y, micro_batches)
        for xm, ym in micro:
            yield Msg(Kind.TRAIN, xm, ym, len(micro))
        if on_batch is not None:
            on_batch(len(y))
    yield Msg(Kind.EPOCH_END)


def eval_messages(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[Msg]:
    """The first stage's input for an evaluation pass, ending with EVAL_END."""
    for x, y in batches:
        yield Msg(Kind.EVAL, x, y)
    yield Msg(Kind.EVAL_END)


def parse_fault(spec: str | None) -> tuple[int, int, str] | None:
    """PPLL_FAULT='stage:step:raise|kill|kill-in-save|nan' -> (stage, step, kind): a deliberate failure for tests.

    raise / kill happen when the stage starts training step `step`; kill-in-save while it writes that step's
    checkpoint (after its model shard, before its training state); nan makes the stage's local loss NaN
    during step `step`.
    """
    if not spec:
        return None
    stage, step, kind = spec.split(":")
    if kind not in ("raise", "kill", "kill-in-save", "nan"):
        raise ValueError(f"PPLL_FAULT={spec!r}: the kind must be raise, kill, kill-in-save or nan")
    return int(stage), int(step), kind


class _NaNAtStep(torch.nn.Module):
    """A block's own loss function, but NaN while the block trains step `step` (PPLL_FAULT nan)."""

    def __init__(self, block: LocalBlock, step: int) -> None:
        super().__init__()
        self.inner = block.loss_fn
        self.due = lambda: block.training and block.steps == step  # a closure: the block is no child of its loss

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.inner(out, y)
        return loss * math.nan if self.due() else loss


class StageWorker:
    """Handles one message at a time for one block; `send` is None on the last stage.

    Control messages are passed on first, then reported: EPOCH_END -> StageStats, EVAL_END ->
    EvalCounts, CHECKPOINT (step in the n_micro field) -> SaveRequest.
    """

    def __init__(self, block: LocalBlock, send: Send | None, device: torch.device | None = None) -> None:
        self.block = block
        self._send = send
        self.device = device or block.device
        self.stats = StageStats(block.index)
        self.counts = EvalCounts(block.index)
        self.last_loss: torch.Tensor | None = None
        self.tracer = trace.current()
        self.tracer.bind(block.index)
        self._train_step = self.tracer.train_step(block)
        fault = parse_fault(os.environ.get("PPLL_FAULT"))
        self._fault = fault if fault is not None and fault[0] == block.index and fault[2] in ("raise", "kill") else None
        if fault is not None and fault[0] == block.index and fault[2] == "nan":
            block.loss_fn = _NaNAtStep(block, fault[1])

    def _inject_fault(self) -> None:
        _, step, kind = self._fault
        if self.block.steps == step:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"fault injected by PPLL_FAULT at step {step}")

    def _emit(self, msg: Msg) -> None:
        if self._send is None:
            return
        start = time.perf_counter()
        self._send(msg)
        self.stats.wait_out_s += time.perf_counter() - start

    def handle(self, msg: Msg) -> Report | None:
        """Process one message; returns this stage's report at EPOCH_END / EVAL_END, else None."""
        start = time.perf_counter()
        waited = self.stats.wait_out_s
        report: Report | None = None
        if msg.kind is Kind.TRAIN:
            if self._fault is not None:
                self._inject_fault()
            x, y = msg.x.to(self.device, non_blocking=True), msg.y.to(self.device, non_blocking=True)
            _, loss = self._train_step(
                x, y, msg.n_micro, on_output=lambda out: self._emit(Msg(Kind.TRAIN, out, y, msg.n_micro))
            )
            self.last_loss = loss
            value = float(loss)
            self.block.check_finite(value)
            self.stats.add_loss(value, len(y))
            self.stats.steps = self.block.steps
        elif msg.kind is Kind.EVAL:
            if self.block.training:
                self.block.eval()
            x, y = msg.x.to(self.device, non_blocking=True), msg.y.to(self.device, non_blocking=True)
            with self.tracer.span("eval", self.block.index):
                h, correct, loss = self.block.eval_step(x, y)
            self._emit(Msg(Kind.EVAL, h, y))
            self.counts.correct += correct
            self.counts.loss += loss
            self.counts.samples += len(y)
        else:
            self._emit(msg)
        self.stats.busy_s += time.perf_counter() - start - (self.stats.wait_out_s - waited)
        if msg.kind is Kind.EPOCH_END:
            report, self.stats = self.stats, StageStats(self.block.index)
        elif msg.kind is Kind.EVAL_END:
            self.block.train()
            report, self.counts = self.counts, EvalCounts(self.block.index)
        elif msg.kind is Kind.CHECKPOINT:
            report = SaveRequest(self.block.index, msg.n_micro)
        return report

    def serve(self, inbox: Iterator[Msg], on_report: Callable[[Report], None]) -> None:
        """Consume `inbox` until STOP, passing every report to `on_report` (the stage loop)."""
        while True:
            start = time.perf_counter()
            msg = next(inbox)
            self.stats.wait_in_s += time.perf_counter() - start
            self.tracer.complete("wait-in", self.block.index, start)
            report = self.handle(msg)
            if report is not None:
                on_report(report)
            if msg.kind is Kind.STOP:
                return
