"""Bad arguments to ppll_ext.deepspeed raise ConfigError on every rank (run with deepspeed --num_gpus 2), and a NaN
local loss with the default on_nan="error" raises a PipelineError naming the stage and the step. Arguments of the
engine and of its calls (queue_depth, timeout_s, num_micro_batches, join_step) are checked before any work.

Rank 0 prints one `ok <case>: <message>` line per case that raised as expected (for the NaN case and the uneven
train_batch calls every rank prints its own line), `FAIL <case>` otherwise; a rank on which some case did not raise exits with status 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.pipe import TiedLayerSpec
from torch import nn

from ppll_ext.deepspeed import LocalPipelineModule, PipeDataParallelTopology, initialize
from ppll_ext.errors import ConfigError, PipelineError


def tied() -> list:
    """A layer used twice through TiedLayerSpec (positions 0 and 2), then a classifier."""
    return [TiedLayerSpec("t", nn.Linear, 4, 4), nn.ReLU(), TiedLayerSpec("t", nn.Linear, 4, 4), nn.Linear(4, 3)]


def without_fp16(fn: Callable[[], object]) -> object:
    """Run `fn` with DeepSpeed's accelerator saying it has no fp16 (as a CPU without oneDNN fp16 kernels says)."""
    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: False
    try:
        return fn()
    finally:
        del accelerator.is_fp16_supported


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)]
    ce = nn.CrossEntropyLoss()
    ex = torch.zeros(2, 4)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}

    def module(**kw: object) -> Callable[[], object]:
        return lambda: LocalPipelineModule(**{"layers": layers, "num_stages": 2, "loss_fn": ce,
                                              "example_input": ex, **kw})

    cases = {
        "aux list length": module(aux_heads=[nn.Linear(8, 3), nn.Linear(8, 3)]),
        "aux list item": module(aux_heads=["conv"]),
        "unknown aux kind": module(aux_heads="bogus"),
        "aux without example": module(aux_heads="auto", example_input=None),
        "stages vs world size": module(num_stages=3),
        "topology vs num_stages": module(topology=PipeDataParallelTopology(num_pp=1, num_dp=2)),
        "topology vs world size": module(num_stages=None, topology=PipeDataParallelTopology(num_pp=2, num_dp=2)),
        "more stages than layers": module(layers=layers[:1]),
        "bad explicit partition": module(partition_method="0,7"),
        "unknown partition": module(partition_method="fastest"),
        "not a LocalPipelineModule": lambda: initialize(model=nn.Linear(2, 2), config={}),
        "missing config file": lambda: initialize(model=module()(), config="no/such/ds_config.json"),
        "ZeRO-2": lambda: initialize(model=module()(), config={**config, "zero_optimization": {"stage": 2}}),
        "ZeRO-3": lambda: initialize(model=module()(), config={**config, "zero_optimization": {"stage": 3}}),
        "fp16 without device support": lambda: without_fp16(
            lambda: initialize(model=module()(), config={**config, "fp16": {"enabled": True}})),
        "tied across stages": module(layers=tied(), partition_method="0,2"),
        "queue_depth 0": lambda: initialize(model=module()(), config=config, queue_depth=0),
        "timeout_s 0": lambda: initialize(model=module()(), config=config, timeout_s=0),
        "ZeRO-1 with an untested client optimizer": lambda: zero_sgd(module()()),
        "train_batch with 0 micro-batches": lambda: engine().train_batch(None, num_micro_batches=0),
        "eval_batch with -1 micro-batches": lambda: engine().eval_batch(None, num_micro_batches=-1),
        "join_step without replicas": lambda: engine().join_step(),
    }
    built: list = []

    def engine() -> object:
        """One engine for the call checks (built once; no call reaches its links)."""
        if not built:
            built.append(initialize(model=module()(), config=config)[0])
        return built[0]

    def zero_sgd(net: LocalPipelineModule) -> object:
        """ZeRO-1 with a client SGD, which DeepSpeed's ZeRO has not tested, and the ds_config saying so."""
        plain = {k: v for k, v in config.items() if k != "optimizer"}
        return initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                          config={**plain, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": False})

    def tied_within_a_stage() -> None:
        """Both uses of a TiedLayerSpec on stage 0: one shared module, trained like any other layer."""
        net = module(layers=tied(), partition_method="0,3")()
        engine, *_ = initialize(model=net, config=config)
        if engine.is_first_stage():
            shared = [m for m in net.modules() if isinstance(m, nn.Linear) and m.in_features == m.out_features == 4]
            before = shared[0].weight.detach().clone()
        engine.train_batch(iter([(torch.randn(2, 4), torch.tensor([0, 1]))]) if engine.is_first_stage() else None)
        if engine.is_first_stage():
            assert len(net.tied_modules) == 1 and not torch.equal(before, shared[0].weight), "tied layer not trained"
        engine.close()

    def nan_loss() -> None:
        """Two good steps, then a batch whose labels (all ignore_index) make every stage's loss NaN."""
        engine, *_ = initialize(model=module(aux_heads="auto")(), config=config)
        for step in range(3):
            y = torch.tensor([0, 1]) if step < 2 else torch.tensor([-100, -100])
            engine.train_batch(iter([(torch.randn(2, 4), y)]) if engine.is_first_stage() else None)

    def uneven_calls() -> None:
        """Stage 1 makes one train_batch call fewer than stage 0: close() raises on both stages."""
        engine, *_ = initialize(model=module(aux_heads="auto")(), config=config)
        for _ in range(2 if engine.is_first_stage() else 1):
            engine.train_batch(iter([(torch.randn(2, 4), torch.tensor([0, 1]))]) if engine.is_first_stage() else None)
        engine.close()

    failed = False
    try:
        tied_within_a_stage()
        line = "ok tied within a stage: trains"
    except (AssertionError, ConfigError, PipelineError) as exc:
        line, failed = f"FAIL tied within a stage: {exc}", True
    if dist.get_rank() == 0:
        print(line, flush=True)
    every_rank = ("nan loss", "uneven calls")
    for name, fn in [*cases.items(), ("nan loss", nan_loss), ("uneven calls", uneven_calls)]:
        expected = PipelineError if name in every_rank else ConfigError
        try:
            fn()
        except (ConfigError, PipelineError) as exc:
            line = f"ok {name}: {exc}" if isinstance(exc, expected) else f"FAIL {name}: {exc}"
            failed = failed or not isinstance(exc, expected)
        else:
            line, failed = f"FAIL {name}", True
        for rank in range(dist.get_world_size()) if name in every_rank else [0]:  # one rank at a time: whole lines
            if dist.get_rank() == rank:
                print(line, flush=True)
            if name in every_rank:
                dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
