"""The native engine: ppll_ext's own runtimes (sequential, threads, processes) behind the loop's interface."""

from __future__ import annotations

import itertools

from ppll_ext import checkpoint as ckpt
from ppll_ext.data import BatchLoader
from ppll_ext.runtime import EpochStats, EvalResult, ProcessRunner, SequentialRunner, ThreadRunner
from ppll_ext.train.loop import OnBatch

Runner = SequentialRunner | ThreadRunner | ProcessRunner


class NativeEngine:
    """Drives one runtime's runner; in the processes runtime rank 0 reads the data and every rank follows."""

    replicas = 1

    def __init__(self, runner: Runner, name: str, rank: int = 0) -> None:
        self.runner = runner
        self.name = name
        self.is_driver = rank == 0

    def train(self, loader: BatchLoader, first: int, steps: int, on_batch: OnBatch | None) -> EpochStats | None:
        """Batches first .. first+steps-1 of the current epoch through the pipeline."""
        batches = itertools.islice(loader.iter_from(first), steps) if self.is_driver else None
        return self.runner.train_segment(batches, on_batch)

    def evaluate(self, loader: BatchLoader) -> EvalResult | None:
        """Pipelined evaluation; the driver reads the test set."""
        return self.runner.evaluate(loader if self.is_driver else None)

    def checkpoint(self, step: int) -> list[ckpt.StageManifest] | None:
        """A CHECKPOINT marker down the pipeline: every stage saves when it gets there."""
        return self.runner.checkpoint(step)

    def close(self) -> None:
        """Stop the stage threads or processes."""
        self.runner.close()
