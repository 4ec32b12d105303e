"""The configuration schema: dataclasses with one docstring per field, their choices and checks (YAML files and
`--set` overrides are parsed in ppll_ext.config.parse).

Each section is owned by the code that uses it: `ModelConfig` lives in ppll_ext.models and `DataConfig` in
ppll_ext.data (both re-exported here), and the allowed values of every choice field are `Literal` types built
from constants of the module that acts on them. Every section checks itself (`check()`); `Config.check` adds
the checks that span sections. Every ConfigError raised here carries `key=`, the dotted config key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from ppll_ext.config.placement import PPLL, Placement, check_micro_batches, placement
from ppll_ext.core.aux_heads import AUX_KINDS
from ppll_ext.core.block import AUTOCAST, ON_NAN
from ppll_ext.core.tasks import TASKS
from ppll_ext.data.datasets import DataConfig
from ppll_ext.data.text import TEXT_SOURCES
from ppll_ext.errors import ConfigError, quote
from ppll_ext.models import ModelConfig

# --- local -----------------------------------------------------------------------------------------------------------

RUNTIMES: tuple[str, ...] = ("sequential", "threads", "processes")
"""Allowed values of local.runtime: where the stages of the native engine run (in turn in one thread, one thread
each, one process each)."""
ENGINES: tuple[str, ...] = ("native", "deepspeed", "torch")
"""Allowed values of local.engine: who runs the stages with runtime=processes."""

AuxKind = Literal.__getitem__(AUX_KINDS)
Runtime = Literal.__getitem__(RUNTIMES)
Engine = Literal.__getitem__(ENGINES)


@dataclass
class LocalConfig:
    """How the model is cut into locally trained blocks and how the pipeline runs them."""

    stages: int = 2
    """K: number of blocks, one per pipeline stage (K = 1 is end-to-end backprop)."""
    partition: str = "parameters"
    """Split method: uniform | parameters | profile | explicit boundaries such as "0,5,9"."""
    aux: AuxKind = "auto"
    """Auxiliary head kind: auto (conv after conv layers, vit after transformer tokens, lm for language models) |
    conv | mlp-sr | vit | next-blocks (classification) | lm | lm-blocks (language models: per-token head, or fresh
    copies of the next local.aux_next_blocks blocks before it, as SOLO)."""
    aux_hidden: int = 128
    """Hidden width of the auxiliary heads' classifier."""
    aux_next_blocks: int = 1
    """For aux=next-blocks / lm-blocks: how many of the next stage's first layers the head copies."""
    micro_batches: int = 1
    """M: micro-batches per mini-batch; each stage accumulates their gradients and steps once."""
    queue_depth: int = 2
    """Bound of every queue between stages (pipeline runtimes)."""
    runtime: Runtime = "processes"
    """Where stages run: sequential (one process, in turn) | threads | processes (one process per stage)."""
    timeout_s: float = 300.0
    """Longest wait for a neighbour stage before the run stops with an error."""
    engine: Engine = "native"
    """Who runs the stages with runtime=processes: native (ppll_ext's stage loop) | deepspeed (the DeepSpeed
    adapter, LocalPipelineEngine, configured by local.deepspeed_config) | torch (a torch.distributed.pipelining
    schedule, local.schedule)."""
    schedule: str = PPLL
    """engine=torch: the schedule, by a name torch's get_schedule_class knows (GPipe, 1F1B, Interleaved1F1B,
    InterleavedZeroBubble, ZBVZeroBubble, DualPipeV, ...; any case), which train end to end without aux heads, or
    PPLL (ppll_ext.pipelining.SchedulePPLL: local learning)."""
    stages_per_rank: int = 0
    """engine=torch: pipeline stages each process holds (processes = local.stages / this); 0 = the schedule's: 1,
    or 2 for the schedules that take several (Interleaved*, LoopedBFS looped: rank r holds r, r + R, ...;
    ZBVZeroBubble, DualPipeV V-shaped: rank r holds r and 2R - 1 - r)."""
    deepspeed_config: str | None = None
    """engine=deepspeed: a ds_config JSON (None: ZeRO stage 0, nothing else). Its optimizer/scheduler sections, if
    any, replace optim.*; batch sizes, accumulation and clipping always come from train.batch_size,
    local.micro_batches and optim.grad_clip, and bf16 from train.autocast=bf16, so both engines train alike."""
    data_parallel: int = 1
    """engine=deepspeed: data-parallel replicas per stage (processes = stages x data_parallel)."""
    checkpoint_activations: bool = False
    """Recompute each layer of a stage's body during its backward instead of keeping its activations (torch's
    non-reentrant checkpoint, RNG state preserved, BatchNorm statistics updated once): the same training results
    for less saved-activation memory and more compute."""

    def check(self) -> None:
        """Reject local.* values that cannot work (ConfigError with the key), before any work is done."""
        _check_fields(self, "local.")
        for name in ("stages", "micro_batches", "queue_depth", "data_parallel", "aux_hidden", "aux_next_blocks"):
            _at_least(self, "local.", name, 1)
        _at_least(self, "local.", "stages_per_rank", 0)
        if not self.timeout_s > 0:
            raise ConfigError(f"local.timeout_s={self.timeout_s} must be positive", key="local.timeout_s")

    def placement(self) -> Placement:
        """engine=torch: the schedule and where its stages live (ConfigError for a schedule or a number of stages per
        rank that cannot run)."""
        return placement(self.schedule, self.stages, self.stages_per_rank)


# --- optim -----------------------------------------------------------------------------------------------------------

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
"""Allowed values of optim.name (ppll_ext.build makes the optimizers)."""
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
"""Allowed values of optim.schedule (ppll_ext.build makes the schedules)."""

Optimizer = Literal.__getitem__(OPTIMIZERS)
Schedule = Literal.__getitem__(SCHEDULES)


@dataclass
class OptimConfig:
    """Every block gets its own optimizer and schedule built from these values."""

    name: Optimizer = "sgd"
    """Optimizer: sgd | adam | adamw."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    schedule: Schedule = "cosine"
    """Learning-rate schedule per optimizer step: cosine | constant."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    grad_clip: float | None = None
    """Clip each block's gradient norm to this value (per stage, never across stages)."""

    def check(self) -> None:
        """Reject optim.* values that cannot work (ConfigError with the key), before any work is done."""
        _check_fields(self, "optim.")
        for name in ("lr", "momentum", "weight_decay", "warmup_steps"):
            _at_least(self, "optim.", name, 0)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip} must be positive (or null for no clipping)",
                              key="optim.grad_clip")


# --- train -----------------------------------------------------------------------------------------------------------

METHODS: tuple[str, ...] = ("local", "bp")
"""Allowed values of train.method: local learning or end-to-end backprop."""
AUTOCAST_MODES: tuple[str, ...] = tuple(AUTOCAST)
"""Allowed values of train.autocast: the keys of ppll_ext.core.block.AUTOCAST (mode -> dtype), which owns them."""

DEVICES: tuple[str, ...] = ("cpu", "cuda")
"""Allowed values of train.device (ppll_ext.runtime.launch places the stages on them)."""
TASK_CHOICES: tuple[str, ...] = ("auto", *TASKS)
"""Allowed values of train.task: auto follows the model (lm for gpt2 / llama, else classification)."""
LM_AUX: tuple[str, ...] = ("auto", "lm", "lm-blocks")
"""Aux head kinds that fit a language model's per-token activations."""

Method = Literal.__getitem__(METHODS)
TaskChoice = Literal.__getitem__(TASK_CHOICES)
Device = Literal.__getitem__(DEVICES)
Autocast = Literal.__getitem__(AUTOCAST_MODES)
OnNan = Literal.__getitem__(ON_NAN)


@dataclass
class TrainConfig:
    """The training loop."""

    method: Method = "local"
    """local (local learning, any runtime) | bp (end-to-end backprop, one process)."""
    task: TaskChoice = "auto"
    """auto | classification (cross-entropy, accuracy) | lm (next-token loss, perplexity and token accuracy); auto
    follows the model."""
    epochs: int = 30
    """Passes over the training set."""
    batch_size: int = 64
    """Mini-batch size (one optimizer step per stage per mini-batch)."""
    eval_batch_size: int = 500
    """Batch size used for evaluation."""
    seed: int = 0
    """Seed of model initialisation, data order and augmentation."""
    device: Device = "cpu"
    """cpu | cuda (threads runtime: stage k on cuda:k; processes: cuda:local_rank)."""
    autocast: Autocast = "none"
    """Mixed precision: none | bf16 | fp16."""
    threads: int = 0
    """torch threads per process (0 = one per stage for local learning, so every runtime gives bit-identical
    weights; torch's default for train.method=bp)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    save_dir: str | None = None
    """Run directory for checkpoints (step-N/ folders); None = save nothing."""
    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at the end, when save_dir is set)."""
    keep: int = 2
    """How many of the newest checkpoints to keep in save_dir."""
    resume: str | None = None
    """Resume from this checkpoint (or the newest one in this run directory); another K re-partitions."""
    stop_at_step: int | None = None
    """End the run after this many steps, as if interrupted (the LR schedule still spans train.epochs)."""
    on_nan: OnNan = "error"
    """A NaN/inf local loss: error (stop, naming stage and step) | skip (that stage skips that step, logged)."""
    check_every: int = 0
    """Optimizer steps between host reads of a stage's non-finite-loss flag with on_nan=error (0 = auto: every step
    on the CPU, where a read is free, every 16 on a GPU, where it would stall the stream; also read at every
    epoch end, evaluation and checkpoint)."""
    trace: str | None = None
    """Write a Chrome-trace / Perfetto JSON of every stage's forward, send, backward, step and waits here."""
    log_dir: str | None = None
    """Folder for the training curves (metrics.jsonl, and TensorBoard events when tensorboard is installed);
    None = train.save_dir; neither = no metrics files."""

    def check(self) -> None:
        """Reject train.* values that cannot work (ConfigError with the key), before any work is done."""
        _check_fields(self, "train.")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            _at_least(self, "train.", name, 1)
        _at_least(self, "train.", "threads", 0)
        _at_least(self, "train.", "check_every", 0)
        if self.save_every < 0 or self.keep < 1:
            raise ConfigError(f"train.save_every={quote(self.save_every)} must be >= 0 and train.keep="
                              f"{quote(self.keep)} >= 1",
                              key="train.save_every" if self.save_every < 0 else "train.keep")
        if self.save_every and not self.save_dir:
            raise ConfigError("train.save_every needs a run directory: set train.save_dir", key="train.save_dir")
        if self.stop_at_step is not None and self.stop_at_step < 0:
            raise ConfigError(f"train.stop_at_step={quote(self.stop_at_step)} must be at least 0 (or null)",
                              key="train.stop_at_step")


# --- the whole experiment --------------------------------------------------------------------------------------------


@dataclass
class Config:
    """A whole experiment."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for logs, YAML and checkpoints)."""
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Check every section, then the values that depend on each other across sections (ConfigError with key)."""
        self.model.check()
        self.data.check()
        self.local.check()
        self.optim.check()
        self.train.check()
        self._check_task()
        self._check_torch_engine()
        if self.train.batch_size % self.local.micro_batches:
            raise ConfigError(
                f"train.batch_size={quote(self.train.batch_size)} is not divisible by local.micro_batches="
                f"{quote(self.local.micro_batches)}; choose a batch size that is a multiple of M",
                key="train.batch_size",
            )


    @property
    def task(self) -> str:
        """The task trained: train.task, or with auto the model's (lm for language models)."""
        if self.train.task != "auto":
            return self.train.task
        return "lm" if self.model.is_lm else "classification"

    def _check_torch_engine(self) -> None:
        """A local.engine=torch combination that cannot run (local.schedule or local.stages_per_rank without that
        engine too): ConfigError naming the key to change."""
        local = self.local
        if local.engine != "torch":
            for key, value, default in (("schedule", local.schedule, PPLL),
                                        ("stages_per_rank", local.stages_per_rank, 0)):
                if value != default:
                    raise ConfigError(f"local.{key}={value} is used by local.engine=torch only (local.engine="
                                      f"{local.engine} here); add --engine torch or drop local.{key}",
                                      key=f"local.{key}")
            return
        if self.train.method != "local":
            raise ConfigError("local.engine=torch: the schedule decides what is trained (PPLL local learning, the "
                              "stock schedules end-to-end backprop through the stages); drop train.method=bp",
                              key="train.method")
        for key, value, allowed in (("local.runtime", local.runtime, "processes"),
                                    ("local.data_parallel", local.data_parallel, 1)):
            if value != allowed:
                raise ConfigError(f"local.engine=torch runs one process per rank of one pipeline: {key}={value} must "
                                  f"be {allowed}", key=key)
        if self.train.trace:
            raise ConfigError("train.trace is recorded by the native engine; drop train.trace or use "
                              "local.engine=native", key="train.trace")
        p = local.placement()
        if not p.end_to_end:
            return
        if self.train.autocast == "fp16":
            raise ConfigError("local.engine=torch with a stock schedule runs train.autocast=none or bf16: fp16 loss "
                              "scaling would need one scale across all stages; use bf16", key="train.autocast")
        check_micro_batches(p, local.micro_batches)

    def _check_task(self) -> None:
        """The model, the data and the task must belong together (ConfigError naming the key to change)."""
        text = ", ".join(TEXT_SOURCES)
        if self.model.is_lm and not self.data.is_text:
            raise ConfigError(f"model.name={self.model.name} is a language model but data.name={self.data.name} is "
                              f"images; set data.name to a text source ({text})", key="data.name")
        if not self.model.is_lm and self.data.is_text:
            raise ConfigError(f"data.name={self.data.name} is text but model.name={self.model.name} classifies "
                              f"images; set model.name to gpt2 or llama", key="model.name")
        if self.task != ("lm" if self.model.is_lm else "classification"):
            raise ConfigError(f"train.task={self.train.task} does not fit model.name={self.model.name}; drop "
                              f"train.task (auto) or change the model", key="train.task")
        if not self.model.is_lm and self.local.aux in LM_AUX[1:]:
            raise ConfigError(f"local.aux={self.local.aux} predicts tokens; model.name={self.model.name} classifies "
                              f"images: use auto, conv, mlp-sr, vit or next-blocks", key="local.aux")
        if self.model.is_lm and self.local.aux not in LM_AUX:
            raise ConfigError(f"local.aux={self.local.aux} classifies whole inputs; a language model needs per-token "
                              f"heads: set local.aux to {' or '.join(LM_AUX)}", key="local.aux")


def config_keys() -> tuple[str, ...]:
    """Every dotted config key ("train.on_nan", ...), so that callers can tell a config key from anything else."""
    cfg = Config()
    return tuple(f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
                 for f in dataclasses.fields(getattr(cfg, section.name)))


def _check_fields(section: Any, prefix: str) -> None:
    """ConfigError for the first field of `section` whose value is outside its Literal choices, or a NaN/infinite
    float (no float setting means anything with those, and NaN would even compare unequal to itself)."""
    hints = get_type_hints(type(section))
    for f in dataclasses.fields(section):
        hint, value, key = hints[f.name], getattr(section, f.name), f"{prefix}{f.name}"
        if get_origin(hint) is Literal:
            check_choice(value, get_args(hint), key)
        elif isinstance(value, float) and not math.isfinite(value):
            fix = "null or a number" if f.default is None else f"a number such as {f.default} (the default)"
            raise ConfigError(f"{key}={value} is not a finite number; set {fix}", key=key)


def check_choice(value: Any, allowed: tuple[Any, ...], key: str) -> None:
    """ConfigError naming `key` and the allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ConfigError(f"{key}={quote(value)} is not one of {', '.join(str(a) for a in allowed)}", key=key)


def _at_least(section: Any, prefix: str, name: str, low: int) -> None:
    """ConfigError naming the key unless the numeric field `name` of `section` is at least `low`."""
    value = getattr(section, name)
    if value < low:
        raise ConfigError(f"{prefix}{name}={quote(value)} must be at least {low}", key=f"{prefix}{name}")

def check_device(cfg: Config) -> None:
    """ConfigError unless train.device=cuda has a CUDA device here: checked when a run starts, not on load, so a
    GPU config can still be read, built on the meta device or inspected on a machine without one."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available (torch.cuda.is_available() is False); "
                          "use train.device=cpu", key="train.device")


def validate(cfg: Config) -> None:
    """Reject values that cannot work, before any work is done (the same as `cfg.check()`)."""
    cfg.check()
