"""The Megatron-DeepSpeed-style GPT pretraining of pretrain_gpt_stock.py with local learning (PPLL).

    deepspeed --num_gpus 2 examples/megatron_gpt/pretrain_gpt_ppll.py --pipeline-model-parallel-size 2 \
        --deepspeed --deepspeed_config examples/megatron_gpt/ds_config_zero1_bf16.json

Changed (docs/deepspeed.md): GPTModelPipe derives from ppll_ext's LocalPipelineModule instead of
DeepSpeed's PipelineModule and gives every stage but the last a per-token aux head ("lm", sized by a dry forward
of example_input), and the engine comes from ppll_ext.deepspeed.initialize. Each stage then trains on its own loss
and never waits for a later stage; train_batch returns this stage's own loss (its aux head's on every stage but
the last).
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from gpt_model import (
    CrossEntropy,
    EmbeddingPipe,
    GPTDataset,
    LMHeadPipe,
    ParallelTransformerLayerPipe,
    build_data_iterator,
    get_batch_pipe,
)
from torch import nn

from ppll_ext.deepspeed import LocalPipelineModule, initialize


class GPTModelPipe(LocalPipelineModule):
    """GPT-2 as DeepSpeed layer specs, each stage building only its own layers."""

    def __init__(self, args: argparse.Namespace, topology: PipeDataParallelTopology) -> None:
        specs = [LayerSpec(EmbeddingPipe, args.hidden_size, args.padded_vocab_size, args.max_position_embeddings,
                           args.hidden_dropout)]
        for layer_idx in range(args.num_layers):
            specs.append(LayerSpec(ParallelTransformerLayerPipe, args.hidden_size, args.num_attention_heads,
                                   args.ffn_hidden_size, args.layernorm_epsilon, layer_number=layer_idx))
        specs.append(LayerSpec(nn.LayerNorm, args.hidden_size, eps=args.layernorm_epsilon))
        specs.append(LayerSpec(LMHeadPipe, args.hidden_size, args.padded_vocab_size))
        super().__init__(layers=specs, loss_fn=CrossEntropy, topology=topology,
                         partition_method="type:transformer",
                         aux_heads="lm", example_input=torch.zeros(2, args.seq_length, dtype=torch.long))


def get_args() -> argparse.Namespace:
    """Megatron's flags for this model and run, DeepSpeed's --deepspeed/--deepspeed_config, the launcher's
    --local_rank."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--max-position-embeddings", type=int, default=64)
    parser.add_argument("--hidden-dropout", type=float, default=0.0)
    parser.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--train-iters", type=int, default=20)
    parser.add_argument("--eval-iters", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=None, help="overrides zero_optimization.stage")
    parser.add_argument("--local_rank", type=int, default=0)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    args.ffn_hidden_size = 4 * args.hidden_size
    args.padded_vocab_size = 256  # byte-level tokens
    return args


def ds_config(args: argparse.Namespace) -> dict:
    """The --deepspeed_config file with the batch sizes (and --zero-stage, if given) of Megatron's flags."""
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    config["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    config["train_batch_size"] = args.global_batch_size
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    return config


def model_provider(args: argparse.Namespace) -> GPTModelPipe:
    """The pipeline model over K stages x D data-parallel replicas (D = processes / K)."""
    topology = PipeDataParallelTopology(num_pp=args.pipeline_model_parallel_size,
                                        num_dp=dist.get_world_size() // args.pipeline_model_parallel_size)
    return GPTModelPipe(args, topology)


def main() -> None:
    """Build the model and the engine, then train for --train-iters iterations and evaluate."""
    args = get_args()
    deepspeed.init_distributed()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = model_provider(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, _, _ = initialize(model=model, optimizer=optimizer, config=ds_config(args))
    model.set_batch_fn(get_batch_pipe)
    dp_rank, dp_size = model.grid.get_data_parallel_rank(), model.grid.get_data_parallel_world_size()
    train_data_iterator = build_data_iterator(GPTDataset(args.seq_length, "train"), args.micro_batch_size, dp_rank,
                                              dp_size, args.seed)
    valid_data_iterator = build_data_iterator(GPTDataset(args.seq_length, "valid"), args.micro_batch_size, dp_rank,
                                              dp_size, args.seed)

    for iteration in range(1, args.train_iters + 1):
        loss = model.train_batch(data_iter=train_data_iterator)
        print(f" iteration {iteration:8d}/{args.train_iters:8d} | stage {model.stage_id} | lm loss: "
              f"{loss.item():.6E} |", flush=True)
    valid_loss = sum(model.eval_batch(data_iter=valid_data_iterator).item() for _ in range(args.eval_iters))
    print(f" validation loss at the end of training | stage {model.stage_id} | lm loss: "
          f"{valid_loss / args.eval_iters:.6E} |", flush=True)


if __name__ == "__main__":
    main()
