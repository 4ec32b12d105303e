"""The wire format between neighbouring stages: message kinds, messages and the fixed-size header.

A message is a (micro-)batch — the activations (one tensor, or a tuple / list / dict of tensors: see
`ppll_ext.core.payload`) with their targets — or an in-band control marker. On a link it travels as a fixed-size
int64 header (kind, its count — micro-batches of the mini-batch for data, the step for a checkpoint marker —, a
resent flag, the activations' container and dict keys, then dtype and shape of every tensor and of the target)
followed by the tensors. Targets keep their shape and dtype end to end: (N,) class labels, (N, T) token ids or (N, C)
soft targets arrive as they were given, and a smaller last batch needs no special case.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ppll_ext.core import payload
from ppll_ext.core.payload import FORMS, Payload, Structure
from ppll_ext.errors import PipelineError

MAX_DIMS = 8
"""Most dimensions a tensor on the wire may have."""
MAX_TENSORS = 8
"""Most tensors the activations of one stage boundary may hold."""
KEY_BYTES = 256
"""Room for a dict payload's keys (UTF-8, NUL-separated) in the header."""
_FIXED = 5
_SPEC = 2 + MAX_DIMS
_KEYS_AT = _FIXED + (MAX_TENSORS + 1) * _SPEC
HEADER_LEN = _KEYS_AT + KEY_BYTES // 8
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.int16, torch.int8]

TensorSpec = tuple[tuple[int, ...], torch.dtype]
"""(shape, dtype) of one tensor on the wire."""
Shape = tuple[TensorSpec, ...]
"""Specs of a data message's tensors: every activation tensor in order, then the target."""


class Kind(enum.IntEnum):
    """Message kinds; the value is what travels in the wire header."""

    TRAIN = 1
    EVAL = 2
    EPOCH_END = 3
    EVAL_END = 4
    STOP = 5
    CHECKPOINT = 6


DATA = (Kind.TRAIN, Kind.EVAL)
"""Kinds that carry activations and targets."""


@dataclass
class Msg:
    """A unit of the stage stream: a (micro-)batch with its targets, or a control marker."""

    kind: Kind
    x: Payload | None = None
    """The activations (data messages): what the next stage's body is called with."""
    y: torch.Tensor | None = None
    """The targets, as the first stage was given them."""
    micro_batches: int = 1
    """Data messages: how many micro-batches the mini-batch of this one was cut into."""
    step: int = 0
    """CHECKPOINT: the optimizer step whose checkpoint is written there."""

    @property
    def count(self) -> int:
        """The number the header carries: the step of a checkpoint marker, else the micro-batch count."""
        return self.step if self.kind is Kind.CHECKPOINT else self.micro_batches


def tensors_of(msg: Msg) -> list[torch.Tensor]:
    """A data message's tensors in wire order (activations, then the target); empty for control messages."""
    if msg.x is None:
        return []
    return [*payload.flatten(msg.x)[0], msg.y]


def payload_shape(msg: Msg) -> Shape | None:
    """Specs of a data message's tensors in wire order; None for control messages."""
    if msg.x is None:
        return None
    return tuple((tuple(t.shape), t.dtype) for t in tensors_of(msg))


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


def _keys(structure: Structure) -> bytes:
    raw = "\0".join(structure.keys).encode("utf-8")
    if len(raw) > KEY_BYTES or any("\0" in k for k in structure.keys):
        raise PipelineError(f"the keys of a stage output dict ({', '.join(structure.keys)}) take {len(raw)} bytes; "
                            f"at most {KEY_BYTES} fit in a message header: use shorter keys or a tuple")
    return raw.ljust(KEY_BYTES, b"\0")


def encode_header(msg: Msg, resent: bool = False) -> torch.Tensor:
    """[kind, count, resent flag, container, tensors, (dtype, ndim, *shape) per tensor and target, dict keys] as
    int64."""
    head = torch.zeros(HEADER_LEN, dtype=torch.int64)
    head[0], head[1], head[2] = int(msg.kind), msg.count, int(resent)
    if msg.x is not None:
        tensors, structure = payload.flatten(msg.x)
        if len(tensors) > MAX_TENSORS:
            raise PipelineError(f"a stage output of {len(tensors)} tensors cannot be sent (at most {MAX_TENSORS}); "
                                f"stack tensors of one shape or cut the model elsewhere")
        head[3], head[4] = FORMS.index(structure.form), len(tensors)
        for i, t in enumerate(tensors):
            _put(head, _FIXED + i * _SPEC, t, "activations" if len(tensors) == 1 else f"activation {i}")
        _put(head, _FIXED + MAX_TENSORS * _SPEC, msg.y, "targets")
        if structure.keys:
            head[_KEYS_AT:] = torch.frombuffer(bytearray(_keys(structure)), dtype=torch.int64)
    return head


def decode_header(head: torch.Tensor) -> tuple[Kind, int, Shape | None, Structure | None, bool]:
    """Inverse of encode_header: kind, count, tensor specs and activation structure (None without payload), resent
    flag.

    `head` must be in host memory (links receive headers there), so reading it never waits on a device.
    """
    if head.device.type != "cpu":
        raise PipelineError(f"a message header must be decoded from host memory, not {head.device}")
    v = head.numpy().tolist()
    kind = Kind(v[0])
    if kind not in DATA:
        return kind, v[1], None, None, bool(v[2])
    form, n = FORMS[v[3]], v[4]
    keys: tuple[str, ...] = ()
    if form == "dict":
        raw = head[_KEYS_AT:].numpy().tobytes().rstrip(b"\0")
        keys = tuple(raw.decode("utf-8").split("\0"))
    specs = tuple(_get(v, _FIXED + i * _SPEC) for i in range(n)) + (_get(v, _FIXED + MAX_TENSORS * _SPEC),)
    return kind, v[1], specs, Structure(form, keys), bool(v[2])


def assemble(kind: Kind, count: int, tensors: list[torch.Tensor] | None, structure: Structure | None) -> Msg:
    """The message a receiver rebuilds from a decoded header and the tensors that followed it."""
    msg = Msg(kind)
    if kind is Kind.CHECKPOINT:
        msg.step = count
    else:
        msg.micro_batches = count
    if tensors is not None and structure is not None:
        msg.x, msg.y = payload.rebuild(tensors[:-1], structure), tensors[-1]
    return msg
