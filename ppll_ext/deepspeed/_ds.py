"""Every use of DeepSpeed's private or undocumented pipeline API, in one place.

The adapter relies on these names of DeepSpeed 0.19 (tested: 0.19.8; pyproject.toml admits >=0.19,<0.20):
`PipelineModule._partition_layers` / `_build` / `_set_bounds` / `_num_layers` / `parts` / `_layer_specs` /
`_local_start` / `_local_stop` / `forward_funcs` / `tied_modules` / `tied_comms` / `_grid`, `PipelineEngine.
_INSTRUCTION_MAP` / `_exec_schedule` / `_exec_reduce_grads` / `_exec_optimizer_step` / `_next_batch` /
`pipe_buffers` / `tput_timer` / `_reentrant_activation_checkpointing` / `_configure_python_gc`,
`BF16_Optimizer.mpu`, `deepspeed.set_optimizer_flags` and `deepspeed.zero.partition_parameters.
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
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, ProcessTopology
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

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
    version = tuple(int(p) for p in deepspeed.__version__.split("+")[0].split(".")[:2] if p.isdigit())
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


def stage_norm_only(optimizer: Any) -> None:
    """Make BF16_Optimizer's gradient norm this stage's own (it would be summed over all stages)."""
    if isinstance(optimizer, BF16_Optimizer):
        optimizer.mpu = None


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
