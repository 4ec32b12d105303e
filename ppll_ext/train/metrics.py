"""Training curves on disk: metrics.jsonl (always) and TensorBoard event files (when tensorboard is installed).

Written by the driving rank only, from the one training loop. Per optimizer step: every stage's mean loss and
learning rate, gathered with the stats each segment already returns; the step's time is when stage 0 (which
runs in the driving process) finished it, and samples/s is the throughput of the segment the step belongs to.
Per evaluation: loss and accuracy (perplexity for language models) of the model and of every aux head.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from ppll_ext.checkpoint import SUPERSEDED
from ppll_ext.errors import ConfigError
from ppll_ext.paths import check_output_file, is_no_space, unwritable, write_atomically
from ppll_ext.runtime import EpochStats, EvalResult

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
EVENTS = "events.out.tfevents."


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of the one in run folder `path`); ConfigError naming a missing, empty or
    garbled file."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    try:
        records = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        for r in records:
            if r["kind"] not in ("step", "eval") or not isinstance(r["step"], int):
                raise ValueError(f"unknown record {r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{str(p)!r} is not a readable metrics.jsonl of a run ({type(exc).__name__}: {exc}); give "
                          f"a run folder of ppll train --save-dir (or train.log_dir) or its metrics.jsonl") from None
    if not records:
        raise ConfigError(f"{str(p)!r} holds no metrics; train a run with --save-dir (or train.log_dir) first")
    return records


def check_log_dir(folder: str | os.PathLike, key: str = "train.log_dir") -> None:
    """ConfigError naming `key` unless the curves can be written in `folder`: a writable folder (or one that can be
    created) whose metrics.jsonl, if there is one, is a regular file (a FIFO there would block the run)."""
    reason = unwritable(folder)
    if reason is not None:
        raise ConfigError(f"{key}={str(folder)!r} cannot be used: {reason}; choose another {key}", key=key)
    check_output_file(Path(folder) / METRICS, f"the training curves {str(Path(folder) / METRICS)!r} ({key})", key=key)


class MetricsLog:
    """Appends a run's step and evaluation records to `folder`/metrics.jsonl and, if possible, TensorBoard."""

    def __init__(self, folder: str | os.PathLike, start_step: int, task: str) -> None:
        self.folder, self.task = Path(folder), task
        path = self.folder / METRICS
        check_log_dir(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.offset_s = self._keep_until(path, start_step) if start_step else self._set_aside()
            self.file = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"the training curves cannot be written to {str(path)!r} ({exc.strerror}); set "
                              f"train.log_dir to a writable folder", key="train.log_dir") from None
        self.began, self.wall = time.perf_counter(), time.time()
        self.tb = _summary_writer(self.folder, start_step)

    def _keep_until(self, path: Path, step: int) -> float:
        """A resumed run: drop the records after `step` that an earlier run wrote; the kept records' last time."""
        kept = [r for r in read_metrics(path) if r["step"] <= step] if path.exists() else []
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), f"the training curves "
                         f"{str(path)!r} (train.log_dir)", key="train.log_dir")
        return max((r["time_s"] for r in kept), default=0.0)

    def _set_aside(self) -> float:
        """A fresh run: move an earlier run's curves to superseded/ (never deleted), start from time 0."""
        old = [p for p in self.folder.iterdir() if p.name == METRICS or p.name.startswith(EVENTS)]
        if old:
            aside = self.folder / SUPERSEDED
            aside.mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for p in old:
                os.replace(p, aside / f"{p.name}.{stamp}")
            log.warning("a new run in %s: moved the earlier run's %s to %s (not deleted)", self.folder,
                        ", ".join(p.name for p in old), aside)
        return 0.0

    def _time(self, clock: float) -> float:
        """Seconds since the run began (continuing a resumed run's clock) of a time.perf_counter() reading."""
        return self.offset_s + clock - self.began

    def steps(self, first_step: int, epoch: int, stats: EpochStats) -> None:
        """One record per optimizer step of a trained segment that began after step `first_step`."""
        lines = []
        for i, end in enumerate(stats.stages[0].step_end_s):
            step, t = first_step + i + 1, self._time(end)
            loss = [st.step_loss[i] for st in stats.stages]
            lr = [st.step_lr[i] for st in stats.stages]
            lines.append(json.dumps({"kind": "step", "step": step, "epoch": epoch, "time_s": round(t, 6),
                                     "loss": loss, "lr": lr, "samples_per_s": stats.samples_per_s}) + "\n")
            if self.tb is not None:
                wall = self.wall + t - self.offset_s
                for k, (v, r) in enumerate(zip(loss, lr, strict=True)):
                    self.tb.add_scalar(f"loss/stage{k}", v, step, wall)
                    self.tb.add_scalar(f"lr/stage{k}", r, step, wall)
                self.tb.add_scalar("throughput/samples_per_s", stats.samples_per_s, step, wall)
        self._append("".join(lines))

    def evaluation(self, step: int, epoch: int, ev: EvalResult) -> None:
        """One record of an evaluation after `step`; flushes both files so a killed run keeps its curves."""
        t = self._time(time.perf_counter())
        rec: dict[str, Any] = {"kind": "eval", "step": step, "epoch": epoch, "time_s": round(t, 6), "loss": ev.loss,
                               "accuracy": ev.accuracy, "aux_loss": ev.aux_loss, "aux_accuracy": ev.aux_accuracy}
        if self.task == "lm":
            rec.update(perplexity=ev.perplexity, aux_perplexity=ev.aux_perplexity)
        self._append(json.dumps(rec) + "\n")
        if self.tb is not None:
            wall = self.wall + t - self.offset_s
            for name in ("loss", "accuracy", "perplexity"):
                if name in rec:
                    self.tb.add_scalar(f"eval/{name}", rec[name], step, wall)
                    for k, v in enumerate(rec[f"aux_{name}"]):
                        self.tb.add_scalar(f"eval/aux{k}_{name}", v, step, wall)
            self.tb.flush()

    def _append(self, text: str) -> None:
        """Append records to metrics.jsonl and flush; on a full disk say so once and train on without curves (a
        checkpoint that cannot be saved then fails the run with its own message)."""
        if self.file is None:
            return
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as exc:
            if not is_no_space(exc):
                raise
            log.warning("no space left on the device of %s: %s is not written any further; free space there or set "
                        "train.log_dir elsewhere", self.folder, METRICS)
            with suppress(OSError):
                self.file.close()
            self.file = None

    def close(self) -> None:
        """Flush and close the files."""
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _summary_writer(folder: Path, start_step: int) -> Any:
    """A TensorBoard SummaryWriter in `folder` (a resumed run hides the earlier run's events after `start_step`),
    or None with one log line when tensorboard is not installed (typed Any: tensorboard is an optional extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("metrics.jsonl only: TensorBoard event files need tensorboard (pip install ppll_ext[tensorboard])")
        return None
    if start_step:
        # TensorBoard reads event files in name order, "events.out.tfevents.<unix second>.<host>.<pid>.<counter>", and
        # the purge works only if the resumed run's file comes last: in the second of an earlier file, another pid or
        # counter ("10" < "9") could sort it first, so it is opened in a later second.
        stamps = [int(p.name.split(".")[3]) for p in folder.glob(EVENTS + "*") if p.name.split(".")[3].isdigit()]
        while stamps and time.time() < max(stamps) + 1:
            time.sleep(0.05)
    return SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
