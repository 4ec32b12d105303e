"""What every engine of a training run shares before and around the loop: data, model, resume, failure exit."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from ppll_ext import checkpoint as ckpt
from ppll_ext.build import build_layered
from ppll_ext.config import Config
from ppll_ext.core import LocalBlock
from ppll_ext.core.partition import check_stages
from ppll_ext.data import BatchLoader, load_dataset, load_tokenizer, shape_of
from ppll_ext.models import LayeredModel
from ppll_ext.train.loop import Engine, LoopSettings, check_stop_at, steps_per_epoch

log = logging.getLogger(__name__)


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
    layered = build_layered(cfg, **shape_of(train_ds))
    if cfg.train.method == "local":
        check_stages(len(layered.layers), cfg.local.stages)
    example = next(iter(test_loader))[0][: min(8, cfg.train.batch_size)]
    return Job(train_loader, test_loader, layered, example)


@dataclass
class Setup:
    """An engine ready to train, with what the run needs around the loop."""

    engine: Engine
    job: Job
    blocks: dict[int, LocalBlock]
    boundaries: list[int]
    start: ckpt.Position
    rank: int = 0
    distributed: bool = False
    """Several processes: a failure exits this rank at once (fail_fast) instead of raising."""
    owns_group: bool = False
    trace_group: dist.ProcessGroup | None = None
    title: str = ""


def resume_position(cfg: Config, total_steps: int) -> tuple[ckpt.Position, Path | None, dict | None]:
    """Where training starts (train.resume's position or the beginning), checked against the run's end and
    train.stop_at_step before any work."""
    folder, info = resume_state(cfg)
    start = ckpt.Position(**info["position"]) if info else ckpt.Position(0, 0, 0)
    check_stop_at(cfg.train.stop_at_step, start, total_steps, repr(str(folder)) if folder else "a new run")
    return start, folder, info


def preflight(cfg: Config) -> Job:
    """Everything that can be checked before processes are started: data, model, resume point, stop step."""
    job = prepare(cfg)
    replicas = cfg.local.data_parallel if cfg.train.method == "local" and cfg.local.engine == "deepspeed" else 1
    resume_position(cfg, cfg.train.epochs * steps_per_epoch(len(job.train_loader), replicas))
    return job


def loop_settings(cfg: Config, job: Job) -> LoopSettings:
    """The loop's share of `cfg`; a language model's checkpoints also get its config.json and tokenizer files."""
    t = cfg.train
    lm = cfg.task == "lm"
    return LoopSettings(t.method, cfg.model.name, cfg.data.name, t.epochs, t.save_dir, t.save_every, t.keep,
                        t.stop_at_step, t.progress, cfg.to_dict(), cfg.task, cfg.data.seq_len if lm else 0,
                        hf_files_writer(job.layered, cfg.data.tokenizer) if lm else None)


def hf_files_writer(layered: LayeredModel, tokenizer: str) -> Callable[[Path], object]:
    """Writes the model's config.json (tie_word_embeddings false: the layers were untied) and the tokenizer files
    into a checkpoint folder, so transformers' from_pretrained loads it as it is."""
    tok = load_tokenizer(tokenizer)

    def write(folder: Path) -> None:
        layered.model.config.save_pretrained(folder)
        tok.save(folder)

    return write


def fail_fast(rank: int, exc: BaseException) -> NoReturn:
    """A failed rank of a multi-process run says which stage failed and why, then exits at once (no teardown
    that could hang on a dead peer)."""
    log.error("stage %d (rank %d) failed: %s: %s", rank, rank, type(exc).__name__, exc)
    for handler in logging.getLogger("ppll_ext").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def resume_state(cfg: Config) -> tuple[Path | None, dict | None]:
    """The checkpoint folder train.resume names and its trainer state (None, None without train.resume)."""
    if not cfg.train.resume:
        return None, None
    folder = ckpt.resolve(cfg.train.resume)
    return folder, ckpt.read_json(folder / ckpt.TRAINER_STATE)


def restore_checkpoint(folder: Path, state: dict, layered: LayeredModel, blocks: dict[int, LocalBlock],
                       boundaries: list[int]) -> ckpt.Position:
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
        log.info("resuming with stages at %s from a checkpoint cut at %s: model weights loaded, aux heads and "
                 "optimizer states start fresh", boundaries, state["boundaries"])
    return position
