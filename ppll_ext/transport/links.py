"""Links between neighbouring stage processes over torch.distributed point-to-point (gloo or NCCL).

Receives are posted ahead without a receiver thread (a thread blocked in a gloo wait aborts the
process at exit): after each data message the receiver posts the next header *and* the next
payload, guessing it has the same shape. Sender and receiver track the same guess, so when the
shape changes (last batch, evaluation, control message) the sender fills the guessed buffers with
a placeholder and sends the real tensors on a second pair of tags. A sender keeps at most `depth`
messages in flight; every wait has a timeout and a failure names the peer stage.

Headers live in host memory whenever they can: on the CPU, or on a GPU when a CPU-capable `header_group`
(gloo) is given beside the NCCL group of the payloads, so decoding a header never waits on the device.
Payloads are sent from the compute stream's results by NCCL on its own stream, so sends overlap the
next forward pass.

`end_stream` ends a pipeline's streams and checks that its stages made the same calls: the end marker goes down the
pipeline, each stage's verdict (`Verdict`: a clean end, or where and how the calls differed) goes down after it and
back up the pipeline, so every stage raises the same error when one stage made more or fewer calls.
"""

from __future__ import annotations

import collections
import datetime
import enum
import math
import operator
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ppll_ext import trace
from ppll_ext.errors import ConfigError, PipelineError
from ppll_ext.transport.wire import (
    DATA,
    HEADER_LEN,
    Kind,
    Msg,
    Shape,
    assemble,
    decode_header,
    encode_header,
    payload_shape,
    tensors_of,
)

_TAG_HEADER, _TAG_VERDICT, _TAG_DATA, _TAG_RESENT = 0, 5, 16, 48
"""Tags: the header, the verdict, then one per tensor of a message (activations in order, then the target), in
the guessed buffers and, after a change of shapes, resent."""


def check_count(name: str, value: object, meaning: str) -> int:
    """`value` as an int; ConfigError naming the argument unless it is an integer >= 1 (`meaning`: what it counts).
    Checked where an argument enters, since 0 or a negative count fails far away (a division, an empty queue)."""
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or isinstance(value, bool) or count < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1 ({meaning})", key=name)
    return count


def check_link_settings(queue_depth: object, timeout_s: object) -> None:
    """ConfigError naming the argument unless `queue_depth` is an integer >= 1 and `timeout_s` a finite number of
    seconds > 0 (checked before any link opens)."""
    check_count("queue_depth", queue_depth, "micro-batches in flight to the next stage, e.g. 2")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ConfigError(f"timeout_s={timeout_s!r} must be a number of seconds > 0 (the longest wait for a "
                          f"neighbour stage, e.g. 300)", key="timeout_s")


def _name(stage: int | None, rank: int) -> str:
    return f"rank {rank}" if stage is None else f"stage {stage} (rank {rank})"


def link_error(me: str, peer: str, sending: bool, timeout_s: float, exc: Exception) -> PipelineError:
    """The PipelineError for a failed wait on a link: `peer` stalled past the timeout, or its process is gone."""
    if "timed out" in str(exc).lower():
        waited = "to take a message" if sending else "for a message"
        return PipelineError(f"{me} waited {timeout_s:g} s {waited} from {peer}, which is stalled or hung; raise "
                             f"local.timeout_s if one of its steps really takes that long ({exc})")
    return PipelineError(f"{me} lost its link to {peer} while {'sending' if sending else 'receiving'}: that process "
                         f"exited or was killed (its log or the launcher's says why) ({exc})")


class LinkSender:
    """Sends messages to the next rank with at most `depth` messages in flight."""

    def __init__(self, peer: int, group: dist.ProcessGroup | None, depth: int, timeout_s: float,
                 device: torch.device, rank: int, stage: int | None = None,
                 header_group: dist.ProcessGroup | None = None) -> None:
        self.peer, self.group, self.depth, self.rank = peer, group, depth, rank
        self.header_group = header_group
        self.me, self.to = _name(stage, rank), _name(None if stage is None else stage + 1, peer)
        self.timeout_s = timeout_s
        self.device = device
        self._guess: Shape | None = None
        self._inflight: collections.deque[tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = collections.deque()

    def _wait_oldest(self) -> None:
        works, _ = self._inflight.popleft()
        try:
            for w in works:
                w.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            raise link_error(self.me, self.to, True, self.timeout_s, exc) from exc

    def _isend(self, tensor: torch.Tensor, tag: int, group: dist.ProcessGroup | None = None) -> dist.Work:
        try:
            return dist.isend(tensor, self.peer, group=self.group if group is None else group, tag=tag)
        except RuntimeError as exc:  # gloo reports a reset connection when the send is posted
            raise link_error(self.me, self.to, True, self.timeout_s, exc) from exc

    def send(self, msg: Msg) -> None:
        """Start sending `msg`; blocks only while `depth` earlier messages are still in flight."""
        if len(self._inflight) >= self.depth:
            started = time.perf_counter()
            while len(self._inflight) >= self.depth:
                self._wait_oldest()
            trace.current().complete("wait-out", None, started)
        shape = payload_shape(msg)
        resent = shape is not None and shape != self._guess
        head = encode_header(msg, resent)
        if self.header_group is None:
            head = head.to(self.device)
        tensors: list[torch.Tensor] = [head]
        works = [self._isend(head, _TAG_HEADER, self.header_group)]
        data = [t.contiguous() for t in tensors_of(msg)]
        if self._guess is not None:
            # The receiver posted buffers of the guessed shapes: on a change they get placeholders.
            guessed = data if shape == self._guess else [torch.zeros(s, dtype=d, device=self.device)
                                                         for s, d in self._guess]
            tensors += guessed
            works += [self._isend(t, _TAG_DATA + i) for i, t in enumerate(guessed)]
        if resent:
            tensors += data
            works += [self._isend(t, _TAG_RESENT + i) for i, t in enumerate(data)]
        self._guess = shape
        self._inflight.append((works, tuple(tensors)))

    def flush(self) -> None:
        """Wait until every message sent so far has been received."""
        while self._inflight:
            self._wait_oldest()

    def send_verdict(self, verdict: Verdict) -> None:
        """Pass `verdict` to the next stage after the end marker; returns once it is taken."""
        _exchange(verdict.encode(_verdict_device(self)), self.peer, self.header_group or self.group, True,
                  self.timeout_s, self.me, self.to)

    def receive_verdict(self, hops: int) -> Verdict:
        """The verdict of the stages after this one (`hops` of them, each waiting for the next: so many timeouts)."""
        buf = torch.zeros(3, dtype=torch.int64, device=_verdict_device(self))
        _exchange(buf, self.peer, self.header_group or self.group, False, self.timeout_s * max(hops, 1), self.me,
                  self.to)
        return Verdict.decode(buf)


class LinkReceiver:
    """Receives messages from the previous rank in the caller's thread, the next one always posted ahead."""

    def __init__(self, peer: int, group: dist.ProcessGroup | None, timeout_s: float, device: torch.device,
                 rank: int, stage: int | None = None, header_group: dist.ProcessGroup | None = None) -> None:
        self.peer, self.group, self.rank, self.timeout_s, self.device = peer, group, rank, timeout_s, device
        self.header_group = header_group
        self._head_device = torch.device("cpu") if header_group is not None else device
        self.me, self.source = _name(stage, rank), _name(None if stage is None else stage - 1, peer)
        self._guess: tuple[list[torch.Tensor], list[dist.Work]] | None = None
        self.stopped = False
        """The end marker has arrived: the previous stage has ended its stream."""
        self._post(None)

    def _irecv(self, tensor: torch.Tensor, tag: int, group: dist.ProcessGroup | None = None) -> dist.Work:
        try:
            return dist.irecv(tensor, self.peer, group=self.group if group is None else group, tag=tag)
        except RuntimeError as exc:
            raise link_error(self.me, self.source, False, self.timeout_s, exc) from exc

    def _post(self, shape: Shape | None) -> None:
        """Post the next header, and the next payload if the last message carried one of `shape`."""
        self._head = torch.empty(HEADER_LEN, dtype=torch.int64, device=self._head_device)
        self._head_work = self._irecv(self._head, _TAG_HEADER, self.header_group)
        self._guess = None
        if shape is not None:
            buffers = [torch.empty(s, dtype=d, device=self.device) for s, d in shape]
            self._guess = (buffers, [self._irecv(t, _TAG_DATA + i) for i, t in enumerate(buffers)])

    def _wait(self, works: list[dist.Work]) -> None:
        for w in works:
            w.wait(datetime.timedelta(seconds=self.timeout_s))

    def _receive(self) -> Msg:
        self._wait([self._head_work])
        head = self._head if self._head.device.type == "cpu" else self._head.cpu()  # NCCL without a header group
        kind, count, shape, structure, resent = decode_header(head)
        guess, self._guess = self._guess, None
        tensors = None
        if guess is not None:
            self._wait(guess[1])
            tensors = guess[0]
        if resent:
            tensors = [torch.empty(s, dtype=d, device=self.device) for s, d in shape]
            self._wait([self._irecv(t, _TAG_RESENT + i) for i, t in enumerate(tensors)])
        msg = assemble(kind, count, tensors if kind in DATA else None, structure)
        if kind is Kind.STOP:
            self.stopped = True
        else:
            self._post(shape)
        return msg

    def messages(self) -> Iterator[Msg]:
        """The received stream, up to the end marker; raises PipelineError if the link failed or stayed silent past
        the timeout."""
        while not self.stopped:
            try:
                msg = self._receive()
            except RuntimeError as exc:
                raise link_error(self.me, self.source, False, self.timeout_s, exc) from exc
            yield msg
        raise PipelineError(f"{self.me}: the stream from {self.source} has ended; nothing more can be received")

    def receive_verdict(self) -> Verdict:
        """The verdict the previous stage sent after its end marker."""
        buf = torch.zeros(3, dtype=torch.int64, device=_verdict_device(self))
        _exchange(buf, self.peer, self.header_group or self.group, False, self.timeout_s, self.me, self.source)
        return Verdict.decode(buf)

    def send_verdict(self, verdict: Verdict) -> None:
        """Pass `verdict` (of this stage and the ones after it) back to the previous stage; returns once taken."""
        _exchange(verdict.encode(_verdict_device(self)), self.peer, self.header_group or self.group, True,
                  self.timeout_s, self.me, self.source)


def _verdict_device(link: LinkSender | LinkReceiver) -> torch.device:
    """Verdicts travel like headers: in host memory over a header group, else on the link's device."""
    return torch.device("cpu") if link.header_group is not None else link.device


def _exchange(buf: torch.Tensor, peer: int, group: dist.ProcessGroup | None, sending: bool, timeout_s: float,
              me: str, other: str) -> None:
    """Send `buf` to `peer` or receive into it, waiting at most `timeout_s`; a failure names the peer."""
    try:
        op = dist.isend if sending else dist.irecv
        op(buf, peer, group=group, tag=_TAG_VERDICT).wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise link_error(me, other, sending, timeout_s, exc) from exc


class Ending(enum.IntEnum):
    """How a pipeline's streams ended, as seen at one stage (the first int of a verdict on the wire)."""

    CLEAN = 0
    FEWER = 1
    """The stage found micro-batches where the end marker should be: it made fewer calls than the stage before."""
    MORE = 2
    """The stage expected micro-batches after the stage before it had ended: it made more calls."""
    FAILED = 3
    """The stage stopped on an error before its last call (its own log says which)."""


@dataclass(frozen=True)
class Verdict:
    """How a pipeline ended: `ending` at stage `stage`, with `count` micro-batches never trained there (FEWER)."""

    ending: Ending = Ending.CLEAN
    stage: int = 0
    count: int = 0

    def encode(self, device: torch.device) -> torch.Tensor:
        """[ending, stage, count] as int64 on `device`."""
        return torch.tensor([int(self.ending), self.stage, self.count], dtype=torch.int64, device=device)

    @staticmethod
    def decode(buf: torch.Tensor) -> Verdict:
        """Inverse of encode."""
        ending, stage, count = buf.cpu().tolist()
        return Verdict(Ending(ending), stage, count)

    def describe(self, calls: str) -> str:
        """What went wrong, in a sentence naming the stages and the fix (`calls`: the calls every rank must make
        alike, e.g. "step() / eval()")."""
        s, same = self.stage, f"every rank must make the same {calls} calls"
        if self.ending is Ending.FEWER:
            return (f"stage {s} ended while stage {s - 1} still sent {self.count} micro-batch(es), which were never "
                    f"trained there: stage {s} made fewer {calls} calls than stage {s - 1}; {same}")
        if self.ending is Ending.MORE:
            return (f"stage {s} expected more micro-batches but stage {s - 1} had ended: stage {s} made more {calls} "
                    f"calls than stage {s - 1}; {same}")
        return f"stage {s} stopped on an error before the end of the run (its log says which)"


def end_stream(next_msg: Callable[[], Msg] | None, receiver: LinkReceiver | None, sender: LinkSender | None,
               stage: int, stages: int, calls: str, failed: bool = False) -> None:
    """End stage `stage`'s streams (of `stages`) so no send and no posted receive is left, and check that every
    stage made the same calls (`calls`, named in the error).

    The previous stage's end marker is taken (with `next_msg`; micro-batches arriving before it are received and
    counted: this stage made fewer calls), and its verdict after it; the marker and this stage's verdict go to the
    next stage, whose verdict (of every stage after it) comes back and goes on to the previous stage. Every stage
    of a pipeline whose stages made different calls raises PipelineError naming where they differed. With `failed`
    (this process stopped on an error) nothing is received from the previous stage and nothing is raised for the
    verdict: the next stages are told of the failure. Each wait has the links' timeout (the wait for the next
    stage's verdict one per stage after this one).
    """
    verdict = Verdict()
    if failed:
        verdict = Verdict(Ending.FAILED, stage)
    elif receiver is not None:
        if receiver.stopped:  # a step took the marker where it expected micro-batches
            own = Verdict(Ending.MORE, stage)
        else:
            seen = extra = 0
            while (msg := next_msg()).kind is not Kind.STOP:
                seen, extra = seen + 1, extra + (msg.kind in DATA)
            own = Verdict(Ending.FEWER, stage, extra) if seen else Verdict()
        upstream = receiver.receive_verdict()
        verdict = upstream if upstream.ending is not Ending.CLEAN else own
    if sender is not None:
        sender.send(Msg(Kind.STOP))
        sender.flush()
        sender.send_verdict(verdict)
        downstream = sender.receive_verdict(stages - 1 - stage)
        if verdict.ending is Ending.CLEAN:
            verdict = downstream
    if failed:
        return
    if receiver is not None:
        receiver.send_verdict(verdict)
    if verdict.ending is Ending.CLEAN:
        return
    if verdict.stage == stage and verdict.ending is not Ending.FAILED:
        raise PipelineError(verdict.describe(calls))
    raise PipelineError(f"stage {stage} stops too: {verdict.describe(calls)}")


def open_links(ranks: list[int], index: int, depth: int, timeout_s: float, device: torch.device,
               group: dist.ProcessGroup | None = None, header_group: dist.ProcessGroup | None = None,
               ) -> tuple[LinkSender | None, LinkReceiver | None]:
    """The sender to stage index+1 and the receiver from stage index-1 of a pipeline whose stage k runs on
    global rank ranks[k], communicating over `group` (default: the default group); headers go over
    `header_group` in host memory when one is given (a gloo group beside NCCL)."""
    me = ranks[index]
    sender = (LinkSender(ranks[index + 1], group, depth, timeout_s, device, me, index, header_group)
              if index + 1 < len(ranks) else None)
    receiver = (LinkReceiver(ranks[index - 1], group, timeout_s, device, me, index, header_group)
                if index > 0 else None)
    return sender, receiver
