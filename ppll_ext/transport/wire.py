"""The wire format between neighbouring stages: message kinds, messages and the fixed-size header.

A message is a (micro-)batch with its targets, or an in-band control marker. On a link it travels as a
fixed-size int64 header (kind, micro-batch count, resent flag, then dtype and shape of the activation and of the
target) followed by the activation and target tensors. Targets keep their shape and dtype end to end: (N,) class
labels, (N, T) token ids or (N, C) soft targets arrive as they were given, and a smaller last batch needs no
special case.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ppll_ext.errors import PipelineError

MAX_DIMS = 8
"""Most dimensions an activation or a target may have."""
_FIXED = 3
HEADER_LEN = _FIXED + 2 * (2 + MAX_DIMS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.int16, torch.int8]

TensorSpec = tuple[tuple[int, ...], torch.dtype]
"""(shape, dtype) of one tensor on the wire."""
Shape = tuple[TensorSpec, TensorSpec]
"""(activation spec, target spec) of a data message."""


class Kind(enum.IntEnum):
    """Message kinds; the value is what travels in the wire header."""

    TRAIN = 1
    EVAL = 2
    EPOCH_END = 3
    EVAL_END = 4
    STOP = 5
    CHECKPOINT = 6


@dataclass
class Msg:
    """A unit of the stage stream: a (micro-)batch with its labels, or a control marker."""

    kind: Kind
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    n_micro: int = 1


def payload_shape(msg: Msg) -> Shape | None:
    """(activation spec, target spec) of a data message; None for control messages."""
    if msg.x is None:
        return None
    return (tuple(msg.x.shape), msg.x.dtype), (tuple(msg.y.shape), msg.y.dtype)


def _put(head: torch.Tensor, at: int, t: torch.Tensor, what: str) -> None:
    if t.dim() > MAX_DIMS:
        raise PipelineError(f"{what} with {t.dim()} dimensions cannot be sent (at most {MAX_DIMS}); flatten the "
                            f"trailing dimensions")
    if t.dtype not in DTYPES:
        raise PipelineError(f"{what} of dtype {t.dtype} cannot be sent; use one of "
                            f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES)}")
    head[at], head[at + 1] = DTYPES.index(t.dtype), t.dim()
    head[at + 2:at + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)


def _get(v: list[int], at: int) -> TensorSpec:
    return tuple(v[at + 2:at + 2 + v[at + 1]]), DTYPES[v[at]]


def encode_header(msg: Msg, resent: bool = False) -> torch.Tensor:
    """[kind, n_micro, resent flag, x dtype, x ndim, *x shape (MAX_DIMS), y dtype, y ndim, *y shape] as int64."""
    head = torch.zeros(HEADER_LEN, dtype=torch.int64)
    head[0], head[1], head[2] = int(msg.kind), msg.n_micro, int(resent)
    if msg.x is not None:
        _put(head, _FIXED, msg.x, "activations")
        _put(head, _FIXED + 2 + MAX_DIMS, msg.y, "targets")
    return head


def decode_header(head: torch.Tensor) -> tuple[Kind, int, Shape | None, bool]:
    """Inverse of encode_header: kind, n_micro, payload shape (None without payload), resent flag.

    `head` must be in host memory (links receive headers there), so reading it never waits on a device.
    """
    if head.device.type != "cpu":
        raise PipelineError(f"a message header must be decoded from host memory, not {head.device}")
    v = head.numpy().tolist()
    kind = Kind(v[0])
    shape = (_get(v, _FIXED), _get(v, _FIXED + 2 + MAX_DIMS)) if kind in (Kind.TRAIN, Kind.EVAL) else None
    return kind, v[1], shape, bool(v[2])
