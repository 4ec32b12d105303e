"""What every runtime reports, and the micro-batch split they share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def split_micro(x: torch.Tensor, y: torch.Tensor, m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a mini-batch into at most m micro-batches along dim 0 (fewer if the batch is smaller than m)."""
    n = min(m, x.shape[0])
    return list(zip(x.tensor_split(n), y.tensor_split(n), strict=True))


@dataclass
class StageStats:
    """One stage's work over an epoch: time busy computing, time waiting for input or output room."""

    index: int
    loss: float = 0.0
    samples: int = 0
    steps: int = 0
    busy_s: float = 0.0
    wait_in_s: float = 0.0
    wait_out_s: float = 0.0

    def add_loss(self, loss: float, n: int) -> None:
        """Accumulate a micro-batch's mean loss weighted by its size; a skipped non-finite loss is left out."""
        if not math.isfinite(loss):
            return
        self.loss += loss * n
        self.samples += n

    @property
    def mean_loss(self) -> float:
        """Sample-weighted mean loss over the epoch."""
        return self.loss / max(1, self.samples)


@dataclass
class EpochStats:
    """A training epoch as seen from the first rank: wall time and every stage's stats."""

    seconds: float
    samples: int
    stages: list[StageStats] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        """Training throughput of the whole pipeline."""
        return self.samples / max(self.seconds, 1e-9)


@dataclass
class EvalResult:
    """Test accuracy of the model (last stage) and of each auxiliary head (early exit per stage)."""

    accuracy: float
    loss: float
    aux_accuracy: list[float]
    samples: int
