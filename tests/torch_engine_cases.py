"""Shared cases of the `--engine torch` tests: every schedule on the default job (configs/default_digits.yaml on a
203-image subset: 4 steps per epoch, the last batch of 11 split unevenly) and on the GPT-2 job
(configs/gpt2_tiny_text.yaml on 70 blocks of 32 tokens: 3 steps, the last of 6), run by
tests/dist/torch_engine_worker.py under one torchrun launch of 2 ranks."""

from __future__ import annotations

from pathlib import Path

from ppll_ext.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = {"GPipe": (2, 2), "1F1B": (2, 2), "Interleaved1F1B": (4, 2), "InterleavedZeroBubble": (4, 2),
             "ZBVZeroBubble": (4, 2), "DualPipeV": (4, 4), "PPLL": (2, 2)}
"""schedule -> (local.stages, local.micro_batches) on 2 ranks: 2 stages per rank for the multi-stage schedules."""
EPOCHS, STEPS, SAVE_EVERY = 2, 8, 3
"""The default job's run: 2 epochs of 4 steps, a checkpoint every 3 steps (3, 6 and the end, 8)."""
NAN_STEP = 2
"""The step (0-based) whose loss a fault makes NaN in the train.on_nan=skip run."""


def default_job(stages: int, micro: int, *extra: str) -> Config:
    """The default job, cut into `stages` stages of `micro` micro-batches, 2 epochs on 203 images."""
    return load_config(str(REPO / "configs" / "default_digits.yaml"), [
        "data.train_subset=203", "data.test_subset=60", f"train.epochs={EPOCHS}", "train.progress=false",
        f"local.stages={stages}", f"local.micro_batches={micro}", "local.timeout_s=120", *extra])


def gpt2_job(stages: int, micro: int, *extra: str) -> Config:
    """The GPT-2 job on 32-token blocks, one epoch of 3 steps."""
    return load_config(str(REPO / "configs" / "gpt2_tiny_text.yaml"), [
        "data.seq_len=32", "data.train_subset=70", "data.test_subset=16", "train.epochs=1", "train.progress=false",
        f"local.stages={stages}", f"local.micro_batches={micro}", "local.timeout_s=120", *extra])


def torch_engine(schedule: str) -> list[str]:
    """The overrides that run `schedule` with the torch engine."""
    return ["local.engine=torch", f"local.schedule={schedule}"]


def checkpoint(run: Path, step: int) -> Path:
    """The committed checkpoint of `step` in run folder `run`."""
    return run / f"step-{step:06d}"
