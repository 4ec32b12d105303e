"""From a Config to trainable local blocks: model, partition, aux heads, optimizers, schedules.

Every runtime builds its blocks here, in the same order and with the same seeds, so the
sequential, threaded and multi-process runs start from identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ppll_ext.config import Config, OptimConfig
from ppll_ext.core import LocalBlock, PartitionPlan, build_aux_head, build_stage_aux_head, make_loss, partition_plan
from ppll_ext.core.recompute import CheckpointedSequential
from ppll_ext.models import LayeredModel, build_model


def make_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by cfg over `params`."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to zero (or constant), stepped once per optimizer step."""
    warm = cfg.warmup_steps
    cosine = cfg.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_layered(cfg: Config, *, num_classes: int, **shape: int) -> LayeredModel:
    """The model, initialised from cfg.train.seed (identical in every process); `shape` as for build_model
    (in_channels and image_size, or seq_len; see ppll_ext.data.shape_of)."""
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, num_classes=num_classes, **shape)


def stage_plan(cfg: Config, layered: LayeredModel, example: torch.Tensor, *, timed: bool = False) -> PartitionPlan:
    """cfg.local.partition on the model's layer list, as a plan (predicted stage times for profile, and for the
    other methods with timed=True).

    Layers are timed on a batch of one micro-batch's rows (`example`'s rows repeated or cut to
    train.batch_size / local.micro_batches): the work a stage does per forward, whatever size the example has.
    """
    num_classes = _num_classes(layered, example)

    # next-blocks / lm-blocks heads depend on the cut itself; a conv / lm head stands in for their cost while
    # profiling.
    kind = {"next-blocks": "conv", "lm-blocks": "lm"}.get(cfg.local.aux, cfg.local.aux)
    if kind == "auto" and cfg.task == "lm":
        kind = "lm"

    def aux_factory(h: torch.Tensor) -> nn.Module:
        return build_aux_head(kind, h, num_classes, hidden=cfg.local.aux_hidden)

    rows = cfg.train.batch_size // cfg.local.micro_batches
    batch = example[torch.arange(rows) % example.shape[0]]
    return partition_plan(layered.layers, cfg.local.stages, cfg.local.partition, example=batch,
                          aux_factory=aux_factory, timed=timed)


def stage_boundaries(cfg: Config, layered: LayeredModel, example: torch.Tensor) -> list[int]:
    """Where the K blocks start and end (cfg.local.partition on the model's layer list)."""
    return stage_plan(cfg, layered, example).boundaries


def _num_classes(layered: LayeredModel, example: torch.Tensor) -> int:
    with torch.no_grad():
        was = layered.model.training
        layered.model.eval()
        out = layered.sequential()(example[:1])
        layered.model.train(was)
    return int(out.shape[-1])


def build_blocks(
    cfg: Config,
    layered: LayeredModel,
    example: torch.Tensor,
    *,
    total_steps: int,
    boundaries: list[int] | None = None,
    stages: Iterable[int] | None = None,
    aux_heads: bool = True,
) -> tuple[list[int], dict[int, LocalBlock]]:
    """Cut the model at `boundaries` (computed if None) and build the blocks listed in `stages` (default all);
    `aux_heads=False` for end-to-end stages (torch's stock schedules), which train on the model's loss only.

    Each aux head is seeded by its stage index (core.aux_seed), so building a subset gives the same weights as
    building all, in every engine. With local.checkpoint_activations each body recomputes its layers in backward
    (core.recompute.CheckpointedSequential: the same layers and state_dict names).
    """
    k = cfg.local.stages
    if boundaries is None:
        boundaries = stage_boundaries(cfg, layered, example)
    num_classes = _num_classes(layered, example)
    loss_fn = make_loss(cfg.task)
    blocks: dict[int, LocalBlock] = {}
    for s in sorted(set(range(k) if stages is None else stages)):
        aux = None
        if aux_heads and s < k - 1:
            aux = build_stage_aux_head(layered.layers, s, boundaries, cfg.local.aux, example, num_classes=num_classes,
                                       hidden=cfg.local.aux_hidden, seed=cfg.train.seed,
                                       next_blocks=cfg.local.aux_next_blocks)
        body = layered.sequential(boundaries[s], boundaries[s + 1])
        if cfg.local.checkpoint_activations:
            body = CheckpointedSequential(*body)
        block = LocalBlock(body, aux, loss_fn, index=s, grad_clip=cfg.optim.grad_clip, autocast=cfg.train.autocast,
                           on_nan=cfg.train.on_nan, check_every=cfg.train.check_every)
        block.optimizer = make_optimizer(cfg.optim, block.parameters())
        block.lr_scheduler = make_scheduler(cfg.optim, block.optimizer, total_steps)
        blocks[s] = block
    return boundaries, blocks


def build_bp_block(cfg: Config, layered: LayeredModel, *, total_steps: int) -> LocalBlock:
    """End-to-end backprop as a single block whose body is the whole, unsplit model."""
    block = LocalBlock(layered.sequential(), None, make_loss(cfg.task), index=0, grad_clip=cfg.optim.grad_clip,
                       autocast=cfg.train.autocast, on_nan=cfg.train.on_nan, check_every=cfg.train.check_every)
    block.optimizer = make_optimizer(cfg.optim, block.parameters())
    block.lr_scheduler = make_scheduler(cfg.optim, block.optimizer, total_steps)
    return block
