"""Run under `deepspeed --num_gpus K`: the DeepSpeed adapter trains on micro-batches whose sequence length changes
from micro-batch to micro-batch and from step to step.

    deepspeed --num_gpus 2 tests/dist/deepspeed_varlen.py --out OUT

The layers and aux heads are varlen_cases' GPT-2 blocks (identical on every rank); each train_batch takes two
micro-batches: first the steps of varlen_cases.micro_steps() (lengths 32 and 17, 48 and 48, ...), then the whole
batches of varlen_cases.batches() cut in two. Each rank writes its module's tensors to OUT/rank<k>.safetensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from varlen_cases import ROWS, as_steps, batches, build, micro_steps  # noqa: E402

from ppll_ext.deepspeed import LocalPipelineModule, initialize  # noqa: E402

MICRO = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    stages = dist.get_world_size()
    blocks = build("gpt2", stages, MICRO)
    layers = [layer for k in sorted(blocks) for layer in blocks[k].body]
    starts = [0]
    for k in sorted(blocks)[:-1]:
        starts.append(starts[-1] + len(blocks[k].body))
    net = LocalPipelineModule(layers, num_stages=stages, loss_fn=blocks[0].loss_fn,
                              aux_heads=[blocks[k].aux for k in sorted(blocks)[:-1]],
                              partition_method=",".join(map(str, starts)))
    config = {"train_micro_batch_size_per_gpu": ROWS // 2, "gradient_accumulation_steps": MICRO,
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "weight_decay": 0.01, "torch_adam": True}}}
    engine, *_ = initialize(model=net, config=config, model_parameters=list(net.parameters()))
    for micro in micro_steps() + as_steps(batches(), MICRO):
        loss = engine.train_batch(iter(micro) if engine.is_first_stage() else None)
        print(f"stage {engine.stage_id} lengths {[x.shape[1] for x, _ in micro]} loss {float(loss):.4f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in engine.module.state_dict().items()},
              str(out / f"rank{dist.get_rank()}.safetensors"))


if __name__ == "__main__":
    main()
