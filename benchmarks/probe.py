"""What benchmark workers measure besides throughput: peak memory per process, busy time of torch's schedules,
and their pipeline traces (the same Chrome-trace format as `ppll train --trace`)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ppll_ext import trace


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
        from torch.distributed.pipelining import schedules  # imported here: it takes seconds, few workers need it

        self.index = index
        self.busy_s = 0.0
        self._micro = {"forward": 0, "backward": 0, "step": 0}
        stage.forward_one_chunk = self._timed("forward", stage.forward_one_chunk)
        stage.backward_one_chunk = self._timed("backward", stage.backward_one_chunk)
        wait = schedules._wait_batch_p2p

        def traced_wait(work: Any) -> Any:
            start = time.perf_counter()
            try:
                return wait(work)
            finally:
                trace.current().complete("wait", self.index, start)

        schedules._wait_batch_p2p = traced_wait

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
