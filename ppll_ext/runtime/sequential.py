"""Sequential local learning in one process: every block in turn, for every mini-batch.

This is the reference every pipelined runtime must match weight for weight; with one block whose
body is the whole model it is plain end-to-end backprop.
"""

from __future__ import annotations

import time

import torch

from ppll_ext import hooks, trace
from ppll_ext.core import LocalBlock
from ppll_ext.runtime.base import (
    Batches,
    EpochStats,
    EvalCounts,
    EvalResult,
    OnBatch,
    Saver,
    StageStats,
    current_lr,
    eval_result,
    split_micro,
)


class SequentialRunner:
    """Trains blocks one after another in the calling thread."""

    def __init__(self, blocks: list[LocalBlock], micro_batches: int = 1, saver: Saver | None = None) -> None:
        self.blocks = blocks
        self.micro_batches = micro_batches
        self.saver = saver
        self._train_steps = [trace.current().train_step(b) for b in blocks]
        for b in blocks:
            hooks.stage_started(b)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, stats: list[StageStats]) -> None:
        """One mini-batch through every block; block k trains on block k-1's detached outputs."""
        micro = split_micro(x, y, self.micro_batches)
        for block, train_step, st in zip(self.blocks, self._train_steps, stats, strict=True):
            start, lr = time.perf_counter(), current_lr(block)
            outputs = []
            for xm, ym in micro:
                out, loss = train_step(xm, ym, n_micro=len(micro))
                st.add_loss(loss, len(ym))
                outputs.append((out, ym))
            micro = outputs
            st.end_step(lr)
            st.steps = block.steps
            st.busy_s += time.perf_counter() - start

    def train_segment(self, batches: Batches, on_batch: OnBatch | None = None) -> EpochStats:
        """Train on every batch of `batches` (an epoch, or the segment of it up to a checkpoint); `on_batch(batch_size)`
        after each (progress bars)."""
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
        for b in self.blocks:
            b.check_health()
        return EpochStats(time.perf_counter() - start, samples, [st.settle() for st in stats])

    def evaluate(self, batches: Batches) -> EvalResult:
        """Accuracy of the final output and of every aux head on `batches`."""
        return evaluate_blocks(self.blocks, batches)

    def checkpoint(self, step: int) -> list:
        """Every stage's saver result (the blocks are idle between batches here)."""
        for b in self.blocks:
            b.check_health()
        return [self.saver(b, step) for b in self.blocks]

    def close(self) -> None:
        """Nothing runs in the background."""


def evaluate_blocks(blocks: list[LocalBlock], batches: Batches) -> EvalResult:
    """Run every batch through all blocks in eval mode, counting each block's correct predictions."""
    for b in blocks:
        b.eval()
    counts = [EvalCounts(b.index) for b in blocks]
    with torch.no_grad():
        for x, y in batches:
            h = x
            for b, c in zip(blocks, counts, strict=True):
                h, s = b.eval_step(h, y)
                c.add(s, len(y))
    for b in blocks:
        b.train()
    return eval_result(counts)
