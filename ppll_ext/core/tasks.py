"""Tasks: the loss a block trains on and how an evaluation scores its predictions.

classification: cross-entropy of class scores against labels (or soft targets), accuracy per sample.
lm: next-token prediction, Hugging Face style: the targets are the input ids themselves and the shift
happens inside the loss (position t predicts token t + 1), padding (-100) ignored; scored per token,
so the mean loss is per token and perplexity is exp(loss).

A loss function that has a `score(logits, targets)` method scores itself; any other is scored by
`count_correct` and its mean loss times the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TASKS: tuple[str, ...] = ("classification", "lm")
"""What a model is trained for; the loss and the evaluation metrics follow from it."""
IGNORE_INDEX = -100
"""Target value that no loss or metric counts (padding), as in Hugging Face and torch's cross_entropy."""


@dataclass
class Score:
    """One evaluated batch: correct predictions out of `predictions`, and the loss summed over `loss_count` units
    (samples for classification, tokens for lm), so that sums over batches give exact means."""

    correct: int
    predictions: int
    loss_sum: float
    loss_count: int


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(correct, predictions) of scores against targets of any shape: class labels (N,) against (N, C), token ids
    (N, T) against (N, T, V) (or (N, V, T)), soft targets against scores of their own shape (argmax of each)."""
    if y.is_floating_point():
        if logits.shape != y.shape:
            return 0, 0
        return int((logits.argmax(-1) == y.argmax(-1)).sum()), y[..., 0].numel()
    if logits.dim() != y.dim() + 1:
        return 0, 0
    if logits.shape[:-1] == y.shape:
        return int((logits.argmax(-1) == y).sum()), y.numel()
    if logits.shape[:1] + logits.shape[2:] == y.shape:
        return int((logits.argmax(1) == y).sum()), y.numel()
    return 0, 0


class NextTokenLoss(nn.Module):
    """Causal language-model loss: logits (N, T, V) at position t against targets[:, t + 1] (targets = the input
    ids), mean over the tokens that are not IGNORE_INDEX; computed in float32 whatever the autocast dtype."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_shifted(logits).float(), targets[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> Score:
        """Next-token accuracy and summed loss over the counted tokens of a batch."""
        flat, target = _shifted(logits).float(), targets[:, 1:].reshape(-1)
        keep = target != IGNORE_INDEX
        loss = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = int((flat.argmax(-1)[keep] == target[keep]).sum())
        count = int(keep.sum())
        return Score(correct, count, float(loss), count)


def _shifted(logits: torch.Tensor) -> torch.Tensor:
    """Predictions for positions 0 .. T-2 (each of the token after it) as one (N * (T - 1), V) matrix."""
    if logits.dim() != 3:
        raise ValueError(f"the next-token loss needs (N, T, vocab) logits, got shape {tuple(logits.shape)}")
    return logits[:, :-1].reshape(-1, logits.shape[-1])


def make_loss(task: str) -> nn.Module:
    """The training loss of `task`."""
    return NextTokenLoss() if task == "lm" else nn.CrossEntropyLoss()


@torch.no_grad()
def score(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
          y: torch.Tensor) -> Score:
    """Score a batch with `loss_fn`'s own `score` method if it has one, else as classification."""
    own = getattr(loss_fn, "score", None)
    if callable(own):
        return own(logits, y)
    correct, predictions = count_correct(logits, y)
    return Score(correct, predictions, float(loss_fn(logits, y)) * len(y), len(y))
