"""PPLL on DeepSpeed: `LocalPipelineModule` + `initialize`, a drop-in for `PipelineModule` + `deepspeed.initialize`.

    net = LocalPipelineModule(layers=[...], num_stages=K, loss_fn=ce, aux_heads="auto", example_input=x[:2])
    engine, optimizer, _, lr_scheduler = initialize(model=net, config="configs/deepspeed/ppll.json",
                                                    model_parameters=[p for p in net.parameters() if p.requires_grad])
    loss = engine.train_batch(data_iter)

Every stage but the last owns an auxiliary head, registered in the module so DeepSpeed's optimizer, bf16 and
checkpoints see it. `LocalTrainSchedule` has no gradient instructions: a stage loads (first stage) or receives
activations together with their labels, forwards, sends both on at once (early forwarding), backpropagates its
own loss through itself only, and after its gradient_accumulation_steps micro-batches all-reduces gradients
within its data-parallel group (same stage, other replicas) and steps, clipping by its own gradient norm.
Activations travel over ppll_ext's links (a small header per message, so batch sizes may vary) on a process
group of their own, so no stage ever waits for a later one. Tested with DeepSpeed 0.19.8.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
from deepspeed.runtime.torch_autocast import autocast_if_enabled
from torch import nn

from ppll_ext.core import build_aux_head
from ppll_ext.core.partition import parse_explicit
from ppll_ext.errors import CheckpointError, ConfigError, PipelineError
from ppll_ext.runtime.processes import open_links
from ppll_ext.runtime.stage import EvalCounts, Kind, Msg

__all__ = [
    "LayerSpec",
    "LocalBackwardPass",
    "LocalPipelineEngine",
    "LocalPipelineModule",
    "LocalTrainSchedule",
    "PipeDataParallelTopology",
    "build_stage_aux_head",
    "initialize",
]

AUX_CHOICES = ("auto", "conv", "mlp-sr", "vit")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_stage_aux_head(
    layers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    stage: int,
    parts: Sequence[int],
    kind: str,
    example_input: torch.Tensor,
    *,
    num_classes: int | None = None,
    hidden: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Aux head `kind` for stage `stage`, sized by a dry forward of layers[:parts[stage+1]] and seeded by
    (seed, stage), so every rank and a single-process reference build the same head.

    kind="auto" picks a conv head for (N, C, H, W) activations, a ViT head for (N, T, D), a linear one for (N, D).
    `num_classes` defaults to the last dimension of the whole model's output.
    """
    if kind not in AUX_CHOICES:
        raise ConfigError(f"aux_heads={kind!r} is not one of {', '.join(AUX_CHOICES)} or a list of modules")
    h = example_input
    with torch.no_grad(), _eval_mode(layers):
        for layer in layers[: parts[stage + 1]]:
            h = layer(h)
        out = h
        if num_classes is None:
            for layer in layers[parts[stage + 1]:]:
                out = layer(out)
    classes = num_classes if num_classes is not None else int(out.shape[-1])
    with torch.random.fork_rng():
        torch.manual_seed(seed + stage)
        if kind == "auto" and h.dim() == 2:
            return nn.Linear(h.shape[1], classes).to(h.device)
        if kind == "auto":
            kind = "conv" if h.dim() == 4 else "vit"
        return build_aux_head(kind, h, classes, hidden=hidden)


@contextlib.contextmanager
def _eval_mode(layers: Sequence[Callable]) -> Iterator[None]:
    """The modules among `layers` in eval mode (no BatchNorm statistics updates), restored afterwards."""
    modules = [m for m in layers if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def _pipe_stages(num_stages: int | None, topology: ProcessTopology | None, num_layers: int) -> int:
    """The number of stages, after checking it against the topology, the world size and the layer count."""
    world = deepspeed.comm.get_world_size()
    if num_stages is None and topology is None:
        raise ConfigError("LocalPipelineModule needs num_stages=K or topology=PipeDataParallelTopology(num_pp=K, ...)")
    if topology is not None:
        pipe = topology.get_dim("pipe")
        if num_stages is not None and num_stages != pipe:
            raise ConfigError(f"num_stages={num_stages} but the topology has {pipe} pipeline stages; give one of them")
        if topology.world_size() != world:
            raise ConfigError(f"the topology has {topology.world_size()} ranks but {world} processes were started; "
                              f"launch {topology.world_size()} (deepspeed --num_gpus {topology.world_size()})")
        num_stages = pipe
    if num_stages < 1 or world % num_stages:
        raise ConfigError(f"num_stages={num_stages} must divide the {world} processes started (stages x data-parallel "
                          f"replicas); launch a multiple of {num_stages} processes or change num_stages")
    if num_stages > num_layers:
        raise ConfigError(f"num_stages={num_stages} is larger than the {num_layers} layers; use at most {num_layers}")
    return num_stages


def _check_aux_heads(aux_heads: str | Sequence[nn.Module], num_stages: int,
                     example_input: torch.Tensor | None) -> str | list[nn.Module]:
    if isinstance(aux_heads, str):
        if aux_heads not in AUX_CHOICES:
            raise ConfigError(f"aux_heads={aux_heads!r} is not one of {', '.join(AUX_CHOICES)} or a list of modules")
        if example_input is None and num_stages > 1:
            raise ConfigError(f"aux_heads={aux_heads!r} builds heads from activation shapes: pass example_input= "
                              f"(a small input batch, e.g. x[:2]) or give aux_heads as a list of modules")
        return aux_heads
    heads = list(aux_heads)
    if len(heads) != num_stages - 1:
        raise ConfigError(f"aux_heads has {len(heads)} modules but {num_stages} stages need {num_stages - 1} "
                          f"(one per stage except the last, whose output is the model's prediction)")
    bad = [i for i, h in enumerate(heads) if not isinstance(h, nn.Module)]
    if bad:
        raise ConfigError(f"aux_heads[{bad[0]}] is a {type(heads[bad[0]]).__name__}, not an nn.Module")
    return heads


class LocalPipelineModule(PipelineModule):
    """A DeepSpeed PipelineModule whose stages also own an auxiliary head and a local loss (PPLL).

    Extra arguments beyond PipelineModule's: `aux_heads` ("auto" | "conv" | "mlp-sr" | "vit", built from a
    dry forward of `example_input`, or one module per stage except the last), `num_classes` (default: from the
    model's output), `aux_hidden` and `aux_seed`. `partition_method` also accepts explicit start layers "0,5,9".
    """

    def __init__(
        self,
        layers: Sequence[nn.Module | LayerSpec | Callable],
        num_stages: int | None = None,
        *,
        loss_fn: LossFn,
        aux_heads: str | Sequence[nn.Module] = "auto",
        example_input: torch.Tensor | None = None,
        num_classes: int | None = None,
        aux_hidden: int = 128,
        aux_seed: int = 0,
        partition_method: str = "parameters",
        topology: ProcessTopology | None = None,
        **kwargs: Any,
    ) -> None:
        if loss_fn is None:
            raise ConfigError("LocalPipelineModule needs loss_fn: every stage trains on its own loss")
        if "LOCAL_RANK" not in os.environ:
            raise ConfigError("LOCAL_RANK is not set: start the script with the deepspeed launcher "
                              "(launch/deepspeed.sh N script.py, or deepspeed --num_gpus N script.py)")
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed()
        layers = list(layers)
        stages = _pipe_stages(num_stages, topology, len(layers))
        self._aux_choice = _check_aux_heads(aux_heads, stages, example_input)
        self._aux_options = (example_input, num_classes, aux_hidden, aux_seed)
        super().__init__(layers, num_stages=num_stages, topology=topology, loss_fn=loss_fn,
                         partition_method=partition_method, **kwargs)
        del self._aux_choice, self._aux_options
        across = sorted(key for key, comm in self.tied_comms.items() if len(comm["ranks"]) > 1)
        if across:
            raise ConfigError(f"tied layers {across} span several stages: their gradients would be all-reduced "
                              f"between stages, which local learning never does; untie them")

    def _partition_layers(self, method: str = "parameters") -> None:
        """DeepSpeed's methods, plus explicit start layers "0,5,9" (ppll_ext's partition format)."""
        if method.lower() in ("uniform", "parameters") or method.lower().startswith("type:"):
            super()._partition_layers(method)
            return
        if not method.replace(",", "").replace(" ", "").isdigit():
            raise ConfigError(f"partition_method={method!r} is none of uniform, parameters, type:REGEX or start "
                              f"layers like 0,5,9 (e.g. from ppll_ext.core.partition(layers, K, 'profile', ...))")
        self.parts = parse_explicit(method, self._num_layers, self.num_stages)
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    def _build(self) -> None:
        super()._build()
        self.aux_head = self._make_aux_head()
        if self.aux_head is not None:
            for p in self.aux_head.parameters():
                p.ds_pipe_replicated = False

    def _make_aux_head(self) -> nn.Module | None:
        if self.stage_id == self.num_stages - 1:
            return None
        if isinstance(self._aux_choice, list):
            return self._aux_choice[self.stage_id]
        example, num_classes, hidden, seed = self._aux_options
        return build_stage_aux_head(self._dry_layers(num_classes is None), self.stage_id, self.parts,
                                    self._aux_choice, example, num_classes=num_classes, hidden=hidden, seed=seed)

    def _dry_layers(self, all_layers: bool) -> list[Callable]:
        """Callables for the layers up to this stage's end (all layers if `all_layers`): this stage's built
        modules, other stages' modules, and LayerSpecs built for the dry forward without touching the RNG."""
        stop = self._num_layers if all_layers else self._local_stop
        tied: dict[str, nn.Module] = {}
        out: list[Callable] = []
        with torch.random.fork_rng():
            for i, spec in enumerate(self._layer_specs[:stop]):
                if self._local_start <= i < self._local_stop:
                    out.append(self.forward_funcs[i - self._local_start])
                elif isinstance(spec, TiedLayerSpec):
                    if spec.key not in tied:
                        tied[spec.key] = self.tied_modules[spec.key] if spec.key in self.tied_modules else spec.build()
                    mod = tied[spec.key]
                    out.append(mod if spec.forward_fn is None else partial(spec.forward_fn, mod))
                elif isinstance(spec, LayerSpec):
                    out.append(spec.build())
                else:
                    out.append(spec)
        return out

    def local_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This stage's loss: of its aux head's scores, or of the stage output itself on the last stage."""
        return self.loss_fn(h if self.aux_head is None else self.aux_head(h), labels)

    def aux_ckpt_path(self, ckpt_dir: str) -> str:
        """File of this stage's aux head beside DeepSpeed's layer_XX-model_states.pt files."""
        path = os.path.join(ckpt_dir, f"aux_head_{self.stage_id:02d}")
        rank_repr = self._grid._topo.get_rank_repr(rank=self.global_rank)
        return path + (f"-{rank_repr}" if rank_repr else "") + "-model_states.pt"

    def save_state_dict(self, save_dir: str, checkpoint_engine: Any, exclude_frozen_params: bool = False) -> None:
        """DeepSpeed's per-layer files, plus this stage's aux head (written by data-parallel rank 0)."""
        super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params=exclude_frozen_params)
        if self.aux_head is None or self._grid.data_parallel_id != 0:
            return
        state = self.aux_head.state_dict()
        if exclude_frozen_params:
            frozen = {n for n, p in self.aux_head.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        if checkpoint_engine.preserves_storage_sharing():
            state = clone_tensors_for_torch_save(state)
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


class LocalBackwardPass(schedule.BufferOpInstruction):
    """Compute this stage's own loss on a buffered output and backpropagate it through this stage only."""


class LocalTrainSchedule(schedule.PipeSchedule):
    """One train_batch of one PPLL stage: per micro-batch load (first stage) or receive activations with labels,
    forward, send both downstream, local loss + backward; then reduce within the stage's data-parallel group and
    step once. No instruction sends or receives gradients, so no stage waits for a later one."""

    def steps(self) -> Iterator[list[schedule.PipeInstruction]]:
        """Yield the instructions of each micro-batch."""
        for micro in range(self.micro_batches):
            cmds: list[schedule.PipeInstruction] = [
                schedule.LoadMicroBatch(buffer_id=0) if self.is_first_stage else schedule.RecvActivation(buffer_id=0),
                schedule.ForwardPass(buffer_id=0),
            ]
            if not self.is_last_stage:
                cmds.append(schedule.SendActivation(buffer_id=0))
            cmds.append(LocalBackwardPass(buffer_id=0))
            if micro == self.micro_batches - 1:
                cmds += [schedule.ReduceGrads(), schedule.OptimizerStep()]
            yield cmds

    def num_pipe_buffers(self) -> int:
        """A micro-batch is finished before the next one starts: one buffer."""
        return 1


class LocalPipelineEngine(PipelineEngine):
    """PipelineEngine running LocalTrainSchedule: per-stage losses, steps and gradient clipping."""

    def __init__(self, *args: Any, queue_depth: int = 2, timeout_s: float = 300.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.module, LocalPipelineModule):
            raise ConfigError("LocalPipelineEngine needs a LocalPipelineModule")
        if isinstance(self.optimizer, BF16_Optimizer):
            # Its gradient norm would be summed over the model-parallel group, i.e. over all stages.
            self.optimizer.mpu = None
        world = dist.get_world_size()
        group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s))
        ranks = [self.grid.stage_to_global(s) for s in range(self.num_stages)]
        self._sender, receiver = open_links(ranks, self.stage_id, queue_depth, timeout_s, self.device, group)
        self._inbox = receiver.messages() if receiver is not None else None
        self._loss_sum = torch.zeros((), device=self.device)
        self.wait_in_s = 0.0
        """Seconds spent waiting for activations from the previous stage (the data loader on the first stage)."""
        self.wait_out_s = 0.0
        """Seconds spent waiting for room in the bounded link to the next stage."""

    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        """Train this stage on gradient_accumulation_steps micro-batches and step once.

        Returns this stage's mean local loss (the model's loss on the last stage, its aux head's elsewhere),
        averaged over the stage's data-parallel replicas; unlike stock DeepSpeed it is not broadcast from the
        last stage, which would make every stage wait for the last one.
        """
        if not torch.is_grad_enabled():
            raise PipelineError("train_batch() needs gradients enabled; use eval_batch() for evaluation")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self._loss_sum = torch.zeros((), device=self.device)
        self._exec_schedule(LocalTrainSchedule(self.micro_batches, self.num_stages, self.stage_id))
        self.agg_train_loss = self._mean_over_replicas(self._loss_sum / self.micro_batches)
        if self.steps_per_print() and self.global_steps % self.steps_per_print() == 0 \
                and self.grid.data_parallel_id == 0:
            print(f"stage {self.stage_id} steps: {self.global_steps} local loss: {self.agg_train_loss:0.4f}",
                  flush=True)
        return self.agg_train_loss

    @torch.no_grad()
    def eval_batch(self, data_iter: Any = None, num_micro_batches: int | None = None) -> torch.Tensor:
        """Forward only over num_micro_batches (default gradient_accumulation_steps) micro-batches; returns this
        stage's mean local loss over them, averaged over its data-parallel replicas."""
        micro = num_micro_batches or self.micro_batches
        train_iter = self.data_iterator
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.eval()
        total = torch.zeros((), device=self.device)
        try:
            for _ in range(micro):
                x, y = self._load() if self.is_first_stage() else self._receive(Kind.EVAL, micro)
                h = self.module(x)
                if self._sender is not None:
                    self._sender.send(Msg(Kind.EVAL, h.contiguous(), y, micro))
                total += self.module.local_loss(h, y).float()
        finally:
            self.module.train()
            self.set_dataiterator(train_iter)
        return self._mean_over_replicas(total / micro)

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
                h = self.module(x)
                if self._sender is not None:
                    self._sender.send(Msg(Kind.EVAL, h.contiguous(), y, 1))
                scores = (h if self.module.aux_head is None else self.module.aux_head(h)).float()
                counts.correct += int((scores.argmax(-1) == y).sum())
                counts.loss += float(self.module.loss_fn(scores, y)) * len(y)
                counts.samples += len(y)
        finally:
            self.module.train()
        return counts

    def _mean_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        if self.is_data_parallel:
            dist.all_reduce(value, group=self.grid.get_data_parallel_group())
            value /= self.dp_world_size
        return value

    def flush(self) -> None:
        """Block until every activation this stage sent has been received downstream."""
        if self._sender is not None:
            self._sender.flush()

    def clip_fp32_gradients(self) -> None:
        """Clip by this stage's own gradient norm (stock code all-reduces the norm over all stages)."""
        nn.utils.clip_grad_norm_(self.module.parameters(), self.gradient_clipping())

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        began = time.perf_counter()
        batch = self._next_batch()
        self.wait_in_s += time.perf_counter() - began
        if batch is None:
            raise PipelineError("the first stage has no data: pass train_batch(data_iter) / eval_batch(data_iter) "
                                "or training_data= to initialize")
        return self._to_device(batch)

    def _to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(torch.is_tensor(t) for t in batch):
            raise PipelineError("the data iterator must yield (inputs, labels) pairs of tensors")
        x, y = batch[0].to(self.device), batch[1].to(self.device)
        if self.bfloat16_enabled() and x.is_floating_point():
            x = x.to(torch.bfloat16)
        return x, y

    def _receive(self, kind: Kind, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        began = time.perf_counter()
        msg = next(self._inbox)
        self.wait_in_s += time.perf_counter() - began
        if msg.kind is not kind or msg.n_micro != micro:
            raise PipelineError(
                f"stage {self.stage_id} expected a {kind.name} micro-batch ({micro} per batch) from stage "
                f"{self.stage_id - 1} but got {msg.kind.name} ({msg.n_micro} per batch): every rank must make the "
                f"same train_batch / eval_batch calls with the same number of micro-batches")
        return msg.x, msg.y

    def _exec_load_micro_batch(self, buffer_id: int) -> None:
        self.pipe_buffers["inputs"][buffer_id], self.pipe_buffers["labels"][buffer_id] = self._load()

    def _exec_recv_activations(self, buffer_id: int) -> None:
        x, y = self._receive(Kind.TRAIN, self.micro_batches)
        self.pipe_buffers["inputs"][buffer_id], self.pipe_buffers["labels"][buffer_id] = x, y

    def _exec_forward_pass(self, buffer_id: int) -> None:
        self.tput_timer.start()
        outputs = DeepSpeedEngine.forward(self, self.pipe_buffers["inputs"][buffer_id])
        if not torch.is_tensor(outputs):
            raise PipelineError(f"stage {self.stage_id} returned a {type(outputs).__name__}; PPLL stages pass one "
                                f"tensor on (the labels travel beside it)")
        self.pipe_buffers["inputs"][buffer_id] = None
        self.pipe_buffers["outputs"][buffer_id] = outputs

    def _exec_send_activations(self, buffer_id: int) -> None:
        out = self.pipe_buffers["outputs"][buffer_id].detach().contiguous()
        began = time.perf_counter()
        self._sender.send(Msg(Kind.TRAIN, out, self.pipe_buffers["labels"][buffer_id], self.micro_batches))
        self.wait_out_s += time.perf_counter() - began

    def _exec_local_backward(self, buffer_id: int) -> None:
        with autocast_if_enabled(self):
            loss = self.module.local_loss(self.pipe_buffers["outputs"][buffer_id],
                                          self.pipe_buffers["labels"][buffer_id])
        self._loss_sum += loss.detach().float()
        DeepSpeedEngine.backward(self, loss)
        self.pipe_buffers["outputs"][buffer_id] = None
        self.pipe_buffers["labels"][buffer_id] = None

    # Functions, not methods: PipelineEngine._exec_schedule binds them, so the map must name our overrides.
    _INSTRUCTION_MAP = {
        schedule.LoadMicroBatch: _exec_load_micro_batch,
        schedule.RecvActivation: _exec_recv_activations,
        schedule.ForwardPass: _exec_forward_pass,
        schedule.SendActivation: _exec_send_activations,
        LocalBackwardPass: _exec_local_backward,
        schedule.ReduceGrads: PipelineEngine._exec_reduce_grads,
        schedule.OptimizerStep: PipelineEngine._exec_optimizer_step,
    }


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
                          f"deepspeed.initialize")
    if config is None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ConfigError("no DeepSpeed config: pass config= (a dict or a JSON file such as "
                          "configs/deepspeed/ppll.json) or args.deepspeed_config")
    if not isinstance(config, dict):
        if not os.path.isfile(config):
            raise ConfigError(f"DeepSpeed config {config!r} is not a file (paths are relative to {os.getcwd()})")
        config = load_ds_config(config)
    mpu = model.mpu()
    config_class = DeepSpeedConfig(config, mpu)
    if config_class.zero_optimization_stage > 0:
        raise ConfigError(f"zero_optimization.stage={int(config_class.zero_optimization_stage)}: use stage 0 "
                          f"(ZeRO-1's gradient norm spans all stages; ZeRO-2/3 do not support pipelines)")
    if config_class.float16_config.enabled:
        raise ConfigError("fp16 syncs loss-scale overflows across stages; use bf16 (configs/deepspeed/ppll_bf16.json)")
    deepspeed.set_optimizer_flags(config_class, model)
    deepspeed.zero.partition_parameters.shutdown_init_context()
    engine = LocalPipelineEngine(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                 training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                                 collate_fn=collate_fn, config=config, config_class=config_class,
                                 queue_depth=queue_depth, timeout_s=timeout_s)
    deepspeed.zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
