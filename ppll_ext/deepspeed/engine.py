"""`LocalPipelineEngine`: DeepSpeed's PipelineEngine interpreting a schedule with no gradient instructions.

Each instruction calls the stage's `LocalBlock` — the same forward, local loss + backward and update the native
stage loop runs — so `on_nan`, clipping, autocast and evaluation have one implementation; DeepSpeed supplies the
backward (its loss scaling and gradient accumulation bookkeeping), the gradient all-reduce within a stage's
data-parallel replicas and the optimizer step (its bf16 optimizer, LR schedule and step counters).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ppll_ext import hooks
from ppll_ext.core import LocalBlock, payload
from ppll_ext.core.payload import Payload
from ppll_ext.deepspeed import _ds
from ppll_ext.deepspeed.module import LocalPipelineModule
from ppll_ext.errors import ConfigError, PipelineError
from ppll_ext.runtime import shutdown
from ppll_ext.runtime.base import EvalCounts
from ppll_ext.runtime.guard import watch_launchers
from ppll_ext.runtime.stage import StageStream
from ppll_ext.transport import Kind, Msg, check_count, check_link_settings, open_links

log = logging.getLogger(__name__)
schedule = _ds.schedule
CALLS = "train_batch / eval_batch"
"""The calls every rank makes alike (named in protocol errors)."""


class LocalBackwardPass(schedule.BufferOpInstruction):
    """Compute this stage's own loss on a buffered output and backpropagate it through this stage only."""


class LocalTrainSchedule(schedule.PipeSchedule):
    """One train_batch of one PPLL stage: per micro-batch load (first stage) or receive activations with labels,
    forward, send both downstream, local loss + backward; then reduce within the stage's data-parallel group and
    step once. No instruction sends or receives gradients, so no stage waits for a later one. With zero
    micro-batches (a replica without data in an epoch's last step) only the reduce and the step remain."""

    def steps(self) -> Iterator[list[schedule.PipeInstruction]]:
        """Yield the instructions of each micro-batch, then the reduce and the step."""
        for _ in range(self.micro_batches):
            cmds: list[schedule.PipeInstruction] = [
                schedule.LoadMicroBatch(buffer_id=0) if self.is_first_stage else schedule.RecvActivation(buffer_id=0),
                schedule.ForwardPass(buffer_id=0),
            ]
            if not self.is_last_stage:
                cmds.append(schedule.SendActivation(buffer_id=0))
            cmds.append(LocalBackwardPass(buffer_id=0))
            yield cmds
        yield [schedule.ReduceGrads(), schedule.OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        """A micro-batch is finished before the next one starts: one buffer."""
        return 1


class DeepSpeedUpdater:
    """A LocalBlock's updater inside the DeepSpeed engine: DeepSpeed's backward and optimizer step."""

    def __init__(self, engine: LocalPipelineEngine) -> None:
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward (scaled by this stage's fp16 loss scale); the block already divided the loss by its
        micro-batch count."""
        _ds.backward(self.engine, loss * self.engine.grad_weight)

    def apply(self) -> bool:
        """DeepSpeed's OptimizerStep: clip (this stage only), step, zero grads, step counters. False when the
        gradients overflowed (fp16 loss scaling, or an inf/NaN norm): DeepSpeed skipped the update and lowered this
        stage's loss scale; the LR schedule advances all the same, as after any skipped step."""
        engine = self.engine
        _ds.stock_optimizer_step(engine)
        if not _ds.overflowed(engine):
            return True
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step()  # DeepSpeed holds the schedule on overflow; PPLL stages count every step
        return False

    def skip(self) -> None:
        """Drop the gradients; the LR schedule and DeepSpeed's step counters advance as after an update."""
        engine = self.engine
        _ds.drop_gradients(engine)
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step()
        engine.global_steps += 1
        engine.global_samples += engine.train_batch_size()

    @property
    def loss_scale(self) -> float | None:
        """This stage's current fp16 loss scale (None without fp16)."""
        return _ds.loss_scale(self.engine)


class LocalPipelineEngine(_ds.PipelineEngine):
    """PipelineEngine running LocalTrainSchedule over the stage's LocalBlock: per-stage losses, steps, clipping."""

    def __init__(self, *args: Any, queue_depth: int = 2, timeout_s: float = 300.0, **kwargs: Any) -> None:
        check_link_settings(queue_depth, timeout_s)
        super().__init__(*args, **kwargs)
        watch_launchers()  # this rank ends with its launcher (deepspeed), never lives on as an orphan
        if not isinstance(self.module, LocalPipelineModule):
            raise ConfigError("LocalPipelineEngine needs a LocalPipelineModule", key="model")
        _ds.confine_to_stage(self)
        world = dist.get_world_size()
        group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s))
        ranks = [self.grid.stage_to_global(s) for s in range(self.num_stages)]
        sender, receiver = open_links(ranks, self.stage_id, queue_depth, timeout_s, self.device, group)
        self._stream = StageStream(self.stage_id, self.num_stages, CALLS, receiver=receiver, sender=sender)
        self._closed = False
        shutdown.register(self)  # closed before destroy_process_group() or at exit, if the script does not
        self._loss_sum, self._losses = 0.0, 0
        self._micro = self.micro_batches
        self.grad_weight = 1.0
        """Factor on this replica's loss: replicas / replicas with data, when an epoch's last step has fewer
        batches than replicas (the all-reduce averages over all replicas)."""
        module: LocalPipelineModule = self.module
        # Kept out of the engine's submodules (it holds the module itself as its body).
        object.__setattr__(self, "block", LocalBlock(
            module, module.aux_head, module.loss_fn, index=self.stage_id, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, on_nan=module.on_nan, autocast=_autocast_of(self),
            updater=DeepSpeedUpdater(self), spread=False))
        hooks.stage_started(self.block)

    @property
    def wait_in_s(self) -> float:
        """Seconds spent waiting for activations from the previous stage (the data loader on the first stage)."""
        return self._stream.wait_in_s

    @wait_in_s.setter
    def wait_in_s(self, seconds: float) -> None:
        self._stream.wait_in_s = seconds

    @property
    def wait_out_s(self) -> float:
        """Seconds spent waiting for room in the bounded link to the next stage."""
        return self._stream.wait_out_s

    @wait_out_s.setter
    def wait_out_s(self, seconds: float) -> None:
        self._stream.wait_out_s = seconds

    def train_batch(self, data_iter: Any = None, num_micro_batches: int | None = None) -> torch.Tensor:
        """Train this stage on one mini-batch of micro-batches and step once (or skip the update, on_nan="skip").

        `num_micro_batches` (>= 1) defaults to gradient_accumulation_steps on the first stage; later stages take the
        count the first stage sent (so a smaller last batch, cut into fewer micro-batches, needs no special case).
        A data-parallel replica without data in a step calls `join_step()` instead.
        Returns this stage's mean finite local loss (the model's loss on the last stage, its aux head's elsewhere;
        NaN when every one was NaN/inf), averaged over the stage's data-parallel replicas; unlike stock DeepSpeed
        it is not broadcast from the last stage, which would make every stage wait for the last one.
        """
        if num_micro_batches is not None:
            num_micro_batches = check_count("num_micro_batches", num_micro_batches,
                                            "micro-batches in this train_batch; a data-parallel replica without "
                                            "data in a step calls join_step()")
        self._check_grad_enabled()
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        return self._train(self._micro_count(num_micro_batches))

    def join_step(self) -> torch.Tensor:
        """This data-parallel replica has no data in this step (an epoch's last step with fewer batches than
        replicas): it joins its stage's gradient reduce and optimizer step with no micro-batch, so the replicas stay
        identical. Returns the stage's mean loss over its replicas that had data (NaN if none)."""
        if not self.is_data_parallel:
            raise ConfigError(f"stage {self.stage_id} has no other data-parallel replica to join: join_step() is "
                              f"for a replica without data in a step; call train_batch with data")
        self._check_grad_enabled()
        return self._train(0)

    def _check_grad_enabled(self) -> None:
        if not torch.is_grad_enabled():
            raise PipelineError("train_batch() needs gradients enabled; use eval_batch() for evaluation")

    def _train(self, micro: int) -> torch.Tensor:
        """Run LocalTrainSchedule over `micro` micro-batches (0: only the reduce and the step)."""
        self.module.train()
        self._micro = micro
        self._loss_sum, self._losses = 0.0, 0
        _ds.exec_schedule(self, LocalTrainSchedule(self._micro, self.num_stages, self.stage_id))
        self.agg_train_loss = self._mean_over_replicas(self._loss_sum, self._losses)
        if self.steps_per_print() and self.global_steps % self.steps_per_print() == 0 \
                and _ds.stage_of(self.module)[0] == 0:
            log.info("stage %d steps: %d local loss: %.4f", self.stage_id, self.global_steps,
                     float(self.agg_train_loss))
        return self.agg_train_loss

    def _micro_count(self, requested: int | None) -> int:
        if requested is not None or self.is_first_stage():
            return self.micro_batches if requested is None else requested
        msg = self._stream.peek()
        self._stream.check(msg, Kind.TRAIN)
        return msg.micro_batches

    @torch.no_grad()
    def eval_batch(self, data_iter: Any = None, num_micro_batches: int | None = None) -> torch.Tensor:
        """Forward only over num_micro_batches (>= 1, default gradient_accumulation_steps) micro-batches; returns
        this stage's mean local loss over them, averaged over its data-parallel replicas."""
        micro = self.micro_batches if num_micro_batches is None else check_count(
            "num_micro_batches", num_micro_batches, "micro-batches in this eval_batch")
        train_iter = self.data_iterator
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.eval()
        total = 0.0
        try:
            for _ in range(micro):
                x, y = self._load() if self.is_first_stage() else self._receive(Kind.EVAL, micro)
                h = self.block(x)
                self._stream.send(Msg(Kind.EVAL, h, y, micro))
                total += float(self.block.local_loss(h, y).float())
        finally:
            self.module.train()
            self.set_dataiterator(train_iter)
        return self._mean_over_replicas(total, micro)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None, num_batches: int) -> EvalCounts:
        """Forward `num_batches` whole batches (the first stage reads `batches`, the others receive them) and count
        this stage's classifier's correct predictions: its aux head's (early exit), or the model's on the last stage.
        """
        self.module.eval()
        counts = EvalCounts(self.stage_id)
        source = iter(batches) if batches is not None else None
        try:
            for _ in range(num_batches):
                if self.is_first_stage():
                    if source is None:
                        raise PipelineError("the first stage has no data: pass evaluate(batches, num_batches)")
                    x, y = self._to_device(next(source))
                else:
                    x, y = self._receive(Kind.EVAL, 1)
                h, s = self.block.eval_step(x, y)
                self._stream.send(Msg(Kind.EVAL, h, y, 1))
                counts.add(s, len(y))
        finally:
            self.module.train()
        return counts

    def _mean_over_replicas(self, total: float | torch.Tensor, count: float | torch.Tensor) -> torch.Tensor:
        """Mean of `count` losses summing to `total`, over the stage's replicas (NaN when there are none), computed
        on the device without a host read."""
        both = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in (total, count)])
        if self.is_data_parallel:
            dist.all_reduce(both, group=self.grid.get_data_parallel_group())
        return (both[0] / both[1]).float()

    def flush(self) -> None:
        """Block until every activation this stage sent has been received downstream."""
        self._stream.flush()

    def close(self, failed: bool = False) -> None:
        """End this stage's streams so the process can exit cleanly, whichever stage finishes first: wait for the
        previous stage's end marker, pass it on and wait until it is taken, so no send and no posted receive is
        left behind. Runs before `torch.distributed.destroy_process_group()` or at exit unless called before
        (scripts need not call it); idempotent. When the ranks made different numbers of train_batch / eval_batch
        calls, every stage raises PipelineError saying where (`transport.end_stream`); `failed=True` (this process
        stopped on an error) tells the later stages so."""
        if self._closed or not dist.is_initialized():
            return
        self._closed = True
        shutdown.forget(self)
        self._stream.close(failed=failed)

    @property
    def zero_sharded(self) -> bool:
        """True when the optimizer states are sharded over the stage's data-parallel replicas (ZeRO-1)."""
        return _ds.is_zero(self.optimizer)

    def optimizer_state_dict(self) -> dict:
        """This stage's optimizer state. Under ZeRO-1 in plain torch form (`torch.optim.Optimizer.state_dict()`: per
        parameter, in param-group order), each state tensor gathered whole from the stage's replicas, so every
        replica must call this (a collective over the stage's data-parallel group); the result equals the state of
        the same training without ZeRO, and ppll_ext checkpoints stay independent of the replica count. Otherwise
        the optimizer's own `state_dict()` (torch's, or DeepSpeed's fp16/bf16 wrapper's)."""
        if self.zero_sharded:
            return _ds.gather_zero_state(self.optimizer)
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Load a plain torch optimizer state (as `optimizer_state_dict` returns it); under ZeRO-1 each replica keeps
        its own shard of it."""
        if self.zero_sharded:
            _ds.load_zero_state(self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)

    def clip_fp32_gradients(self) -> None:
        """Clip by this stage's own gradient norm (stock code all-reduces the norm over all stages); the norm is what
        `get_global_grad_norm()` then reports, as with DeepSpeed's other optimizers."""
        _ds.set_grad_norm(self, nn.utils.clip_grad_norm_(self.module.parameters(), self.gradient_clipping()).detach())

    def _load(self) -> tuple[Payload, torch.Tensor]:
        began = time.perf_counter()
        batch = _ds.next_batch(self)
        self._stream.wait_in_s += time.perf_counter() - began
        if batch is None:
            raise PipelineError("the first stage has no data: pass train_batch(data_iter) / eval_batch(data_iter) "
                                "or training_data= to initialize")
        return self._to_device(batch)

    def _to_device(self, batch: Any) -> tuple[Payload, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not torch.is_tensor(batch[1]):
            raise PipelineError("the data iterator must yield (inputs, labels) pairs: inputs a tensor or a tuple of "
                                "tensors, labels a tensor")
        low = torch.bfloat16 if self.bfloat16_enabled() else (torch.float16 if self.fp16_enabled() else None)

        def place(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device)
            return t.to(low) if low is not None and t.is_floating_point() else t

        return payload.apply(place, batch[0]), batch[1].to(self.device)

    def _receive(self, kind: Kind, micro: int) -> tuple[Payload, torch.Tensor]:
        msg = self._stream.take(kind, micro)
        return msg.x, msg.y

    def _stage_input(self, x: Payload) -> Payload:
        """Reentrant activation checkpointing needs floating inputs that require grad (as stock DeepSpeed sets
        them)."""
        if not _ds.reentrant_checkpointing(self):
            return x
        return payload.apply(lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t, x)

    def _local_load(self, buffer_id: int) -> None:
        x, y = self._load()
        _ds.set_buffer(self, "inputs", buffer_id, self._stage_input(x))
        _ds.set_buffer(self, "labels", buffer_id, y)

    def _local_recv(self, buffer_id: int) -> None:
        x, y = self._receive(Kind.TRAIN, self._micro)
        _ds.set_buffer(self, "inputs", buffer_id, self._stage_input(x))
        _ds.set_buffer(self, "labels", buffer_id, y)

    def _local_forward(self, buffer_id: int) -> None:
        _ds.start_throughput_timer(self)
        outputs = self.block(_ds.buffer(self, "inputs", buffer_id))
        payload.flatten(outputs)  # a tensor or a tuple / list / dict of tensors, else one line naming what it is
        _ds.set_buffer(self, "inputs", buffer_id, None)
        _ds.set_buffer(self, "outputs", buffer_id, outputs)

    def _local_send(self, buffer_id: int) -> None:
        out = payload.detach(_ds.buffer(self, "outputs", buffer_id))
        self._stream.send(Msg(Kind.TRAIN, out, _ds.buffer(self, "labels", buffer_id), self._micro))

    def _local_backward(self, buffer_id: int) -> None:
        h, y = _ds.buffer(self, "outputs", buffer_id), _ds.buffer(self, "labels", buffer_id)
        value = self.block.backward(self.block.local_loss(h, y), self._micro).to(torch.float64)
        finite = torch.isfinite(value)
        self._loss_sum = torch.where(finite, value, 0.0) + self._loss_sum
        self._losses = finite.to(torch.float64) + self._losses
        _ds.set_buffer(self, "outputs", buffer_id, None)
        _ds.set_buffer(self, "labels", buffer_id, None)

    def _local_reduce(self) -> None:
        """All replicas of a stage skip together (one saw a non-finite loss), then reduce as DeepSpeed does (ZeRO-1:
        reduce-scatter to the replica owning each shard; a replica without data contributes zeros)."""
        if self.is_data_parallel and self.block.on_nan == "skip":
            flag = torch.tensor(float(self.block.will_skip), device=self.device)  # on_nan="skip": a read per step
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.grid.get_data_parallel_group())
            if flag.item() and not self.block.will_skip:
                self.block.mark_skip()
        if self._micro == 0 and _ds.is_zero(self.optimizer):
            _ds.fill_missing_gradients(self)
        _ds.stock_reduce_grads(self)

    def _local_step(self) -> None:
        self.block.step()

    _INSTRUCTION_MAP = _ds.instruction_map({
        schedule.LoadMicroBatch: _local_load,
        schedule.RecvActivation: _local_recv,
        schedule.ForwardPass: _local_forward,
        schedule.SendActivation: _local_send,
        LocalBackwardPass: _local_backward,
        schedule.ReduceGrads: _local_reduce,
        schedule.OptimizerStep: _local_step,
    })


def _autocast_of(engine: LocalPipelineEngine) -> str:
    """The block's autocast from ds_config's torch_autocast section ("none" when it is off)."""
    if not engine.torch_autocast_enabled():
        return "none"
    dtype = engine.torch_autocast_dtype()
    if dtype is torch.bfloat16:
        return "bf16"
    raise ConfigError(f"torch_autocast with {dtype} is not supported by the PPLL adapter (the steps its GradScaler "
                      f"skips would go unnoticed); use dtype bfloat16, or the ds_config fp16 section (a dynamic loss "
                      f"scale per stage)", key="torch_autocast")


def initialize(
    args: Any = None,
    model: LocalPipelineModule | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    *,
    collate_fn: Callable | None = None,
    config: str | dict | None = None,
    queue_depth: int = 2,
    timeout_s: float = 300.0,
) -> tuple[LocalPipelineEngine, Any, Any, Any]:
    """`deepspeed.initialize` for a LocalPipelineModule: same arguments and results, but a LocalPipelineEngine
    (deepspeed.initialize builds the stock PipelineEngine for every PipelineModule).

    `queue_depth` bounds the micro-batches in flight to the next stage; `timeout_s` bounds every wait on a link.
    """
    if not isinstance(model, LocalPipelineModule):
        raise ConfigError(f"model must be a LocalPipelineModule, got {type(model).__name__}; for other models use "
                          f"deepspeed.initialize", key="model")
    if config is None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ConfigError("no DeepSpeed config: pass config= (a dict or a JSON file such as "
                          "configs/deepspeed/ppll.json) or args.deepspeed_config", key="config")
    if not isinstance(config, dict):
        if not os.path.isfile(config):
            raise ConfigError(f"DeepSpeed config {config!r} is not a file (paths are relative to {os.getcwd()})",
                              key="config")
        config = _ds.load_ds_config(config)
    conf = _ds.config_class(config, model)
    stage = int(conf.zero_optimization_stage)
    if stage > 1:
        raise ConfigError(f"zero_optimization.stage={stage}: use stage 1 (optimizer states sharded over each stage's "
                          f"data-parallel replicas) or 0; ZeRO-2/3 partition gradients or parameters across the "
                          f"micro-batches of a pipeline, which DeepSpeed refuses for pipelines too",
                          key="zero_optimization")
    if stage == 1 and isinstance(optimizer, torch.optim.Optimizer) and not conf.zero_allow_untested_optimizer \
            and not _ds.zero_tested(optimizer):
        raise ConfigError(f"zero_optimization.stage=1 with the client optimizer {type(optimizer).__name__}, which "
                          f"DeepSpeed's ZeRO has not tested: add \"zero_allow_untested_optimizer\": true to the "
                          f"ds_config, or use Adam or AdamW", key="zero_allow_untested_optimizer")
    if conf.float16_config.enabled and not _ds.fp16_supported():
        raise ConfigError(f"fp16: DeepSpeed's {_ds.accelerator_name()} accelerator here does not support fp16 (a CPU "
                          f"needs oneDNN fp16 kernels: AVX512-FP16 or AMX-FP16); use bf16 "
                          f"(configs/deepspeed/ppll_bf16.json) or run on GPUs", key="fp16")
    engine = _ds.build_engine(LocalPipelineEngine, config, conf, model, args=args, optimizer=optimizer,
                              model_parameters=model_parameters, training_data=training_data,
                              lr_scheduler=lr_scheduler, collate_fn=collate_fn, queue_depth=queue_depth,
                              timeout_s=timeout_s)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
