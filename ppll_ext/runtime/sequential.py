"""Sequential local learning in one process: every block in turn, for every mini-batch.

This is the reference every pipelined runtime must match weight for weight; with one block whose
body is the whole model it is plain end-to-end backprop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from ppll_ext.core import LocalBlock
from ppll_ext.runtime import trace
from ppll_ext.runtime.base import EpochStats, EvalResult, StageStats, split_micro

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
OnBatch = Callable[[int], None]
Saver = Callable[[LocalBlock, int], object]
"""Writes a stage's part of the checkpoint of `step` and returns what the first rank needs to finish it."""


class SequentialRunner:
    """Trains blocks one after another in the calling thread."""

    def __init__(self, blocks: list[LocalBlock], micro_batches: int = 1, saver: Saver | None = None) -> None:
        self.blocks = blocks
        self.micro_batches = micro_batches
        self.saver = saver
        self._train_steps = [trace.current().train_step(b) for b in blocks]

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, stats: list[StageStats]) -> None:
        """One mini-batch through every block; block k trains on block k-1's detached outputs."""
        micro = split_micro(x, y, self.micro_batches)
        for block, train_step, st in zip(self.blocks, self._train_steps, stats, strict=True):
            start = time.perf_counter()
            outputs = []
            for xm, ym in micro:
                out, loss = train_step(xm, ym, n_micro=len(micro))
                value = float(loss)
                block.check_finite(value)
                st.add_loss(value, len(ym))
                outputs.append((out, ym))
            micro = outputs
            st.steps = block.steps
            st.busy_s += time.perf_counter() - start

    def train_epoch(self, batches: Batches, on_batch: OnBatch | None = None) -> EpochStats:
        """Train on every batch of `batches`; `on_batch(batch_size)` after each (progress bars)."""
        stats = [StageStats(b.index) for b in self.blocks]
        for b in self.blocks:
            b.train()
        start = time.perf_counter()
        samples = 0
        for x, y in batches:
            self.train_batch(x, y, stats)
            samples += len(y)
            if on_batch is not None:
                on_batch(len(y))
        return EpochStats(time.perf_counter() - start, samples, stats)

    def evaluate(self, batches: Batches) -> EvalResult:
        """Accuracy of the final output and of every aux head on `batches`."""
        return evaluate_blocks(self.blocks, batches)

    def checkpoint(self, step: int) -> list:
        """Every stage's saver result (the blocks are idle between batches here)."""
        return [self.saver(b, step) for b in self.blocks]


def evaluate_blocks(blocks: list[LocalBlock], batches: Batches) -> EvalResult:
    """Run every batch through all blocks in eval mode, counting each block's correct predictions."""
    for b in blocks:
        b.eval()
    correct = [0] * len(blocks)
    loss_sum = 0.0
    n = 0
    with torch.no_grad():
        for x, y in batches:
            h = x
            for i, b in enumerate(blocks):
                h, c, loss = b.eval_step(h, y)
                correct[i] += c
            loss_sum += loss
            n += len(y)
    for b in blocks:
        b.train()
    n = max(n, 1)
    return EvalResult(correct[-1] / n, loss_sum / n, [c / n for c in correct[:-1]], n)
