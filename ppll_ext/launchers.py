"""Settings that launchers pass through the environment: Accelerate's config, torchrun's ranks.

`accelerate launch` refuses nothing here: with a MULTI_CPU / MULTI_GPU config it starts the
processes through torch's launcher, and its settings arrive as ACCELERATE_* variables, which
this module maps onto our config (PPLL settings themselves stay in our YAML, since Accelerate
rejects unknown keys in its own files).
"""

from __future__ import annotations

import os

import torch

from ppll_ext.config import Config

_PRECISION = {"bf16": "bf16", "fp16": "fp16", "no": "none"}


def apply_launcher_env(cfg: Config) -> list[str]:
    """Under `accelerate launch`: adopt its mixed precision (unless the config sets one), its CPU/GPU choice (GPU
    when it did not ask for the CPU and one is present) and its DeepSpeed selection (the DeepSpeed adapter with its
    ds_config file); returns what changed."""
    changed = []
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision in _PRECISION and cfg.train.autocast == "none" and _PRECISION[precision] != "none":
        cfg.train.autocast = _PRECISION[precision]
        changed.append(f"train.autocast={cfg.train.autocast}")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and cfg.local.engine != "deepspeed":
        cfg.local.engine = "deepspeed"
        changed.append("local.engine=deepspeed")
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if ds_file and cfg.local.deepspeed_config is None:
            cfg.local.deepspeed_config = ds_file
            changed.append(f"local.deepspeed_config={ds_file}")
    if precision is not None:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
        device = "cuda" if not use_cpu and torch.cuda.is_available() else "cpu"
        if device != cfg.train.device:
            cfg.train.device = device
            changed.append(f"train.device={device}")
    return changed


def is_secondary_rank() -> bool:
    """True on every launched rank but the first: they stay silent about errors all ranks hit alike."""
    return int(os.environ.get("RANK", "0")) != 0
