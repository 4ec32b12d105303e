"""`SchedulePPLL`: local learning as a drop-in schedule for `torch.distributed.pipelining`.

Replace the `ScheduleGPipe(stage, n_microbatches=M, loss_fn=loss_fn)` line of a training script with

    SchedulePPLL(stage, n_microbatches=M, loss_fn=loss_fn, aux_head=aux, optimizer=opt)

and drop the script's own `optimizer.step()`: every stage now trains on its own loss (aux head on
all but the last stage) and steps its optimizer after its M micro-batches, never waiting for a
later stage. The training step is ppll_ext's LocalBlock run by the runtime's StageWorker; the
activations travel over ppll_ext's links with the targets (a small header per message carries shape and
dtype of both, so (N, T) token ids or soft targets arrive whole, batches of any size work and no
shape-inference pass touches the weights or BatchNorm statistics). Importing this module also makes
`torch.distributed.pipelining.schedules.get_schedule_class("PPLL")` return SchedulePPLL, whatever the order of the
imports (ppll_ext.torch_patches).

Tested with torch 2.13–2.14 (`TESTED`; pyproject.toml asks for torch>=2.13). `PipelineScheduleSingle` and
`PipelineStage` attributes used here: `submod`, `stage_index`, `num_stages`, `is_first`, `is_last`, `group`,
`device`; a newer torch that moves one of them is reported once at construction.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import schedules
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from ppll_ext import checkpoint as ckpt
from ppll_ext import torch_patches
from ppll_ext.core import LocalBlock, payload
from ppll_ext.core.payload import Payload
from ppll_ext.errors import CheckpointError, ConfigError, PipelineError
from ppll_ext.runtime import shutdown
from ppll_ext.runtime.guard import watch_launchers
from ppll_ext.runtime.stage import StageStream, StageWorker
from ppll_ext.transport import Kind, Msg, check_count, check_link_settings, open_links
from ppll_ext.versions import release

__all__ = ["SchedulePPLL", "get_schedule_class"]

TESTED = ((2, 13), (2, 15))
"""torch releases SchedulePPLL is tested with: at least the first, below the second."""
log = logging.getLogger(__name__)


def _check_torch_version() -> None:
    """Warn when torch is outside the tested range (the schedule uses undocumented pipelining internals)."""
    version = release(torch.__version__)
    if not TESTED[0] <= version < TESTED[1]:
        log.warning("torch %s is outside the range SchedulePPLL is tested with (>=%d.%d, <%d.%d)", torch.__version__,
                    *TESTED[0], *TESTED[1])


CALLS = "step() / eval()"
"""The calls every rank makes alike (named in protocol errors)."""


class _StageOutput(nn.Module):
    """The stage module as its block's body: a one-element tuple output (as graph-split stages return) becomes the
    tensor sent downstream, several tensors travel as they are; the first stage's keyword inputs of the current
    micro-batch (`extra`) are passed to the stage module."""

    def __init__(self, submod: nn.Module) -> None:
        super().__init__()
        self.submod = submod
        self.extra: dict[str, Any] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Payload:
        out = self.submod(*args, **kwargs, **self.extra)
        if isinstance(out, (tuple, list)) and len(out) == 1:
            out = out[0]
        return out


class _LossWithKwargs:
    """The user's loss_fn, called with the `loss_kwargs` of the current step (torch's step(loss_kwargs=...))."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.kwargs: dict[str, Any] = {}

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, target, **self.kwargs)


def _check_optimizer(optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> None:
    covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, module in modules.items():
        missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ConfigError(f"the optimizer does not cover {len(missing)} parameter(s) of the {name} "
                              f"(e.g. {missing[0]!r}); build it over stage_mod.parameters() and aux_head.parameters()")


def _micro_list(value: Any, name: str, m: int) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list with one entry per micro-batch, got {type(value).__name__}")
    if len(value) != m:
        raise ConfigError(f"{name} has {len(value)} entries but n_microbatches={m}; give one per micro-batch")
    return value


class SchedulePPLL(PipelineScheduleSingle):
    """One stage of a local-learning pipeline (one stage per rank), streaming with no flush between steps.

    Every stage trains on its own loss, so the targets enter at the first stage (`step(x, target=y)`) and travel
    with the activations, keeping their shape and dtype. `aux_head`, `optimizer` and `lr_scheduler` may be given
    here or set as attributes before the first `step`. `queue_depth` (>= 1) bounds the micro-batches in flight to
    the next stage, `timeout_s` (> 0) every wait for a neighbour stage.
    """

    def __init__(
        self,
        stage,
        n_microbatches: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        aux_head: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        scale_grads: bool = True,
        queue_depth: int = 2,
        timeout_s: float = 300.0,
    ) -> None:
        _check_torch_version()
        n_microbatches = check_count("n_microbatches", n_microbatches, "micro-batches per step(), e.g. 4")
        check_link_settings(queue_depth, timeout_s)
        if isinstance(stage, (list, tuple)):
            raise ConfigError(f"SchedulePPLL runs one stage per rank, got a list of {len(stage)} stages: start as "
                              f"many ranks as stages and give each rank its own PipelineStage(stage_index=rank); "
                              f"several stages per rank (interleaved schedules) do not apply to local learning")
        super().__init__(stage, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        watch_launchers()  # this rank ends with its launcher (torchrun), never lives on as an orphan
        if loss_fn is None:
            raise ConfigError("SchedulePPLL needs loss_fn: every stage trains on its own loss")
        if stage.is_last and aux_head is not None:
            raise ConfigError(f"stage {stage.stage_index} is the last stage: pass aux_head=None "
                              f"(its own output is the model's prediction)")
        self._loss = _LossWithKwargs(loss_fn)
        self._body = _StageOutput(stage.submod)
        self.block = LocalBlock(self._body, aux_head, self._loss, index=stage.stage_index, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, scale_grads=scale_grads)
        self._checked = False
        group = stage.group if stage.group is not None else dist.group.WORLD
        ranks = [dist.get_global_rank(group, i) for i in range(stage.num_stages)]
        device = torch.device(stage.device)
        sender, receiver = open_links(ranks, stage.stage_index, queue_depth, timeout_s, device, group)
        self._stream = StageStream(stage.stage_index, stage.num_stages, CALLS, receiver=receiver, sender=sender)
        self._worker = StageWorker(self.block, self._stream, device, per_step=False)
        self._group, self._ranks = group, ranks
        self._closed = self._streaming = False

    @property
    def aux_head(self) -> nn.Module | None:
        """This stage's auxiliary head (None on the last stage); settable before the first step."""
        return self.block.aux

    @aux_head.setter
    def aux_head(self, head: nn.Module | None) -> None:
        self._before_first_step("aux_head")
        if self._stage.is_last and head is not None:
            raise ConfigError(f"stage {self._stage.stage_index} is the last stage: it takes no aux_head")
        self.block.aux = head

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer over this stage's module and aux head, stepped by the schedule; settable before the first
        step (trainers that build optimizers after the schedule)."""
        return self.block.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        self._before_first_step("optimizer")
        self.block.optimizer = optimizer

    @property
    def lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The LR schedule advanced after each of this stage's optimizer steps; settable before the first step."""
        return self.block.lr_scheduler

    @lr_scheduler.setter
    def lr_scheduler(self, scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
        self._before_first_step("lr_scheduler")
        self.block.lr_scheduler = scheduler

    def _before_first_step(self, name: str) -> None:
        if self._checked:
            raise ConfigError(f"set {name} before the first step(); this stage has already trained with the old one")

    def _check_ready(self) -> None:
        """A non-last stage needs its aux head, every training stage its optimizer (checked at the first step)."""
        if self._checked:
            return
        index, k = self._stage.stage_index, self._stage.num_stages
        if not self._stage.is_last and self.block.aux is None:
            raise ConfigError(f"stage {index} of {k} needs an aux head for its local loss: pass aux_head= or set "
                              f"schedule.aux_head before the first step, e.g. ppll_ext.core.build_aux_head(...)")
        if self.block.optimizer is None:
            raise ConfigError(f"stage {index} of {k} has no optimizer: pass optimizer= or set schedule.optimizer "
                              f"before the first step (over the stage module's and the aux head's parameters)")
        modules = {"stage module": self._stage.submod, **({"aux head": self.block.aux} if self.block.aux else {})}
        _check_optimizer(self.block.optimizer, modules)
        self._checked = True

    def step(self, *args: Any, target: Any = None, losses: list | None = None, return_outputs: bool = True,
             loss_kwargs: dict[str, Any] | None = None, arg_mbs: Any = None, kwarg_mbs: Any = None,
             target_mbs: Any = None, **kwargs: Any) -> torch.Tensor | list[torch.Tensor] | None:
        """Train this stage on one mini-batch (first stage: `step(x, target=y)`, or pre-split `arg_mbs=`/
        `target_mbs=`); returns without waiting for later stages. `losses` is extended with this stage's
        per-micro-batch losses; the last stage returns its merged output (the list of micro-batch outputs when
        their shapes differ beyond the batch dimension, e.g. in sequence length; None elsewhere or with
        return_outputs=False). Under torch's `eval()` (no backward) the pass is forward-only."""
        if self._closed:
            raise PipelineError(f"stage {self._stage.stage_index}: step() after close(); build a new schedule")
        training = self._has_backward
        if training and not torch.is_grad_enabled():
            raise ConfigError("step() trains and needs gradients: call it outside torch.no_grad(), or use eval()")
        if training:
            self._check_ready()
        arg_mbs, kwarg_mbs, target_mbs = self._micro_batches(args, kwargs, target, arg_mbs, kwarg_mbs, target_mbs)
        self._loss.kwargs = dict(loss_kwargs or {})
        outputs = self._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs,
                                          training=training)
        if self._stage.is_last and return_outputs and outputs:
            if len({tuple(out.shape[1:]) for out in outputs}) > 1:  # e.g. micro-batches of different lengths
                return outputs
            return torch.cat(outputs)
        return None

    def _micro_batches(self, args: tuple, kwargs: dict, target: Any, arg_mbs: Any, kwarg_mbs: Any,
                       target_mbs: Any) -> tuple[list | None, list | None, list | None]:
        """Validate and split this stage's inputs the way torch's step() takes them (whole batch or pre-split)."""
        index, m = self._stage.stage_index, self._n_microbatches
        if (args or kwargs) and (arg_mbs is not None or kwarg_mbs is not None):
            raise ConfigError("pass either whole-batch inputs (step(x, ...)) or pre-split arg_mbs=/kwarg_mbs=, "
                              "not both")
        if target is not None and target_mbs is not None:
            raise ConfigError("pass either target= (whole batch) or target_mbs= (pre-split), not both")
        if target_mbs is not None:
            target_mbs = _micro_list(target_mbs, "target_mbs", m)
        if not self._stage.is_first:
            if args or kwargs or arg_mbs is not None or kwarg_mbs is not None:
                raise ConfigError(f"stage {index} receives its input from the previous stage; call step() without "
                                  f"inputs (losses= and, on the last stage, target= are allowed)")
            if target is not None:
                target_mbs = [target]
            return None, None, target_mbs
        if target is None and target_mbs is None:
            raise ConfigError("the first stage needs the targets: every stage's local loss uses them, so they enter "
                              "the pipeline at the first stage; call step(x, target=y) there")
        if arg_mbs is not None:
            arg_mbs = _micro_list(arg_mbs, "arg_mbs", m)
            kwarg_mbs = _micro_list(kwarg_mbs, "kwarg_mbs", m) if kwarg_mbs is not None else [{}] * m
            if target_mbs is None:
                target_mbs = list(target.tensor_split(m))
            if any(not isinstance(a, (tuple, list)) or not a for a in arg_mbs):
                raise ConfigError("each arg_mbs entry must be a tuple of the stage's positional input tensors "
                                  "(keyword inputs go in kwarg_mbs)")
            return [a[0] if len(a) == 1 else tuple(a) for a in arg_mbs], kwarg_mbs, target_mbs
        if not args:
            raise ConfigError("the first stage takes step(x, target=y): its input tensor(s), then target=")
        x = args[0] if len(args) == 1 else tuple(args)
        rows = len(target) if target is not None else payload.batch_size(x)
        if rows % m:
            raise ConfigError(f"batch size {rows} is not divisible by n_microbatches={m}; use a multiple of it")
        n = min(m, rows)
        tensors, structure = payload.flatten(x)
        parts = [t.tensor_split(n) for t in tensors]
        xs = [payload.rebuild([p[i] for p in parts], structure) for i in range(n)]
        kws = [{k: (v.tensor_split(n)[i] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
               for i in range(n)]
        if target_mbs is None:
            target_mbs = list(target.tensor_split(n))
        elif len(target_mbs) != n:
            raise ConfigError(f"target_mbs has {len(target_mbs)} entries for {n} micro-batches")
        return xs, kws, target_mbs

    def _step_microbatches(self, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None, return_outputs=True,
                           *args, training: bool = True, **kwargs) -> list[torch.Tensor]:
        """Run one mini-batch given as micro-batches: first stage from `arg_mbs`/`target_mbs`, later stages from
        their input link (a `target_mbs` given there must equal the targets that arrived). Returns this stage's
        outputs per micro-batch when `return_outputs`."""
        index = self._stage.stage_index
        device = self._worker.device
        kind = Kind.TRAIN if training else Kind.EVAL
        if not self._streaming:  # from the first step on, the links are ended before the group goes or at exit
            self._streaming = True
            shutdown.register(self)
        if self._stage.is_first:
            messages = iter([Msg(kind, payload.to(x, device), t.to(device), len(arg_mbs))
                             for x, t in zip(arg_mbs, target_mbs, strict=True)])
            count = len(arg_mbs)
        else:
            # Each micro-batch is handled as soon as it arrives (not after all of them): the previous stage keeps
            # streaming into the bounded queue instead of waiting for room.
            first = self._worker.take(kind)
            count = first.micro_batches
            messages = itertools.chain([first], iter(lambda: self._worker.take(kind, count), None))
        given, given_mbs = None, None
        if target_mbs is not None and not self._stage.is_first:
            if len({tuple(t.shape[1:]) for t in target_mbs}) > 1:  # e.g. sequence lengths differ: match one by one
                given_mbs = list(target_mbs)
            else:
                given = target_mbs[0] if len(target_mbs) == 1 else torch.cat(list(target_mbs))
        outputs: list[torch.Tensor] = []
        seen = 0
        for i in range(count):
            msg = next(messages)
            if given is not None:
                self._check_target(given, msg.y, seen, last=i == count - 1)
                seen += len(msg.y)
            elif given_mbs is not None:
                if len(given_mbs) != count:
                    raise PipelineError(f"stage {index}: target_mbs has {len(given_mbs)} entries but stage 0 sent "
                                        f"{count} micro-batches; feed every rank the same data")
                self._check_target(given_mbs[i], msg.y, 0, last=True)
            self._body.extra = kwarg_mbs[i] if kwarg_mbs else {}
            try:
                self._worker.handle(msg)
            finally:
                self._body.extra = {}
            if losses is not None:
                losses.append(self._worker.last_loss)
            if return_outputs and self._stage.is_last:
                outputs.append(self._worker.last_output)
        if not training:  # the stage loop's end of evaluation: back to train mode, passed downstream
            end = Msg(Kind.EVAL_END) if self._stage.is_first else self._worker.take(Kind.EVAL_END)
            self._worker.handle(end)
        return outputs

    def _check_target(self, given: torch.Tensor, arrived: torch.Tensor, start: int, last: bool) -> None:
        """PipelineError unless the micro-batch targets that arrived are rows start.. of the step's `target=`
        (checked before the micro-batch is used; the last one must also end the given targets)."""
        part = given[start:start + len(arrived)]
        if (part.shape != arrived.shape or not torch.equal(part.to(arrived.device), arrived)
                or (last and start + len(arrived) != len(given))):
            raise PipelineError(f"stage {self._stage.stage_index}: target= differs from the targets that arrived "
                                f"with the activations; feed every rank the same data order")

    def flush(self) -> None:
        """Block until everything this stage sent has been received downstream."""
        self._stream.flush()

    def close(self, failed: bool = False) -> None:
        """End this stage's streams so every process can exit cleanly, whichever stage finishes first: wait for
        the previous stage's end marker, pass it on and wait until it is taken, so no send and no posted receive is
        left. Runs before `torch.distributed.destroy_process_group()` or at exit unless called before; idempotent; a
        schedule that never stepped has nothing to end.
        When the ranks made different numbers of step() / eval() calls, every stage raises PipelineError saying
        where (`transport.end_stream`). `failed=True` (this process stopped on an error) tells the later stages so."""
        if self._closed or not self._streaming:
            return
        self._closed = True
        shutdown.forget(self)
        self._stream.close(failed=failed)

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
        state = ckpt.read_trainer_state(folder)
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


# Config-driven trainers (torchtitan's pipeline_parallel_schedule = "PPLL") find the schedule by name, whatever the
# order of their imports (see ppll_ext.torch_patches).
torch_patches.register_schedule("PPLL", SchedulePPLL)
get_schedule_class = schedules.get_schedule_class
"""torch's `get_schedule_class` (the same function), which also knows "PPLL" (case-insensitive) -> SchedulePPLL."""
