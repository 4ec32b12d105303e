"""Shared cases of the variable-sequence-length tests: tiny GPT-2 (learned positions) and Llama (rotary positions,
"lm-blocks" aux heads) cut into local blocks, batches of byte tokens whose length changes from step to step (and,
where micro-batches are given one by one, from micro-batch to micro-batch), and sequential local learning over
them as the reference."""

from __future__ import annotations

from pydoc_data.topics import topics

import torch

from ppll_ext.build import build_blocks, build_layered
from ppll_ext.config import Config, load_config
from ppll_ext.core import LocalBlock
from ppll_ext.runtime import split_micro

Batch = tuple[torch.Tensor, torch.Tensor]
"""(inputs, targets) of one batch or micro-batch; for the next-token loss the targets are the inputs."""

MAX_LEN = 64
"""Positions the models cover; every length below is at most this."""
LENGTHS = (32, 48, 17, 64, 5, 40)
"""Sequence length of each training step."""
MICRO_LENGTHS = ((32, 17), (48, 48), (5, 64), (40, 23))
"""Sequence length of each micro-batch of each step, where micro-batches are fed one by one."""
EVAL_LENGTHS = (24, 9, 64)
"""Sequence length of each evaluation batch."""
ROWS = 8
"""Sequences per batch (micro-batch, in MICRO_LENGTHS)."""
SEED = 3
MODELS = {
    "gpt2": ["model.name=gpt2", "local.aux=lm"],
    "llama": ["model.name=llama", "model.kv_heads=1", "local.aux=lm-blocks"],
}


def config(model: str, stages: int, micro: int) -> Config:
    """A 2-block model of width 32 cut into `stages` blocks (uniform), AdamW at a constant rate, one thread."""
    return load_config(None, [
        *MODELS[model], "model.depth=2", "model.hidden_dim=32", "model.heads=2", "model.mlp_dim=64",
        f"model.max_positions={MAX_LEN}", "data.name=pydoc", f"data.seq_len={MAX_LEN}", f"local.stages={stages}",
        f"local.micro_batches={micro}", "local.partition=uniform", "optim.name=adamw", "optim.lr=0.003",
        "optim.weight_decay=0.01", "optim.schedule=constant", "train.threads=1", f"train.seed={SEED}",
    ])


def build(model: str, stages: int, micro: int) -> dict[int, LocalBlock]:
    """The blocks of `model` cut into `stages`, identical in every process (same seeds)."""
    cfg = config(model, stages, micro)
    layered = build_layered(cfg, num_classes=256, seq_len=MAX_LEN)
    _, blocks = build_blocks(cfg, layered, torch.zeros(2, 16, dtype=torch.int64), total_steps=100)
    return blocks


def tokens(lengths: tuple[int, ...], rows: int = ROWS, offset: int = 0) -> list[torch.Tensor]:
    """One (rows, T) batch of byte tokens of Python's documentation per length T (the next-token loss shifts them:
    targets = inputs)."""
    text = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    out, at = [], offset
    for length in lengths:
        chunk = torch.frombuffer(bytearray(text[at:at + rows * length]), dtype=torch.uint8).long()
        out.append(chunk.view(rows, length))
        at += rows * length
    return out


def batches() -> list[Batch]:
    """The training batches, one length per step (LENGTHS)."""
    return [(x, x) for x in tokens(LENGTHS)]


def micro_steps() -> list[list[Batch]]:
    """The training steps given as micro-batches of different lengths (MICRO_LENGTHS)."""
    flat = tokens(tuple(t for step in MICRO_LENGTHS for t in step), rows=ROWS // 2, offset=100_000)
    out, at = [], 0
    for step in MICRO_LENGTHS:
        out.append([(x, x) for x in flat[at:at + len(step)]])
        at += len(step)
    return out


def eval_batches() -> list[Batch]:
    """Held-out batches of changing lengths (EVAL_LENGTHS)."""
    return [(x, x) for x in tokens(EVAL_LENGTHS, offset=200_000)]


def train_sequential(blocks: dict[int, LocalBlock], steps: list[list[Batch]]) -> None:
    """Sequential local learning: every block in turn trains on each step's micro-batches (block k on block k-1's
    detached outputs) and steps once per step, in one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for micro in steps:
            for k in sorted(blocks):
                micro = [(blocks[k].train_step(x, y, n_micro=len(micro))[0], y) for x, y in micro]
    finally:
        torch.set_num_threads(threads)


def as_steps(whole: list[Batch], micro: int) -> list[list[Batch]]:
    """Whole batches cut into `micro` micro-batches by rows, as every runtime cuts them."""
    return [split_micro(x, y, micro) for x, y in whole]


def weights(block: LocalBlock) -> dict[str, torch.Tensor]:
    """A block's trained tensors (body and aux head), contiguous copies on the CPU."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in block.state_dict().items()}
