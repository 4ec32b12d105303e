"""What every runtime shares: the reports stages make, the micro-batch split, the message streams.

The runtimes (sequential, threads, processes) import this module and `stage`, never each other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ppll_ext.core import LocalBlock, payload
from ppll_ext.core.payload import Payload
from ppll_ext.core.tasks import Score
from ppll_ext.errors import CheckpointError
from ppll_ext.transport import Kind, Msg

Batches = Iterable[tuple[Payload, torch.Tensor]]
OnBatch = Callable[[int], None]
Saver = Callable[[LocalBlock, int], object]
"""Writes a stage's part of the checkpoint of `step` and returns what the first rank needs to commit it."""


def current_lr(block: LocalBlock) -> float:
    """The learning rate `block` takes its next step with (first parameter group; NaN without an optimizer)."""
    groups = block.optimizer.param_groups if block.optimizer is not None else []
    return float(groups[0]["lr"]) if groups else math.nan


def split_micro(x: Payload, y: torch.Tensor, m: int) -> list[tuple[Payload, torch.Tensor]]:
    """Cut a mini-batch into at most m micro-batches along dim 0 (fewer if the batch is smaller than m); every tensor
    of a several-tensor input is cut alike."""
    n = min(m, len(y))
    tensors, structure = payload.flatten(x)
    parts = [t.tensor_split(n) for t in tensors]
    return [(payload.rebuild([p[i] for p in parts], structure), ym) for i, ym in enumerate(y.tensor_split(n))]


@dataclass
class StageStats:
    """One stage's work over a stretch of training: time busy computing, time waiting for input or output room,
    and per optimizer step its mean loss, learning rate and end time, so the driver draws curves of every stage
    from the stats it already gathers at segment ends (no extra messages per step).

    Losses are summed on their device while training (no host read per micro-batch); `settle()` reads them back
    once, at the end of the stretch, before the stats are reported.
    """

    index: int
    loss: float = 0.0
    """Sum over finite micro-batch losses of loss x samples."""
    samples: int = 0
    """Samples trained on (every micro-batch, finite loss or not)."""
    counted: int = 0
    """Samples whose loss was finite (the mean's denominator)."""
    steps: int = 0
    busy_s: float = 0.0
    wait_in_s: float = 0.0
    wait_out_s: float = 0.0
    step_loss: list[float] = field(default_factory=list)
    """Sample-weighted mean loss of each optimizer step (NaN when every micro-batch of it was non-finite)."""
    step_lr: list[float] = field(default_factory=list)
    """Learning rate each step was taken with (of the first parameter group)."""
    step_end_s: list[float] = field(default_factory=list)
    """time.perf_counter() when each step ended on this stage (stage 0 runs in the driving process)."""
    per_step: bool = True
    """Keep the per-step lists (False: totals only, for a stage whose stats nobody collects per segment)."""
    _step: torch.Tensor | None = None
    _pending: list[torch.Tensor | None] = field(default_factory=list)

    def add_loss(self, loss: torch.Tensor | float, n: int) -> None:
        """Accumulate a micro-batch's mean loss weighted by its size, on its device; a non-finite loss is left out."""
        value = torch.as_tensor(loss).detach().to(torch.float64)
        finite = torch.isfinite(value)
        pair = torch.stack([torch.where(finite, value * n, 0.0), finite.to(torch.float64) * n])
        self._step = pair if self._step is None else self._step + pair
        self.samples += n

    def end_step(self, lr: float) -> None:
        """Close an optimizer step: keep its (loss sum, samples) on the device, its learning rate and end time."""
        if not self.per_step:
            return
        self._pending.append(self._step)
        self._step = None
        self.step_lr.append(lr)
        self.step_end_s.append(time.perf_counter())

    def settle(self) -> StageStats:
        """Read the pending steps' losses back to the host (one read) and fold them in; returns self."""
        if self._step is not None:  # micro-batches of a step not closed yet count towards the totals only
            self._pending.append(self._step)
        closed = len(self.step_lr) - len(self.step_loss)
        real = [t for t in self._pending if t is not None]
        values = iter(torch.stack(real).tolist() if real else [])
        sums = [next(values) if t is not None else [0.0, 0.0] for t in self._pending]
        for total, count in sums:
            self.loss += total
            self.counted += int(count)
        self.step_loss += [total / count if count else math.nan for total, count in sums[:closed]]
        self._pending, self._step = [], None
        return self

    def merge(self, other: StageStats) -> None:
        """Add `other` (a later segment of the same stage) to these stats."""
        self.loss += other.loss
        self.samples += other.samples
        self.counted += other.counted
        self.steps = other.steps
        self.busy_s += other.busy_s
        self.wait_in_s += other.wait_in_s
        self.wait_out_s += other.wait_out_s
        self.step_loss += other.step_loss
        self.step_lr += other.step_lr
        self.step_end_s += other.step_end_s

    @property
    def mean_loss(self) -> float:
        """Sample-weighted mean loss over the epoch."""
        return self.loss / max(1, self.counted)


@dataclass
class EpochStats:
    """A stretch of training as seen from the first rank: wall time, samples and every stage's stats."""

    seconds: float
    samples: int
    stages: list[StageStats] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        """Training throughput of the whole pipeline."""
        return self.samples / max(self.seconds, 1e-9)

    @staticmethod
    def merge(parts: list[EpochStats]) -> EpochStats:
        """One epoch's stats from the segments it was trained in (checkpoints cut an epoch into segments)."""
        stages = []
        for group in zip(*(p.stages for p in parts)):
            merged = StageStats(group[0].index)
            for st in group:
                merged.merge(st)
            stages.append(merged)
        return EpochStats(sum(p.seconds for p in parts), sum(p.samples for p in parts), stages)


@dataclass
class EvalCounts:
    """One stage's evaluation tally: correct predictions of its classifier (out of `predictions`: one per sample
    for class labels, one per token for token targets) and its loss summed over `loss_count` units."""

    index: int
    correct: int = 0
    loss: float = 0.0
    samples: int = 0
    predictions: int = 0
    loss_count: int = 0

    def add(self, s: Score, n: int) -> None:
        """Count one evaluated batch of `n` samples."""
        self.correct += s.correct
        self.predictions += s.predictions
        self.loss += s.loss_sum
        self.loss_count += s.loss_count
        self.samples += n


@dataclass
class EvalResult:
    """Test accuracy and mean loss of the model (last stage) and of each auxiliary head (early exit per stage);
    the loss is per sample for classification, per token for language models (perplexity = exp(loss))."""

    accuracy: float
    loss: float
    aux_accuracy: list[float]
    samples: int
    aux_loss: list[float] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        """exp(loss) of the model (meaningful for the lm task)."""
        return perplexity(self.loss)

    @property
    def aux_perplexity(self) -> list[float]:
        """exp(loss) of every aux head: early-exit perplexity."""
        return [perplexity(v) for v in self.aux_loss]


def perplexity(loss: float) -> float:
    """exp of a mean per-token loss (inf where exp overflows)."""
    return math.exp(loss) if loss < 700 else math.inf


def eval_result(counts: Iterable[EvalCounts]) -> EvalResult:
    """Combine evaluation tallies (several per stage when data-parallel replicas split the test set)."""
    per_stage: dict[int, EvalCounts] = {}
    for c in counts:
        total = per_stage.setdefault(c.index, EvalCounts(c.index))
        total.add(Score(c.correct, c.predictions, c.loss, c.loss_count), c.samples)
    ordered = [per_stage[k] for k in sorted(per_stage)]
    acc = [c.correct / max(1, c.predictions) for c in ordered]
    loss = [c.loss / max(1, c.loss_count) for c in ordered]
    return EvalResult(acc[-1], loss[-1], acc[:-1], ordered[-1].samples, loss[:-1])


@dataclass
class SaveRequest:
    """A stage reached CHECKPOINT(step): everything before it is trained, nothing after it has started."""

    index: int
    step: int


@dataclass
class SaveFailure:
    """A stage's part of a checkpoint that could not be written (a full disk ...), reported in place of what the saver
    returns: the side that commits learns of it once every stage has finished writing, so it can discard the
    partial folder with no stage still writing into it."""

    index: int
    message: str
    """"stage k[ (rank r)] failed: <error type>: <error>", as the runtimes word a failed stage."""
    key: str | None = None
    """The setting the error names (train.save_dir for a full disk)."""

    def error(self, every_rank: bool = False) -> CheckpointError:
        """The failure as the CheckpointError a runtime raises (`every_rank`: raised alike on every rank)."""
        return CheckpointError(self.message, key=self.key, every_rank=every_rank)


def attempt_save(save: Callable[[], object], index: int, who: str) -> object:
    """`save()`'s result, or a SaveFailure of stage `index` naming `who` (e.g. "stage 1 (rank 1)") and the error."""
    try:
        return save()
    except Exception as exc:
        return SaveFailure(index, f"{who} failed: {type(exc).__name__}: {exc}", getattr(exc, "key", None))


def first_failure(reports: Iterable[object]) -> SaveFailure | None:
    """The first SaveFailure among `reports` (by stage), None when every stage saved its part."""
    return min((r for r in reports if isinstance(r, SaveFailure)), key=lambda r: r.index, default=None)


Report = StageStats | EvalCounts | SaveRequest


def train_messages(batches: Batches, micro_batches: int, on_batch: OnBatch | None = None) -> Iterator[Msg]:
    """The first stage's input for a stretch of training: every mini-batch cut into micro-batches, then EPOCH_END."""
    for x, y in batches:
        micro = split_micro(x, y, micro_batches)
        for xm, ym in micro:
            yield Msg(Kind.TRAIN, xm, ym, len(micro))
        if on_batch is not None:
            on_batch(len(y))
    yield Msg(Kind.EPOCH_END)


def eval_messages(batches: Batches) -> Iterator[Msg]:
    """The first stage's input for an evaluation pass, ending with EVAL_END."""
    for x, y in batches:
        yield Msg(Kind.EVAL, x, y)
    yield Msg(Kind.EVAL_END)
