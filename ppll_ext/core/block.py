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
the step it first happened at) or, with `on_nan="skip"`, makes this block skip the parameter update
of that mini-batch: its gradients are dropped and the optimizer (and its state, e.g. momentum) is
left untouched, but `steps` and the LR schedule still advance, so they keep counting mini-batches and
stay aligned with the data position stored in checkpoints. Only this block skips; the others train
on as usual.

No host-device synchronisation per micro-batch: losses stay on the device and finiteness is
recorded there. The host reads it back only where it must act on it: with `on_nan="skip"` once per
optimizer step (to apply or skip it, as torch's GradScaler does with non-fused optimizers); with
`on_nan="error"` every `check_every` steps before the update (1 = every step, so a NaN never reaches
the weights) and at the stage loop's logging points (`check_health`). On the CPU a read costs
nothing, so `check_every` defaults to 1 there and to CHECK_EVERY on accelerators.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import nn

from ppll_ext.core import payload
from ppll_ext.core.payload import Payload
from ppll_ext.core.tasks import Score, score
from ppll_ext.errors import PipelineError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Mixed-precision choices of a block (`autocast=`) and the dtype each one computes in."""
CHECK_EVERY = 16
"""Optimizer steps between host checks of the non-finite flag on an accelerator (on_nan="error")."""
ON_NAN = ("error", "skip")
"""What a block does with a NaN/inf local loss (`on_nan=`)."""
OnNaN = Literal["error", "skip"]

log = logging.getLogger(__name__)


class Updater(Protocol):
    """How a block's gradients are computed and applied (plain torch, or DeepSpeed's engine)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate an already scaled loss."""

    def apply(self) -> bool:
        """Apply the accumulated gradients, clear them, advance the LR schedule. False when the gradients overflowed
        (inf/NaN under fp16 loss scaling) and the update was skipped instead."""

    def skip(self) -> None:
        """Drop the accumulated gradients without an update, advance the LR schedule."""

    @property
    def loss_scale(self) -> float | None:
        """The block's current fp16 loss scale (None without loss scaling)."""


class TorchUpdater:
    """The default updater: per-block clipping, fp16 loss scaling, the block's optimizer and schedule.

    Under fp16 each block owns its GradScaler (dynamic loss scale), so an overflow lowers that block's scale and
    skips that block's update only; nothing is shared between stages.
    """

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

    def apply(self) -> bool:
        """Unscale (fp16), clip this block only, step, clear the gradients, advance the schedule. False when the
        fp16 gradients overflowed: GradScaler skipped the step and halved the scale (one host read, as its step
        makes one already)."""
        block, optimizer = self.block, self._optimizer()
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if block.grad_clip is not None:
            nn.utils.clip_grad_norm_(block.parameters(), block.grad_clip)
        applied = True
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= before  # the scale only shrinks after an overflow
        else:
            optimizer.step()
        self._advance()
        return applied

    @property
    def loss_scale(self) -> float | None:
        """The GradScaler's current scale (None before the first fp16 backward or without fp16)."""
        return None if self.scaler is None else self.scaler.get_scale()

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
        check_every: int = 0,
        spread: bool = True,
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
        self.check_every = check_every
        self.spread = spread
        """How body and aux head take several tensors: spread as arguments (a tuple positional, a dict keyword), or
        as one argument (False: DeepSpeed's layers take one tuple)."""
        """Steps between host reads of the non-finite flag with on_nan="error" (0: 1 on the CPU, else
        CHECK_EVERY)."""
        self.steps = 0
        self.skipped_steps = 0
        self._skip = False
        self._pending = 0
        self._bad: torch.Tensor | None = None
        """On the device: the step (mini-batch) at which a non-finite loss first appeared since the last check, -1
        if none, and that loss; only read by the host at checks."""

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

    def forward(self, x: Payload, **kwargs: object) -> Payload:
        """The body's output (what the next stage receives): `x` passed as the unsplit model passes it (a tuple as
        positional arguments, a dict as keyword arguments; `kwargs` added)."""
        try:
            with self._autocast():
                return payload.call(self.body, x, self.spread, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            # Most often the input does not fit this stage (stages cut from different models or partitions).
            got = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else payload.describe(x)
            raise PipelineError(f"stage {self.index}: the forward pass failed on an input of {got}: {exc}; if the "
                                f"shapes do not fit, the stages were built from different models or partitions (every "
                                f"rank needs the same configuration)") from exc

    def logits(self, h: Payload) -> torch.Tensor:
        """Predictions from this block's output: the aux head's (called with `h` as the next stage's body would be),
        or the output itself on the last block."""
        if self.aux is None:
            return h
        with self._autocast():
            return payload.call(self.aux, h, self.spread)

    def local_loss(self, h: Payload, y: torch.Tensor) -> torch.Tensor:
        """This block's own loss on its output `h` (through the aux head unless last)."""
        with self._autocast():
            return self.loss_fn(h if self.aux is None else payload.call(self.aux, h, self.spread), y)

    def backward(self, loss: torch.Tensor, n_micro: int = 1) -> torch.Tensor:
        """Backpropagate one micro-batch's loss through this block only; returns it detached (on the device).

        The loss is divided by `n_micro` (gradients = mean over micro-batches) unless scale_grads=False (sum).
        A non-finite loss is recorded on the device, without a host read: it stops the run (on_nan="error") or skips
        this mini-batch's update (on_nan="skip") when `step` checks it.
        """
        value = loss.detach()
        self._record(value)
        self.updater.backward(loss / n_micro if self.scale_grads else loss)
        self._pending += 1
        return value

    def _record(self, loss: torch.Tensor) -> None:
        """Keep (step, loss) of the first non-finite loss since the last check in `_bad`, on the device."""
        here = torch.stack([torch.full_like(loss, self.steps, dtype=torch.float64), loss.to(torch.float64)])
        if self._bad is None:
            self._bad = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=loss.device)
        fresh = (self._bad[0] < 0) & ~torch.isfinite(loss)
        self._bad = torch.where(fresh, here, self._bad)

    def train_step(
        self,
        x: Payload,
        y: torch.Tensor,
        n_micro: int = 1,
        on_output: Callable[[Payload], None] | None = None,
    ) -> tuple[Payload, torch.Tensor]:
        """Train on one micro-batch: returns (detached output, detached loss); steps after `n_micro` calls.

        `on_output` receives the detached output right after the forward pass, before the local
        backward, so a pipeline can send it downstream early; its value does not depend on this step.
        """
        h = self(x)
        out = payload.detach(h)
        if on_output is not None:
            on_output(out)
        loss = self.local_loss(h, y)
        self.backward(loss, n_micro)
        if self._pending >= n_micro:
            self.step()
        return out, loss.detach()

    @torch.no_grad()
    def eval_step(self, x: Payload, y: torch.Tensor) -> tuple[Payload, Score]:
        """Evaluate one batch: (output for the next stage, this block's score: its aux head's, or the model's on the
        last block)."""
        h = self(x)
        return h, score(self.loss_fn, self.logits(h).float(), y)

    def check_health(self) -> None:
        """Read the non-finite flag (one host read): raise for on_nan="error", naming the step it first happened at.

        Called before updates every `check_every` steps and at logging points (reports, checkpoints).
        """
        if self._bad is None or self.on_nan == "skip":
            return
        step, loss = self._bad.tolist()
        if step >= 0:
            self.zero_grad(set_to_none=True)  # the pending (non-finite) gradients are never applied
            raise PipelineError(
                f"stage {self.index}: loss is {loss} at step {int(step)}; lower the learning rate or clip "
                f"gradients, or skip such steps with on_nan=\"skip\"", key="on_nan")

    def _pending_non_finite(self) -> float | None:
        """The first non-finite loss of the pending mini-batch, else None (one host read; on_nan="skip")."""
        if self._bad is None:
            return None
        step, loss = self._bad.tolist()
        self._bad = None
        return loss if step >= 0 else None

    @property
    def will_skip(self) -> bool:
        """True when the pending mini-batch's update will be skipped (a non-finite loss, on_nan="skip")."""
        if self.on_nan == "skip" and not self._skip:
            loss = self._pending_non_finite()
            if loss is not None:
                log.warning("stage %d: loss is %s at step %d; this stage skips the step's update (on_nan=skip)",
                            self.index, loss, self.steps)
                self._skip = True
        return self._skip

    def mark_skip(self) -> None:
        """Skip the pending mini-batch's update (a data-parallel peer of this stage saw a non-finite loss)."""
        self._skip = True

    def _check_due(self) -> bool:
        every = self.check_every or (1 if self.device.type == "cpu" else CHECK_EVERY)
        return (self.steps + 1) % every == 0

    def step(self) -> None:
        """Apply (or, after a non-finite loss with on_nan="skip", drop) the pending update; count the step.

        An update whose fp16 gradients overflowed is skipped too (whatever on_nan says: dynamic loss scaling expects
        it), with a warning like on_nan="skip"'s. The LR schedule and `steps` advance either way.
        """
        self._pending = 0
        if self.on_nan == "error" and self._check_due():
            self.check_health()
        if self.will_skip:
            self._skip = False
            self.skipped_steps += 1
            self.updater.skip()
        elif not self.updater.apply():
            self.skipped_steps += 1
            scale = self.updater.loss_scale
            log.warning("stage %d: gradients overflowed at step %d; this stage skips the step's update%s", self.index,
                        self.steps, "" if scale is None else f" (loss scale now {scale:g})")
        self.steps += 1
