"""Checkpoints: the layout and checksums (layout), saving and committing (save), loading and resume checks (load),
export (export), the run directory's lock (lock) and DeepSpeed import (deepspeed_import).

The public names of every module are re-exported here: `from ppll_ext import checkpoint as ckpt; ckpt.commit(...)`.
"""

from __future__ import annotations

from ppll_ext.checkpoint.deepspeed_import import deepspeed_folder, import_deepspeed, write_imported
from ppll_ext.checkpoint.export import check_output_folder, export
from ppll_ext.checkpoint.layout import (
    AUX,
    CHECKSUMS,
    HEADER_BYTES,
    HF_FILES,
    INDEX,
    SINGLE,
    STATE_DIR,
    SUPERSEDED,
    TRAINER_STATE,
    Position,
    StageManifest,
    check_against,
    read_json,
    shard_name,
    step_folder,
    verify,
    warn_unverified,
)
from ppll_ext.checkpoint.load import (
    OPTIMIZER_SETTINGS,
    RESUME_SETTINGS,
    check_cut,
    check_resume_settings,
    checkpoints,
    load_aux,
    load_language_model,
    load_model_state,
    load_saved_tokenizer,
    load_stage,
    read_trainer_state,
    resolve,
)
from ppll_ext.checkpoint.lock import LOCK, RunLock, check_run_dir, lock_run
from ppll_ext.checkpoint.save import check_free_space, commit, discard, stage_bytes, supersede, write_stage

__all__ = [
    "AUX", "CHECKSUMS", "HEADER_BYTES", "HF_FILES", "INDEX", "LOCK", "OPTIMIZER_SETTINGS", "Position",
    "RESUME_SETTINGS", "RunLock", "SINGLE", "STATE_DIR", "SUPERSEDED", "StageManifest", "TRAINER_STATE",
    "check_against", "check_cut", "check_free_space", "check_output_folder", "check_resume_settings",
    "check_run_dir", "checkpoints", "commit", "deepspeed_folder", "discard", "export", "import_deepspeed",
    "load_aux", "load_language_model", "load_model_state", "load_saved_tokenizer", "load_stage", "lock_run",
    "read_json", "read_trainer_state", "resolve", "shard_name", "stage_bytes", "step_folder", "supersede", "verify",
    "warn_unverified", "write_imported", "write_stage",
]
