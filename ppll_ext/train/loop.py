"""The one training loop: epochs, segments between checkpoints, evaluation, progress, epoch lines, summary.

Every engine (the native runtimes, the DeepSpeed adapter, torch's pipelining schedules) is driven through the
small `Engine` interface below, and every rank of a multi-process run runs this same loop: engines decide which rank
reads data, and only the driving rank prints and commits checkpoints.

A training step is one optimizer step of every stage: it consumes `engine.replicas` mini-batches (one
per data-parallel replica; the last step of an epoch may have fewer), so an epoch of B batches takes
ceil(B / replicas) steps and `Position.batch` is the index of the next unseen batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from tqdm import tqdm

from ppll_ext import checkpoint as ckpt
from ppll_ext.data import BatchLoader
from ppll_ext.errors import CheckpointError, ConfigError
from ppll_ext.runtime import EpochStats, EvalResult, StageStats
from ppll_ext.runtime.base import perplexity
from ppll_ext.train.metrics import MetricsLog

log = logging.getLogger(__name__)
OnBatch = Callable[[int], None]


class Engine(Protocol):
    """What the loop needs from an engine; every rank calls the same methods in the same order."""

    name: str
    """How the stages run, for the banner and the summary (e.g. "processes", "processes (deepspeed)",
    "processes (torch 1F1B)")."""
    is_driver: bool
    """True on the one rank that prints, shows progress and commits checkpoints."""
    replicas: int
    """Data-parallel replicas per stage: mini-batches consumed by one training step."""

    def train(self, loader: BatchLoader, first: int, steps: int, on_batch: OnBatch | None) -> EpochStats | None:
        """Train `steps` steps from batch `first` of the loader's current epoch; all stages' stats on the driver."""

    def evaluate(self, loader: BatchLoader) -> EvalResult | None:
        """Evaluate the model and every aux head on `loader`; the result on the driver."""

    def checkpoint(self, step: int) -> list[ckpt.StageManifest] | None:
        """Every stage writes its part of checkpoint `step`; the manifests on the driver."""

    def close(self) -> None:
        """Stop the stages once everything sent has been processed."""


def steps_per_epoch(num_batches: int, replicas: int) -> int:
    """Optimizer steps in an epoch of `num_batches` mini-batches (the last step may use fewer replicas)."""
    return math.ceil(num_batches / replicas)


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
    task: str = "classification"
    loss: float = math.nan
    """The model's mean evaluation loss (per token for lm)."""
    aux_loss: list[float] = field(default_factory=list)
    tokens_per_sample: int = 0

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"summary: method={self.method} runtime={self.runtime} stages={self.stages} "
               f"boundaries={self.boundaries} epochs={self.epochs}"]
        if self.task == "lm":
            aux = ", ".join(f"{perplexity(loss):.2f} ({acc:.4f})"
                            for loss, acc in zip(self.aux_loss, self.aux_accuracy))
            aux = f" | aux heads (early exit) {aux}" if aux else ""
            out.append(f"  validation perplexity {perplexity(self.loss):.3f} (token accuracy {self.accuracy:.4f})"
                       + aux)
            tokens = f", {self.samples_per_s * self.tokens_per_sample:.0f} tokens/s"
        else:
            aux = " ".join(f"{a:.4f}" for a in self.aux_accuracy)
            aux = f" | aux heads (early exit) {aux}" if aux else ""
            out.append(f"  test accuracy {self.accuracy:.4f}" + aux)
            tokens = ""
        out.append(f"  throughput {self.samples_per_s:.1f} samples/s{tokens} (last epoch) | total {self.seconds:.1f} s")
        for st in self.stage_stats:
            total = st.busy_s + st.wait_in_s + st.wait_out_s
            busy = st.busy_s / total if total > 0 else 1.0
            out.append(
                f"  stage {st.index}: loss {st.mean_loss:.4f} | busy {st.busy_s:.1f} s ({busy:.0%}) | "
                f"wait in {st.wait_in_s:.1f} s, out {st.wait_out_s:.1f} s | steps {st.steps}"
            )
        return out


def epoch_line(epoch: int, epochs: int, stats: EpochStats, ev: EvalResult, task: str = "classification",
               tokens_per_sample: int = 0) -> str:
    """One line per epoch: per-stage loss, test accuracy (or validation perplexity and token accuracy) of the model
    and the aux heads, throughput."""
    losses = " ".join(f"{s.mean_loss:.3f}" for s in stats.stages)
    if task == "lm":
        ppl_aux = f" (aux {' '.join(f'{p:.2f}' for p in ev.aux_perplexity)})" if ev.aux_loss else ""
        acc_aux = f" (aux {' '.join(f'{a:.3f}' for a in ev.aux_accuracy)})" if ev.aux_accuracy else ""
        return (f"epoch {epoch + 1}/{epochs} | loss {losses} | val ppl {ev.perplexity:.2f}{ppl_aux} | "
                f"token acc {ev.accuracy:.3f}{acc_aux} | {stats.samples_per_s:.0f} samples/s, "
                f"{stats.samples_per_s * tokens_per_sample:.0f} tokens/s")
    aux = f" (aux {' '.join(f'{a:.3f}' for a in ev.aux_accuracy)})" if ev.aux_accuracy else ""
    return (
        f"epoch {epoch + 1}/{epochs} | loss {losses} | test acc {ev.accuracy:.4f}{aux} | "
        f"{stats.samples_per_s:.0f} samples/s"
    )


@dataclass
class LoopSettings:
    """The loop's share of the configuration."""

    method: str
    model: str
    data: str
    epochs: int
    save_dir: str | None = None
    save_every: int = 0
    keep: int = 2
    stop_at_step: int | None = None
    progress: bool = True
    config: dict = field(default_factory=dict)
    task: str = "classification"
    tokens_per_sample: int = 0
    """Tokens in one sample (lm), for tokens/s."""
    extra_files: Callable[[Path], object] | None = None
    """Writes what else a checkpoint folder holds (a language model's config.json and tokenizer files)."""
    log_dir: str | None = None
    """Where the driver writes the training curves (metrics.jsonl, TensorBoard events); None = none."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """{setting: digest of the content it names} recorded in every checkpoint (data.tokenizer of language models)."""


def check_stop_at(stop_at: int | None, start: ckpt.Position, total_steps: int, where: str) -> None:
    """ConfigError before any work when nothing is left to train (resumed at or past the end or stop_at_step)."""
    if start.step >= total_steps:
        raise ConfigError(f"nothing to train: {where} is at step {start.step} of {total_steps}; raise train.epochs "
                          f"to continue", key="train.epochs")
    if stop_at is not None and stop_at <= start.step:
        raise ConfigError(f"train.stop_at_step={stop_at} is not after the starting step {start.step} ({where}); "
                          f"give a later step or drop train.stop_at_step", key="train.stop_at_step")


def run_loop(engine: Engine, s: LoopSettings, train_loader: BatchLoader, test_loader: BatchLoader,
             boundaries: list[int], start: ckpt.Position, out: TextIO) -> Summary | None:
    """Train from `start` to the end of s.epochs (or s.stop_at_step); the summary on the driver, None elsewhere."""
    say: Callable[[str], None] = (lambda line: print(line, file=out, flush=True)) if engine.is_driver else _silent
    n_batches, d = len(train_loader), engine.replicas
    per_epoch = steps_per_epoch(n_batches, d)
    k = len(boundaries) - 1
    replicas = f" x {d} data-parallel replica(s)" if d > 1 else ""
    say(f"training {s.model} on {s.data} ({len(train_loader.dataset)} train / {len(test_loader.dataset)} test), "
        f"method={s.method}, runtime={engine.name}, stages={k} at layers {boundaries}{replicas}"
        + (f", resuming at epoch {start.epoch + 1} batch {start.batch} (step {start.step})" if start.step else ""))
    every, stop_at = s.save_every, s.stop_at_step
    began = time.perf_counter()
    step, saved = start.step, start.step
    stats: EpochStats | None = None
    ev: EvalResult | None = None
    position = start
    metrics = MetricsLog(s.log_dir, start.step, s.task) if s.log_dir and engine.is_driver else None

    def save(at: ckpt.Position) -> None:
        nonlocal saved
        partial = ckpt.step_folder(s.save_dir, at.step)
        try:
            manifests = engine.checkpoint(at.step)
        except CheckpointError:
            # A stage could not write its part (a full disk ...), and none writes any more: the step's folder goes
            # (a stage that died while writing leaves it to the next run, which removes it when it takes the lock).
            if engine.is_driver:
                ckpt.discard(partial)
            raise
        saved = at.step
        if engine.is_driver:
            folder = ckpt.commit(partial, manifests, at, boundaries, s.config, s.keep, s.extra_files,
                                 s.fingerprints)
            say(f"checkpoint saved: {folder}")

    try:
        for epoch in range(start.epoch, s.epochs):
            train_loader.set_epoch(epoch)
            done = math.ceil(start.batch / d) if epoch == start.epoch else 0
            bar = tqdm(total=len(train_loader.dataset), desc=f"epoch {epoch + 1}/{s.epochs}", unit="sample",
                       disable=not (s.progress and engine.is_driver), leave=False, file=out)
            parts: list[EpochStats | None] = []
            while done < per_epoch and (stop_at is None or step < stop_at):
                end = per_epoch
                if every:
                    end = min(end, done + every - step % every)
                if stop_at is not None:
                    end = min(end, done + stop_at - step)
                parts.append(engine.train(train_loader, done * d, end - done, bar.update))
                if metrics is not None:
                    metrics.steps(step, epoch, parts[-1])
                step, done = step + end - done, end
                position = (ckpt.Position(step, epoch + 1, 0) if done == per_epoch
                            else ckpt.Position(step, epoch, done * d))
                if every and step % every == 0:
                    save(position)
            bar.close()
            ev = engine.evaluate(test_loader)
            if engine.is_driver:
                stats = EpochStats.merge([p for p in parts if p is not None])
                say(epoch_line(epoch, s.epochs, stats, ev, s.task, s.tokens_per_sample))
            if metrics is not None:
                metrics.evaluation(step, epoch, ev)
            if stop_at is not None and step >= stop_at:
                say(f"stopped at step {step} (train.stop_at_step)")
                break
        if s.save_dir and saved != step:
            save(position)
        engine.close()
    finally:
        if metrics is not None:
            metrics.close()  # also when a stage fails: the curves so far stay on disk
    if not engine.is_driver:
        return None
    summary = Summary(s.method, engine.name, k, boundaries, s.epochs, ev.accuracy, ev.aux_accuracy,
                      stats.samples_per_s, time.perf_counter() - began, stats.stages, s.task, ev.loss, ev.aux_loss,
                      s.tokens_per_sample)
    for line in summary.lines():
        say(line)
    return summary


def _silent(line: str) -> None:
    """Non-driving ranks print nothing."""
