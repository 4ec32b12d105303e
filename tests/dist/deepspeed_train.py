"""A small CNN on 8x8 digits trained with ppll_ext.deepspeed (or the stock PipelineEngine), one stage per rank.

    deepspeed --num_gpus 2 tests/dist/deepspeed_train.py --stages 2 --steps 12 --out OUT_DIR

Writes per rank `rank{R}.safetensors` (the stage's module tensors, aux head included, and the optimizer state)
and `rank{R}.json` (stage, replica, partition, losses, gradient norms, step counters, optimizer-state bytes held,
fp16 loss scale)
for the tests to compare. `--zero 1` shards each stage's optimizer states over its replicas (4 processes, 2 stages:
2 replicas per stage); `--fp16` trains with DeepSpeed's fp16 optimizer and dynamic loss scaling, and
`--overflow S:T[:R]` makes stage S's gradients infinite at train_batch T (a hook on one of its parameters; on
replica R only if given).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors.torch import save_file
from torch import nn

from ppll_ext.config import ModelConfig
from ppll_ext.deepspeed import (
    LocalPipelineEngine,
    LocalPipelineModule,
    build_stage_aux_head,
    initialize,
    release_shm_buffer,
)
from ppll_ext.models import build_model

LR, BETAS, EPS, WEIGHT_DECAY, WARMUP = 3e-3, (0.9, 0.999), 1e-8, 0.01, 8
AUX_HIDDEN = 32


def make_layers() -> list[nn.Module]:
    """The model as an ordered layer list (identical weights in every process).

    Convolutions before BatchNorm have no bias: its gradient is zero up to rounding, which Adam would amplify into
    steps that depend on the summation order (data-parallel all-reduce vs one process).
    """
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()),
        nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10)),
    ]


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 of scikit-learn's bundled digits, normalised, in a fixed order: read from its CSV (what its
    load_digits reads) without importing scikit-learn, which costs each rank seconds."""
    root = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    data = np.loadtxt(root / "datasets" / "data" / "digits.csv.gz", delimiter=",", dtype=np.float32)
    x = torch.from_numpy(data[:, :-1]).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return x, torch.from_numpy(data[:, -1].astype(np.int64))


def micro_batches(step: int, replica: int, replicas: int, micro: int, size: int,
                  nan_step: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The `micro` micro-batches that data-parallel replica `replica` trains on at train_batch `step`; at
    `nan_step` every label is CrossEntropyLoss's ignore_index, so every stage's loss is NaN (0 / 0)."""
    x, y = digits()
    start = (step * replicas + replica) * micro * size
    out = [(x[start + j * size: start + (j + 1) * size], y[start + j * size: start + (j + 1) * size])
           for j in range(micro)]
    if step == nan_step:
        out = [(xm, torch.full_like(ym, -100)) for xm, ym in out]
    return out


def lr_factor(step: int) -> float:
    """Linear warm-up over WARMUP optimizer steps."""
    return min(1.0, (step + 1) / WARMUP)


def ds_config(micro: int, size: int, clip: float, bf16: bool, reentrant: bool = True, zero: int = 0,
              fp16: bool = False) -> dict:
    """The ds_config of the tests: torch AdamW, gradient_accumulation_steps = micro-batches per train_batch."""
    return {
        "zero_optimization": {"stage": zero},
        # hysteresis 1: ZeRO's loss scaler halves the scale at the first overflow, as FP16_Optimizer does
        "fp16": {"enabled": fp16, "initial_scale_power": 8, "hysteresis": 1},
        "pipeline": {"use_reentrant": reentrant},
        "train_micro_batch_size_per_gpu": size,
        "gradient_accumulation_steps": micro,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                  "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
        "gradient_clipping": clip,
        "steps_per_print": 1000,
        "bf16": {"enabled": bf16},
        # DeepSpeed keeps buffers in fp32 unless told otherwise: BatchNorm then fails on fp16/bf16 parameters
        **({"data_types": {"buffer_dtype": "fp16" if fp16 else "bf16"}} if fp16 or bf16 else {}),
    }


def state(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """The stage's module tensors (aux head included) and, for torch's AdamW (under ZeRO-1 gathered from the stage's
    replicas: every rank calls this at the same points), the optimizer state."""
    out = {k: v.detach().float().contiguous().clone() for k, v in engine.module.state_dict().items()}
    opt = None
    if isinstance(engine, LocalPipelineEngine) and (engine.zero_sharded or isinstance(engine.optimizer,
                                                                                        torch.optim.AdamW)):
        opt = engine.optimizer_state_dict()
    elif isinstance(engine.optimizer, torch.optim.AdamW):
        opt = engine.optimizer.state_dict()
    for i, s in (opt or {"state": {}})["state"].items():
        out.update({f"opt.{i}.{k}": torch.as_tensor(v).float().reshape(-1).clone() for k, v in s.items()})
    return out


def optimizer_bytes(engine: deepspeed.DeepSpeedEngine) -> int:
    """Bytes of optimizer-state tensors this process holds (exp_avg, exp_avg_sq: a 1/D shard under ZeRO-1)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's wrappers keep torch's inside
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator declares fp16 unsupported unless oneDNN has fp16 kernels (AVX512-FP16/AMX-FP16),
    and its engine then refuses fp16; torch's own CPU kernels compute fp16 correctly (slowly), so the test lets
    DeepSpeed's fp16 optimizer and loss scaler run on them."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        accelerator.is_fp16_supported = lambda: True
        accelerator.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]


def overflow_hook(engine: LocalPipelineEngine) -> torch.utils.hooks.RemovableHandle:
    """Make the gradient of the stage's first parameter infinite in the coming backward passes."""
    param = next(p for p in engine.module.parameters() if p.requires_grad)
    return param.register_hook(lambda g: torch.full_like(g, float("inf")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cnn", help="cnn (make_layers) or a ppll_ext model: resnet8, vit, ...")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="train_batch calls")
    parser.add_argument("--start", type=int, default=0, help="index of the first train_batch's data")
    parser.add_argument("--micro", type=int, default=2, help="micro-batches per train_batch")
    parser.add_argument("--size", type=int, default=16, help="micro-batch size")
    parser.add_argument("--aux", default="conv", help="auto | conv | list (modules built by the script)")
    parser.add_argument("--clip", type=float, default=0.0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--config", help="a ds_config JSON file instead of the built-in one")
    parser.add_argument("--engine", choices=["ppll", "stock"], default="ppll")
    parser.add_argument("--save-ckpt", help="checkpoint folder, written after --save-at steps")
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--load-ckpt", help="checkpoint folder to resume from before training")
    parser.add_argument("--eval", action="store_true", help="run eval_batch after training")
    parser.add_argument("--checkpoint-interval", type=int, default=0, help="activation_checkpoint_interval")
    parser.add_argument("--non-reentrant", action="store_true", help="ds_config pipeline.use_reentrant=false")
    parser.add_argument("--nan-step", type=int, help="a train_batch whose labels make every stage's loss NaN")
    parser.add_argument("--on-nan", default="error", choices=["error", "skip"])
    parser.add_argument("--zero", type=int, default=0, help="zero_optimization.stage")
    parser.add_argument("--fp16", action="store_true", help="DeepSpeed's fp16 with dynamic loss scaling")
    parser.add_argument("--overflow", help="S:T[:R]: stage S's (replica R's) gradients are infinite at train_batch T")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fp16:
        allow_fp16_on_cpu()
    deepspeed.init_distributed()
    release_shm_buffer()
    rank = dist.get_rank()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.model == "cnn":
        layers = make_layers()
    else:
        torch.manual_seed(0)
        cfg = ModelConfig(name=args.model, width=8, hidden_dim=32, mlp_dim=64, depth=3, heads=2)
        layers = build_model(cfg, in_channels=1, image_size=8, num_classes=10).layers
    x_all, _ = digits()
    example = x_all[:2]
    if args.engine == "stock":
        net = deepspeed.PipelineModule(layers, num_stages=args.stages, loss_fn=nn.CrossEntropyLoss())
        engine, *_ = deepspeed.initialize(model=net, config=args.config,
                                          model_parameters=[p for p in net.parameters() if p.requires_grad])
    else:
        parts = [round(i * len(layers) / args.stages) for i in range(args.stages + 1)]
        aux = args.aux
        if aux == "list":
            aux = [build_stage_aux_head(layers, s, parts, "conv", example, hidden=AUX_HIDDEN, seed=0)
                   for s in range(args.stages - 1)]
        partition = ",".join(str(p) for p in parts[:-1]) if args.aux == "list" else "parameters"
        net = LocalPipelineModule(layers, num_stages=args.stages, loss_fn=nn.CrossEntropyLoss(), aux_heads=aux,
                                  example_input=example, aux_hidden=AUX_HIDDEN, partition_method=partition,
                                  on_nan=args.on_nan, activation_checkpoint_interval=args.checkpoint_interval)
        warmup = None if args.config else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor))
        conf = ds_config(args.micro, args.size, args.clip, args.bf16, reentrant=not args.non_reentrant,
                         zero=args.zero, fp16=args.fp16)
        engine, *_ = initialize(model=net, config=args.config or conf,
                                model_parameters=[p for p in net.parameters() if p.requires_grad],
                                lr_scheduler=warmup)
    stage, replica, replicas = engine.stage_id, engine.grid.data_parallel_id, engine.grid.data_parallel_size
    micro, size = engine.micro_batches, engine.micro_batch_size
    info: dict = {"rank": rank, "stage": stage, "replica": replica, "parts": [int(p) for p in engine.module.parts],
                  "losses": [], "grad_norms": []}

    if args.load_ckpt:
        engine.load_checkpoint(args.load_ckpt)
        save_file(state(engine), str(out / f"loaded_rank{rank}.safetensors"))
        info["loaded_steps"], info["loaded_samples"] = engine.global_steps, engine.global_samples
    overflow = [int(v) for v in args.overflow.split(":")] if args.overflow else [-1, -1]
    overflow_replicas = overflow[2:] or range(replicas)
    start = time.perf_counter()
    for step in range(args.start, args.start + args.steps):
        data = iter(micro_batches(step, replica, replicas, micro, size, args.nan_step))
        due = [stage, step] == overflow[:2] and replica in overflow_replicas
        hook = overflow_hook(engine) if due else None
        # PPLL: only the first stage reads data, labels travel with the activations; stock also feeds the last.
        info["losses"].append(float(engine.train_batch(data if stage == 0 or args.engine == "stock" else None)))
        norm = engine.get_global_grad_norm()
        info["grad_norms"].append(None if norm is None else float(norm))
        if hook is not None:
            hook.remove()
        if args.save_ckpt and step + 1 - args.start == args.save_at:
            engine.save_checkpoint(args.save_ckpt, tag=f"step{step + 1}")
            save_file(state(engine), str(out / f"ckpt_rank{rank}.safetensors"))
    info["seconds"] = time.perf_counter() - start
    if args.eval:
        data = iter(micro_batches(args.start + args.steps, replica, replicas, micro, size))
        info["eval_loss"] = float(engine.eval_batch(data if stage == 0 else None))
    info["global_steps"], info["global_samples"] = engine.global_steps, engine.global_samples
    info["lr"] = engine.get_lr()[0]
    info["finite"] = all(math.isfinite(v) for v in info["losses"])
    if args.engine == "ppll":
        info["skipped_steps"] = engine.block.skipped_steps
        info["loss_scale"] = engine.block.updater.loss_scale
    info["optimizer_bytes"] = optimizer_bytes(engine)
    info["optimizer"] = type(engine.optimizer).__name__
    info["trainable_numel"] = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    save_file(state(engine), str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
