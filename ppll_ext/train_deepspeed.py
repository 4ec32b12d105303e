"""`ppll train --engine deepspeed`: the native job (data, model, cut, aux heads, optimizers, checkpoints) run by
the DeepSpeed adapter, one process per stage x data-parallel replica.

Rank r is stage r // D, replica r % D (DeepSpeed's PipeDataParallelTopology). Each rank loops over the same number
of train_batch calls; only first-stage ranks read data (replica j takes batches j, j + D, ... of each epoch), and
labels travel downstream with the activations. Ranks meet only at epoch ends (stats and evaluation) and at
checkpoints, like the native runtime's flushes. Checkpoints use ppll_ext's safetensors layout, so a run may be
resumed with either engine.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ppll_ext import checkpoint as ckpt
from ppll_ext.build import build_blocks, stage_boundaries
from ppll_ext.config import Config
from ppll_ext.core import LocalBlock
from ppll_ext.data import BatchLoader
from ppll_ext.errors import ConfigError
from ppll_ext.runtime import EpochStats, EvalResult, StageStats
from ppll_ext.runtime.launch import check_same_config, init_distributed
from ppll_ext.runtime.stage import EvalCounts
from ppll_ext.train import Summary, epoch_line, fail_fast, prepare, restore_checkpoint, resume_state


def ds_config(cfg: Config) -> dict[str, Any]:
    """The ds_config of a run: local.deepspeed_config (if any) with batch sizes, accumulation, clipping and bf16
    set from the ppll config, ZeRO stage 0 unless the file says otherwise (the adapter rejects other stages)."""
    conf: dict[str, Any] = {}
    path = cfg.local.deepspeed_config
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"local.deepspeed_config={path!r} is not a file (paths are relative to {os.getcwd()}); "
                              f"give a ds_config JSON such as configs/deepspeed/ppll.json")
        try:
            conf = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"local.deepspeed_config={path!r} is not valid JSON (line {exc.lineno})") from None
    if cfg.train.autocast == "fp16":
        raise ConfigError("train.autocast=fp16 with local.engine=deepspeed: DeepSpeed's fp16 syncs loss-scale "
                          "overflows across stages; use train.autocast=bf16")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        conf.pop(key, None)
    conf.update({
        "train_micro_batch_size_per_gpu": max(1, cfg.train.batch_size // cfg.local.micro_batches),
        "gradient_accumulation_steps": cfg.local.micro_batches,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
    })
    conf.setdefault("zero_optimization", {"stage": 0})
    conf.setdefault("steps_per_print", 10**9)
    if cfg.train.autocast == "bf16":
        conf["bf16"] = {"enabled": True}
    return conf


def steps_per_epoch(loader: BatchLoader, micro_batches: int, replicas: int) -> int:
    """train_batch calls per epoch: each takes one batch per replica; a last batch smaller than M is dropped."""
    batches = len(loader)
    last = len(loader.dataset) - (batches - 1) * loader.batch_size
    if last < micro_batches:
        batches -= 1
    return batches // replicas


def _micro(batch: tuple[torch.Tensor, torch.Tensor], m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = batch
    return list(zip(x.tensor_split(m), y.tensor_split(m), strict=True))


def run_deepspeed_training(cfg: Config, *, out: TextIO | None = None,
                           on_finish: Callable[[dict[int, LocalBlock]], None] | None = None) -> Summary | None:
    """Train as `cfg` says with LocalPipelineEngine; returns the summary on rank 0 (None elsewhere).

    `on_finish(blocks)` receives this rank's block (its body and aux head share the engine's tensors).
    """
    out = sys.stdout if out is None else out
    if cfg.train.method != "local":
        raise ConfigError("local.engine=deepspeed trains local learning; train.method=bp runs with the native engine")
    if cfg.train.trace:
        raise ConfigError("train.trace is recorded by the native engine; drop --trace or use local.engine=native")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.train.device == "cuda" else "cpu")
    k, d = cfg.local.stages, cfg.local.data_parallel
    rank, owns_group, _ = init_distributed(k, cfg.train.device, cfg.local.timeout_s, d)
    check_same_config(cfg.to_dict())
    torch.set_num_threads(cfg.train.threads or 1)
    from ppll_ext import deepspeed as ppll_ds  # imports DeepSpeed: only when this engine is used

    conf = ds_config(cfg)
    if cfg.train.save_dir and conf.get("bf16", {}).get("enabled"):
        raise ConfigError("checkpoints of local.engine=deepspeed with bf16 are not supported (DeepSpeed keeps the fp32 "
                          "master weights in its optimizer); drop train.save_dir or bf16")
    stage, replica = divmod(rank, d)
    log = out if rank == 0 else io.StringIO()
    job = prepare(cfg)
    per_epoch = steps_per_epoch(job.train_loader, cfg.local.micro_batches, d)
    if per_epoch < 1:
        raise ConfigError(f"{len(job.train_loader)} training batches cannot feed {d} data-parallel replicas; "
                          f"lower local.data_parallel or train.batch_size")
    total_steps = cfg.train.epochs * per_epoch
    resume_folder, resume_info = resume_state(cfg)
    kept = resume_info["boundaries"] if resume_info and resume_info["num_stages"] == k else None
    shared = [kept or stage_boundaries(cfg, job.layered, job.example) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    boundaries, blocks = build_blocks(cfg, job.layered, job.example, total_steps=total_steps, boundaries=shared[0])
    block = blocks[stage]
    position = ckpt.Position(0, 0, 0)
    if resume_folder is not None:
        position = restore_checkpoint(resume_folder, resume_info, job.layered, {stage: block}, boundaries, log)
        if position.step >= total_steps:
            raise ConfigError(f"nothing to train: {str(resume_folder)!r} is at step {position.step} of "
                              f"{total_steps}; raise train.epochs to continue")
    net = ppll_ds.LocalPipelineModule(
        job.layered.layers, topology=ppll_ds.PipeDataParallelTopology(num_pp=k, num_dp=d),
        loss_fn=nn.CrossEntropyLoss(), aux_heads=[blocks[s].aux for s in range(k - 1)],
        partition_method=",".join(str(b) for b in boundaries[:-1]))
    engine, optimizer, _, scheduler = ppll_ds.initialize(
        model=net, config=conf, model_parameters=[p for p in net.parameters() if p.requires_grad],
        optimizer=None if "optimizer" in conf else block.optimizer,
        lr_scheduler=None if "scheduler" in conf else block.lr_scheduler,
        queue_depth=cfg.local.queue_depth, timeout_s=cfg.local.timeout_s)
    block.optimizer, block.lr_scheduler = optimizer, scheduler
    engine.global_steps = position.step
    engine.global_samples = position.step * cfg.train.batch_size * d
    run = _Run(cfg, engine, block, boundaries, job.train_loader, job.test_loader, stage, replica, per_epoch, log)
    try:
        summary = run.train(position, job.layered.key_map(block.body))
    except BaseException as exc:
        fail_fast(rank, exc)
    if on_finish is not None:
        on_finish({stage: block})
    dist.barrier()
    if owns_group:
        dist.destroy_process_group()
    return summary if rank == 0 else None


class _Run:
    """One rank's epoch loop: train_batch calls, epoch-end stats and evaluation, checkpoints."""

    def __init__(self, cfg: Config, engine: Any, block: LocalBlock, boundaries: list[int], train_loader: BatchLoader,
                 test_loader: BatchLoader, stage: int, replica: int, per_epoch: int, out: TextIO) -> None:
        self.cfg, self.engine, self.block, self.boundaries = cfg, engine, block, boundaries
        self.train_loader, self.test_loader = train_loader, test_loader
        self.stage, self.replica, self.per_epoch, self.out = stage, replica, per_epoch, out
        self.replicas = cfg.local.data_parallel
        self.rank = dist.get_rank()

    def train(self, start: ckpt.Position, key_map: dict[str, str]) -> Summary:
        """Train from `start` to the end (or train.stop_at_step); every rank returns the same summary."""
        cfg, engine = self.cfg, self.engine
        m, every, stop_at = cfg.local.micro_batches, cfg.train.save_every, cfg.train.stop_at_step
        resuming = f", resuming at epoch {start.epoch + 1} batch {start.batch} (step {start.step})"
        print(f"training {cfg.model.name} on {cfg.data.name} with DeepSpeed ({len(self.train_loader.dataset)} train "
              f"/ {len(self.test_loader.dataset)} test), stages={cfg.local.stages} at layers {self.boundaries} x "
              f"{self.replicas} data-parallel replica(s), {self.per_epoch} steps per epoch"
              + (resuming if start.step else ""),
              file=self.out, flush=True)
        began = time.perf_counter()
        step, saved, stats, ev, epoch = start.step, start.step, None, None, start.epoch
        for epoch in range(start.epoch, cfg.train.epochs):
            first = start.batch if epoch == start.epoch else 0
            if stop_at is not None and step >= stop_at:
                position = ckpt.Position(step, epoch, first)
                break
            self.train_loader.set_epoch(epoch)
            n_steps = self.per_epoch - first // self.replicas
            batches = self.train_loader.iter_from(first + self.replica, self.replicas) if self.stage == 0 else None
            st = StageStats(self.stage)
            engine.wait_in_s = engine.wait_out_s = 0.0
            bar = tqdm(total=n_steps * cfg.train.batch_size * self.replicas, unit="img",
                       desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, file=self.out,
                       disable=not cfg.train.progress or self.rank != 0)
            t0 = time.perf_counter()
            done = 0
            while done < n_steps and (stop_at is None or step < stop_at):
                batch = next(batches) if batches is not None else None
                loss = engine.train_batch(iter(_micro(batch, m)) if batch is not None else None)
                st.add_loss(float(loss), self._batch_size(first + self.replica + done * self.replicas))
                done, step = done + 1, step + 1
                bar.update(cfg.train.batch_size * self.replicas)
                if every and step % every == 0:
                    at = first + done * self.replicas
                    self._save(step, ckpt.Position(step, epoch + 1, 0) if done == n_steps
                               else ckpt.Position(step, epoch, at), key_map)
                    saved = step
            bar.close()
            st.busy_s = time.perf_counter() - t0 - engine.wait_in_s - engine.wait_out_s
            st.wait_in_s, st.wait_out_s, st.steps = engine.wait_in_s, engine.wait_out_s, engine.global_steps
            stats = self._epoch_stats(st, time.perf_counter() - t0, done)
            ev = self._evaluate()
            print(epoch_line(epoch, cfg.train.epochs, stats, ev), file=self.out, flush=True)
            if done < n_steps:
                print(f"stopped at step {step} (train.stop_at_step)", file=self.out, flush=True)
                position = ckpt.Position(step, epoch, first + done * self.replicas)
                break
        else:
            position = ckpt.Position(step, cfg.train.epochs, 0)
        if cfg.train.save_dir and saved != step:
            self._save(step, position, key_map)
        summary = Summary(cfg.train.method, "processes (deepspeed)", cfg.local.stages, self.boundaries,
                          cfg.train.epochs, ev.accuracy, ev.aux_accuracy, stats.samples_per_s,
                          time.perf_counter() - began, stats.stages)
        for line in summary.lines():
            print(line, file=self.out, flush=True)
        return summary

    def _batch_size(self, index: int) -> int:
        """Samples in batch `index` of an epoch (the last one may be short), known without the data."""
        size = self.train_loader.batch_size
        return min(size, len(self.train_loader.dataset) - index * size)

    def _epoch_stats(self, mine: StageStats, seconds: float, steps: int) -> EpochStats:
        """Every stage's stats (replica 0's) on every rank; the gather waits for the last stage to finish."""
        gathered: list[StageStats | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine if self.replica == 0 else None)
        stages = [s for s in gathered if s is not None]
        samples = steps * self.cfg.train.batch_size * self.replicas
        return EpochStats(seconds, samples, sorted(stages, key=lambda s: s.index))

    def _evaluate(self) -> EvalResult:
        """Test accuracy of the model and of every aux head; replica j evaluates test batches j, j + D, ..."""
        n = len(range(self.replica, len(self.test_loader), self.replicas))
        batches = self.test_loader.iter_from(self.replica, self.replicas) if self.stage == 0 else None
        mine = self.engine.evaluate(batches, n)
        gathered: list[EvalCounts | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        k = self.cfg.local.stages
        per_stage = [EvalCounts(s) for s in range(k)]
        for c in gathered:
            total = per_stage[c.index]
            total.correct, total.loss, total.samples = (total.correct + c.correct, total.loss + c.loss,
                                                        total.samples + c.samples)
        acc = [c.correct / max(1, c.samples) for c in per_stage]
        last = per_stage[-1]
        return EvalResult(acc[-1], last.loss / max(1, last.samples), acc[:-1], last.samples)

    def _save(self, step: int, position: ckpt.Position, key_map: dict[str, str]) -> None:
        """Replica 0 of every stage writes its shard and state; rank 0 completes the checkpoint."""
        folder = ckpt.step_folder(self.cfg.train.save_dir, step)
        manifest = None
        if self.replica == 0:
            self.block.steps = self.engine.global_steps
            manifest = ckpt.write_stage(folder, self.block, self.cfg.local.stages, key_map)
        gathered: list[ckpt.StageManifest | None] = [None] * dist.get_world_size()
        dist.gather_object(manifest, gathered if self.rank == 0 else None, dst=0)
        if self.rank == 0:
            final = ckpt.finalize(folder, [g for g in gathered if g is not None], position, self.boundaries,
                                  self.cfg.to_dict(), self.cfg.train.keep)
            print(f"checkpoint saved: {final}", file=self.out, flush=True)
