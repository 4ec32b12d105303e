"""The benchmarks' one model registry: each model's settings, the job every method of a measurement runs, synthetic
batches of its data's shape, and the profiled split that every method of a comparison shares."""

from __future__ import annotations

import torch

from ppll_ext.build import build_layered, stage_plan
from ppll_ext.config import Config, load_config
from ppll_ext.core import PartitionPlan

MODELS = {
    "resnet32": ["model.name=resnet32", "local.aux=conv"],
    "vit": ["model.name=vit", "model.patch_size=4", "model.depth=6", "model.hidden_dim=192", "model.heads=3",
            "model.mlp_dim=384", "local.aux=vit", "optim.name=adamw", "optim.lr=0.001"],
    # configs/gpt2_tiny_text.yaml's model: 4 blocks of width 128, context 128, byte-level tokens.
    "gpt2": ["model.name=gpt2", "model.depth=4", "model.hidden_dim=128", "model.heads=4", "model.mlp_dim=512",
             "data.name=pydoc", "data.seq_len=128", "local.aux=lm", "optim.name=adamw", "optim.lr=0.002"],
}
"""The throughput benchmarks' models (their defaults)."""
MEMORY_MODELS = {
    "resnet110": ["model.name=resnet110", "local.aux=conv"],
    "resnet8": ["model.name=resnet8", "local.aux=conv"],  # a small model for smoke runs and tests
}
"""Models the workers also know, beyond the throughput benchmarks' defaults (the memory benchmark uses them)."""
ALL_MODELS = {**MODELS, **MEMORY_MODELS}
LM_MODELS = ("gpt2",)
SEQ_LEN, VOCAB = 128, 256

ACCURACY_JOB = ("configs/resnet32_cifar10_k4.yaml",
                ["model.name=resnet32", "local.stages=4", "local.partition=profile", "local.aux=conv",
                 "local.runtime=processes", "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9",
                 "optim.nesterov=true", "optim.weight_decay=0.0001", "optim.schedule=cosine", "train.epochs=160",
                 "train.batch_size=128"])
"""The accuracy runs' job: (the experiment file of the source tree it equals, the same settings as `--set` values,
so that an installed package needs no configs/ folder). tests/test_bench.py checks that they are equal."""
LM_JOB = ("configs/gpt2_tiny_text.yaml",
          ["model.name=gpt2", "model.depth=4", "model.hidden_dim=128", "model.heads=4", "model.mlp_dim=512",
           "data.name=pydoc", "data.tokenizer=byte", "data.seq_len=128", "local.stages=2", "local.partition=uniform",
           "local.aux=lm", "local.runtime=processes", "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.01",
           "optim.schedule=cosine", "optim.warmup_steps=50", "optim.grad_clip=1.0", "train.epochs=4",
           "train.batch_size=32", "train.eval_batch_size=64"])
"""The language-model quality runs' job, as ACCURACY_JOB."""


def model_shape(model: str) -> dict[str, int]:
    """build_layered's data-shape arguments for `model`: CIFAR-10 images or byte-level token blocks."""
    if model in LM_MODELS:
        return {"num_classes": VOCAB, "seq_len": SEQ_LEN}
    return {"in_channels": 3, "image_size": 32, "num_classes": 10}


def bench_config(model: str, method: str, stages: int, batch: int, partition: str = "profile",
                 micro: int = 1, checkpoint: bool = False) -> Config:
    """The job every method runs: `model` cut into `stages` blocks of `micro` micro-batches, one torch thread
    (`method`: bp or a runtime; `checkpoint`: local.checkpoint_activations)."""
    runtime = "sequential" if method == "bp" else method
    return load_config(None, ["data.name=cifar10", *ALL_MODELS[model], f"local.stages={stages}",
                              f"local.runtime={runtime}", f"local.partition={partition}",
                              f"local.micro_batches={micro}",
                              f"train.method={'bp' if method == 'bp' else 'local'}", f"train.batch_size={batch}",
                              "train.threads=1", f"local.checkpoint_activations={str(checkpoint).lower()}"])


def synthetic_batches(n: int, batch: int, seed: int = 0, model: str = "resnet32"
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` CIFAR-10-shaped batches (normalised noise, random labels), or for a language model random token blocks
    with themselves as targets (the next-token shift is inside the loss)."""
    gen = torch.Generator().manual_seed(seed)
    if model in LM_MODELS:
        return [(ids, ids.clone()) for ids in (torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=gen)
                                               for _ in range(n))]
    return [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def profiled_plan(model: str, stages: int, batch: int) -> PartitionPlan:
    """Cut the model once by measured layer + aux-head + send time (one thread), so every method uses the same
    split; the plan also holds each stage's predicted seconds per batch of `batch` rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = bench_config(model, "sequential", stages, batch)
        layered = build_layered(cfg, **model_shape(model))
        example = synthetic_batches(1, batch, seed=1, model=model)[0][0]
        return stage_plan(cfg, layered, example)
    finally:
        torch.set_num_threads(threads)


def profiled_partition(model: str, stages: int, batch: int) -> str:
    """The start layers of profiled_plan's split, as local.partition takes them (e.g. "0,6")."""
    return profiled_plan(model, stages, batch).starts


def describe_plan(plan: PartitionPlan) -> str:
    """One line: start layers, then each stage's predicted milliseconds and share of the bottleneck."""
    shares = plan.shares() or []
    times = ", ".join(f"{s.total_s * 1e3:.1f} ms ({share:.0%})" for s, share in zip(plan.stages or [], shares))
    return f"stages start at layers {plan.starts} ({plan.method}; predicted per micro-batch: {times or 'not timed'})"
