"""The one stage protocol: what a stage does with its stream, shared by every runtime and adapter.

`StageStream` is a stage's end of the pipeline: it takes messages from the previous stage (timing the wait), hands
messages to the next one (timing the wait for room), applies the rules every stage obeys — the message due is of the
expected kind and micro-batch count, an end marker where data was due means the ranks made different calls — and
ends the streams (`transport.end_stream`: every stage learns how the others ended and raises the same error). The
native runtimes (threads over queues, processes over links), `SchedulePPLL` and DeepSpeed's `LocalPipelineEngine`
each translate their framework's calls into it; none has rules or timing of its own.

`StageWorker` is what a stage does with one message: training micro-batches are forwarded downstream as soon as
their forward pass is done, then trained on; evaluation batches are scored; control markers are passed on, then
reported. Training micro-batches make no host read of device values: losses and the non-finite flag are read back at
the control markers (evaluation batches, which count correct predictions on the host, are not on that path).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from ppll_ext import hooks, trace
from ppll_ext.core import LocalBlock, payload
from ppll_ext.errors import PipelineError
from ppll_ext.runtime.base import EvalCounts, Report, SaveRequest, StageStats, current_lr
from ppll_ext.transport import DATA, Kind, LinkReceiver, LinkSender, Msg, end_stream

NATIVE_CALLS = "train_segment / evaluate / checkpoint / close"
"""The calls every rank of a native runtime makes alike (named in protocol errors)."""
_LOGGING_POINTS = (Kind.EPOCH_END, Kind.EVAL_END, Kind.CHECKPOINT)
"""Markers at which a stage reads its device-side state back (non-finite flag, losses): the only host reads of
the training stream."""


class StageStream:
    """Stage `index`'s (of `stages`) end of the pipeline's message stream.

    Over links (`receiver` from the previous stage, `sender` to the next), or over any `inbox` iterator and `send`
    callable (the threads runtime's queues). `calls` names the calls every rank must make alike, e.g.
    "step() / eval()"; it appears in every protocol error. `wait_in_s` / `wait_out_s` add up the time spent waiting
    for a message and for room downstream.
    """

    def __init__(self, index: int, stages: int, calls: str, *, receiver: LinkReceiver | None = None,
                 sender: LinkSender | None = None, inbox: Iterator[Msg] | None = None,
                 send: Callable[[Msg], None] | None = None) -> None:
        self.index, self.stages, self.calls = index, stages, calls
        self.receiver, self.sender = receiver, sender
        self._inbox = inbox if inbox is not None else (receiver.messages() if receiver is not None else None)
        self._send = send if send is not None else (sender.send if sender is not None else None)
        self._peeked: Msg | None = None
        self.wait_in_s = 0.0
        self.wait_out_s = 0.0
        self.closed = False
        self.tracer = trace.current()

    @property
    def first(self) -> bool:
        """True when nothing comes from a previous stage (this stage is fed by its caller)."""
        return self._inbox is None

    @property
    def last(self) -> bool:
        """True when nothing goes to a next stage."""
        return self._send is None

    def receive(self) -> Msg:
        """The next message from the previous stage, whatever it is (the wait counted and traced as "wait-in")."""
        if self._peeked is not None:
            msg, self._peeked = self._peeked, None
            return msg
        if self._inbox is None:
            raise PipelineError(f"stage {self.index} is the first stage: it has no previous stage to receive from")
        start = time.perf_counter()
        msg = next(self._inbox)
        self.wait_in_s += time.perf_counter() - start
        self.tracer.complete("wait-in", self.index, start)
        return msg

    def peek(self) -> Msg:
        """The next message, left in place for the next `receive`/`take`."""
        if self._peeked is None:
            self._peeked = self.receive()
        return self._peeked

    def take(self, kind: Kind, micro_batches: int | None = None) -> Msg:
        """The next message, which must be of `kind` (and, for data, of `micro_batches` per mini-batch when given).

        The previous stage's end marker here means this rank made more calls than the previous one: the streams are
        ended (every stage learns it) and PipelineError raised; any other message is a one-line PipelineError.
        """
        msg = self.receive()
        self.check(msg, kind, micro_batches)
        return msg

    def check(self, msg: Msg, kind: Kind, micro_batches: int | None = None) -> None:
        """PipelineError unless `msg` is what is due (see `take`)."""
        if msg.kind is Kind.STOP and kind is not Kind.STOP and self.receiver is not None:
            self.close()  # raises: the receiver has seen the marker where a message was due
        count_differs = micro_batches is not None and msg.kind in DATA and msg.micro_batches != micro_batches
        if msg.kind is kind and not count_differs:
            return
        per = f" ({micro_batches} per batch)" if micro_batches is not None and kind in DATA else ""
        got = f" ({msg.micro_batches} per batch)" if per and msg.kind in DATA else ""
        raise PipelineError(f"stage {self.index} expected {_what(kind)}{per} from stage {self.index - 1} but got "
                            f"{_what(msg.kind)}{got}: every rank must make the same {self.calls} calls"
                            + (" with the same number of micro-batches" if per else ""))

    def send(self, msg: Msg) -> None:
        """Hand `msg` to the next stage (nothing on the last stage); waits only while the link or queue is full."""
        if self._send is None:
            return
        start = time.perf_counter()
        self._send(msg)
        self.wait_out_s += time.perf_counter() - start

    def flush(self) -> None:
        """Block until everything sent over a link has been received downstream."""
        if self.sender is not None:
            self.sender.flush()

    def close(self, failed: bool = False) -> None:
        """End this stage's streams; idempotent. Over links `transport.end_stream`: the previous stage's end marker is
        taken (micro-batches still arriving before it are counted), passed on, and every stage's verdict exchanged,
        so when the ranks made different calls every stage raises PipelineError saying where; `failed` (this process
        stopped on an error) tells the later stages so. Without links the end marker is handed on."""
        if self.closed:
            return
        self.closed = True
        if self.receiver is None and self.sender is None:
            self.send(Msg(Kind.STOP))
            return
        end_stream(None if self._inbox is None else self.receive, self.receiver, self.sender, self.index, self.stages,
                   self.calls, failed=failed)


def _what(kind: Kind) -> str:
    return {Kind.TRAIN: "a training micro-batch", Kind.EVAL: "an evaluation batch", Kind.EPOCH_END: "the end of a "
            "training stretch", Kind.EVAL_END: "the end of an evaluation", Kind.CHECKPOINT: "a checkpoint marker",
            Kind.STOP: "the end of the stream"}[kind]


class StageWorker:
    """Handles one message at a time for one block over its `stream`.

    Control messages are passed on first, then reported: EPOCH_END -> StageStats, EVAL_END -> EvalCounts,
    CHECKPOINT (at `msg.step`) -> SaveRequest. The end marker is not handled here: `StageStream.close` ends streams.
    """

    def __init__(self, block: LocalBlock, stream: StageStream, device: torch.device | None = None,
                 per_step: bool = True) -> None:
        self.block = block
        self.stream = stream
        self.device = device or block.device
        self.per_step = per_step
        """Record per-step curves in `stats` (False where no EPOCH_END ever collects them, e.g. SchedulePPLL)."""
        self.stats = StageStats(block.index, per_step=per_step)
        self.counts = EvalCounts(block.index)
        self.last_loss: torch.Tensor | None = None
        self.last_output: payload.Payload | None = None
        self.tracer = trace.current()
        self.tracer.bind(block.index)
        self._train_step = self.tracer.train_step(block)
        hooks.stage_started(block)

    def take(self, kind: Kind | None = None, micro_batches: int | None = None) -> Msg:
        """The next message of the stream (checked against `kind` / `micro_batches` when given), its wait counted in
        this stage's stats."""
        before = self.stream.wait_in_s
        msg = self.stream.receive() if kind is None else self.stream.take(kind, micro_batches)
        self.stats.wait_in_s += self.stream.wait_in_s - before
        return msg

    def handle(self, msg: Msg) -> Report | None:
        """Process one message; returns this stage's report at EPOCH_END / EVAL_END / CHECKPOINT, else None."""
        if msg.kind is Kind.STOP:
            raise PipelineError(f"stage {self.block.index}: the end marker is handled by StageStream.close, not by "
                                f"the stage worker")
        start = time.perf_counter()
        waited = self.stream.wait_out_s
        report: Report | None = None
        if msg.kind is Kind.TRAIN:
            x, y = payload.to(msg.x, self.device, True), msg.y.to(self.device, non_blocking=True)
            steps, lr = self.block.steps, current_lr(self.block)
            m = msg.micro_batches
            out, loss = self._train_step(x, y, m, on_output=lambda out: self.stream.send(Msg(Kind.TRAIN, out, y, m)))
            self.last_loss, self.last_output = loss, out
            self.stats.add_loss(loss, len(y))
            if self.block.steps != steps:
                self.stats.end_step(lr)
            self.stats.steps = self.block.steps
        elif msg.kind is Kind.EVAL:
            if self.block.training:
                self.block.eval()
            x, y = payload.to(msg.x, self.device, True), msg.y.to(self.device, non_blocking=True)
            with self.tracer.span("eval", self.block.index):
                h, s = self.block.eval_step(x, y)
            self.stream.send(Msg(Kind.EVAL, h, y, msg.micro_batches))
            self.counts.add(s, len(y))
            self.last_loss, self.last_output = torch.tensor(s.loss_sum / max(1, s.loss_count)), h
        else:
            self.stream.send(msg)
        out_wait = self.stream.wait_out_s - waited
        self.stats.wait_out_s += out_wait
        self.stats.busy_s += time.perf_counter() - start - out_wait
        if msg.kind in _LOGGING_POINTS:
            self.block.check_health()
        if msg.kind is Kind.EPOCH_END:
            report, self.stats = self.stats.settle(), StageStats(self.block.index, per_step=self.per_step)
        elif msg.kind is Kind.EVAL_END:
            self.block.train()
            report, self.counts = self.counts, EvalCounts(self.block.index)
        elif msg.kind is Kind.CHECKPOINT:
            report = SaveRequest(self.block.index, msg.step)
        return report

    def serve(self, on_report: Callable[[Report], None], until: Kind = Kind.STOP) -> Kind:
        """Follow the stream up to the marker `until`, passing every report to `on_report`; returns `until`.

        The end marker ends the streams (`StageStream.close`): with `until=STOP` that is the normal end, otherwise
        this rank made more calls than the previous one (the error every stage raises). Another marker than `until`
        is the protocol error of a rank that made different calls.
        """
        while True:
            msg = self.take()
            if msg.kind is Kind.STOP:
                if until is not Kind.STOP:
                    self.stream.check(msg, until)
                self.stream.close()
                return Kind.STOP
            if msg.kind not in DATA and until is not Kind.STOP and msg.kind is not until:
                self.stream.check(msg, until)
            report = self.handle(msg)
            if report is not None:
                on_report(report)
            if msg.kind is until:
                return until
