"""Every use of DeepSpeed's private or undocumented pipeline API, in one place.

The adapter relies on these names of DeepSpeed 0.19 (tested: 0.19.8; pyproject.toml admits >=0.19,<0.20):
`PipelineModule._partition_layers` / `_build` / `_set_bounds` / `_num_layers` / `parts` / `_layer_specs` /
`_local_start` / `_local_stop` / `forward_funcs` / `tied_modules` / `tied_comms` / `_grid`, `PipelineEngine.
_INSTRUCTION_MAP` / `_exec_schedule` / `_exec_reduce_grads` / `_exec_optimizer_step` / `_next_batch` /
`pipe_buffers` / `tput_timer` / `_reentrant_activation_checkpointing` / `_configure_python_gc` /
`_global_grad_norm`,
`BF16_Optimizer.mpu`, `DeepSpeedZeroOptimizer.model_parallel_group` / `model_parallel_world_size` /
`averaged_gradients` / `all_grad_tensors` / `single_partition_of_fp32_groups` / `bit16_groups` /
`_lazy_init_hp_params_optimizer_state` / `_hp_optimizer_states_linked`, `FP16_Optimizer` / `FP16_UnfusedOptimizer.mpu` /
`overflow_checker` / `overflow` / `backward`, `deepspeed.set_optimizer_flags` and `deepspeed.zero.partition_parameters.
shutdown_init_context` / `restore_init_context`, `deepspeed.comm.comm.cdb.shm_comm_op` and the name of the CPU
comm op's shared-memory buffer. A DeepSpeed release that moves one of them breaks only this file
(and tests/test_deepspeed.py says so).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import deepspeed
import deepspeed.comm
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, ProcessTopology
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.runtime.zero.utils import is_zero_supported_optimizer
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

from ppll_ext.versions import release

log = logging.getLogger(__name__)

TESTED = ((0, 19), (0, 20))
"""DeepSpeed releases the adapter is tested with: at least the first, below the second (as in pyproject.toml)."""

__all__ = [
    "BF16_Optimizer",
    "DeepSpeedConfig",
    "DeepSpeedEngine",
    "LayerSpec",
    "PipeDataParallelTopology",
    "PipelineEngine",
    "PipelineModule",
    "ProcessTopology",
    "TiedLayerSpec",
    "clone_tensors_for_torch_save",
    "load_ds_config",
    "schedule",
]


SHM_BUFFER = "deepspeed_allreduce_buffer"
"""Prefix of the /dev/shm file (about 66 MB per rank) that DeepSpeed's CPU comm op creates and never removes."""
_shm_released = False


def release_shm_buffer() -> None:
    """Unlink this rank's CPU all-reduce buffer from /dev/shm once every rank has mapped it (a world barrier).

    DeepSpeed's shared-memory comm op (CPU accelerator) creates `deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK` at
    `init_distributed` and never unlinks it, so every run leaks ~66 MB of RAM per rank until reboot. The mappings
    stay valid after the unlink; the memory goes when the last process exits. Collective; a no-op after the first
    call or when the op is not in use.
    """
    global _shm_released
    backend = getattr(deepspeed.comm.comm, "cdb", None)
    if _shm_released or getattr(backend, "shm_comm_op", None) is None or not dist.is_initialized():
        return
    dist.barrier()
    name = "_".join((SHM_BUFFER, str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))
    _shm_released = True


def check_version() -> None:
    """Warn once when the installed DeepSpeed is outside the tested range."""
    version = release(deepspeed.__version__)
    if not TESTED[0] <= version < TESTED[1]:
        log.warning("DeepSpeed %s is outside the range ppll_ext's adapter is tested with (>=%s, <%s)",
                    deepspeed.__version__, ".".join(map(str, TESTED[0])), ".".join(map(str, TESTED[1])))


class PipelineModuleHooks(PipelineModule):
    """A PipelineModule whose private build steps call two public hooks a subclass overrides."""

    def _partition_layers(self, method: str = "parameters") -> None:
        parts = self.explicit_partition(method, self._num_layers)
        if parts is None:
            super()._partition_layers(method)
            return
        self.parts = parts
        self._set_bounds(start=parts[self.stage_id], stop=parts[self.stage_id + 1])

    def _build(self) -> None:
        super()._build()
        self.after_build()

    def explicit_partition(self, method: str, num_layers: int) -> list[int] | None:
        """Stage start layers (K+1 entries) for `method`, or None to use DeepSpeed's own partitioning."""
        return None

    def after_build(self) -> None:
        """Called once this rank's layers are built."""


def dry_layers(module: PipelineModule, all_layers: bool) -> list[Callable]:
    """Callables for the layers up to this stage's end (every layer if `all_layers`): this stage's built modules,
    and the other stages' LayerSpecs built for a dry forward without touching the RNG."""
    stop = module._num_layers if all_layers else module._local_stop
    tied: dict[str, torch.nn.Module] = {}
    out: list[Callable] = []
    with torch.random.fork_rng(devices=[]):
        for i, spec in enumerate(module._layer_specs[:stop]):
            if module._local_start <= i < module._local_stop:
                out.append(module.forward_funcs[i - module._local_start])
            elif isinstance(spec, TiedLayerSpec):
                if spec.key not in tied:
                    tied[spec.key] = module.tied_modules[spec.key] if spec.key in module.tied_modules else spec.build()
                mod = tied[spec.key]
                out.append(mod if spec.forward_fn is None else partial(spec.forward_fn, mod))
            elif isinstance(spec, LayerSpec):
                out.append(spec.build())
            else:
                out.append(spec)
    return out


def layer_starts(module: PipelineModule) -> list[int]:
    """The start layer of every stage, and the layer count (K+1 entries), after partitioning."""
    return list(module.parts)


def tied_across_stages(module: PipelineModule) -> list[str]:
    """Keys of tied layers that span several stages (their gradients would be all-reduced between stages)."""
    return sorted(key for key, comm in module.tied_comms.items() if len(comm["ranks"]) > 1)


def rank_repr(module: PipelineModule) -> str:
    """DeepSpeed's suffix for this rank's per-layer checkpoint files ("" without model parallelism)."""
    return module._grid._topo.get_rank_repr(rank=module.global_rank)


def stage_of(module: PipelineModule) -> tuple[int, int]:
    """(data-parallel replica index, replicas) of this rank's stage."""
    return module._grid.data_parallel_id, module._grid.get_data_parallel_world_size()


def instruction_map(table: dict[type, Callable]) -> dict[type, Callable]:
    """The value of an engine subclass's `_INSTRUCTION_MAP`: instruction type -> function, which _exec_schedule
    binds to the engine (overriding an `_exec_*` method alone is silently ignored)."""
    return dict(table)


def exec_schedule(engine: PipelineEngine, sched: schedule.PipeSchedule) -> None:
    """Interpret `sched` with the engine's instruction table."""
    engine._exec_schedule(sched)


def stock_reduce_grads(engine: PipelineEngine) -> None:
    """All-reduce gradients within the stage's data-parallel group (DeepSpeed's own ReduceGrads)."""
    PipelineEngine._exec_reduce_grads(engine)


def stock_optimizer_step(engine: PipelineEngine) -> None:
    """Clip, step, zero the gradients, advance the LR schedule and global_steps (DeepSpeed's own OptimizerStep)."""
    PipelineEngine._exec_optimizer_step(engine)


def buffer(engine: PipelineEngine, name: str, buffer_id: int) -> Any:
    """A pipeline buffer slot ("inputs", "labels" or "outputs") of the engine's schedule."""
    return engine.pipe_buffers[name][buffer_id]


def set_buffer(engine: PipelineEngine, name: str, buffer_id: int, value: Any) -> None:
    """Fill (or, with None, release) a pipeline buffer slot."""
    engine.pipe_buffers[name][buffer_id] = value


def start_throughput_timer(engine: PipelineEngine) -> None:
    """DeepSpeed's samples/s timer starts at a micro-batch's forward pass."""
    engine.tput_timer.start()


def next_batch(engine: PipelineEngine) -> Any:
    """The next item of the engine's data iterator (None without one)."""
    return engine._next_batch()


def reentrant_checkpointing(engine: PipelineEngine) -> bool:
    """True when the module checkpoints activations with the reentrant function: stage inputs must require grad,
    or the first checkpointed segment is cut off from autograd."""
    return bool(engine._reentrant_activation_checkpointing())


class _StageGroups:
    """The `mpu` an fp16 optimizer's overflow check sees: its "model-parallel" group is the stage's data-parallel
    group, so an overflow flag is reduced over the stage's replicas only (a pipeline's real one spans every stage)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def get_model_parallel_group(self) -> Any:
        """The stage's data-parallel group."""
        return self.group

    def get_data_parallel_group(self) -> Any:
        """The stage's data-parallel group."""
        return self.group


def confine_to_stage(engine: PipelineEngine) -> None:
    """Make the optimizer's gradient norm and overflow check this stage's own.

    DeepSpeed reduces both over the grid's "model-parallel" group, which in a pipeline spans every stage: the bf16
    and fp16 optimizers' norms (clipping), fp16's overflow flag (one stage's overflow would skip every stage's step
    and lower every stage's loss scale) and ZeRO-1's norm and overflow flag. Afterwards they are reduced over the
    stage's data-parallel replicas only (ZeRO-1 shards over that group, so its partial norms must be summed there).
    """
    optimizer = engine.optimizer
    if isinstance(optimizer, BF16_Optimizer):
        optimizer.mpu = None
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        optimizer.model_parallel_group = None
        optimizer.model_parallel_world_size = 1
    elif isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        optimizer.mpu = None  # gradients are already reduced over the replicas: the local norm is the stage's
        optimizer.overflow_checker.mpu = _StageGroups(engine.grid.get_data_parallel_group())


def set_grad_norm(engine: PipelineEngine, norm: torch.Tensor) -> None:
    """Record the gradient norm `engine.get_global_grad_norm()` reports (DeepSpeed records it for its own
    optimizers only)."""
    engine._global_grad_norm = norm


def fp16_supported() -> bool:
    """Whether DeepSpeed's accelerator runs fp16 (its engine refuses fp16 otherwise)."""
    return bool(get_accelerator().is_fp16_supported())


def accelerator_name() -> str:
    """DeepSpeed's accelerator ("cuda", "cpu", ...)."""
    return str(get_accelerator().device_name())


def is_zero(optimizer: Any) -> bool:
    """True for DeepSpeed's ZeRO-1/2 optimizer (optimizer states sharded over the data-parallel group)."""
    return isinstance(optimizer, DeepSpeedZeroOptimizer)


def zero_tested(optimizer: torch.optim.Optimizer) -> bool:
    """Whether DeepSpeed's ZeRO takes this client optimizer without "zero_allow_untested_optimizer": true (Adam,
    AdamW, Adagrad and DeepSpeed's own; not SGD)."""
    return bool(is_zero_supported_optimizer(optimizer))


def backward(engine: PipelineEngine, loss: torch.Tensor) -> None:
    """DeepSpeed's backward of an already averaged loss, scaled by the stage's fp16 loss scale where one applies.

    DeepSpeed 0.19's engine.backward scales the loss only for ZeRO optimizers; with fp16 and ZeRO-0 it leaves it
    unscaled while FP16_Optimizer.step still divides the gradients by the loss scale (deepspeedai/DeepSpeed#8393),
    so that case takes the optimizer's own scaled backward (what the fix does).
    """
    if isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        engine.optimizer.backward(loss)
    else:
        DeepSpeedEngine.backward(engine, loss, scale_wrt_gas=False)


def overflowed(engine: PipelineEngine) -> bool:
    """True when the last optimizer step was skipped because the gradients held inf/NaN (DeepSpeed's fp16 loss
    scaler, or ZeRO's and the bf16 optimizer's invalid-norm check)."""
    return bool(getattr(engine.optimizer, "overflow", False))


def loss_scale(engine: PipelineEngine) -> float | None:
    """The stage's current fp16 loss scale (None without fp16)."""
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else None


def drop_gradients(engine: PipelineEngine) -> None:
    """Discard the accumulated (and already reduced) gradients without an update, as DeepSpeed does on overflow."""
    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        optimizer.zero_grad(set_to_none=True)
        for k in optimizer.averaged_gradients:
            optimizer.averaged_gradients[k] = None
            optimizer.all_grad_tensors[k] = None
    elif isinstance(optimizer, (BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer)):
        optimizer.zero_grad()
    else:
        engine.zero_grad()


def fill_missing_gradients(engine: PipelineEngine) -> None:
    """Zero gradients for parameters without one (a replica with no data in a step), so every replica of the stage
    makes the same reduction calls."""
    for p in engine.module.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _zero_params(optimizer: DeepSpeedZeroOptimizer) -> list[torch.nn.Parameter]:
    """The optimizer's parameters in the order of its param groups (the order a plain torch optimizer numbers them)."""
    return [p for group in optimizer.bit16_groups for p in group]


def _link_zero_state(optimizer: DeepSpeedZeroOptimizer) -> None:
    """Point every parameter's view of its optimizer-state fragment at the current state tensors. ZeRO links them at
    its first step only; after `load_checkpoint` (before a step) or `load_zero_state` they are missing or stale."""
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def gather_zero_state(optimizer: DeepSpeedZeroOptimizer) -> dict:
    """A ZeRO-1 optimizer's state as the plain torch optimizer's `state_dict()` would hold it unsharded: per
    parameter its full fp32 state, gathered from the stage's replicas (collective over them), param groups numbered
    as torch numbers them. Empty state before the first step."""
    base = optimizer.optimizer
    flat_states = [base.state.get(flat, {}) for flat in optimizer.single_partition_of_fp32_groups]
    if any(flat_states):
        _link_zero_state(optimizer)
    state: dict[int, dict] = {}
    groups: list[dict] = []
    index = 0
    for i, group in enumerate(optimizer.bit16_groups):
        flat_state = flat_states[i]
        ids = list(range(index, index + len(group)))
        for pid, p in zip(ids, group):
            if not flat_state:
                continue
            entry = {k: v.clone() for k, v in flat_state.items() if torch.is_tensor(v) and v.dim() == 0}
            entry.update({k: v for k, v in flat_state.items() if not torch.is_tensor(v)})
            for key, value in flat_state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    entry[key] = safe_get_full_optimizer_state(p, key).detach().cpu()
            state[pid] = entry
        groups.append({**{k: v for k, v in base.param_groups[i].items() if k != "params"}, "params": ids})
        index += len(group)
    return {"state": state, "param_groups": groups}


def load_zero_state(optimizer: DeepSpeedZeroOptimizer, full: dict) -> None:
    """Load a plain torch optimizer's `state_dict()` (as `gather_zero_state` returns it) into a ZeRO-1 optimizer:
    each replica keeps its own shard of every state tensor; hyper-parameters come from the param groups."""
    base = optimizer.optimizer
    params = _zero_params(optimizer)
    groups = full["param_groups"]
    if len(groups) != len(optimizer.bit16_groups) or \
            [len(g["params"]) for g in groups] != [len(g) for g in optimizer.bit16_groups]:
        raise ValueError(f"the saved optimizer has {[len(g['params']) for g in groups]} parameters per group, "
                         f"this stage's ZeRO optimizer {[len(g) for g in optimizer.bit16_groups]}")
    for saved, group in zip(groups, base.param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    state = {int(k): v for k, v in full["state"].items()}
    if not state:
        return
    for i, flat in enumerate(optimizer.single_partition_of_fp32_groups):
        present = [state[pid] for pid in groups[i]["params"] if pid in state]
        if present:  # a parameter without state (never had a gradient) keeps zeros in its slice
            base.state[flat] = {key: (torch.zeros_like(flat) if torch.is_tensor(v) and v.dim() > 0 else
                                      (v.clone() if torch.is_tensor(v) else v)) for key, v in present[0].items()}
    _link_zero_state(optimizer)
    for pid, p in enumerate(params):
        for key, value in state.get(pid, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)


def build_engine(engine_cls: type, config: dict, conf: DeepSpeedConfig, model: PipelineModule, **kwargs: Any) -> Any:
    """Construct `engine_cls` the way deepspeed.initialize constructs PipelineEngine (which it hard-codes)."""
    deepspeed.set_optimizer_flags(conf, model)
    deepspeed.zero.partition_parameters.shutdown_init_context()
    try:
        engine = engine_cls(model=model, mpu=model.mpu(), config=config, config_class=conf, **kwargs)
    finally:
        deepspeed.zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine


def config_class(config: dict, model: PipelineModule) -> DeepSpeedConfig:
    """DeepSpeed's parsed view of a ds_config (for checks before the engine is built)."""
    return DeepSpeedConfig(config, model.mpu())
