"""`SchedulePPLL`: local learning as a drop-in schedule for `torch.distributed.pipelining`.

Replace the `ScheduleGPipe(stage, n_microbatches=M, loss_fn=loss_fn)` line of a training script with

    SchedulePPLL(stage, n_microbatches=M, loss_fn=loss_fn, aux_head=aux, optimizer=opt)

and drop the script's own `optimizer.step()`: every stage now trains on its own loss (aux head on
all but the last stage) and steps its optimizer after its M micro-batches, never waiting for a
later stage. The training step is ppll_ext's LocalBlock run by the runtime's StageWorker; the
activations travel over ppll_ext's links (a small header per message carries shape and dtype, so
batches of any size work and no shape-inference pass touches the weights or BatchNorm statistics).

Tested with torch 2.13–2.14 (`TESTED`; pyproject.toml asks for torch>=2.13). `PipelineScheduleSingle` and
`PipelineStage` attributes used here: `submod`, `stage_index`, `num_stages`, `is_first`, `is_last`, `group`,
`device`; a newer torch that moves one of them is reported once at construction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from ppll_ext import checkpoint as ckpt
from ppll_ext.core import LocalBlock
from ppll_ext.errors import CheckpointError, ConfigError, PipelineError
from ppll_ext.runtime.base import split_micro
from ppll_ext.runtime.stage import StageWorker
from ppll_ext.transport import Kind, Msg, open_links

__all__ = ["SchedulePPLL"]

TESTED = ((2, 13), (2, 15))
"""torch releases SchedulePPLL is tested with: at least the first, below the second."""
log = logging.getLogger(__name__)


def _check_torch_version() -> None:
    """Warn when torch is outside the tested range (the schedule uses undocumented pipelining internals)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if not TESTED[0] <= version < TESTED[1]:
        log.warning("torch %s is outside the range SchedulePPLL is tested with (>=%d.%d, <%d.%d)", torch.__version__,
                    *TESTED[0], *TESTED[1])


class _SingleOutput(nn.Module):
    """Unwraps a one-element tuple output (as graph-split stages return) to the tensor sent downstream."""

    def __init__(self, submod: nn.Module) -> None:
        super().__init__()
        self.submod = submod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.submod(x)
        if isinstance(out, (tuple, list)):
            if len(out) != 1:
                raise PipelineError(f"stage output has {len(out)} tensors; SchedulePPLL sends one tensor per stage")
            out = out[0]
        return out


def _check_optimizer(optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> None:
    covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, module in modules.items():
        missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ConfigError(f"the optimizer does not cover {len(missing)} parameter(s) of the {name} "
                              f"(e.g. {missing[0]!r}); build it over stage_mod.parameters() and aux_head.parameters()")


class SchedulePPLL(PipelineScheduleSingle):
    """One stage of a local-learning pipeline (one stage per rank), streaming with no flush between steps."""

    def __init__(
        self,
        stage,
        n_microbatches: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        aux_head: nn.Module | None = None,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        scale_grads: bool = True,
        queue_depth: int = 2,
        timeout_s: float = 300.0,
    ) -> None:
        _check_torch_version()
        super().__init__(stage, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        if loss_fn is None:
            raise ConfigError("SchedulePPLL needs loss_fn: every stage trains on its own loss")
        if stage.is_last and aux_head is not None:
            raise ConfigError(f"stage {stage.stage_index} is the last stage: pass aux_head=None "
                              f"(its own output is the model's prediction)")
        if not stage.is_last and aux_head is None:
            raise ConfigError(f"stage {stage.stage_index} of {stage.num_stages} needs an aux_head (a module mapping "
                              f"its output to class scores), e.g. ppll_ext.core.build_aux_head('conv', out, classes)")
        modules = {"stage module": stage.submod, **({"aux head": aux_head} if aux_head is not None else {})}
        _check_optimizer(optimizer, modules)
        self.block = LocalBlock(_SingleOutput(stage.submod), aux_head, loss_fn, index=stage.stage_index,
                                optimizer=optimizer, lr_scheduler=lr_scheduler, scale_grads=scale_grads)
        group = stage.group if stage.group is not None else dist.group.WORLD
        ranks = [dist.get_global_rank(group, i) for i in range(stage.num_stages)]
        device = torch.device(stage.device)
        self._sender, receiver = open_links(ranks, stage.stage_index, queue_depth, timeout_s, device, group)
        self._inbox = receiver.messages() if receiver is not None else None
        self._worker = StageWorker(self.block, self._sender.send if self._sender else None, device)
        self._group, self._ranks = group, ranks

    def step(self, *args, target: torch.Tensor | None = None, losses: list | None = None, **kwargs) -> None:
        """Train this stage on one mini-batch (first stage: `step(x, target=y)`); returns without waiting
        for later stages. `losses` is extended with this stage's per-micro-batch losses."""
        index = self._stage.stage_index
        arg_mbs = target_mbs = None
        if self._stage.is_first:
            if len(args) != 1 or kwargs or target is None:
                raise ConfigError("the first stage takes step(x, target=y): one input tensor and its labels")
            if args[0].shape[0] % self._n_microbatches:
                raise ConfigError(f"batch size {args[0].shape[0]} is not divisible by n_microbatches="
                                  f"{self._n_microbatches}; use a multiple of it")
            micro = split_micro(args[0], target, self._n_microbatches)
            arg_mbs, target_mbs = [(xm,) for xm, _ in micro], [ym for _, ym in micro]
        elif args or kwargs:
            raise ConfigError(f"stage {index} receives its input from the previous stage; call step() without "
                              f"inputs (losses= and, on the last stage, target= are allowed)")
        elif target is not None:
            target_mbs = [target]
        self._step_microbatches(arg_mbs, None, target_mbs, losses)

    def _step_microbatches(self, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None, *args, **kwargs):
        """Run one mini-batch given as micro-batches: first stage from `arg_mbs`/`target_mbs`, later stages
        from their input link (a `target_mbs` given there must equal the labels that arrived)."""
        index = self._stage.stage_index
        device = self._worker.device
        if self._stage.is_first:
            messages = [Msg(Kind.TRAIN, a[0].to(device), t.to(device), len(arg_mbs))
                        for a, t in zip(arg_mbs, target_mbs, strict=True)]
        else:
            first = next(self._inbox)
            messages = [first, *(next(self._inbox) for _ in range(first.n_micro - 1))]
            if any(m.kind is not Kind.TRAIN for m in messages):
                raise PipelineError(f"stage {index}: expected training micro-batches from stage {index - 1}")
            if target_mbs is not None and not torch.equal(torch.cat([m.y for m in messages]).cpu(),
                                                          torch.cat(list(target_mbs)).cpu()):
                raise PipelineError(f"stage {index}: target= differs from the labels that arrived with the "
                                    f"activations; feed every rank the same data order")
        for msg in messages:
            self._worker.handle(msg)
            if losses is not None:
                losses.append(self._worker.last_loss)

    def flush(self) -> None:
        """Block until everything this stage sent has been received downstream."""
        if self._sender is not None:
            self._sender.flush()

    def _key_map(self, names: Callable[[str], str] | None) -> dict[str, str]:
        """Checkpoint name of each tensor of the block's body (`submod.<key>`): `names(key)`, default `key`."""
        rename = names or (lambda key: key)
        return {f"submod.{k}": rename(k) for k in self._stage.submod.state_dict()}

    def save_checkpoint(self, save_dir: str | Path, *, names: Callable[[str], str] | None = None, keep: int = 2,
                        config: dict | None = None) -> Path | None:
        """Save this stage into `save_dir/step-N` (N = this stage's optimizer steps) in ppll_ext's layout.

        Every stage calls it after the same step. Stage tensors are stored under `names(key)` — by default the
        stage module's own names, which are the unsplit model's when stages are the model with other layers
        removed; pass `names` otherwise. The first stage completes the checkpoint and returns its folder.
        """
        self.flush()
        folder = ckpt.step_folder(save_dir, self.block.steps)
        manifest = ckpt.write_stage(folder, self.block, self._stage.num_stages, self._key_map(names))
        gathered: list[ckpt.StageManifest] | None = [None] * len(self._ranks) if self._stage.is_first else None
        dist.gather_object(manifest, gathered, dst=self._ranks[0], group=self._group)
        if not self._stage.is_first:
            return None
        position = ckpt.Position(self.block.steps, 0, self.block.steps)
        return ckpt.commit(folder, gathered, position, None, config or {}, keep)

    def load_checkpoint(self, path: str | Path, *, names: Callable[[str], str] | None = None) -> None:
        """Restore this stage's weights, aux head, optimizer, LR schedule and step count from a checkpoint written
        by `save_checkpoint` with the same stages (`path`: the checkpoint or its run directory, newest step)."""
        folder = ckpt.resolve(path)
        state = ckpt.read_json(folder / ckpt.TRAINER_STATE)
        if state["num_stages"] != self._stage.num_stages:
            raise ConfigError(f"{str(folder)!r} was saved by {state['num_stages']} stages, this pipeline has "
                              f"{self._stage.num_stages}; resume with the same stages")
        weights = ckpt.load_model_state(folder)
        key_map = self._key_map(names)
        missing = sorted(n for n in key_map.values() if n not in weights)
        if missing:
            raise CheckpointError(f"{str(folder)!r} has no tensor {missing[0]!r} for stage "
                                  f"{self._stage.stage_index} ({len(missing)} missing); pass the names= used when "
                                  f"saving")
        body = {k: weights[name] for k, name in key_map.items()}
        ckpt.check_against(body, self.block.body.state_dict(), f"checkpoint {str(folder)!r} (stage "
                                                                 f"{self._stage.stage_index})")
        self.block.body.load_state_dict(body)
        ckpt.load_stage(folder, self.block, same_cut=True)
