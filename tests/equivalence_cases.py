"""Shared cases of the runtime-equivalence tests: tiny ResNet and ViT jobs on digits and GPT-2 / Llama language
models on pydoc bytes, >= 10 steps."""

from __future__ import annotations

import os

from ppll_ext.config import Config, load_config

DEVICE = os.environ.get("PPLL_TEST_DEVICE", "cpu")
"""Where the equivalence cases train: cpu here; benchmarks/gpu_check.sh sets cuda."""

VARIANTS = {
    "resnet_m1": ["model.name=resnet8", "model.width=8", "local.aux=conv", "local.micro_batches=1"],
    "vit_m1": ["model.name=vit", "model.patch_size=2", "model.depth=4", "model.hidden_dim=32", "model.heads=2",
               "model.mlp_dim=64", "local.aux=vit", "local.partition=uniform", "local.micro_batches=1",
               "optim.name=adamw", "optim.lr=0.001"],
    "vit_m4": ["model.name=vit", "model.patch_size=2", "model.depth=4", "model.hidden_dim=32", "model.heads=2",
               "model.mlp_dim=64", "local.aux=vit", "local.partition=uniform", "local.micro_batches=4",
               "optim.name=adamw", "optim.lr=0.001"],
    "gpt2_m1": ["model.name=gpt2", "model.depth=4", "model.hidden_dim=32", "model.heads=2", "model.mlp_dim=64",
                "data.name=pydoc", "data.seq_len=16", "local.aux=lm", "local.partition=uniform",
                "local.micro_batches=1", "optim.name=adamw", "optim.lr=0.001"],
    "llama_m2": ["model.name=llama", "model.depth=4", "model.hidden_dim=32", "model.heads=2", "model.kv_heads=1",
                 "model.mlp_dim=64", "data.name=pydoc", "data.seq_len=16", "local.aux=lm-blocks",
                 "local.partition=uniform", "local.micro_batches=2", "optim.name=adamw", "optim.lr=0.001"],
}
DEPTHS = (1, 4)


def case_config(variant: str, stages: int, runtime: str, depth: int = 2) -> Config:
    """12 training steps (384 digits or text blocks, batch 32) of `variant` cut into `stages` blocks, one torch
    thread, on DEVICE."""
    return load_config(None, [
        *VARIANTS[variant], f"local.stages={stages}", f"local.runtime={runtime}", f"local.queue_depth={depth}",
        "data.train_subset=384", "data.test_subset=64", "train.batch_size=32", "train.epochs=1",
        "train.threads=1", "train.progress=false", "local.timeout_s=120", f"train.device={DEVICE}",
    ])
