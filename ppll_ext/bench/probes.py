"""What benchmark workers measure besides throughput: peak memory per process, busy time of torch's stock schedules
and their pipeline traces (the same Chrome-trace format as `ppll train --trace`), and per-stage memory (`--memory`):
a SavedTensorMeter and a StateWatch per stage, and the peak bytes of the stage's in-flight communication buffers,
sampled where they change.

Buffers are read from the objects that hold them (ppll_ext's links, the threads runtime's queues, torch
pipelining's stage caches, DeepSpeed's pipe buffers); storages that autograd holds for backward at the moment of
a sample are left out, since the meter counts them already (a received input saved by the first layer, an
output saved by the aux head). Reading the links' private fields is a benchmark's licence; the library itself
has no hook for it.
"""

from __future__ import annotations

import collections
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ppll_ext import trace
from ppll_ext.memory import SavedTensorMeter, StageMemory, StateWatch, unique_bytes
from ppll_ext.torch_patches import on_p2p_wait


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather(value: Any, group: dist.ProcessGroup | None = None) -> list | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    out: list | None = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0, group=group)
    return out


class TorchStageProbe:
    """Times a torch.distributed.pipelining stage (ScheduleGPipe / Schedule1F1B): every forward and backward
    chunk, every wait on point-to-point communication and the optimizer step, as busy seconds and as
    trace events of this stage when tracing is on."""

    def __init__(self, stage: Any, index: int) -> None:
        self.index = index
        self.busy_s = 0.0
        self._micro = {"forward": 0, "backward": 0, "step": 0}
        stage.forward_one_chunk = self._timed("forward", stage.forward_one_chunk)
        stage.backward_one_chunk = self._timed("backward", stage.backward_one_chunk)
        on_p2p_wait(lambda start, end: trace.current().complete("wait", self.index, start, end))

    def _timed(self, kind: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.record(kind, start)

        return timed

    def record(self, kind: str, start: float) -> None:
        """Count `kind` work from perf_counter `start` until now."""
        end = time.perf_counter()
        self.busy_s += end - start
        trace.current().complete(kind, self.index, start, end, self._micro[kind])
        self._micro[kind] += 1


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts, lists, tuples and deques, and in the `buffer` of torch pipelining's
    receive-info objects."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple, collections.deque)):
        for v in obj:
            yield from tensors_in(v)
    elif isinstance(getattr(obj, "buffer", None), torch.Tensor):
        yield obj.buffer


class StageProbe:
    """One stage's meter, state watch and buffer peak; `result()` is its StageMemory as a dict."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | None = None
                 ) -> None:
        self.meter = SavedTensorMeter(module, device)
        self.watch = StateWatch(module, optimizer)
        self.buffers_peak = 0
        self._sources: list[Callable[[], Iterable[torch.Tensor]]] = []

    def reset(self) -> None:
        """Forget the peaks so far (after warm-up: one-off work such as torch pipelining's shape inference)."""
        self.meter.reset()
        self.buffers_peak = 0

    def add_buffers(self, source: Callable[[], Iterable[torch.Tensor]]) -> None:
        """Count the tensors `source()` returns as this stage's buffers at every sample."""
        self._sources.append(source)

    def sample(self) -> None:
        """Take the buffers held now (less what autograd holds) into the peak."""
        if not self._sources:
            return
        live = self.meter.live_keys()
        held = unique_bytes((t for source in self._sources for t in source()), exclude=live)
        self.buffers_peak = max(self.buffers_peak, held)

    def after(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, sampling the buffers after each call."""

        def sampled(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                self.sample()

        return sampled

    def result(self) -> dict:
        """This stage's StageMemory.to_dict()."""
        self.watch.sample()
        # saved_live_end: bytes still saved for backward after the last backward (a graph some code keeps alive).
        return {**StageMemory.measured(self.meter, self.watch, self.buffers_peak).to_dict(),
                "saved_live_end": self.meter.live}


class _SampledDeque(collections.deque):
    """A deque that calls `on_append` after each append (a link sender's in-flight messages)."""

    def __init__(self, items: Iterable[Any], on_append: Callable[[], None]) -> None:
        super().__init__(items)
        self.on_append = on_append

    def append(self, item: Any) -> None:
        super().append(item)
        self.on_append()


def watch_links(probe: StageProbe, sender: Any, receiver: Any) -> None:
    """Count a ppll_ext LinkSender's in-flight messages (sampled at each send) and a LinkReceiver's posted buffers
    (header, and payload of the guessed shape) as `probe`'s buffers."""
    if sender is not None:
        sender._inflight = _SampledDeque(sender._inflight, probe.sample)
        probe.add_buffers(lambda: tensors_in([tensors for _, tensors in sender._inflight]))
    if receiver is not None:
        probe.add_buffers(lambda: tensors_in([receiver._head, receiver._guess[0] if receiver._guess else ()]))


def rows(per_stage: Iterable[dict]) -> list[dict]:
    """Per-stage dicts in stage order, each with its stage index."""
    return [{"stage": k, **m} for k, m in enumerate(per_stage)]
