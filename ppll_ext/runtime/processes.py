"""PPLL with one process per stage over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

Rank k runs stage k. Each message crosses a link as a fixed-size int64 header (kind, micro-batch
count, dtype and shape of the activation, length of the labels) followed by the tensors, so a
smaller last batch needs no special case. A receiver thread posts the next receive as soon as the
previous message is handed over (receives are posted ahead) into a bounded queue; the stage
keeps at most `queue_depth` sends in flight. Reports are gathered on rank 0 over a separate
group at EPOCH_END / EVAL_END, the only synchronisation points.
"""

from __future__ import annotations

import collections
import datetime
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ppll_ext.core import LocalBlock
from ppll_ext.errors import PipelineError
from ppll_ext.runtime.base import EpochStats, EvalResult
from ppll_ext.runtime.stage import Kind, Msg, Report, StageWorker, eval_messages, train_messages
from ppll_ext.runtime.threads import eval_result

HEADER_LEN = 16
MAX_DIMS = HEADER_LEN - 5
_TAG_HEADER, _TAG_X, _TAG_Y = 0, 1, 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]
_POLL_S = 0.1


def encode_header(msg: Msg) -> torch.Tensor:
    """[kind, n_micro, dtype code, ndim, label count, *shape, 0...] as int64."""
    head = torch.zeros(HEADER_LEN, dtype=torch.int64)
    head[0], head[1] = int(msg.kind), msg.n_micro
    if msg.x is not None:
        if msg.x.dim() > MAX_DIMS:
            raise PipelineError(f"activations with {msg.x.dim()} dimensions cannot be sent (at most {MAX_DIMS})")
        head[2], head[3], head[4] = DTYPES.index(msg.x.dtype), msg.x.dim(), msg.y.numel()
        head[5:5 + msg.x.dim()] = torch.tensor(msg.x.shape)
    return head


def decode_header(head: torch.Tensor) -> tuple[Kind, int, torch.dtype, list[int], int]:
    """Inverse of encode_header: kind, n_micro, dtype, shape, label count."""
    values = head.tolist()
    ndim = values[3]
    return Kind(values[0]), values[1], DTYPES[values[2]], values[5:5 + ndim], values[4]


class LinkSender:
    """Sends messages to the next rank with at most `depth` messages in flight."""

    def __init__(self, peer: int, group: dist.ProcessGroup | None, depth: int, timeout_s: float,
                 device: torch.device) -> None:
        self.peer, self.group, self.depth = peer, group, depth
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = device
        self._inflight: collections.deque[tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = collections.deque()

    def _wait_oldest(self) -> None:
        works, _ = self._inflight.popleft()
        for w in works:
            try:
                w.wait(self.timeout)
            except RuntimeError as exc:
                raise PipelineError(f"sending to rank {self.peer} failed (it exited, crashed or stalled for "
                                    f"{self.timeout.total_seconds():.0f} s): {exc}") from exc

    def send(self, msg: Msg) -> None:
        """Start sending `msg`; blocks only while `depth` earlier messages are still in flight."""
        while len(self._inflight) >= self.depth:
            self._wait_oldest()
        head = encode_header(msg).to(self.device)
        tensors: tuple[torch.Tensor, ...] = (head,)
        works = [dist.isend(head, self.peer, group=self.group, tag=_TAG_HEADER)]
        if msg.x is not None:
            x, y = msg.x.contiguous(), msg.y.to(torch.int64).contiguous()
            works.append(dist.isend(x, self.peer, group=self.group, tag=_TAG_X))
            works.append(dist.isend(y, self.peer, group=self.group, tag=_TAG_Y))
            tensors = (head, x, y)
        self._inflight.append((works, tensors))

    def flush(self) -> None:
        """Wait until every message sent so far has been received."""
        while self._inflight:
            self._wait_oldest()


def receive_payload(head: torch.Tensor, peer: int, group: dist.ProcessGroup | None, timeout_s: float,
                    device: torch.device) -> Msg:
    """The message a received header announces, with its tensors received into fresh buffers."""
    kind, n_micro, dtype, shape, n_labels = decode_header(head.cpu())
    msg = Msg(kind, n_micro=n_micro)
    if kind in (Kind.TRAIN, Kind.EVAL):
        msg.x = torch.empty(shape, dtype=dtype, device=device)
        msg.y = torch.empty(n_labels, dtype=torch.int64, device=device)
        timeout = datetime.timedelta(seconds=timeout_s)
        works = [dist.irecv(msg.x, peer, group=group, tag=_TAG_X), dist.irecv(msg.y, peer, group=group, tag=_TAG_Y)]
        for w in works:
            w.wait(timeout)
    return msg


class InlineReceiver:
    """Receives in the caller's thread; only the next header's receive is posted ahead.

    For pipelines with no end-of-stream marker (SchedulePPLL): a receive left pending at exit is harmless,
    whereas a thread blocked in one aborts the process when the process group is destroyed.
    """

    def __init__(self, peer: int, group: dist.ProcessGroup | None, timeout_s: float, device: torch.device,
                 rank: int) -> None:
        self.peer, self.group, self.rank, self.timeout_s, self.device = peer, group, rank, timeout_s, device
        self._post()

    def _post(self) -> None:
        self._head = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._work = dist.irecv(self._head, self.peer, group=self.group, tag=_TAG_HEADER)

    def messages(self) -> Iterator[Msg]:
        """The received stream; raises PipelineError if the link failed or stayed silent past the timeout."""
        while True:
            try:
                self._work.wait(datetime.timedelta(seconds=self.timeout_s))
                head = self._head
                self._post()
                msg = receive_payload(head, self.peer, self.group, self.timeout_s, self.device)
            except RuntimeError as exc:
                raise PipelineError(f"rank {self.rank}: receiving from rank {self.peer} failed (it exited, crashed "
                                    f"or sent nothing for {self.timeout_s:.0f} s): {exc}") from exc
            yield msg


class LinkReceiver:
    """A thread that receives messages from the previous rank into a bounded queue."""

    def __init__(self, peer: int, group: dist.ProcessGroup | None, depth: int, timeout_s: float,
                 device: torch.device, rank: int) -> None:
        self.peer, self.group, self.rank = peer, group, rank
        self.timeout_s = timeout_s
        self.device = device
        self._queue: queue.Queue[Msg | BaseException] = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ppll-recv-{rank}", daemon=True)
        self._thread.start()

    def _recv(self, tensor: torch.Tensor, tag: int) -> None:
        dist.irecv(tensor, self.peer, group=self.group, tag=tag).wait(datetime.timedelta(seconds=self.timeout_s))

    def _run(self) -> None:
        try:
            while True:
                head = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
                self._recv(head, _TAG_HEADER)
                msg = receive_payload(head, self.peer, self.group, self.timeout_s, self.device)
                self._put(msg)
                if msg.kind is Kind.STOP:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the stage thread, which raises it
            self._put(exc)

    def _put(self, item: Msg | BaseException) -> None:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def messages(self) -> Iterator[Msg]:
        """The received stream; raises PipelineError if the link failed or stayed silent past the timeout."""
        while True:
            try:
                item = self._queue.get(timeout=self.timeout_s)
            except queue.Empty:
                raise PipelineError(f"rank {self.rank}: no message from rank {self.peer} for {self.timeout_s:.0f} s "
                                    f"(raise local.timeout_s if a stage really takes this long)") from None
            if isinstance(item, BaseException):
                raise PipelineError(f"rank {self.rank}: receiving from rank {self.peer} failed (it exited or "
                                    f"crashed): {item}") from item
            yield item

    def close(self) -> None:
        """Let the receiver thread exit (it is a daemon; pending receives die with the process group)."""
        self._closing.set()


Receiver = LinkReceiver | InlineReceiver


def open_links(ranks: list[int], index: int, depth: int, timeout_s: float, device: torch.device,
               group: dist.ProcessGroup | None = None) -> tuple[LinkSender | None, Receiver | None]:
    """The sender to stage index+1 and the receiver from stage index-1, for a pipeline whose stage k is on
    global rank ranks[k].

    Without `group`, every link gets its own two-rank group (a collective call: every rank of the world
    must make it) and a receiver thread prefetches the next message, so the two threads never share a
    communicator. With `group`, both directions use it from the caller's thread (InlineReceiver).
    """
    if group is None:
        timeout = datetime.timedelta(seconds=timeout_s)
        links = [dist.new_group([ranks[k], ranks[k + 1]], timeout=timeout) for k in range(len(ranks) - 1)]
    else:
        links = [group] * (len(ranks) - 1)
    me = ranks[index]
    sender = LinkSender(ranks[index + 1], links[index], depth, timeout_s, device) if index + 1 < len(ranks) else None
    receiver: Receiver | None = None
    if index > 0:
        receiver = (LinkReceiver(ranks[index - 1], links[index - 1], depth, timeout_s, device, me) if group is None
                    else InlineReceiver(ranks[index - 1], group, timeout_s, device, me))
    return sender, receiver


class ProcessRunner:
    """This rank's stage in a multi-process pipeline. Rank 0 drives (feeds data, collects reports);
    the other ranks call `serve()` until rank 0 closes the pipeline."""

    def __init__(self, block: LocalBlock, *, micro_batches: int = 1, queue_depth: int = 2,
                 timeout_s: float = 300.0) -> None:
        if not dist.is_initialized():
            raise PipelineError("the processes runtime needs torch.distributed to be initialised (run under torchrun)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.block = block
        self.micro_batches = micro_batches
        self.timeout_s = timeout_s
        # Reports travel in their own group, apart from the links' groups.
        self.control = dist.new_group(list(range(self.world)), timeout=datetime.timedelta(seconds=timeout_s),
                                      backend="gloo")
        self.sender, self.receiver = open_links(list(range(self.world)), self.rank, queue_depth, timeout_s,
                                                block.device)
        self.worker = StageWorker(block, self.sender.send if self.sender else None)

    @property
    def is_driver(self) -> bool:
        """Rank 0 feeds the data and prints; the others serve."""
        return self.rank == 0

    def _gather(self, report: Report) -> list[Report]:
        if self.sender is not None:
            self.sender.flush()
        out: list[Report] | None = [None] * self.world if self.rank == 0 else None  # type: ignore[list-item]
        dist.gather_object(report, out, dst=0, group=self.control)
        return out or []

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
        if self.receiver is not None:
            self.receiver.close()
        dist.barrier(group=self.control)
