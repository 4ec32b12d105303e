"""Activation checkpointing of a stage's body (local.checkpoint_activations): each layer recomputed in backward,
with the running statistics of its norm layers counted once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ppll_ext.core.payload import Chain


@contextlib.contextmanager
def frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Normalisation layers of `module` leave their running statistics as they are (momentum 0, batch counter
    restored): the recomputation of a checkpointed forward must not count the batch twice. The layers still run
    the same op, so autograd saves the same tensors as in the first forward (checkpoint checks that)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def checkpointed(fn: Callable[..., Any], *args: Any, modules: nn.Module | None = None, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` under non-reentrant `torch.utils.checkpoint` (RNG state preserved, so dropout recomputes
    the same mask), with the running statistics of `modules`' norm layers frozen during the recomputation."""
    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), (frozen_norm_statistics(modules) if modules is not None
                                          else contextlib.nullcontext())

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


class CheckpointedSequential(Chain):
    """A Chain (nn.Sequential's children and state_dict names, payloads passed on as the unsplit model does) whose
    training forward checkpoints each layer: only the layer-boundary activations are kept until backward, each layer
    is recomputed during backward.

    Per layer rather than per body: a PPLL stage backpropagates right after its forward, so what bounds its memory
    is the backward's peak; checkpointing the whole body would recompute all of its activations at once in
    backward (the same peak as without), per layer recomputes one layer at a time.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Each layer in turn, checkpointed when gradients are being recorded."""
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        for layer in self:
            out = checkpointed(layer, *args, modules=layer, **kwargs)
            args, kwargs = ((), out) if isinstance(out, dict) else (
                (tuple(out), {}) if isinstance(out, (tuple, list)) else ((out,), {}))
        return out
