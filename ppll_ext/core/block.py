"""The local block: one stage's slice of the model, its auxiliary head, loss and optimizer.

A block never needs anything from a later stage: it forwards, hands its detached output
on (early forwarding), backpropagates its own loss through itself only, and steps its own
optimizer once it has seen all micro-batches of a mini-batch.

The step is split into the pieces an instruction interpreter needs — `forward`, `local_loss`,
`backward` (finite check, scaling, backward pass) and `step` (apply or skip the update) — so the
native stage loop (`train_step`) and the DeepSpeed adapter's instructions run the same code. How
gradients are computed and applied is an `Updater`: plain torch (clipping, fp16 loss scaling) by
default, DeepSpeed's engine in the adapter.

A non-finite local loss either stops the run (`on_nan="error"`, a PipelineError naming stage and
step, raised before the backward pass) or, with `on_nan="skip"`, makes this block skip the
parameter update of that mini-batch: its gradients are dropped and the optimizer (and its state,
e.g. momentum) is left untouched, but `steps` and the LR schedule still advance, so they keep
counting mini-batches and stay aligned with the data position stored in checkpoints. Only this
block skips; the others train on as usual.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import nn

from ppll_ext.core.tasks import Score, score
from ppll_ext.errors import PipelineError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Mixed-precision choices of a block (`autocast=`) and the dtype each one computes in."""
ON_NAN = ("error", "skip")
"""What a block does with a NaN/inf local loss (`on_nan=`)."""
OnNaN = Literal["error", "skip"]

log = logging.getLogger(__name__)


class Updater(Protocol):
    """How a block's gradients are computed and applied (plain torch, or DeepSpeed's engine)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate an already scaled loss."""

    def apply(self) -> None:
        """Apply the accumulated gradients, clear them, advance the LR schedule."""

    def skip(self) -> None:
        """Drop the accumulated gradients without an update, advance the LR schedule."""


class TorchUpdater:
    """The default updater: per-block clipping, fp16 loss scaling, the block's optimizer and schedule."""

    def __init__(self, block: LocalBlock) -> None:
        self.block = block
        self.scaler: torch.amp.GradScaler | None = None

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled by a GradScaler under fp16 autocast."""
        if self.block.autocast_dtype is torch.float16:
            if self.scaler is None:
                self.scaler = torch.amp.GradScaler(self.block.device.type)
            loss = self.scaler.scale(loss)
        loss.backward()

    def apply(self) -> None:
        """Unscale (fp16), clip this block only, step, clear the gradients, advance the schedule."""
        block, optimizer = self.block, self._optimizer()
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if block.grad_clip is not None:
            nn.utils.clip_grad_norm_(block.parameters(), block.grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        self._advance()

    def skip(self) -> None:
        """Drop the gradients without an update; the schedule advances all the same."""
        self._advance()

    def _advance(self) -> None:
        """Clear the gradients and advance the LR schedule (after every mini-batch, updated or skipped)."""
        self._optimizer().zero_grad(set_to_none=True)
        if self.block.lr_scheduler is not None:
            self.block.lr_scheduler.step()

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.block.optimizer is None:
            raise PipelineError(f"stage {self.block.index}: the local block has no optimizer; pass optimizer=",
                                key="optimizer")
        return self.block.optimizer


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
        on_nan: OnNaN = "error",
        updater: Updater | None = None,
    ) -> None:
        super().__init__()
        if on_nan not in ON_NAN:
            raise PipelineError(f"on_nan={on_nan!r} is not one of {', '.join(ON_NAN)}", key="on_nan")
        if autocast not in AUTOCAST:
            raise PipelineError(f"autocast={autocast!r} is not one of {', '.join(AUTOCAST)}", key="autocast")
        self.body = body
        self.aux = aux
        self.loss_fn = loss_fn
        self.index = index
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.autocast_dtype = AUTOCAST[autocast]
        self.scale_grads = scale_grads
        self.on_nan = on_nan
        self.updater: Updater = updater if updater is not None else TorchUpdater(self)
        self.steps = 0
        self.skipped_steps = 0
        self._skip = False
        self._pending = 0

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
                                f"models or partitions (every rank needs the same configuration)") from exc

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Predictions from this block's output: the aux head's, or the output itself on the last block."""
        if self.aux is None:
            return h
        with self._autocast():
            return self.aux(h)

    def local_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This block's own loss on its output `h` (through the aux head unless last)."""
        with self._autocast():
            return self.loss_fn(h if self.aux is None else self.aux(h), y)

    def backward(self, loss: torch.Tensor, n_micro: int = 1) -> float:
        """Backpropagate one micro-batch's loss through this block only; returns its value.

        The loss is divided by `n_micro` (gradients = mean over micro-batches) unless scale_grads=False (sum).
        A non-finite loss raises (on_nan="error") or marks this mini-batch's update as skipped (on_nan="skip").
        """
        value = float(loss.detach())
        if math.isfinite(value):
            self.updater.backward(loss / n_micro if self.scale_grads else loss)
        else:
            self._non_finite(value)
        self._pending += 1
        return value

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        n_micro: int = 1,
        on_output: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one micro-batch: returns (detached output, detached loss); steps after `n_micro` calls.

        `on_output` receives the detached output right after the forward pass, before the local
        backward, so a pipeline can send it downstream early; its value does not depend on this step.
        """
        h = self(x)
        out = h.detach()
        if on_output is not None:
            on_output(out)
        loss = self.local_loss(h, y)
        self.backward(loss, n_micro)
        if self._pending >= n_micro:
            self.step()
        return out, loss.detach()

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Score]:
        """Evaluate one batch: (output for the next stage, this block's score: its aux head's, or the model's on the
        last block)."""
        h = self(x)
        return h, score(self.loss_fn, self.logits(h).float(), y)

    def check_finite(self, loss: float) -> None:
        """PipelineError naming the stage and step when a loss is NaN or infinite (unless on_nan="skip")."""
        if not math.isfinite(loss) and self.on_nan == "error":
            raise PipelineError(
                f"stage {self.index}: loss is {loss} at step {self.steps}; lower the learning rate or clip "
                f"gradients, or skip such steps with on_nan=\"skip\"", key="on_nan")

    def _non_finite(self, loss: float) -> None:
        """Raise (on_nan="error"), or mark the current mini-batch's update as skipped and say so once."""
        self.check_finite(loss)
        if not self._skip:
            log.warning("stage %d: loss is %s at step %d; this stage skips the step's update (on_nan=skip)",
                        self.index, loss, self.steps)
        self._skip = True

    @property
    def will_skip(self) -> bool:
        """True when the pending mini-batch's update will be skipped (a non-finite loss, on_nan="skip")."""
        return self._skip

    def mark_skip(self) -> None:
        """Skip the pending mini-batch's update (a data-parallel peer of this stage saw a non-finite loss)."""
        self._skip = True

    def step(self) -> None:
        """Apply (or, after a non-finite loss with on_nan="skip", drop) the pending update; count the step.

        The LR schedule and `steps` advance either way.
        """
        self._pending = 0
        if self._skip:
            self._skip = False
            self.skipped_steps += 1
            self.updater.skip()
        else:
            self.updater.apply()
        self.steps += 1
