"""What crosses a stage boundary: one tensor, or a tuple, list or dict of tensors.

A stage body may return several tensors (hidden states with an attention mask and position ids, features with a
skip map and an index tensor); they reach the next stage's body as the unsplit model passes them — a tuple or list
as positional arguments, a dict as keyword arguments — and this stage's aux head is called the same way. Tensors of
any dtype travel; floating tensors that require grad are detached where the stage hands them on, integer and bool
tensors travel as they are. Containers are flat (no nesting): that is all a wire header needs to describe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ppll_ext.errors import PipelineError

Payload = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | dict[str, torch.Tensor]
"""Activations at a stage boundary."""
Form = Literal["tensor", "tuple", "list", "dict"]
FORMS: tuple[Form, ...] = ("tensor", "tuple", "list", "dict")
"""Container kinds, in the order their codes travel in a wire header."""


@dataclass(frozen=True)
class Structure:
    """How a payload's flat list of tensors is put back together: its container and, for a dict, its keys."""

    form: Form = "tensor"
    keys: tuple[str, ...] = ()


def flatten(payload: Payload) -> tuple[list[torch.Tensor], Structure]:
    """The payload's tensors in order (a dict's in key order as given) and its structure; PipelineError naming what
    was found when it is not a tensor or a flat tuple / list / dict of tensors."""
    if isinstance(payload, torch.Tensor):
        return [payload], Structure()
    if isinstance(payload, dict):
        items, form, keys = list(payload.values()), "dict", tuple(payload)
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise PipelineError(f"a stage output dict has the key {bad[0]!r}; keys must be strings (they become the "
                                f"next stage's keyword arguments)")
    elif isinstance(payload, (tuple, list)):
        items, form, keys = list(payload), ("tuple" if isinstance(payload, tuple) else "list"), ()
    else:
        raise PipelineError(f"a stage output is a {type(payload).__name__}; a stage hands on a tensor or a tuple, "
                            f"list or dict of tensors")
    if not items:
        raise PipelineError(f"a stage output is an empty {form}; a stage hands on at least one tensor")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            where = keys[i] if keys else i
            raise PipelineError(f"entry {where!r} of a stage output {form} is a {type(t).__name__}; every entry must "
                                f"be a tensor (pass other values as module attributes or configuration)")
    return items, Structure(form, keys)  # type: ignore[arg-type]


def rebuild(tensors: list[torch.Tensor], structure: Structure) -> Payload:
    """Inverse of flatten."""
    if structure.form == "tensor":
        return tensors[0]
    if structure.form == "dict":
        return dict(zip(structure.keys, tensors, strict=True))
    return tuple(tensors) if structure.form == "tuple" else list(tensors)


def apply(fn: Callable[[torch.Tensor], torch.Tensor], payload: Payload) -> Payload:
    """The payload with `fn` applied to each of its tensors, same structure (one tensor: no container built, as the
    stage loop calls this per micro-batch)."""
    if isinstance(payload, torch.Tensor):
        return fn(payload)
    tensors, structure = flatten(payload)
    return rebuild([fn(t) for t in tensors], structure)


def detach(payload: Payload) -> Payload:
    """What a stage hands on: floating tensors detached from this stage's graph, the others as they are."""
    return apply(lambda t: t.detach() if t.requires_grad else t, payload)


def to(payload: Payload, device: torch.device, non_blocking: bool = False) -> Payload:
    """The payload on `device`."""
    return apply(lambda t: t.to(device, non_blocking=non_blocking), payload)


def call(module: nn.Module | Callable[..., Any], payload: Payload, spread: bool = True, **kwargs: Any) -> Any:
    """`module` applied as the unsplit model passes `payload`: a tensor as the argument, a tuple or list as positional
    arguments, a dict as keyword arguments (`kwargs` added). With `spread=False` the payload is the one argument
    whatever it holds (DeepSpeed's convention: pipeline layers take and return one tuple)."""
    if not spread:
        return module(payload, **kwargs)
    if isinstance(payload, dict):
        return module(**payload, **kwargs)
    if isinstance(payload, (tuple, list)):
        return module(*payload, **kwargs)
    return module(payload, **kwargs)


def batch_size(payload: Payload) -> int:
    """Samples in the payload: the first dimension of its first tensor."""
    first = flatten(payload)[0][0]
    return int(first.shape[0]) if first.dim() else 1


def describe(payload: Payload) -> str:
    """Shapes and dtypes, for error messages: e.g. "(4, 16) float32 + mask (4, 16) bool"."""
    tensors, structure = flatten(payload)
    names = structure.keys or ("",) * len(tensors)
    return " + ".join(f"{f'{n} ' if n else ''}{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                      for n, t in zip(names, tensors, strict=True))


class Chain(nn.Sequential):
    """nn.Sequential (same children, same state_dict names) whose layers pass payloads on as the unsplit model does:
    each layer is called with the previous one's output through `call` (a tuple as positional arguments, a dict as
    keyword arguments), so a stage body may take and return several tensors."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Each layer in turn, the first called with this call's arguments."""
        layers = iter(self)
        first = next(layers, None)
        if first is None:
            raise PipelineError("a stage body has no layers")
        out = first(*args, **kwargs)
        for layer in layers:
            out = call(layer, out)
        return out
