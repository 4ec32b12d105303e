"""DeepSpeedExamples' pipeline_parallelism loop converted to PPLL, for a small decoder LM built from LayerSpecs.

    deepspeed --num_gpus 2 tests/dist/deepspeed_lm.py --steps 6 --out OUT_DIR

Token targets (N, T) travel whole with the activations, `aux_heads="auto"` picks the per-token head (the model's
output is (N, T, V)), the loss is torchtitan's form. The first stage (the embedding alone) is much faster than the
second, and the script returns right after its last train_batch, as stock scripts do: no flush, no barrier.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from pipelining_lm_gpipe import DIM, VOCAB, Block, batches, loss_fn
from safetensors.torch import save_file
from torch import nn

from ppll_ext.deepspeed import LayerSpec, LocalPipelineModule, initialize

LR, WEIGHT_DECAY, BASE_SEED, SIZE = 3e-3, 0.01, 1234, 8
PARTS = {2: [0, 1, 6], 3: [0, 1, 4, 6]}
"""Start layers per stage count; stage 0 is the embedding alone, the fastest stage."""


class Head(nn.Module):
    """Final norm and output layer: (N, T, DIM) -> (N, T, VOCAB) next-token scores."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))


def specs() -> list[LayerSpec]:
    """The model as DeepSpeed layer specs (built per stage, each layer from its own seed)."""
    return [LayerSpec(nn.Embedding, VOCAB, DIM), *(LayerSpec(Block) for _ in range(4)), LayerSpec(Head)]


def config(micro: int) -> dict:
    return {"train_micro_batch_size_per_gpu": SIZE, "gradient_accumulation_steps": micro, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
            "steps_per_print": 10 ** 9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", type=int, default=2, help="micro-batches of SIZE sequences per train_batch")
    parser.add_argument("--soft", action="store_true", help="soft (float) targets instead of token ids")
    parser.add_argument("--out", help="folder for each rank's trained tensors")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    example = batches(1, 2)[0][0]
    stages = dist.get_world_size()
    net = LocalPipelineModule(specs(), num_stages=stages, loss_fn=loss_fn, aux_heads="auto", example_input=example,
                              partition_method=",".join(map(str, PARTS[stages][:-1])), seed_layers=True,
                              base_seed=BASE_SEED)
    engine, *_ = initialize(model=net, config=config(args.micro), model_parameters=[p for p in net.parameters()])
    for x, y in batches(args.steps, args.micro * SIZE, args.soft):
        data = iter(list(zip(x.split(SIZE), y.split(SIZE), strict=True)))
        loss = engine.train_batch(data if engine.is_first_stage() else None)
        print(f"stage {engine.stage_id} loss {float(loss):.4f}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().clone() for k, v in engine.module.state_dict().items()},
                  str(Path(args.out) / f"rank{dist.get_rank()}.safetensors"))


if __name__ == "__main__":
    main()
