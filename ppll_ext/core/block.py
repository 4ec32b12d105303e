"""The local block: one stage's slice of the model, its auxiliary head, loss and optimizer.

A block never needs anything from a later stage: it forwards, hands its detached output
on (early forwarding), backpropagates its own loss through itself only, and steps its own
optimizer once it has seen all micro-batches of a mini-batch.

A non-finite local loss either stops the run (`on_nan="error"`, a PipelineError naming stage and
step, raised before the backward pass) or, with `on_nan="skip"`, makes this block skip the
parameter update of that mini-batch: its gradients are dropped and the optimizer (and its state,
e.g. momentum) is left untouched, but `steps` and the LR schedule still advance, so they keep
counting mini-batches and stay aligned with the data position stored in checkpoints. Only this
block skips; the others train on as usual.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from ppll_ext.errors import PipelineError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ON_NAN = ("error", "skip")


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
        on_nan: str = "error",
    ) -> None:
        super().__init__()
        if on_nan not in ON_NAN:
            raise ValueError(f"on_nan={on_nan!r} is not one of {', '.join(ON_NAN)}")
        self.body = body
        self.aux = aux
        self.loss_fn = loss_fn
        self.index = index
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.autocast_dtype = _AUTOCAST[autocast]
        self.scale_grads = scale_grads
        self.on_nan = on_nan
        self.steps = 0
        self.skipped_steps = 0
        self._skip = False
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
        try:
            with self._autocast():
                return self.body(x)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            # Most often the input does not fit this stage (stages cut from different models or partitions).
            raise PipelineError(f"stage {self.index}: the forward pass failed on an input of shape {tuple(x.shape)} "
                                f"{x.dtype}: {exc}; if the shapes do not fit, the stages were built from different "
                                f"models or partitions (every rank needs the same config)") from exc

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
        A non-finite loss raises (on_nan="error") or marks this mini-batch's update as skipped (on_nan="skip").
        """
        h = self(x)
        out = h.detach()
        if on_output is not None:
            on_output(out)
        with self._autocast():
            loss = self.loss_fn(h if self.aux is None else self.aux(h), y)
        value = float(loss.detach())
        if math.isfinite(value):
            scaled = loss / n_micro if self.scale_grads else loss
            if self.autocast_dtype is torch.float16:
                if self._scaler is None:
                    self._scaler = torch.amp.GradScaler(self.device.type)
                scaled = self._scaler.scale(scaled)
            scaled.backward()
        else:
            self._non_finite(value)
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
        """PipelineError naming the stage and step when a loss is NaN or infinite (unless on_nan="skip")."""
        if not math.isfinite(loss) and self.on_nan == "error":
            raise PipelineError(
                f"stage {self.index}: loss is {loss} at step {self.steps}; lower optim.lr or enable optim.grad_clip, "
                f"or skip such steps with --on-nan skip (train.on_nan=skip)"
            )

    def _non_finite(self, loss: float) -> None:
        """Raise (on_nan="error"), or mark the current mini-batch's update as skipped and say so once."""
        self.check_finite(loss)
        if not self._skip:
            print(f"ppll: warning: stage {self.index}: loss is {loss} at step {self.steps}; this stage skips the "
                  f"step's update (train.on_nan=skip)", file=sys.stderr, flush=True)
        self._skip = True

    def step(self) -> None:
        """Clip (this block only), step the optimizer and the LR schedule, clear the gradients.

        A mini-batch marked as skipped (non-finite loss, on_nan="skip") only drops its gradients; the
        LR schedule and `steps` advance all the same.
        """
        self._pending = 0
        if self.optimizer is None:
            raise PipelineError(f"stage {self.index}: no optimizer was given to the local block")
        if self._skip:
            self._skip = False
            self.skipped_steps += 1
        else:
            self._update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.steps += 1

    def _update(self) -> None:
        """Unscale (fp16), clip and apply this block's gradients."""
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip)
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
