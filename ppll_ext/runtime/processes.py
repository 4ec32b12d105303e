"""PPLL with one process per stage over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

Rank k runs stage k. Each message crosses a link as a fixed-size int64 header (kind, micro-batch
count, dtype and shape of the activation, label count) plus the activation and label tensors, so
a smaller last batch needs no special case.

Receives are posted ahead without a receiver thread (a thread blocked in a gloo wait aborts the
process at exit): after each data message the receiver posts the next header *and* the next
payload, guessing it has the same shape. Sender and receiver track the same guess, so when the
shape changes (last batch, evaluation, control message) the sender fills the guessed buffers with
a placeholder and sends the real tensors on a second pair of tags. The stage keeps at most
`queue_depth` sends in flight. Reports are gathered on rank 0 over a separate group at
EPOCH_END / EVAL_END, the only synchronisation points.
"""

from __future__ import annotations

import collections
import datetime
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ppll_ext.core import LocalBlock
from ppll_ext.errors import PipelineError
from ppll_ext.runtime import trace
from ppll_ext.runtime.base import EpochStats, EvalResult
from ppll_ext.runtime.sequential import Saver
from ppll_ext.runtime.stage import Kind, Msg, Report, SaveRequest, StageWorker, eval_messages, train_messages
from ppll_ext.runtime.threads import eval_result

HEADER_LEN = 16
MAX_DIMS = HEADER_LEN - 6
_TAG_HEADER, _TAG_X, _TAG_Y, _TAG_X_RESENT, _TAG_Y_RESENT = 0, 1, 2, 3, 4
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]

Shape = tuple[tuple[int, ...], torch.dtype, int]


def payload_shape(msg: Msg) -> Shape | None:
    """(activation shape, dtype, label count) of a data message; None for control messages."""
    return (tuple(msg.x.shape), msg.x.dtype, msg.y.numel()) if msg.x is not None else None


def encode_header(msg: Msg, resent: bool = False) -> torch.Tensor:
    """[kind, n_micro, dtype code, ndim, label count, resent flag, *shape, 0...] as int64."""
    head = torch.zeros(HEADER_LEN, dtype=torch.int64)
    head[0], head[1], head[5] = int(msg.kind), msg.n_micro, int(resent)
    if msg.x is not None:
        if msg.x.dim() > MAX_DIMS:
            raise PipelineError(f"activations with {msg.x.dim()} dimensions cannot be sent (at most {MAX_DIMS})")
        head[2], head[3], head[4] = DTYPES.index(msg.x.dtype), msg.x.dim(), msg.y.numel()
        head[6:6 + msg.x.dim()] = torch.tensor(msg.x.shape)
    return head


def decode_header(head: torch.Tensor) -> tuple[Kind, int, Shape | None, bool]:
    """Inverse of encode_header: kind, n_micro, payload shape (None without payload), resent flag."""
    v = head.tolist()
    kind = Kind(v[0])
    shape = (tuple(v[6:6 + v[3]]), DTYPES[v[2]], v[4]) if kind in (Kind.TRAIN, Kind.EVAL) else None
    return kind, v[1], shape, bool(v[5])


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
                 device: torch.device, rank: int, stage: int | None = None) -> None:
        self.peer, self.group, self.depth, self.rank = peer, group, depth, rank
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

    def _isend(self, tensor: torch.Tensor, tag: int) -> dist.Work:
        try:
            return dist.isend(tensor, self.peer, group=self.group, tag=tag)
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
        head = encode_header(msg, resent).to(self.device)
        tensors: list[torch.Tensor] = [head]
        works = [self._isend(head, _TAG_HEADER)]
        if self._guess is not None:
            if shape == self._guess:
                tensors += [msg.x.contiguous(), msg.y.to(torch.int64).contiguous()]
            else:  # the receiver posted buffers of the guessed shape: fill them with a placeholder
                g_shape, g_dtype, g_labels = self._guess
                tensors += [torch.zeros(g_shape, dtype=g_dtype, device=self.device),
                            torch.zeros(g_labels, dtype=torch.int64, device=self.device)]
            works += [self._isend(tensors[-2], _TAG_X), self._isend(tensors[-1], _TAG_Y)]
        if resent:
            tensors += [msg.x.contiguous(), msg.y.to(torch.int64).contiguous()]
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
                 rank: int, stage: int | None = None) -> None:
        self.peer, self.group, self.rank, self.timeout_s, self.device = peer, group, rank, timeout_s, device
        self.me, self.source = _name(stage, rank), _name(None if stage is None else stage - 1, peer)
        self._guess: tuple[torch.Tensor, torch.Tensor, list[dist.Work]] | None = None
        self._post(None)

    def _irecv(self, tensor: torch.Tensor, tag: int) -> dist.Work:
        try:
            return dist.irecv(tensor, self.peer, group=self.group, tag=tag)
        except RuntimeError as exc:
            raise link_error(self.me, self.source, False, self.timeout_s, exc) from exc

    def _post(self, shape: Shape | None) -> None:
        """Post the next header, and the next payload if the last message carried one of `shape`."""
        self._head = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._head_work = self._irecv(self._head, _TAG_HEADER)
        self._guess = None
        if shape is not None:
            x = torch.empty(shape[0], dtype=shape[1], device=self.device)
            y = torch.empty(shape[2], dtype=torch.int64, device=self.device)
            self._guess = (x, y, [self._irecv(x, _TAG_X), self._irecv(y, _TAG_Y)])

    def _wait(self, works: list[dist.Work]) -> None:
        for w in works:
            w.wait(datetime.timedelta(seconds=self.timeout_s))

    def _receive(self) -> Msg:
        self._wait([self._head_work])
        kind, n_micro, shape, resent = decode_header(self._head.cpu())
        msg = Msg(kind, n_micro=n_micro)
        guess, self._guess = self._guess, None
        if guess is not None:
            self._wait(guess[2])
            msg.x, msg.y = guess[0], guess[1]
        if resent:
            msg.x = torch.empty(shape[0], dtype=shape[1], device=self.device)
            msg.y = torch.empty(shape[2], dtype=torch.int64, device=self.device)
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


def open_links(ranks: list[int], index: int, depth: int, timeout_s: float, device: torch.device,
               group: dist.ProcessGroup | None = None) -> tuple[LinkSender | None, LinkReceiver | None]:
    """The sender to stage index+1 and the receiver from stage index-1 of a pipeline whose stage k runs on
    global rank ranks[k], communicating over `group` (default: the default group)."""
    me = ranks[index]
    sender = (LinkSender(ranks[index + 1], group, depth, timeout_s, device, me, index) if index + 1 < len(ranks)
              else None)
    receiver = LinkReceiver(ranks[index - 1], group, timeout_s, device, me, index) if index > 0 else None
    return sender, receiver


class ProcessRunner:
    """This rank's stage in a multi-process pipeline. Rank 0 drives (feeds data, collects reports);
    the other ranks call `serve()` until rank 0 closes the pipeline."""

    def __init__(self, block: LocalBlock, *, micro_batches: int = 1, queue_depth: int = 2,
                 timeout_s: float = 300.0, saver: Saver | None = None) -> None:
        if not dist.is_initialized():
            raise PipelineError("the processes runtime needs torch.distributed to be initialised (run under torchrun)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.block = block
        self.micro_batches = micro_batches
        self.timeout_s = timeout_s
        self.saver = saver
        # Reports travel in their own group, so collectives never mix with the links' point-to-point traffic.
        self.control = dist.new_group(list(range(self.world)), timeout=datetime.timedelta(seconds=timeout_s),
                                      backend="gloo")
        self.sender, self.receiver = open_links(list(range(self.world)), self.rank, queue_depth, timeout_s,
                                                block.device)
        self.worker = StageWorker(block, self.sender.send if self.sender else None)

    def _gather(self, report: Report) -> list:
        if isinstance(report, SaveRequest):
            report = self.saver(self.block, report.step)
        if self.sender is not None:
            self.sender.flush()
        out: list[Report] | None = [None] * self.world if self.rank == 0 else None  # type: ignore[list-item]
        self._control(lambda: dist.gather_object(report, out, dst=0, group=self.control))
        return out or []

    def _control(self, collective: Callable[[], object]) -> None:
        """Run a collective of the control group; a dead or stalled stage becomes a PipelineError."""
        try:
            collective()
        except RuntimeError as exc:
            raise PipelineError(f"stage {self.rank} (rank {self.rank}): exchanging reports with the other stages "
                                f"failed: one of them exited, was killed or stalled longer than local.timeout_s="
                                f"{self.timeout_s:g} s (raise local.timeout_s if a stage's work between reports "
                                f"really takes that long) ({exc})") from exc

    def _drive(self, messages: Iterable[Msg]) -> list[Report]:
        reports: list[Report] = []
        for msg in messages:
            report = self.worker.handle(msg)
            if report is not None:
                reports = self._gather(report)
        return reports

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    on_batch: Callable[[int], None] | None = None) -> EpochStats:
        """Rank 0: stream one epoch; returns when every stage has finished it, with all stages' stats."""
        start = time.perf_counter()
        stats = self._drive(train_messages(batches, self.micro_batches, on_batch))
        return EpochStats(time.perf_counter() - start, stats[0].samples, stats)  # type: ignore[arg-type]

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> EvalResult:
        """Rank 0: pipelined evaluation; every stage scores its own classifier."""
        return eval_result(self._drive(eval_messages(batches)))  # type: ignore[arg-type]

    def checkpoint(self, step: int) -> list:
        """Rank 0: send CHECKPOINT(step) down the pipeline; every stage saves and reports to rank 0."""
        return self._drive([Msg(Kind.CHECKPOINT, n_micro=step)])

    def serve(self) -> None:
        """Ranks > 0: process the incoming stream until STOP, reporting at every EPOCH_END / EVAL_END."""
        assert self.receiver is not None
        self.worker.serve(self.receiver.messages(), self._gather)
        self._finish()

    def close(self) -> None:
        """Rank 0: send STOP down the pipeline and wait until it has gone through."""
        self.worker.handle(Msg(Kind.STOP))
        self._finish()

    def _finish(self) -> None:
        if self.sender is not None:
            self.sender.flush()
        self._control(lambda: dist.barrier(group=self.control))
