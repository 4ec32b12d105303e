"""The local block: one stage's slice of the model, its auxiliary head, loss and optimizer.

A block never needs anything from a later stage: it forwards, hands its detached output
on (early forwarding), backpropagates its own loss through itself only, and steps its own
optimizer once it has seen all micro-batches of a mini-batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from ppll_ext.errors import PipelineError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class LocalBlock(nn.Module):
    """body (+ aux head unless last) trained on its own loss with its own optimizer."""

    def __init__(
        self,
        body: nn.Module,
        aux: nn.Module | None,
        loss_fn: LossFn,
        *,
        index: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        grad_clip: float | None = None,
        autocast: str = "none",
        scale_grads: bool = True,
    ) -> None:
        super().__init__()
        self.body = body
        self.aux = aux
        self.loss_fn = loss_fn
        self.index = index
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.autocast_dtype = _AUTOCAST[autocast]
        self.scale_grads = scale_grads
        self.steps = 0
        self._pending = 0
        self._scaler: torch.amp.GradScaler | None = None

    @property
    def is_last(self) -> bool:
        """The last block has no aux head: its body ends in the real classifier."""
        return self.aux is None

    @property
    def device(self) -> torch.device:
        """Device of the block's parameters."""
        return next(self.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The body's output (what the next stage receives)."""
        with self._autocast():
            return self.body(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Class scores from this block's output: the aux head's, or the output itself on the last block."""
        if self.aux is None:
            return h
        with self._autocast():
            return self.aux(h)

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        n_micro: int = 1,
        on_output: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one micro-batch: returns (detached output, detached loss); steps after `n_micro` calls.

        The loss is divided by `n_micro` (gradients = mean over micro-batches) unless scale_grads=False (sum).

        `on_output` receives the detached output right after the forward pass, before the local
        backward, so a pipeline can send it downstream early; its value does not depend on this step.
        """
        with self._autocast():
            h = self.body(x)
        out = h.detach()
        if on_output is not None:
            on_output(out)
        with self._autocast():
            loss = self.loss_fn(h if self.aux is None else self.aux(h), y)
        scaled = loss / n_micro if self.scale_grads else loss
        if self.autocast_dtype is torch.float16:
            if self._scaler is None:
                self._scaler = torch.amp.GradScaler(self.device.type)
            scaled = self._scaler.scale(scaled)
        scaled.backward()
        self._pending += 1
        if self._pending >= n_micro:
            self.step()
        return out, loss.detach()

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """Evaluate one batch: (output for the next stage, correct predictions, summed loss of this block)."""
        h = self(x)
        logits = self.logits(h).float()
        correct = int((logits.argmax(dim=1) == y).sum())
        return h, correct, float(self.loss_fn(logits, y)) * len(y)

    def check_finite(self, loss: float) -> None:
        """PipelineError naming the stage and step when a loss is NaN or infinite."""
        if not math.isfinite(loss):
            raise PipelineError(
                f"stage {self.index}: loss is {loss} at step {self.steps}; lower optim.lr or enable optim.grad_clip"
            )

    def step(self) -> None:
        """Clip (this block only), step the optimizer and the LR schedule, clear the gradients."""
        self._pending = 0
        if self.optimizer is None:
            raise PipelineError(f"stage {self.index}: no optimizer was given to the local block")
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip)
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.steps += 1
