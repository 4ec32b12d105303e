"""`ppll train --engine deepspeed`: the native job (data, model, cut, aux heads, optimizers, checkpoints) run by
the DeepSpeed adapter, one process per stage x data-parallel replica, driven by the one training loop.

Rank r is stage r // D, replica r % D (DeepSpeed's PipeDataParallelTopology). A training step takes D batches:
replica j trains batch step * D + j of the epoch; in an epoch's last step replicas without a batch only join the
gradient all-reduce, and the others' losses are weighted so the average is over the replicas with data. Only
first-stage ranks read data; labels travel downstream with the activations. Ranks meet only at the loop's
segment ends (stats, evaluation, checkpoints). Checkpoints use ppll_ext's safetensors layout, so a run may be
resumed with either engine; with ZeRO-1 (`zero_optimization.stage: 1` in local.deepspeed_config) each stage's
optimizer states are sharded over its D replicas, gathered whole for a checkpoint and re-sharded on resume, so the
checkpoint equals one written without ZeRO and resumes with any D or engine.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ppll_ext import checkpoint as ckpt
from ppll_ext.build import build_blocks, stage_boundaries
from ppll_ext.config import Config
from ppll_ext.core import LocalBlock, make_loss
from ppll_ext.core.recompute import checkpointed
from ppll_ext.data import BatchLoader
from ppll_ext.deepspeed import LocalPipelineEngine, LocalPipelineModule, PipeDataParallelTopology, initialize
from ppll_ext.errors import ConfigError
from ppll_ext.runtime import EpochStats, EvalResult, StageStats, eval_result, split_micro
from ppll_ext.runtime.base import attempt_save, current_lr
from ppll_ext.runtime.launch import check_same_config, init_distributed
from ppll_ext.train.job import (
    Setup,
    batch_len,
    check_save_space,
    collect_saves,
    prepare,
    restore_checkpoint,
    resume_position,
)
from ppll_ext.train.loop import OnBatch, steps_per_epoch


def ds_config(cfg: Config) -> dict[str, Any]:
    """The ds_config of a run: local.deepspeed_config (if any) with batch sizes, accumulation, clipping and bf16 or
    fp16 (train.autocast) set from the ppll config, ZeRO stage 0 unless the file says otherwise (1 shards each
    stage's optimizer states over its replicas; the adapter refuses 2 and 3). Without an "optimizer" section the
    client optimizer is optim.* (e.g. SGD), which ZeRO runs only with zero_allow_untested_optimizer: set to true
    unless the file sets it."""
    conf: dict[str, Any] = {}
    path = cfg.local.deepspeed_config
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"local.deepspeed_config={path!r} is not a file (paths are relative to {os.getcwd()}); "
                              f"give a ds_config JSON such as configs/deepspeed/ppll.json",
                              key="local.deepspeed_config")
        try:
            conf = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"local.deepspeed_config={path!r} is not valid JSON (line {exc.lineno})",
                              key="local.deepspeed_config") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        conf.pop(key, None)
    conf.update({
        "train_micro_batch_size_per_gpu": max(1, cfg.train.batch_size // cfg.local.micro_batches),
        "gradient_accumulation_steps": cfg.local.micro_batches,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
    })
    conf.setdefault("zero_optimization", {"stage": 0})
    if "optimizer" not in conf:
        conf.setdefault("zero_allow_untested_optimizer", True)  # ppll_ext builds the client optimizer from optim.*
    conf.setdefault("steps_per_print", 10**9)
    if cfg.train.autocast in ("bf16", "fp16"):
        conf[cfg.train.autocast] = {"enabled": True}
    return conf


class DeepSpeedLoopEngine:
    """The loop's interface over LocalPipelineEngine: which replica trains which batch, stats, eval, saving."""

    name = "processes (deepspeed)"

    def __init__(self, engine: LocalPipelineEngine, block: LocalBlock, cfg: Config, key_map: dict[str, str]) -> None:
        self.engine, self.block, self.cfg, self.key_map = engine, block, cfg, key_map
        self.replicas = cfg.local.data_parallel
        self.rank = dist.get_rank()
        self.stage, self.replica = divmod(self.rank, self.replicas)
        self.is_driver = self.rank == 0

    def train(self, loader: BatchLoader, first: int, steps: int, on_batch: OnBatch | None) -> EpochStats | None:
        """`steps` train_batch calls from batch `first`; replica j takes batches first + j, first + j + D, ..."""
        engine, d, n = self.engine, self.replicas, len(loader)
        batches = loader.iter_from(first + self.replica, d) if self.stage == 0 else None
        st = StageStats(self.stage)
        engine.wait_in_s = engine.wait_out_s = 0.0
        began = time.perf_counter()
        samples = 0
        for i in range(steps):
            start = first + i * d
            present = min(d, n - start)
            sizes = [batch_len(loader, b) for b in range(start, start + present)]
            lr = current_lr(self.block)
            if self.replica < present:
                engine.grad_weight = d / present
                data = iter(split_micro(*next(batches), self.cfg.local.micro_batches)) if batches else None
                micro = min(self.cfg.local.micro_batches, sizes[self.replica]) if batches else None
                loss = engine.train_batch(data, num_micro_batches=micro)
                st.add_loss(loss, sizes[self.replica])
            else:
                engine.grad_weight = 1.0
                engine.join_step()
            st.end_step(lr)
            samples += sum(sizes)
            if on_batch is not None:
                on_batch(sum(sizes))
        seconds = time.perf_counter() - began
        st.busy_s = seconds - engine.wait_in_s - engine.wait_out_s
        st.wait_in_s, st.wait_out_s, st.steps = engine.wait_in_s, engine.wait_out_s, engine.global_steps
        self.block.check_health()
        gathered: list[StageStats | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, st.settle() if self.replica == 0 else None)
        if not self.is_driver:
            return None
        return EpochStats(seconds, samples, sorted((s for s in gathered if s is not None), key=lambda s: s.index))

    def evaluate(self, loader: BatchLoader) -> EvalResult | None:
        """Test accuracy of the model and of every aux head; replica j evaluates test batches j, j + D, ..."""
        n = len(range(self.replica, len(loader), self.replicas))
        batches = loader.iter_from(self.replica, self.replicas) if self.stage == 0 else None
        mine = self.engine.evaluate(batches, n)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return eval_result(gathered) if self.is_driver else None

    def checkpoint(self, step: int) -> list[ckpt.StageManifest] | None:
        """Replica 0 of every stage writes its shard and state (ZeRO-1: the optimizer states gathered from all the
        stage's replicas); the manifests reach rank 0."""
        reports = []
        opt_state = self.engine.optimizer_state_dict() if self.engine.zero_sharded else None  # every replica
        if self.replica == 0:
            self.block.steps = self.engine.global_steps
            reports.append(attempt_save(lambda: ckpt.write_stage(ckpt.step_folder(self.cfg.train.save_dir, step),
                                                                 self.block, self.cfg.local.stages, self.key_map,
                                                                 optimizer_state=opt_state),
                                        self.stage, f"stage {self.stage} (rank {self.rank})"))
        return collect_saves(reports, self.is_driver)

    def close(self) -> None:
        """End the stage's links (every activation sent is received, no receive left posted), then meet the other
        ranks."""
        self.engine.close()
        dist.barrier()


def setup_deepspeed(cfg: Config) -> Setup:
    """Build the job, this rank's stage and LocalPipelineEngine; resume if asked."""
    if cfg.train.method != "local":
        raise ConfigError("local.engine=deepspeed trains local learning; train.method=bp runs with the native engine",
                          key="local.engine")
    if cfg.train.trace:
        raise ConfigError("train.trace is recorded by the native engine; drop train.trace or use local.engine=native",
                          key="train.trace")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.train.device == "cuda" else "cpu")
    k, d = cfg.local.stages, cfg.local.data_parallel
    rank, owns_group, _ = init_distributed(k, cfg.train.device, cfg.local.timeout_s, d)
    check_same_config(cfg.to_dict())
    torch.set_num_threads(cfg.train.threads or 1)
    conf = ds_config(cfg)
    low = [k for k in ("bf16", "fp16") if conf.get(k, {}).get("enabled")]
    if cfg.train.save_dir and low:
        raise ConfigError(f"checkpoints of local.engine=deepspeed with {low[0]} are not supported (DeepSpeed keeps the "
                          f"fp32 master weights in its optimizer); drop train.save_dir or {low[0]}",
                          key="train.save_dir")
    stage = rank // d
    job = prepare(cfg)
    total_steps = cfg.train.epochs * steps_per_epoch(len(job.train_loader), d)
    start, folder, info = resume_position(cfg, len(job.train_loader), d, len(job.layered.layers))
    kept = info["boundaries"] if info and info["num_stages"] == k else None
    shared = [kept or stage_boundaries(cfg, job.layered, job.example) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    boundaries, blocks = build_blocks(cfg, job.layered, job.example, total_steps=total_steps, boundaries=shared[0])
    block = blocks[stage]
    # every rank built every stage: rank 0 counts them all
    check_save_space(cfg, sum(ckpt.stage_bytes(b) for b in blocks.values()) if rank == 0 else 0, shared=True)
    saved_optimizer = None
    if folder is not None:
        restore_checkpoint(folder, info, job.layered, {stage: block}, boundaries)
        if conf["zero_optimization"].get("stage", 0) and "optimizer" not in conf:
            # ZeRO-1 re-flattens the optimizer's parameters: its states are re-sharded once it exists
            saved_optimizer = block.optimizer.state_dict()
            block.optimizer.state.clear()
    def checkpoint_layer(fn: Any, *args: torch.Tensor) -> Any:
        """local.checkpoint_activations: DeepSpeed's per-layer checkpoint, non-reentrant as in the native engine."""
        return checkpointed(fn, *args, modules=net)

    net = LocalPipelineModule(
        job.layered.layers, topology=PipeDataParallelTopology(num_pp=k, num_dp=d), loss_fn=make_loss(cfg.task),
        aux_heads=[blocks[s].aux for s in range(k - 1)], on_nan=cfg.train.on_nan,
        partition_method=",".join(str(b) for b in boundaries[:-1]),
        activation_checkpoint_interval=int(cfg.local.checkpoint_activations),
        activation_checkpoint_func=checkpoint_layer)
    engine, optimizer, _, scheduler = initialize(
        model=net, config=conf, model_parameters=[p for p in net.parameters() if p.requires_grad],
        optimizer=None if "optimizer" in conf else block.optimizer,
        lr_scheduler=None if "scheduler" in conf else block.lr_scheduler,
        queue_depth=cfg.local.queue_depth, timeout_s=cfg.local.timeout_s)
    block.optimizer, block.lr_scheduler = optimizer, scheduler
    if saved_optimizer is not None:
        engine.load_optimizer_state_dict(saved_optimizer)
    engine.global_steps = engine.block.steps = start.step
    engine.global_samples = start.step * cfg.train.batch_size * d
    loop_engine = DeepSpeedLoopEngine(engine, block, cfg, job.layered.key_map(block.body))
    return Setup(loop_engine, job, {stage: block}, boundaries, start, rank, owns_group=owns_group)
