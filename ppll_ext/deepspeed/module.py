"""`LocalPipelineModule`: a DeepSpeed PipelineModule whose every stage also owns an aux head and a local loss."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import deepspeed
import deepspeed.comm
import torch
from torch import nn

from ppll_ext.core import AUX_KINDS, ON_NAN, build_stage_aux_head
from ppll_ext.core.block import LossFn, OnNaN
from ppll_ext.core.partition import parse_explicit
from ppll_ext.deepspeed import _ds
from ppll_ext.errors import CheckpointError, ConfigError


def _pipe_stages(num_stages: int | None, topology: _ds.ProcessTopology | None, num_layers: int) -> int:
    """The number of stages, after checking it against the topology, the world size and the layer count."""
    world = deepspeed.comm.get_world_size()
    if num_stages is None and topology is None:
        raise ConfigError("LocalPipelineModule needs num_stages=K or topology=PipeDataParallelTopology(num_pp=K, ...)",
                          key="num_stages")
    if topology is not None:
        pipe = topology.get_dim("pipe")
        if num_stages is not None and num_stages != pipe:
            raise ConfigError(f"num_stages={num_stages} but the topology has {pipe} pipeline stages; give one of them",
                              key="num_stages")
        if topology.world_size() != world:
            raise ConfigError(f"the topology has {topology.world_size()} ranks but {world} processes were started; "
                              f"launch {topology.world_size()} (deepspeed --num_gpus {topology.world_size()})",
                              key="topology")
        num_stages = pipe
    if num_stages < 1 or world % num_stages:
        raise ConfigError(f"num_stages={num_stages} must divide the {world} processes started (stages x data-parallel "
                          f"replicas); launch a multiple of {num_stages} processes or change num_stages",
                          key="num_stages")
    if num_stages > num_layers:
        raise ConfigError(f"num_stages={num_stages} is larger than the {num_layers} layers; use at most {num_layers}",
                          key="num_stages")
    return num_stages


def _check_aux_heads(aux_heads: str | Sequence[nn.Module], num_stages: int,
                     example_input: torch.Tensor | None) -> str | list[nn.Module]:
    if isinstance(aux_heads, str):
        if aux_heads not in AUX_KINDS:
            raise ConfigError(f"aux_heads={aux_heads!r} is not one of {', '.join(AUX_KINDS)} or a list of modules",
                              key="aux_heads")
        if example_input is None and num_stages > 1:
            raise ConfigError(f"aux_heads={aux_heads!r} builds heads from activation shapes: pass example_input= "
                              f"(a small input batch, e.g. x[:2]) or give aux_heads as a list of modules",
                              key="example_input")
        return aux_heads
    heads = list(aux_heads)
    if len(heads) != num_stages - 1:
        raise ConfigError(f"aux_heads has {len(heads)} modules but {num_stages} stages need {num_stages - 1} "
                          f"(one per stage except the last, whose output is the model's prediction)", key="aux_heads")
    bad = [i for i, h in enumerate(heads) if not isinstance(h, nn.Module)]
    if bad:
        raise ConfigError(f"aux_heads[{bad[0]}] is a {type(heads[bad[0]]).__name__}, not an nn.Module",
                          key="aux_heads")
    return heads


class LocalPipelineModule(_ds.PipelineModuleHooks):
    """A DeepSpeed PipelineModule whose stages also own an auxiliary head and a local loss (PPLL).

    Extra arguments beyond PipelineModule's: `aux_heads` (a kind of `ppll_ext.core.AUX_KINDS`, built from a dry
    forward of `example_input`, or one module per stage except the last), `num_classes` (default: from the
    model's output), `aux_hidden`, `aux_seed`, `aux_next_blocks` (for "next-blocks"), and `on_nan`: "error" stops
    the run naming the stage and step when a local loss is NaN/inf; "skip" makes that stage skip that mini-batch's
    update (optimizer state untouched; schedule and step count advance). `partition_method` also accepts explicit
    start layers "0,5,9". `activation_checkpoint_interval` (reentrant or not) trains exactly as without it.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module | _ds.LayerSpec | Callable],
        num_stages: int | None = None,
        *,
        loss_fn: LossFn,
        aux_heads: str | Sequence[nn.Module] = "auto",
        example_input: torch.Tensor | None = None,
        num_classes: int | None = None,
        aux_hidden: int = 128,
        aux_seed: int = 0,
        aux_next_blocks: int = 1,
        on_nan: OnNaN = "error",
        partition_method: str = "parameters",
        topology: _ds.ProcessTopology | None = None,
        **kwargs: Any,
    ) -> None:
        if loss_fn is None:
            raise ConfigError("LocalPipelineModule needs loss_fn: every stage trains on its own loss", key="loss_fn")
        if on_nan not in ON_NAN:
            raise ConfigError(f"on_nan={on_nan!r} is not one of {', '.join(ON_NAN)}", key="on_nan")
        if "LOCAL_RANK" not in os.environ:
            raise ConfigError("LOCAL_RANK is not set: start the script with the deepspeed launcher "
                              "(launch/deepspeed.sh N script.py, or deepspeed --num_gpus N script.py)")
        _ds.check_version()
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed()
        _ds.release_shm_buffer()
        layers = list(layers)
        stages = _pipe_stages(num_stages, topology, len(layers))
        self.on_nan = on_nan
        self._aux_choice = _check_aux_heads(aux_heads, stages, example_input)
        self._aux_options = (example_input, num_classes, aux_hidden, aux_seed, aux_next_blocks)
        super().__init__(layers, num_stages=num_stages, topology=topology, loss_fn=loss_fn,
                         partition_method=partition_method, **kwargs)
        del self._aux_choice, self._aux_options
        across = _ds.tied_across_stages(self)
        if across:
            raise ConfigError(f"tied layers {across} span several stages: their gradients would be all-reduced "
                              f"between stages, which local learning never does; untie them", key="layers")

    def explicit_partition(self, method: str, num_layers: int) -> list[int] | None:
        """DeepSpeed's methods (None), or explicit start layers "0,5,9" (ppll_ext's partition format)."""
        if method.lower() in ("uniform", "parameters") or method.lower().startswith("type:"):
            return None
        if not method.replace(",", "").replace(" ", "").isdigit():
            raise ConfigError(f"partition_method={method!r} is none of uniform, parameters, type:REGEX or start "
                              f"layers like 0,5,9 (e.g. from ppll_ext.core.partition(layers, K, 'profile', ...))",
                              key="partition_method")
        return parse_explicit(method, num_layers, self.num_stages)

    def after_build(self) -> None:
        """Build this stage's aux head once its layers exist (it is sized by a dry forward through them)."""
        self.aux_head = self._make_aux_head()
        if self.aux_head is not None:
            for p in self.aux_head.parameters():
                p.ds_pipe_replicated = False

    def _make_aux_head(self) -> nn.Module | None:
        if self.stage_id == self.num_stages - 1:
            return None
        if isinstance(self._aux_choice, list):
            return self._aux_choice[self.stage_id]
        example, num_classes, hidden, seed, next_blocks = self._aux_options
        all_layers = num_classes is None or self._aux_choice == "next-blocks"
        return build_stage_aux_head(_ds.dry_layers(self, all_layers), self.stage_id, _ds.layer_starts(self),
                                    self._aux_choice, example, num_classes=num_classes, hidden=hidden, seed=seed,
                                    next_blocks=next_blocks)

    def aux_ckpt_path(self, ckpt_dir: str) -> str:
        """File of this stage's aux head beside DeepSpeed's layer_XX-model_states.pt files."""
        path = os.path.join(ckpt_dir, f"aux_head_{self.stage_id:02d}")
        suffix = _ds.rank_repr(self)
        return path + (f"-{suffix}" if suffix else "") + "-model_states.pt"

    def save_state_dict(self, save_dir: str, checkpoint_engine: Any, exclude_frozen_params: bool = False) -> None:
        """DeepSpeed's per-layer files, plus this stage's aux head (written by data-parallel rank 0)."""
        super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params=exclude_frozen_params)
        if self.aux_head is None or _ds.stage_of(self)[0] != 0:
            return
        state = self.aux_head.state_dict()
        if exclude_frozen_params:
            frozen = {n for n, p in self.aux_head.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        if checkpoint_engine.preserves_storage_sharing():
            state = _ds.clone_tensors_for_torch_save(state)
        checkpoint_engine.makedirs(save_dir, exist_ok=True)
        checkpoint_engine.save(state_dict=state, path=self.aux_ckpt_path(save_dir))

    def load_state_dir(self, load_dir: str, checkpoint_engine: Any, strict: bool = True) -> None:
        """DeepSpeed's per-layer files, plus this stage's aux head (loaded without unpickling code)."""
        super().load_state_dir(load_dir, checkpoint_engine, strict=strict)
        if self.aux_head is None:
            return
        path = self.aux_ckpt_path(load_dir)
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing: the checkpoint has no aux head for stage {self.stage_id} "
                                  f"(was it written by a stock PipelineModule?)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.aux_head.load_state_dict(state, strict=strict)
