"""PPLL with one process per stage over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

Rank k runs stage k; messages cross the links of `ppll_ext.transport`. Every rank makes the same
calls (train, evaluate, checkpoint, close): rank 0 feeds the data and control markers into the
pipeline, the other ranks follow their input stream up to the same marker. Reports are gathered on
rank 0 over a separate group at those markers, the only synchronisation points.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from ppll_ext.core import LocalBlock
from ppll_ext.errors import PipelineError
from ppll_ext.runtime.base import (
    EpochStats,
    EvalResult,
    Report,
    SaveFailure,
    Saver,
    SaveRequest,
    attempt_save,
    eval_messages,
    eval_result,
    first_failure,
    train_messages,
)
from ppll_ext.runtime.stage import NATIVE_CALLS, StageStream, StageWorker
from ppll_ext.transport import Kind, Msg, open_links


class ProcessRunner:
    """This rank's stage in a multi-process pipeline; every rank calls the same methods in the same order."""

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
        # On a GPU the headers travel over gloo in host memory, so reading one never stalls the device.
        headers = (dist.new_group(list(range(self.world)), timeout=datetime.timedelta(seconds=timeout_s),
                                  backend="gloo") if block.device.type != "cpu" else None)
        self.sender, self.receiver = open_links(list(range(self.world)), self.rank, queue_depth, timeout_s,
                                                block.device, header_group=headers)
        self.stream = StageStream(self.rank, self.world, NATIVE_CALLS, receiver=self.receiver, sender=self.sender)
        self.worker = StageWorker(block, self.stream)

    def _gather(self, report: Report) -> list:
        if isinstance(report, SaveRequest):
            report = self._save(report.step)
        self.stream.flush()
        out: list[Report] | None = [None] * self.world if self.rank == 0 else None  # type: ignore[list-item]
        self._control(lambda: dist.gather_object(report, out, dst=0, group=self.control))
        return out or []

    def _save(self, step: int) -> object:
        """This stage's part of checkpoint `step`; then every rank learns whether all parts were written and, if not,
        raises the first failure alike (rank 0 alone reports it), with no stage still writing into the step's
        folder, which the committing rank discards."""
        result = attempt_save(lambda: self.saver(self.block, step), self.rank, f"stage {self.rank} (rank {self.rank})")
        failures: list[SaveFailure | None] = [None] * self.world
        mine = result if isinstance(result, SaveFailure) else None
        self._control(lambda: dist.all_gather_object(failures, mine, group=self.control))
        failure = first_failure(failures)
        if failure is not None:
            raise failure.error(every_rank=True)
        return result

    def _control(self, collective: Callable[[], object]) -> None:
        """Run a collective of the control group; a dead or stalled stage becomes a PipelineError."""
        try:
            collective()
        except RuntimeError as exc:
            raise PipelineError(f"stage {self.rank} (rank {self.rank}): exchanging reports with the other stages "
                                f"failed: one of them exited, was killed or stalled longer than local.timeout_s="
                                f"{self.timeout_s:g} s (raise local.timeout_s if a stage's work between reports "
                                f"really takes that long) ({exc})") from exc

    def _drive(self, messages: Iterable[Msg], until: Kind) -> list[Report]:
        """Rank 0 feeds `messages` (ending with `until`); other ranks follow their input up to `until`.

        Returns every stage's report of that marker on rank 0 (an empty list elsewhere).
        """
        reports: list[Report] = []
        if self.rank == 0:
            for msg in messages:
                report = self.worker.handle(msg)
                if report is not None:
                    reports = self._gather(report)
            return reports
        self.worker.serve(lambda r: reports.extend(self._gather(r)), until)
        return reports

    def train_segment(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
                      on_batch: Callable[[int], None] | None = None) -> EpochStats | None:
        """Stream a stretch of training (rank 0 reads `batches`); returns all stages' stats on rank 0."""
        start = time.perf_counter()
        stats = self._drive(train_messages(batches or [], self.micro_batches, on_batch), Kind.EPOCH_END)
        if self.rank != 0:
            return None
        return EpochStats(time.perf_counter() - start, stats[0].samples, stats)  # type: ignore[arg-type]

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None) -> EvalResult | None:
        """Pipelined evaluation (rank 0 reads `batches`); every stage scores its own classifier."""
        counts = self._drive(eval_messages(batches or []), Kind.EVAL_END)
        return eval_result(counts) if self.rank == 0 else None  # type: ignore[arg-type]

    def checkpoint(self, step: int) -> list:
        """CHECKPOINT(step) down the pipeline; every stage saves; rank 0 gets every stage's saver result."""
        return self._drive([Msg(Kind.CHECKPOINT, step=step)], Kind.CHECKPOINT)

    def close(self) -> None:
        """End the streams (`StageStream.close`: every stage raises the same PipelineError when the ranks made
        different calls); returns once the end has gone through every stage. Idempotent: streams that already ended
        (with that error) are left as they are."""
        if self.stream.closed:
            return
        self.stream.close()
        self._control(lambda: dist.barrier(group=self.control))
