"""The wire format between neighbouring stages: message kinds, messages and the fixed-size header.

A message is a (micro-)batch with its labels, or an in-band control marker. On a link it travels as a
fixed-size int64 header (kind, micro-batch count, dtype and shape of the activation, label count)
followed by the activation and label tensors, so a smaller last batch needs no special case.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ppll_ext.errors import PipelineError

HEADER_LEN = 16
MAX_DIMS = HEADER_LEN - 6
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]

Shape = tuple[tuple[int, ...], torch.dtype, int]
"""(activation shape, activation dtype, label count) of a data message."""


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
    """(activation shape, dtype, label count) of a data message; None for control messages."""
    return (tuple(msg.x.shape), msg.x.dtype, msg.y.numel()) if msg.x is not None else None


def encode_header(msg: Msg, resent: bool = False) -> torch.Tensor:
    """[kind, n_micro, dtype code, ndim, label count, resent flag, *shape, 0...] as int64."""
    head = torch.zeros(HEADER_LEN, dtype=torch.int64)
    head[0], head[1], head[5] = int(msg.kind), msg.n_micro, int(resent)
    if msg.x is not None:
        if msg.x.dim() > MAX_DIMS:
            raise PipelineError(f"activations with {msg.x.dim()} dimensions cannot be sent (at most {MAX_DIMS})")
        head[2], head[3], head[4] = DTYPES.index(msg.x.dtype), msg.x.dim(), msg.y.numel()
        head[6:6 + msg.x.dim()] = torch.tensor(msg.x.shape)
    return head


def decode_header(head: torch.Tensor) -> tuple[Kind, int, Shape | None, bool]:
    """Inverse of encode_header: kind, n_micro, payload shape (None without payload), resent flag."""
    v = head.tolist()
    kind = Kind(v[0])
    shape = (tuple(v[6:6 + v[3]]), DTYPES[v[2]], v[4]) if kind in (Kind.TRAIN, Kind.EVAL) else None
    return kind, v[1], shape, bool(v[5])
