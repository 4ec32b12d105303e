"""`ppll train --engine torch --set local.schedule=NAME`: a torch.distributed.pipelining schedule runs the stages,
one process per rank, driven by the one training loop (the same data order, evaluation, checkpoints, metrics and
summary as the native engine).

- torch's stock schedules (GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV, ...)
  train end to end: the schedule runs forward and backward of a mini-batch's M micro-batches through every stage
  (no aux heads), then every stage steps its own optimizer, which is the update of one optimizer over the whole
  model (optim.grad_clip clips the norm over all stages; one all-reduce per step tells every rank that norm and
  whether the loss was finite, so all ranks apply, skip or stop alike). Stages are placed per rank as the
  schedule needs them (ppll_ext.config.placement). The model's loss, computed on the last stage, is the one loss
  reported.
- PPLL: ppll_ext.pipelining.SchedulePPLL, local learning with the aux heads, one stage per rank, streaming.

Micro-batches are cut as the native engine cuts them (runtime.base.split_micro). A stock schedule's stages receive
into buffers shaped at its first step, so a stage boundary carries the activations padded to train.batch_size / M
rows with the count of real rows beside them, and every stage computes on the real rows only (BatchNorm sees the
micro-batch the native engine gives it): an epoch's smaller last batch and its uneven micro-batches run on the same
schedule. Rank 0 reads the data and sends each batch's targets to the rank holding the last stage; evaluation is
forward-only, whole test batches stage by stage over point-to-point sends, each stage that has a head scoring. The
schedules communicate over a group of their own, so these sends never meet theirs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from ppll_ext import checkpoint as ckpt
from ppll_ext import hooks
from ppll_ext.build import build_blocks, stage_boundaries
from ppll_ext.config import Config
from ppll_ext.config.placement import Placement
from ppll_ext.core import LocalBlock
from ppll_ext.core.block import AUTOCAST
from ppll_ext.data import BatchLoader
from ppll_ext.errors import ConfigError, PipelineError
from ppll_ext.models import LayeredModel
from ppll_ext.pipelining import SchedulePPLL
from ppll_ext.runtime import EpochStats, EvalCounts, EvalResult, StageStats, eval_result, split_micro
from ppll_ext.runtime.base import attempt_save, current_lr
from ppll_ext.runtime.launch import check_same_config, init_distributed
from ppll_ext.train.job import (
    Setup,
    batch_len,
    check_last_batch,
    check_save_space,
    collect_saves,
    prepare,
    restore_checkpoint,
    resume_position,
)
from ppll_ext.train.loop import OnBatch, steps_per_epoch

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 8
_TAG = 29
"""Tag of the engine's own point-to-point messages (targets, evaluation) on the default group."""


def _send(t: torch.Tensor, peer: int) -> None:
    """Send a tensor of any shape and dtype (a header, then the data) to `peer` on the default group."""
    header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
    header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
    header[2:2 + t.dim()] = torch.tensor(t.shape)
    dist.send(header.to(t.device), peer, tag=_TAG)
    dist.send(t.contiguous(), peer, tag=_TAG)


def _recv(peer: int, device: torch.device) -> torch.Tensor:
    """The tensor `peer` sent with `_send`."""
    header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, peer, tag=_TAG)
    code, dims, *shape = header.tolist()
    t = torch.empty(shape[:dims], dtype=_DTYPES[code], device=device)
    dist.recv(t, peer, tag=_TAG)
    return t


def _autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """train.autocast's context on `device_type` (none: a context that does nothing)."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def micro_sizes(n: int, m: int) -> list[int]:
    """Rows of each micro-batch split_micro cuts a batch of `n` rows into."""
    return [len(part) for part in torch.arange(n).tensor_split(min(m, n))]


class _Padded(nn.Module):
    """One stage of a stock schedule: computes on the real rows of its input (`count`), passes its output on padded
    to `rows` rows with the count beside it; the last stage returns its real rows, for the loss."""

    def __init__(self, body: nn.Module, rows: int, last: bool, autocast: torch.dtype | None,
                 device: torch.device) -> None:
        super().__init__()
        self.body, self.rows, self.last = body, rows, last
        self.autocast, self.device_type = autocast, device.type
        self.ragged = False
        """Set by the engine for a step whose micro-batches have fewer rows than `rows`: `count` is read then only,
        so full steps make no host read of a device value."""

    def forward(self, h: torch.Tensor, count: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n = int(count[0]) if self.ragged else h.shape[0]
        with _autocast(self.device_type, self.autocast):
            out = self.body(h[:n])
        if self.last:
            return out
        if n < self.rows:
            out = torch.cat([out, out.new_zeros((self.rows - n, *out.shape[1:]))])
        return out.contiguous(), count.clone()


def stage_examples(layered: LayeredModel, boundaries: list[int], example: torch.Tensor, stages: list[int], rows: int,
                   autocast: torch.dtype | None, device: torch.device) -> dict[int, tuple[tuple, tuple]]:
    """{stage: (example inputs, example outputs)} of `stages` as their `_Padded` modules take and give them, for
    micro-batches of `rows` rows: torch's stages then take their shapes as given (static) instead of inferring them
    with a forward and backward at the first step. Found by one forward of one example row through the model in eval
    mode (on the CPU, before the stages move to their device), which changes no weight, statistic or random
    stream."""
    model = layered.model
    was = model.training
    model.eval()
    shapes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad(), torch.random.fork_rng(), _autocast("cpu", autocast):
        h = example[:1]
        for s in range(max(stages) + 1):
            out = layered.sequential(boundaries[s], boundaries[s + 1])(h)
            shapes[s] = (h, out)
            h = out
    model.train(was)

    def like(t: torch.Tensor, grad: bool) -> torch.Tensor:
        return torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=device,
                           requires_grad=grad and t.is_floating_point())

    count = torch.zeros(1, dtype=torch.int64, device=device)
    last = len(boundaries) - 2
    return {s: ((like(shapes[s][0], s > 0), count),
                like(shapes[s][1], True) if s == last else (like(shapes[s][1], True), count)) for s in stages}


class _Loss:
    """The last stage's loss (its block's `loss_fn`, which a test hook may replace) as the native engine computes it,
    under the block's autocast; torch's schedules call it on the rank holding the last stage only."""

    def __init__(self, last: LocalBlock | None, autocast: torch.dtype | None, device: torch.device) -> None:
        self.last, self.autocast, self.device_type = last, autocast, device.type

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device_type, self.autocast):
            return self.last.loss_fn(output, target)


class TorchEngine:
    """What both kinds of schedule share behind the loop's interface: placement, evaluation, saving, closing."""

    replicas = 1

    def __init__(self, cfg: Config, place: Placement, blocks: dict[int, LocalBlock], key_maps: dict[int, dict],
                 device: torch.device) -> None:
        self.cfg, self.place, self.blocks, self.key_maps, self.device = cfg, place, blocks, key_maps, device
        self.name = f"processes (torch {place.name})"
        self.rank = dist.get_rank()
        self.is_driver = self.rank == 0
        self.k, self.m = place.stages, cfg.local.micro_batches
        self.owners = place.owners()
        self.last_owner = self.owners[self.k - 1]
        self.stage_group = dist.new_group(list(range(dist.get_world_size())))
        """The schedule's own group: its messages never meet the engine's on the default group."""

    def _segment(self, st: StageStats, began: float, samples: int) -> EpochStats | None:
        """Every rank's stats of a trained segment on rank 0, after every rank has finished it."""
        gathered: list[StageStats | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, st.settle())
        seconds = time.perf_counter() - began
        return EpochStats(seconds, samples, self._merge(gathered, seconds)) if self.is_driver else None

    def _merge(self, gathered: list[StageStats | None], seconds: float) -> list[StageStats]:
        """The stats the loop reports, from every rank's (by stage)."""
        return sorted((s for s in gathered if s is not None), key=lambda s: s.index)

    def evaluate(self, loader: BatchLoader) -> EvalResult | None:
        """Forward-only pass of the test set, whole batches, stage by stage; every stage with a head scores it."""
        counts = {s: EvalCounts(s) for s, b in self.blocks.items() if b.aux is not None or s == self.k - 1}
        batches = iter(loader) if self.rank == 0 else None
        for block in self.blocks.values():
            block.eval()
        with torch.no_grad():
            for _ in range(len(loader)):
                h = y = None
                if batches is not None:
                    x, y = next(batches)
                    h, y = x.to(self.device), y.to(self.device)
                for s in range(self.k):
                    if self.owners[s] != self.rank:
                        continue
                    if s > 0 and self.owners[s - 1] != self.rank:
                        h, y = _recv(self.owners[s - 1], self.device), _recv(self.owners[s - 1], self.device)
                    if s in counts:
                        h, result = self.blocks[s].eval_step(h, y)
                        counts[s].add(result, len(y))
                    else:
                        h = self.blocks[s](h)
                    if s < self.k - 1 and self.owners[s + 1] != self.rank:
                        _send(h, self.owners[s + 1])
                        _send(y, self.owners[s + 1])
        for block in self.blocks.values():
            block.train()
        gathered: list[list[EvalCounts] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(counts.values()))
        return eval_result(c for part in gathered for c in part) if self.is_driver else None

    def _sync_steps(self) -> None:
        """Bring the blocks' step counts up to date before they are saved."""

    def checkpoint(self, step: int) -> list[ckpt.StageManifest] | None:
        """Every rank writes its stages' shards and states; the manifests reach rank 0."""
        self._sync_steps()
        folder = ckpt.step_folder(self.cfg.train.save_dir, step)
        reports = [attempt_save(lambda b=block, s=s: ckpt.write_stage(folder, b, self.k, self.key_maps[s]), s,
                                f"stage {s} (rank {self.rank})") for s, block in self.blocks.items()]
        return collect_saves(reports, self.is_driver)

    def close(self) -> None:
        """Meet the other ranks."""
        dist.barrier()


class StockEngine(TorchEngine):
    """A stock torch schedule: end-to-end backprop through this rank's stages, one optimizer step per stage."""

    def __init__(self, cfg: Config, place: Placement, blocks: dict[int, LocalBlock], key_maps: dict[int, dict],
                 device: torch.device, examples: dict[int, tuple[tuple, tuple]]) -> None:
        super().__init__(cfg, place, blocks, key_maps, device)
        autocast = AUTOCAST[cfg.train.autocast]
        rows = cfg.train.batch_size // self.m
        self.modules = {s: _Padded(b.body, rows, s == self.k - 1, autocast, device) for s, b in blocks.items()}
        stages = [PipelineStage(self.modules[s], s, self.k, device, input_args=examples[s][0],
                                output_args=examples[s][1], group=self.stage_group) for s in sorted(blocks)]
        for block in blocks.values():
            hooks.stage_started(block)
        loss = _Loss(blocks.get(self.k - 1), autocast, device)
        try:
            self.schedule = place.schedule(stages if place.multi else stages[0], n_microbatches=self.m, loss_fn=loss)
        except ValueError as exc:
            raise ConfigError(f"local.schedule={place.name} refuses local.stages={self.k}, local.micro_batches="
                              f"{self.m} on {place.ranks} rank(s): {exc}", key="local.schedule",
                              every_rank=True) from None
        self.rows = rows
        self.params = [p for b in blocks.values() for p in b.parameters() if p.requires_grad]

    def train(self, loader: BatchLoader, first: int, steps: int, on_batch: OnBatch | None) -> EpochStats | None:
        """Batches first .. first+steps-1: one schedule step each, then every stage's optimizer step."""
        batches = loader.iter_from(first) if self.rank == 0 else None
        st = StageStats(self.k - 1)
        began, samples = time.perf_counter(), 0
        for i in range(steps):
            n = batch_len(loader, first + i)
            sizes = micro_sizes(n, self.m)
            for module in self.modules.values():
                module.ragged = sizes[0] < self.rows
            x = y = None
            if batches is not None:
                x, y = next(batches)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            y = self._targets(y)
            kwargs: dict = {}
            if x is not None:
                kwargs["arg_mbs"] = [(xm, torch.tensor([len(xm)], device=self.device))
                                     for xm in x.tensor_split(len(sizes))]
            losses: list[torch.Tensor] = []
            if y is not None:
                kwargs.update(target_mbs=list(y.tensor_split(len(sizes))), losses=losses)
            lr = current_lr(next(iter(self.blocks.values())))
            self.schedule.step(**kwargs)
            self._update(losses)
            for loss, rows in zip(losses, sizes):
                st.add_loss(loss, rows)
            st.end_step(lr)
            samples += n
            if on_batch is not None and self.is_driver:
                on_batch(n)
        st.steps = next(iter(self.blocks.values())).steps
        return self._segment(st, began, samples)

    def _targets(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's targets on the rank holding the last stage (rank 0 sends them there)."""
        if self.last_owner == 0:
            return y
        if self.rank == 0:
            _send(y, self.last_owner)
        return _recv(0, self.device) if self.rank == self.last_owner else None

    def _merge(self, gathered: list[StageStats | None], seconds: float) -> list[StageStats]:
        """One entry: the model's loss (from the last stage's rank) at the times rank 0 finished each step."""
        model = gathered[self.last_owner]
        model.step_end_s = gathered[0].step_end_s
        model.busy_s = seconds
        return [model]

    def _update(self, losses: list[torch.Tensor]) -> None:
        """After a schedule step: every rank learns whether the loss was finite and (optim.grad_clip) the gradient
        norm over all stages, then applies, or with train.on_nan=skip drops, its stages' updates."""
        clip = self.cfg.optim.grad_clip
        flags = torch.zeros(2, dtype=torch.float64, device=self.device)
        if clip is not None:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                flags[0] = torch.stack([torch.linalg.vector_norm(g) for g in grads]).double().square().sum()
        if losses:
            flags[1] = (~torch.isfinite(torch.stack(losses))).sum()
        dist.all_reduce(flags)
        norm_sq, bad = flags.tolist()
        step = next(iter(self.blocks.values())).steps
        if bad and self.cfg.train.on_nan == "error":
            raise PipelineError(f"the model's loss is not finite at step {step}; lower the learning rate or clip "
                                f"gradients, or skip such steps with on_nan=\"skip\"", key="on_nan", every_rank=True)
        if bad:
            if self.is_driver:
                log.warning("the model's loss is not finite at step %d; every stage skips the step's update "
                            "(on_nan=skip)", step)
        elif clip is not None:
            scale = min(clip / (math.sqrt(norm_sq) + 1e-6), 1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        for block in self.blocks.values():
            if not bad:
                block.optimizer.step()
            block.optimizer.zero_grad(set_to_none=True)
            block.lr_scheduler.step()
            block.steps += 1
            block.skipped_steps += int(bool(bad))


class PPLLEngine(TorchEngine):
    """SchedulePPLL: this rank's local block trains on its own loss and streams its output on."""

    def __init__(self, cfg: Config, place: Placement, blocks: dict[int, LocalBlock], key_maps: dict[int, dict],
                 device: torch.device) -> None:
        super().__init__(cfg, place, blocks, key_maps, device)
        (index, block), = blocks.items()
        self.block = block
        stage = PipelineStage(block.body, index, self.k, device, group=self.stage_group)
        self.schedule = SchedulePPLL(stage, n_microbatches=self.m, loss_fn=block.loss_fn, aux_head=block.aux,
                                     optimizer=block.optimizer, lr_scheduler=block.lr_scheduler,
                                     queue_depth=cfg.local.queue_depth, timeout_s=cfg.local.timeout_s)
        trained = self.schedule.block  # trains with the settings build_blocks gave this stage's block
        trained.grad_clip, trained.autocast_dtype = block.grad_clip, block.autocast_dtype
        trained.on_nan, trained.check_every, trained.steps = block.on_nan, block.check_every, block.steps

    def train(self, loader: BatchLoader, first: int, steps: int, on_batch: OnBatch | None) -> EpochStats | None:
        """Batches first .. first+steps-1 through SchedulePPLL: rank 0 feeds the micro-batches, every rank steps."""
        batches = loader.iter_from(first) if self.rank == 0 else None
        st = StageStats(self.block.index)
        began, samples = time.perf_counter(), 0
        for i in range(steps):
            n = batch_len(loader, first + i)
            kwargs: dict = {}
            if batches is not None:
                x, y = next(batches)
                micro = split_micro(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                                    self.m)
                kwargs = {"arg_mbs": [(xm,) for xm, _ in micro], "target_mbs": [ym for _, ym in micro]}
            losses: list[torch.Tensor] = []
            lr = current_lr(self.block)
            start = time.perf_counter()
            self.schedule.step(losses=losses, return_outputs=False, **kwargs)
            st.busy_s += time.perf_counter() - start
            for loss, rows in zip(losses, micro_sizes(n, self.m)):
                st.add_loss(loss, rows)
            st.end_step(lr)
            samples += n
            if on_batch is not None and self.is_driver:
                on_batch(n)
        self.schedule.block.check_health()
        st.steps = self.schedule.block.steps
        return self._segment(st, began, samples)

    def _sync_steps(self) -> None:
        """The schedule's block counts the steps: the block that is saved takes its count."""
        self.block.steps = self.schedule.block.steps

    def close(self) -> None:
        """End the schedule's streams (every rank made the same calls), then meet the other ranks."""
        self.schedule.close()
        super().close()


def setup_torch(cfg: Config) -> Setup:
    """Build the job, this rank's stages and its schedule; resume if asked."""
    place = cfg.local.placement()
    rank, owns_group, device = init_distributed(cfg.local.stages, cfg.train.device, cfg.local.timeout_s,
                                                stages_per_rank=place.per_rank)
    check_same_config(cfg.to_dict())
    torch.set_num_threads(cfg.train.threads or 1)
    job = prepare(cfg)
    check_last_batch(cfg, job.train_loader)
    total_steps = cfg.train.epochs * steps_per_epoch(len(job.train_loader), 1)
    start, folder, info = resume_position(cfg, len(job.train_loader), 1, len(job.layered.layers))
    kept = info["boundaries"] if info and info["num_stages"] == place.stages else None
    shared = [kept or stage_boundaries(cfg, job.layered, job.example) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    boundaries, blocks = build_blocks(cfg, job.layered, job.example, total_steps=total_steps, boundaries=shared[0],
                                      stages=place.stages_of(rank), aux_heads=not place.end_to_end)
    check_save_space(cfg, sum(ckpt.stage_bytes(b) for b in blocks.values()), shared=True)
    examples = (stage_examples(job.layered, boundaries, job.example, sorted(blocks), cfg.train.batch_size //
                               cfg.local.micro_batches, AUTOCAST[cfg.train.autocast], device)
                if place.end_to_end else {})
    for block in blocks.values():
        block.to(device)
    if folder is not None:
        restore_checkpoint(folder, info, job.layered, blocks, boundaries)
    key_maps = {s: job.layered.key_map(b.body) for s, b in blocks.items()}
    engine = (StockEngine(cfg, place, blocks, key_maps, device, examples) if place.end_to_end
              else PPLLEngine(cfg, place, blocks, key_maps, device))
    return Setup(engine, job, blocks, boundaries, start, rank, owns_group=owns_group)
