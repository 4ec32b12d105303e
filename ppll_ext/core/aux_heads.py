"""Auxiliary heads: the small classifiers that give every non-last stage its own local loss.

Every head is built from the shape of the activation it will receive (a dry forward of the
stage's body gives it), so one kind works after any layer of a CNN (N, C, H, W) or a
transformer (N, T, D).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ppll_ext.core import payload
from ppll_ext.errors import ConfigError

AUX_KINDS = ("conv", "mlp-sr", "vit", "next-blocks", "lm", "lm-blocks", "auto")
"""Auxiliary head kinds, for every engine: "auto" picks conv for (N, C, H, W) activations, vit for (N, T, D)
and a linear classifier for (N, D); for a model whose output is per token (N, T, V), lm (per-token head)."""
AUX_SEED_OFFSET = 7919


class TokensToGrid(nn.Module):
    """(N, T, D) transformer tokens -> (N, D, g, g) feature map; a leading class token is dropped (only built when
    asked with grid=True)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        side = math.isqrt(t)
        if side * side != t:
            x = x[:, 1:]
            side = math.isqrt(t - 1)
        return x.transpose(1, 2).reshape(n, d, side, side)


class GridToTokens(nn.Module):
    """(N, C, H, W) feature map -> (N, H*W, C) tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class TokenPool(nn.Module):
    """Pools tokens to one vector: the class token (index 0) or the mean of all tokens."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.mode == "cls" else x.mean(dim=1)


def _grid_channels(shape: Sequence[int], grid: bool) -> tuple[nn.Module, int]:
    """An adapter that turns the activation into a feature map, and that map's channel count."""
    if len(shape) == 4:
        return nn.Identity(), shape[1]
    if len(shape) == 3:
        t = shape[1]
        if not grid:
            raise ConfigError(f"this aux head pools a feature map, but the activations are {t} tokens {tuple(shape)}: "
                              f"use aux kind 'vit' (pooled classifier) or 'lm' (per-token), or pass grid=True to "
                              f"read the tokens as a square image grid", key="aux")
        if math.isqrt(t) ** 2 != t and math.isqrt(t - 1) ** 2 != t - 1:
            raise ConfigError(f"cannot lay {t} tokens out as a square grid (with or without one class token); use "
                              f"aux kind 'vit' or 'lm' for this model", key="aux")
        return TokensToGrid(), shape[2]
    raise ConfigError(f"auxiliary heads need (N,C,H,W) or (N,T,D) activations, got shape {tuple(shape)}")


def conv_head(shape: Sequence[int], num_classes: int, hidden: int, grid: bool = False) -> nn.Module:
    """InfoPro's default head: 3x3 conv-BN-ReLU, global average pool, FC-ReLU-FC."""
    to_grid, c = _grid_channels(shape, grid)
    width = max(c, 32)
    return nn.Sequential(
        to_grid,
        nn.Conv2d(c, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def mlp_sr_head(shape: Sequence[int], num_classes: int, hidden: int, grid: bool = False) -> nn.Module:
    """DGL's MLP-SR head: average pool to 2x2, a 1x1 conv stack, then a small MLP."""
    to_grid, c = _grid_channels(shape, grid)
    width = max(c, 32)
    return nn.Sequential(
        to_grid,
        nn.AdaptiveAvgPool2d(2),
        nn.Conv2d(c, width, 1),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 1),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(width * 4, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def vit_head(shape: Sequence[int], num_classes: int, pool: str = "cls") -> nn.Module:
    """ViT-style head: LayerNorm, class-token (or mean) pooling, linear classifier."""
    if len(shape) == 4:
        c = shape[1]
        return nn.Sequential(GridToTokens(), nn.LayerNorm(c), TokenPool("mean"), nn.Linear(c, num_classes))
    if len(shape) == 3:
        return nn.Sequential(nn.LayerNorm(shape[2]), TokenPool(pool), nn.Linear(shape[2], num_classes))
    raise ConfigError(f"the vit head needs (N,C,H,W) or (N,T,D) activations, got shape {tuple(shape)}")


def lm_head(shape: Sequence[int], vocab_size: int) -> nn.Module:
    """Per-token next-token head: LayerNorm and an unembedding, (N, T, D) -> (N, T, vocab_size)."""
    if len(shape) != 3:
        raise ConfigError(f"the lm head maps (N, T, D) tokens to (N, T, vocab), got activations of shape "
                          f"{tuple(shape)}", key="aux")
    return nn.Sequential(nn.LayerNorm(shape[2]), nn.Linear(shape[2], vocab_size))


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every parameter re-initialised (same architecture, independent weights)."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    for p in clone.parameters(recurse=True):
        p.requires_grad_(True)
    return clone


def _fresh_blocks(next_layers: Sequence[nn.Module], example: torch.Tensor) -> tuple[list[nn.Module], torch.Tensor]:
    """Fresh copies of `next_layers` and their output on `example` (a dry forward in eval mode, no gradients)."""
    blocks = [_fresh_copy(m) for m in next_layers]
    with torch.no_grad():
        h = example
        for m in blocks:
            h = m.eval()(h)
    return blocks, h


def next_blocks_head(
    example: torch.Tensor, num_classes: int, next_layers: Sequence[nn.Module], final_head: nn.Module
) -> nn.Module:
    """FBA/MAN-style head: fresh copies of the next stage's first layers, then a fresh copy of the final head.

    If the copied final head does not fit the copied layers' output (e.g. channel count), a
    pool-and-linear classifier of the right width replaces it.
    """
    if not next_layers:
        raise ConfigError("local.aux=next-blocks needs at least one following layer; use local.aux_next_blocks>=1")
    layers, h = _fresh_blocks(next_layers, example)
    with torch.no_grad():
        head = _fresh_copy(final_head)
        try:
            out = head.eval()(h)
            fits = out.shape[0] == h.shape[0] and out.shape[-1] == num_classes
        except RuntimeError:
            fits = False
    if not fits:
        if h.dim() == 4:
            head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(h.shape[1], num_classes))
        else:
            head = vit_head(tuple(h.shape), num_classes)
    return nn.Sequential(*layers, head)


def build_aux_head(
    kind: str,
    example: torch.Tensor,
    num_classes: int,
    *,
    hidden: int = 128,
    next_layers: Sequence[nn.Module] = (),
    final_head: nn.Module | None = None,
    grid: bool = False,
) -> nn.Module:
    """Build an auxiliary head of `kind` for activations shaped like `example` (a dry-forward output).

    "lm" maps (N, T, D) to (N, T, num_classes) (num_classes = vocabulary size); "lm-blocks" puts fresh copies of
    `next_layers` (the next stage's first transformer blocks) before it, as SOLO does. conv and mlp-sr read
    (N, T, D) tokens as a square grid only with grid=True.
    """
    if not isinstance(example, torch.Tensor):
        raise ConfigError(f"aux head kind {kind!r} is built for a stage boundary of one tensor, and this one carries "
                          f"{payload.describe(example)}; build the aux heads yourself (modules called with the "
                          f"boundary's tensors as the next stage's body is) and pass them in", key="aux")
    shape = tuple(example.shape)
    if kind == "auto":
        kind = {4: "conv", 3: "vit"}.get(len(shape), "linear")
    if kind == "linear":
        if len(shape) != 2:
            raise ConfigError(f"no auxiliary head fits activations of shape {shape}; build one and pass it in",
                              key="aux")
        head = nn.Linear(shape[1], num_classes)
    elif kind == "conv":
        head = conv_head(shape, num_classes, hidden, grid)
    elif kind == "mlp-sr":
        head = mlp_sr_head(shape, num_classes, hidden, grid)
    elif kind == "lm":
        head = lm_head(shape, num_classes)
    elif kind == "lm-blocks":
        if not next_layers:
            raise ConfigError("aux kind 'lm-blocks' needs next_layers (the next stage's first blocks); use "
                              "aux_next_blocks>=1", key="aux")
        blocks, h = _fresh_blocks(next_layers, example)
        head = nn.Sequential(*blocks, lm_head(tuple(h.shape), num_classes)).train()
    elif kind == "vit":
        head = vit_head(shape, num_classes)
    elif kind == "next-blocks":
        if final_head is None:
            raise ConfigError("local.aux=next-blocks needs the model's final head layer")
        head = next_blocks_head(example, num_classes, next_layers, final_head)
    else:
        raise ConfigError(f"aux head kind {kind!r} is not one of {', '.join(AUX_KINDS)}", key="aux")
    return head.to(device=example.device)


def aux_seed(seed: int, stage: int) -> int:
    """The seed stage `stage`'s aux head is initialised from: every engine and every rank builds the same head."""
    return seed + AUX_SEED_OFFSET * (stage + 1)


@contextlib.contextmanager
def eval_mode(layers: Sequence[Callable]) -> Iterator[None]:
    """The modules among `layers` in eval mode (a dry forward updates no BatchNorm statistics), restored after."""
    modules = [m for m in layers if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def build_stage_aux_head(
    layers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    stage: int,
    parts: Sequence[int],
    kind: str,
    example_input: torch.Tensor,
    *,
    num_classes: int | None = None,
    hidden: int = 128,
    seed: int = 0,
    next_blocks: int = 1,
) -> nn.Module:
    """Aux head `kind` for stage `stage` of a model cut into `layers` at start indices `parts` (K+1 entries).

    Sized by a dry forward of `example_input` through layers[:parts[stage+1]] (eval mode, no gradients) and
    initialised from aux_seed(seed, stage) without touching the global RNG, so every rank, engine and a
    single-process reference build the same head. `num_classes` defaults to the last dimension of the whole
    model's output. "next-blocks" copies the next `next_blocks` layers and the last layer (they must be modules),
    "lm-blocks" the next `next_blocks` layers; "auto" picks "lm" when the model's output is per token (N, T, V).
    """
    if kind not in AUX_KINDS:
        raise ConfigError(f"aux head kind {kind!r} is not one of {', '.join(AUX_KINDS)}", key="aux")
    end = parts[stage + 1]
    with torch.no_grad(), eval_mode(layers):
        h = example_input
        for layer in layers[:end]:
            h = layer(h)
        if not isinstance(h, torch.Tensor):
            build_aux_head(kind, h, 0)  # one line: these kinds need a one-tensor boundary
        if num_classes is None or kind == "auto":
            out = h
            for layer in layers[end:]:
                out = layer(out)
            num_classes = num_classes or int(out.shape[-1])
            if kind == "auto" and h.dim() == 3 and out.dim() == 3:
                kind = "lm"
    extra: dict = {}
    if kind in ("next-blocks", "lm-blocks"):
        following = list(layers[end:end + next_blocks])
        copied = [*following, layers[-1]] if kind == "next-blocks" else following
        if not all(isinstance(m, nn.Module) for m in copied):
            raise ConfigError(f"aux head kind {kind!r} copies the following layers, which must be nn.Modules; "
                              f"choose another kind or build the heads yourself", key="aux")
        extra = {"next_layers": following, **({"final_head": layers[-1]} if kind == "next-blocks" else {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(aux_seed(seed, stage))
        return build_aux_head(kind, h, num_classes, hidden=hidden, **extra)
