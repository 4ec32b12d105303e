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
from ppll_ext.config import Config, check_device
from ppll_ext.core import LocalBlock
from ppll_ext.core.partition import check_stages
from ppll_ext.data import BatchLoader, load_dataset, load_tokenizer, shape_of, tokenizer_digest
from ppll_ext.errors import EXIT_ERROR, CheckpointError, ConfigError, PPLLError
from ppll_ext.models import LayeredModel
from ppll_ext.paths import check_output_file, free_bytes
from ppll_ext.runtime.base import SaveFailure, first_failure
from ppll_ext.train.loop import Engine, LoopSettings, check_stop_at, steps_per_epoch
from ppll_ext.train.metrics import check_log_dir

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything a run needs before the blocks are built: loaders, the model and an example input."""

    train_loader: BatchLoader
    test_loader: BatchLoader
    layered: LayeredModel
    example: torch.Tensor


def prepare(cfg: Config) -> Job:
    """Check the outputs (trace file, curves folder), load the data and build the model; raises ConfigError/DataError
    on bad input before any training.

    Also run in the parent before spawning stage processes, so bad input fails once, clearly.
    """
    check_device(cfg)
    if cfg.train.trace:
        check_output_file(cfg.train.trace, f"train.trace={cfg.train.trace!r}", key="train.trace",
                          example="trace.json")
    if cfg.train.log_dir or cfg.train.save_dir:  # the curves go into the run directory unless told otherwise
        check_log_dir(cfg.train.log_dir or cfg.train.save_dir, "train.log_dir" if cfg.train.log_dir else
                      "train.save_dir")
    train_ds = load_dataset(cfg.data, "train")
    test_ds = load_dataset(cfg.data, "test")
    pin = cfg.train.device == "cuda"
    train_loader = BatchLoader(train_ds, cfg.train.batch_size, shuffle=True, augment=cfg.data.augment,
                               seed=cfg.train.seed, pin_memory=pin)
    test_loader = BatchLoader(test_ds, cfg.train.eval_batch_size, shuffle=False, augment=False, pin_memory=pin)
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
    owns_group: bool = False
    trace_group: dist.ProcessGroup | None = None
    title: str = ""


def batch_len(loader: BatchLoader, index: int) -> int:
    """Samples in batch `index` of an epoch (the last one may be short), known on every rank without reading data."""
    return min(loader.batch_size, len(loader.dataset) - index * loader.batch_size)


def check_last_batch(cfg: Config, loader: BatchLoader) -> None:
    """local.engine=torch: ConfigError (on every rank) when the epoch's last batch has fewer samples than
    local.micro_batches, since torch's schedules take the same number of micro-batches at every step."""
    m = cfg.local.micro_batches
    last = batch_len(loader, len(loader) - 1)
    if last < m:
        raise ConfigError(f"the epoch's last batch has {last} sample(s), fewer than local.micro_batches={m}, and "
                          f"torch's schedules take {m} micro-batches every step (local.engine=torch); choose a "
                          f"train.batch_size or data.train_subset that leaves at least {m}", key="local.micro_batches",
                          every_rank=True)


def collect_saves(reports: list[object], is_driver: bool) -> list[ckpt.StageManifest] | None:
    """Every rank's part of a checkpoint (`reports`: what attempt_save returned for each stage it wrote) gathered:
    every rank learns whether all parts were written before any raises (so no stage still writes into the step's
    folder when rank 0 discards it), and rank 0 gets every manifest."""
    failures: list[SaveFailure | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, first_failure(reports))
    failure = first_failure(failures)
    if failure is not None:
        raise failure.error(every_rank=True)
    gathered: list[list[ckpt.StageManifest]] | None = [[] for _ in failures] if is_driver else None
    dist.gather_object(reports, gathered, dst=0)
    return [m for part in gathered for m in part] if is_driver else None


def resume_position(cfg: Config, batches: int, replicas: int, layers: int
                    ) -> tuple[ckpt.Position, Path | None, dict | None]:
    """Where training starts (train.resume's position or the beginning), checked against the epoch's `batches`
    (mini-batches, taken `replicas` per step), the run's end, train.stop_at_step and the model's `layers` before any
    work."""
    folder, info = resume_state(cfg)
    if info is not None:
        ckpt.check_cut(folder, info, layers)
    start = ckpt.Position(**info["position"]) if info else ckpt.Position(0, 0, 0)
    per_epoch = steps_per_epoch(batches, replicas)
    if info is not None:
        check_position(folder, start, batches, replicas)
    check_stop_at(cfg.train.stop_at_step, start, cfg.train.epochs * per_epoch,
                  repr(str(folder)) if folder else "a new run")
    return start, folder, info


def check_position(folder: Path, at: ckpt.Position, batches: int, replicas: int) -> None:
    """CheckpointError unless a saved position is one the loop can have written for this data stream: a batch
    inside the epoch, at a step boundary, and the step count its epoch and batch imply."""
    per_epoch = steps_per_epoch(batches, replicas)
    expected = at.epoch * per_epoch + at.batch // replicas
    if at.batch >= batches or at.batch % replicas or at.step != expected:
        raise CheckpointError(
            f"{str(folder / ckpt.TRAINER_STATE)!r}: position (step {at.step}, epoch {at.epoch}, batch {at.batch}) is "
            f"not a point of this data stream ({batches} batches per epoch, {replicas} per step: batch below "
            f"{batches}, step = epoch x {per_epoch} + batch / {replicas}); the file was edited or belongs to another "
            f"data set: resume from another checkpoint")


def preflight(cfg: Config) -> Job:
    """Everything that can be checked before processes are started: data, model, outputs, resume point, stop step,
    and the run directory (a writable folder that no live run holds)."""
    job = prepare(cfg)
    if cfg.local.engine == "torch":
        check_last_batch(cfg, job.train_loader)
    replicas = cfg.local.data_parallel if cfg.train.method == "local" and cfg.local.engine == "deepspeed" else 1
    resume_position(cfg, len(job.train_loader), replicas, len(job.layered.layers))
    if cfg.train.save_dir:
        ckpt.check_run_dir(cfg.train.save_dir)
    return job


def check_save_space(cfg: Config, share: int, shared: bool) -> None:
    """Before training: ConfigError unless train.save_dir (if set) has room for two checkpoints (ckpt.check_free_space).
    `share` is what this process's stages add to one checkpoint (ckpt.stage_bytes); with `shared` (one process per
    stage) the ranks' shares are added up and every rank decides on rank 0's free space, so all refuse alike and rank
    0 alone reports it."""
    if not cfg.train.save_dir:
        return
    free = free_bytes(cfg.train.save_dir)
    if shared:
        everyone: list[tuple[int, int] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (share, free))
        share, free = sum(n for n, _ in everyone), everyone[0][1]
    ckpt.check_free_space(cfg.train.save_dir, share, free, every_rank=shared)


def loop_settings(cfg: Config, job: Job) -> LoopSettings:
    """The loop's share of `cfg`; a language model's checkpoints also get its config.json and tokenizer files."""
    t = cfg.train
    lm = cfg.task == "lm"
    end_to_end = cfg.local.engine == "torch" and cfg.local.placement().end_to_end  # a stock torch schedule
    return LoopSettings("bp" if end_to_end else t.method, cfg.model.name, cfg.data.name, t.epochs, t.save_dir,
                        t.save_every, t.keep, t.stop_at_step, t.progress, cfg.to_dict(), cfg.task,
                        cfg.data.seq_len if lm else 0, hf_files_writer(job.layered, cfg.data.tokenizer) if lm else None,
                        t.log_dir or t.save_dir,
                        fingerprints(cfg))


def fingerprints(cfg: Config) -> dict[str, str]:
    """{setting: digest of the content it names} that a checkpoint records and a resume compares: a language model's
    data.tokenizer (by its tokenizer.json, wherever it lies)."""
    return {"data.tokenizer": tokenizer_digest(cfg.data.tokenizer)} if cfg.task == "lm" else {}


def hf_files_writer(layered: LayeredModel, tokenizer: str) -> Callable[[Path], object]:
    """Writes the model's config.json (tie_word_embeddings false: the layers were untied) and the tokenizer files
    into a checkpoint folder, so transformers' from_pretrained loads it as it is."""
    tok = load_tokenizer(tokenizer)

    def write(folder: Path) -> None:
        layered.model.config.save_pretrained(folder)
        tok.save(folder)

    return write


def fail_fast(rank: int, stage: int, exc: BaseException) -> NoReturn:
    """A failed rank of a multi-process run says in one line which stage failed and why, then exits at once (no
    teardown that could hang on a dead peer): code 2 for a ppll_ext error, as the `ppll` command, 1 otherwise.

    An error raised alike on every rank (`every_rank`) is reported by rank 0 only, as the `ppll` command would."""
    ours = isinstance(exc, PPLLError)
    if ours and exc.every_rank:
        if rank == 0:
            log.error("%s", exc)
    else:
        log.error("stage %d (rank %d) failed: %s: %s", stage, rank, type(exc).__name__, exc)
    for handler in logging.getLogger("ppll_ext").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_ERROR if ours else 1)


def resume_state(cfg: Config) -> tuple[Path | None, dict | None]:
    """The checkpoint folder train.resume names and its trainer state (None, None without train.resume), checked:
    every field, its sha256, and the settings the checkpoint depends on (ckpt.check_resume_settings)."""
    if not cfg.train.resume:
        return None, None
    folder = ckpt.resolve(cfg.train.resume)
    state = ckpt.read_trainer_state(folder)
    stages = 1 if cfg.train.method == "bp" else cfg.local.stages
    ckpt.check_resume_settings(folder, state, cfg.to_dict(), same_stages=state["num_stages"] == stages,
                               fingerprints=fingerprints(cfg))
    return folder, state


def restore_checkpoint(folder: Path, state: dict, layered: LayeredModel, blocks: dict[int, LocalBlock],
                       boundaries: list[int]) -> ckpt.Position:
    """Load the model weights (any cut) and, if the cut is unchanged, every stage's aux head and optimizer; each file
    is verified against its recorded sha256 (a checkpoint without checksums is loaded with a warning)."""
    weights = ckpt.load_model_state(folder, warn=0 in blocks)
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
