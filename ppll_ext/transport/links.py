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
"""

from __future__ import annotations

import collections
import datetime
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from ppll_ext import trace
from ppll_ext.errors import PipelineError
from ppll_ext.transport.wire import HEADER_LEN, Kind, Msg, Shape, decode_header, encode_header, payload_shape

_TAG_HEADER, _TAG_X, _TAG_Y, _TAG_X_RESENT, _TAG_Y_RESENT = 0, 1, 2, 3, 4


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
        if self._guess is not None:
            if shape == self._guess:
                tensors += [msg.x.contiguous(), msg.y.contiguous()]
            else:  # the receiver posted buffers of the guessed shape: fill them with a placeholder
                tensors += [torch.zeros(s, dtype=d, device=self.device) for s, d in self._guess]
            works += [self._isend(tensors[-2], _TAG_X), self._isend(tensors[-1], _TAG_Y)]
        if resent:
            tensors += [msg.x.contiguous(), msg.y.contiguous()]
            works += [self._isend(tensors[-2], _TAG_X_RESENT), self._isend(tensors[-1], _TAG_Y_RESENT)]
        self._guess = shape
        self._inflight.append((works, tuple(tensors)))

    def flush(self) -> None:
        """Wait until every message sent so far has been received."""
        while self._inflight:
            self._wait_oldest()


class LinkReceiver:
    """Receives messages from the previous rank in the caller's thread, the next one always posted ahead."""

    def __init__(self, peer: int, group: dist.ProcessGroup | None, timeout_s: float, device: torch.device,
                 rank: int, stage: int | None = None, header_group: dist.ProcessGroup | None = None) -> None:
        self.peer, self.group, self.rank, self.timeout_s, self.device = peer, group, rank, timeout_s, device
        self.header_group = header_group
        self._head_device = torch.device("cpu") if header_group is not None else device
        self.me, self.source = _name(stage, rank), _name(None if stage is None else stage - 1, peer)
        self._guess: tuple[torch.Tensor, torch.Tensor, list[dist.Work]] | None = None
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
            x, y = (torch.empty(s, dtype=d, device=self.device) for s, d in shape)
            self._guess = (x, y, [self._irecv(x, _TAG_X), self._irecv(y, _TAG_Y)])

    def _wait(self, works: list[dist.Work]) -> None:
        for w in works:
            w.wait(datetime.timedelta(seconds=self.timeout_s))

    def _receive(self) -> Msg:
        self._wait([self._head_work])
        head = self._head if self._head.device.type == "cpu" else self._head.cpu()  # NCCL without a header group
        kind, n_micro, shape, resent = decode_header(head)
        msg = Msg(kind, n_micro=n_micro)
        guess, self._guess = self._guess, None
        if guess is not None:
            self._wait(guess[2])
            msg.x, msg.y = guess[0], guess[1]
        if resent:
            msg.x, msg.y = (torch.empty(s, dtype=d, device=self.device) for s, d in shape)
            self._wait([self._irecv(msg.x, _TAG_X_RESENT), self._irecv(msg.y, _TAG_Y_RESENT)])
        if shape is None:
            msg.x = msg.y = None
        if kind is not Kind.STOP:
            self._post(shape)
        return msg

    def messages(self) -> Iterator[Msg]:
        """The received stream; raises PipelineError if the link failed or stayed silent past the timeout."""
        while True:
            try:
                msg = self._receive()
            except RuntimeError as exc:
                raise link_error(self.me, self.source, False, self.timeout_s, exc) from exc
            yield msg


def end_stream(next_msg: Callable[[], Msg] | None, sender: LinkSender | None, mismatch: str) -> None:
    """End a stage's streams: take the previous stage's end marker (`next_msg`, None on the first stage), pass it
    on and wait until it is taken, so no send and no posted receive is left. Anything but the marker arriving
    first is PipelineError(`mismatch`): the ranks made different calls."""
    if next_msg is not None and next_msg().kind is not Kind.STOP:
        raise PipelineError(mismatch)
    if sender is not None:
        sender.send(Msg(Kind.STOP))
        sender.flush()


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
