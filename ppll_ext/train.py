"""The training job: config -> data -> model -> blocks -> runtime -> metrics and a summary.

Run as `ppll train ...` or `python -m ppll_ext.train ...` (the form launchers such as
`accelerate launch -m` use).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TextIO

import torch
import torch.distributed as dist
from tqdm import tqdm

from ppll_ext import checkpoint as ckpt
from ppll_ext.build import build_blocks, build_bp_block, build_layered, stage_boundaries
from ppll_ext.config import Config
from ppll_ext.core import LocalBlock
from ppll_ext.core.partition import check_stages
from ppll_ext.data import BatchLoader, load_dataset
from ppll_ext.errors import ConfigError
from ppll_ext.models import LayeredModel
from ppll_ext.runtime import EpochStats, EvalResult, SequentialRunner, StageStats, trace
from ppll_ext.runtime.launch import check_same_config, init_distributed
from ppll_ext.runtime.processes import ProcessRunner
from ppll_ext.runtime.sequential import Saver
from ppll_ext.runtime.threads import ThreadRunner

Runner = SequentialRunner | ThreadRunner | ProcessRunner


@dataclass
class Summary:
    """What a finished run reports."""

    method: str
    runtime: str
    stages: int
    boundaries: list[int]
    epochs: int
    accuracy: float
    aux_accuracy: list[float]
    samples_per_s: float
    seconds: float
    stage_stats: list[StageStats] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        aux = " ".join(f"{a:.4f}" for a in self.aux_accuracy)
        aux = f" | aux heads (early exit) {aux}" if aux else ""
        out = [
            f"summary: method={self.method} runtime={self.runtime} stages={self.stages} "
            f"boundaries={self.boundaries} epochs={self.epochs}",
            f"  test accuracy {self.accuracy:.4f}" + aux,
            f"  throughput {self.samples_per_s:.1f} samples/s (last epoch) | total {self.seconds:.1f} s",
        ]
        for st in self.stage_stats:
            total = st.busy_s + st.wait_in_s + st.wait_out_s
            busy = st.busy_s / total if total > 0 else 1.0
            out.append(
                f"  stage {st.index}: loss {st.mean_loss:.4f} | busy {st.busy_s:.1f} s ({busy:.0%}) | "
                f"wait in {st.wait_in_s:.1f} s, out {st.wait_out_s:.1f} s | steps {st.steps}"
            )
        return out


def epoch_line(epoch: int, epochs: int, stats: EpochStats, ev: EvalResult) -> str:
    """One line per epoch: per-stage loss, test accuracy (model and aux heads), throughput."""
    losses = " ".join(f"{s.mean_loss:.3f}" for s in stats.stages)
    aux = f" (aux {' '.join(f'{a:.3f}' for a in ev.aux_accuracy)})" if ev.aux_accuracy else ""
    return (
        f"epoch {epoch + 1}/{epochs} | loss {losses} | test acc {ev.accuracy:.4f}{aux} | "
        f"{stats.samples_per_s:.0f} samples/s"
    )


@dataclass
class Job:
    """Everything a run needs before the blocks are built: loaders, the model and an example input."""

    train_loader: BatchLoader
    test_loader: BatchLoader
    layered: LayeredModel
    example: torch.Tensor


def prepare(cfg: Config) -> Job:
    """Load the data and build the model; raises ConfigError/DataError on bad input before any training.

    Also run in the parent before spawning stage processes, so bad input fails once, clearly.
    """
    train_ds = load_dataset(cfg.data, "train")
    test_ds = load_dataset(cfg.data, "test")
    train_loader = BatchLoader(train_ds, cfg.train.batch_size, shuffle=True, augment=cfg.data.augment,
                               seed=cfg.train.seed)
    test_loader = BatchLoader(test_ds, cfg.train.eval_batch_size, shuffle=False, augment=False)
    layered = build_layered(cfg, in_channels=train_ds.in_channels, image_size=train_ds.image_size,
                            num_classes=train_ds.num_classes)
    if cfg.train.method == "local":
        check_stages(len(layered.layers), cfg.local.stages)
    example = next(iter(test_loader))[0][: min(8, cfg.train.batch_size)]
    return Job(train_loader, test_loader, layered, example)


def _make_runner(cfg: Config, blocks: list[LocalBlock], runtime: str, saver: Saver) -> Runner:
    m = cfg.local.micro_batches if cfg.train.method == "local" else 1
    if runtime == "threads":
        return ThreadRunner(blocks, m, cfg.local.queue_depth, cfg.local.timeout_s, saver)
    if runtime == "processes":
        return ProcessRunner(blocks[0], micro_batches=m, queue_depth=cfg.local.queue_depth,
                             timeout_s=cfg.local.timeout_s, saver=saver)
    return SequentialRunner(blocks, m, saver)


def fail_fast(rank: int, exc: BaseException) -> NoReturn:
    """A failed rank says which stage failed and why, then exits at once (no teardown that could hang)."""
    print(f"ppll: error: stage {rank} (rank {rank}) failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def resume_state(cfg: Config) -> tuple[Path | None, dict | None]:
    """The checkpoint folder train.resume names and its trainer state (None, None without train.resume)."""
    if not cfg.train.resume:
        return None, None
    folder = ckpt.resolve(cfg.train.resume)
    return folder, ckpt.read_json(folder / ckpt.TRAINER_STATE)


def restore_checkpoint(folder: Path, state: dict, layered: LayeredModel, blocks: dict[int, LocalBlock],
             boundaries: list[int], out: TextIO) -> ckpt.Position:
    """Load the model weights (any cut) and, if the cut is unchanged, every stage's aux head and optimizer."""
    weights = ckpt.load_model_state(folder)
    ckpt.check_against(weights, layered.model.state_dict(), f"checkpoint {str(folder)!r}")
    layered.model.load_state_dict(weights)
    position = ckpt.Position(**state["position"])
    same_cut = state["boundaries"] == boundaries
    for block in blocks.values():
        ckpt.load_stage(folder, block, same_cut)
        if not same_cut:
            # Re-partitioned: fresh aux heads and optimizers, but the schedule continues where it was (a
            # deliberate fast-forward before any optimizer step, which torch would otherwise warn about).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                for _ in range(position.step):
                    block.lr_scheduler.step()
            block.steps = position.step
    if not same_cut and 0 in blocks:
        print(f"resuming with stages at {boundaries} from a checkpoint cut at {state['boundaries']}: model weights "
              f"loaded, aux heads and optimizer states start fresh", file=out, flush=True)
    return position


def run_training(cfg: Config, *, out: TextIO | None = None,
                 on_finish: Callable[[dict[int, LocalBlock]], None] | None = None) -> Summary | None:
    """Train as `cfg` says; returns the summary on the driving rank (None on the other ranks).

    `on_finish(blocks)` receives this process's trained blocks, by stage index; `out` defaults to sys.stdout.
    """
    out = sys.stdout if out is None else out
    if cfg.train.method == "local" and cfg.local.engine == "deepspeed":
        from ppll_ext.train_deepspeed import run_deepspeed_training

        return run_deepspeed_training(cfg, out=out, on_finish=on_finish)
    runtime = cfg.local.runtime if cfg.train.method == "local" else "sequential"
    rank, device = 0, torch.device("cuda" if cfg.train.device == "cuda" else "cpu")
    owns_group = False
    if runtime == "processes":
        rank, owns_group, device = init_distributed(cfg.local.stages, cfg.train.device, cfg.local.timeout_s)
        check_same_config(cfg.to_dict())
    threads = cfg.train.threads or (1 if runtime == "processes" else 0)
    if threads:
        torch.set_num_threads(threads)
    job = prepare(cfg)
    train_loader, test_loader, layered, example = job.train_loader, job.test_loader, job.layered, job.example
    total_steps = cfg.train.epochs * len(train_loader)
    resume_folder, resume_info = resume_state(cfg)
    k = 1 if cfg.train.method == "bp" else cfg.local.stages
    kept_cut = resume_info["boundaries"] if resume_info and resume_info["num_stages"] == k else None
    if cfg.train.method == "bp":
        blocks = {0: build_bp_block(cfg, layered, total_steps=total_steps)}
        boundaries = [0, len(layered.layers)]
    elif runtime == "processes":
        # Rank 0 decides the cut (profiling differs between processes) and everyone follows it.
        shared = [kept_cut or stage_boundaries(cfg, layered, example) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        boundaries, blocks = build_blocks(cfg, layered, example, total_steps=total_steps, boundaries=shared[0],
                                          stages=[rank])
    else:
        boundaries, blocks = build_blocks(cfg, layered, example, total_steps=total_steps, boundaries=kept_cut)
    position = ckpt.Position(0, 0, 0)
    if resume_folder is not None:
        position = restore_checkpoint(resume_folder, resume_info, layered, blocks, boundaries, out)
        if position.step >= total_steps:
            raise ConfigError(f"nothing to train: {str(resume_folder)!r} is at step {position.step} of "
                              f"{total_steps}; raise train.epochs to continue")
    for idx, block in blocks.items():
        on_gpu = device.type == "cuda" and runtime == "threads"
        block.to(torch.device("cuda", idx) if on_gpu else device)
    key_maps = {idx: layered.key_map(b.body) for idx, b in blocks.items()}

    def saver(block: LocalBlock, step: int) -> ckpt.StageManifest:
        return ckpt.write_stage(ckpt.step_folder(cfg.train.save_dir, step), block, k, key_maps[block.index])

    if cfg.train.trace:
        trace.start()
    runner = _make_runner(cfg, [blocks[i] for i in sorted(blocks)], runtime, saver)
    try:
        summary = None
        if rank == 0:
            summary = _drive(cfg, runner, runtime, boundaries, train_loader, test_loader, out, position)
        elif isinstance(runner, ProcessRunner):
            runner.serve()
    except BaseException as exc:
        if runtime == "processes":
            fail_fast(rank, exc)
        raise
    if cfg.train.trace:
        title = f"{cfg.model.name}: {cfg.train.method} {runtime}, K={len(boundaries) - 1}, M={runner.micro_batches}"
        written = trace.finish(cfg.train.trace, runner.control if isinstance(runner, ProcessRunner) else None, title)
        if written is not None:
            print(f"trace written: {written}", file=out, flush=True)
    if on_finish is not None:
        on_finish(blocks)
    if owns_group:
        dist.destroy_process_group()
    return summary


def _merge(parts: list[EpochStats]) -> EpochStats:
    """One epoch's stats from the segments it was trained in (checkpoints cut an epoch into segments)."""
    stages = []
    for group in zip(*(p.stages for p in parts)):
        merged = StageStats(group[0].index, steps=group[-1].steps)
        for st in group:
            merged.loss += st.loss
            merged.samples += st.samples
            merged.busy_s += st.busy_s
            merged.wait_in_s += st.wait_in_s
            merged.wait_out_s += st.wait_out_s
        stages.append(merged)
    return EpochStats(sum(p.seconds for p in parts), sum(p.samples for p in parts), stages)


def _drive(cfg: Config, runner: Runner, runtime: str, boundaries: list[int], train_loader: BatchLoader,
           test_loader: BatchLoader, out: TextIO, start: ckpt.Position) -> Summary:
    """The epoch loop on the driving rank: progress bar, checkpoints, per-epoch line, final summary."""
    n_train, per_epoch = len(train_loader.dataset), len(train_loader)
    print(f"training {cfg.model.name} on {cfg.data.name} ({n_train} train / {len(test_loader.dataset)} test), "
          f"method={cfg.train.method}, runtime={runtime}, stages={len(boundaries) - 1} at layers {boundaries}"
          + (f", resuming at epoch {start.epoch + 1} batch {start.batch} (step {start.step})" if start.step else ""),
          file=out, flush=True)
    every, stop_at = cfg.train.save_every, cfg.train.stop_at_step
    began = time.perf_counter()
    step, saved, stats, ev = start.step, start.step, None, None

    def save(epoch: int, batch: int) -> None:
        nonlocal saved
        at = ckpt.Position(step, epoch + 1, 0) if batch == per_epoch else ckpt.Position(step, epoch, batch)
        folder = ckpt.finalize(ckpt.step_folder(cfg.train.save_dir, step), runner.checkpoint(step), at, boundaries,
                               cfg.to_dict(), cfg.train.keep)
        saved = step
        print(f"checkpoint saved: {folder}", file=out, flush=True)

    for epoch in range(start.epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        batch = start.batch if epoch == start.epoch else 0
        bar = tqdm(total=n_train, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="img",
                   disable=not cfg.train.progress, leave=False, file=out)
        parts = []
        while batch < per_epoch and (stop_at is None or step < stop_at):
            end = per_epoch
            if every:
                end = min(end, batch + every - step % every)
            if stop_at is not None:
                end = min(end, batch + stop_at - step)
            parts.append(runner.train_epoch(itertools.islice(train_loader.iter_from(batch), end - batch),
                                            bar.update))
            step, batch = step + end - batch, end
            if every and step % every == 0:
                save(epoch, batch)
        bar.close()
        if not parts:
            break
        stats = _merge(parts)
        ev = runner.evaluate(test_loader)
        print(epoch_line(epoch, cfg.train.epochs, stats, ev), file=out, flush=True)
        if stop_at is not None and step >= stop_at:
            print(f"stopped at step {step} (train.stop_at_step)", file=out, flush=True)
            break
    if cfg.train.save_dir and saved != step:
        save(epoch, batch)
    if not isinstance(runner, SequentialRunner):
        runner.close()
    summary = Summary(cfg.train.method, runtime, len(boundaries) - 1, boundaries, cfg.train.epochs, ev.accuracy,
                      ev.aux_accuracy, stats.samples_per_s, time.perf_counter() - began, stats.stages)
    for line in summary.lines():
        print(line, file=out, flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m ppll_ext.train` = `ppll train`."""
    from ppll_ext.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
