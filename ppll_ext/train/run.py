"""The training job: config -> data -> model -> blocks -> engine -> the one loop -> metrics and a summary.

Run as `ppll train ...`, `python -m ppll_ext.train ...` (the form launchers such as `accelerate launch -m`
use) or `python -m ppll_ext train ...`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import TextIO

import torch
import torch.distributed as dist

from ppll_ext import checkpoint as ckpt
from ppll_ext import trace
from ppll_ext.build import build_blocks, build_bp_block, stage_boundaries
from ppll_ext.config import Config
from ppll_ext.core import LocalBlock
from ppll_ext.runtime import ProcessRunner, SequentialRunner, ThreadRunner
from ppll_ext.runtime.launch import check_same_config, init_distributed
from ppll_ext.train.job import (
    Setup,
    check_save_space,
    loop_settings,
    prepare,
    restore_checkpoint,
    resume_position,
)
from ppll_ext.train.loop import Summary, run_loop, steps_per_epoch
from ppll_ext.train.native import NativeEngine


def setup_native(cfg: Config) -> Setup:
    """ppll_ext's own runtimes: sequential and threads in this process, processes one stage per rank."""
    runtime = cfg.local.runtime if cfg.train.method == "local" else "sequential"
    rank, device = 0, torch.device("cuda" if cfg.train.device == "cuda" else "cpu")
    owns_group = False
    if runtime == "processes":
        rank, owns_group, device = init_distributed(cfg.local.stages, cfg.train.device, cfg.local.timeout_s)
        check_same_config(cfg.to_dict())
    # One torch thread per stage for local learning in every runtime: the runtimes then sum floats in the same
    # order and give bit-identical weights; end-to-end backprop keeps torch's default.
    threads = cfg.train.threads or (1 if cfg.train.method == "local" else 0)
    if threads:
        torch.set_num_threads(threads)
    job = prepare(cfg)
    total_steps = cfg.train.epochs * steps_per_epoch(len(job.train_loader), 1)
    start, folder, info = resume_position(cfg, len(job.train_loader), 1, len(job.layered.layers))
    k = 1 if cfg.train.method == "bp" else cfg.local.stages
    kept_cut = info["boundaries"] if info and info["num_stages"] == k else None
    if cfg.train.method == "bp":
        blocks = {0: build_bp_block(cfg, job.layered, total_steps=total_steps)}
        boundaries = [0, len(job.layered.layers)]
    elif runtime == "processes":
        # Rank 0 decides the cut (profiling differs between processes) and everyone follows it.
        shared = [kept_cut or stage_boundaries(cfg, job.layered, job.example) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        boundaries, blocks = build_blocks(cfg, job.layered, job.example, total_steps=total_steps,
                                          boundaries=shared[0], stages=[rank])
    else:
        boundaries, blocks = build_blocks(cfg, job.layered, job.example, total_steps=total_steps,
                                          boundaries=kept_cut)
    check_save_space(cfg, sum(ckpt.stage_bytes(b) for b in blocks.values()), shared=runtime == "processes")
    # Onto the devices before a resumed optimizer state is loaded, which puts that state beside its parameters.
    for idx, block in blocks.items():
        on_gpu = device.type == "cuda" and runtime == "threads"
        block.to(torch.device("cuda", idx % torch.cuda.device_count()) if on_gpu else device)
    if folder is not None:
        restore_checkpoint(folder, info, job.layered, blocks, boundaries)
    key_maps = {idx: job.layered.key_map(b.body) for idx, b in blocks.items()}

    def saver(block: LocalBlock, step: int) -> ckpt.StageManifest:
        return ckpt.write_stage(ckpt.step_folder(cfg.train.save_dir, step), block, k, key_maps[block.index])

    if cfg.train.trace:
        trace.start()
    ordered = [blocks[i] for i in sorted(blocks)]
    m = cfg.local.micro_batches if cfg.train.method == "local" else 1
    if runtime == "threads":
        runner = ThreadRunner(ordered, m, cfg.local.queue_depth, cfg.local.timeout_s, saver)
    elif runtime == "processes":
        runner = ProcessRunner(ordered[0], micro_batches=m, queue_depth=cfg.local.queue_depth,
                               timeout_s=cfg.local.timeout_s, saver=saver)
    else:
        runner = SequentialRunner(ordered, m, saver)
    title = f"{cfg.model.name}: {cfg.train.method} {runtime}, K={len(boundaries) - 1}, M={m}"
    return Setup(NativeEngine(runner, runtime, rank), job, blocks, boundaries, start, rank,
                 owns_group=owns_group,
                 trace_group=runner.control if isinstance(runner, ProcessRunner) else None, title=title)


def run_training(cfg: Config, *, out: TextIO | None = None,
                 on_finish: Callable[[dict[int, LocalBlock]], None] | None = None) -> Summary | None:
    """Train as `cfg` says; returns the summary on the driving rank (None on the other ranks).

    `on_finish(blocks)` receives this process's trained blocks, by stage index; `out` defaults to sys.stdout.
    Errors are raised on the rank where they happen (`ppll train` then ends a multi-process run at once:
    `train.job.fail_fast`).
    """
    out = sys.stdout if out is None else out
    threads = torch.get_num_threads()
    try:
        return _run(cfg, out, on_finish)
    finally:
        torch.set_num_threads(threads)  # the caller's setting: a library call leaves no global change behind


def _run(cfg: Config, out: TextIO, on_finish: Callable[[dict[int, LocalBlock]], None] | None) -> Summary | None:
    # The process that commits the checkpoints (rank 0, or the only one) holds the run directory's lock for the run.
    if cfg.train.resume:  # refused before the lock settles the run directory's interrupted saves
        ckpt.resolve(cfg.train.resume)
    commits = bool(cfg.train.save_dir) and os.environ.get("RANK", "0") == "0"
    lock = ckpt.lock_run(cfg.train.save_dir) if commits else nullcontext()
    with lock:
        if cfg.train.method == "local" and cfg.local.engine == "deepspeed":
            from ppll_ext.train.deepspeed_engine import setup_deepspeed  # imports DeepSpeed: only for this engine

            setup = setup_deepspeed(cfg)
        elif cfg.local.engine == "torch":
            from ppll_ext.train.torch_engine import setup_torch  # imports torch.distributed.pipelining

            setup = setup_torch(cfg)
        else:
            setup = setup_native(cfg)
        if commits:  # an earlier run's checkpoints after this run's start are moved aside, not pruned
            ckpt.supersede(cfg.train.save_dir, setup.start.step)
        summary = run_loop(setup.engine, loop_settings(cfg, setup.job), setup.job.train_loader,
                           setup.job.test_loader, setup.boundaries, setup.start, out)
        if cfg.train.trace:
            written = trace.finish(cfg.train.trace, setup.trace_group, setup.title)
            if written is not None:
                print(f"trace written: {written}", file=out, flush=True)
    if on_finish is not None:
        on_finish(setup.blocks)
    if setup.owns_group:
        dist.barrier()
        dist.destroy_process_group()
    return summary
