"""Experiment configuration: dataclasses with one docstring per field, YAML files and `--set` overrides."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from ppll_ext.errors import ConfigError


@dataclass
class ModelConfig:
    """Which network to build; its input shape and class count come from the data set."""

    name: str = "resnet8"
    """Model: resnet8 | resnet20 | resnet32 | resnet56 | resnet110 (CIFAR ResNets, 6n+2 layers) or vit."""
    width: int = 16
    """ResNet: channels of the first group (the groups use width, 2*width, 4*width)."""
    patch_size: int = 4
    """ViT: side of the square patches."""
    depth: int = 6
    """ViT: number of encoder blocks."""
    hidden_dim: int = 192
    """ViT: token width."""
    heads: int = 3
    """ViT: attention heads per block."""
    mlp_dim: int = 384
    """ViT: hidden width of each block's MLP."""
    dropout: float = 0.0
    """ViT: dropout inside the encoder."""


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    name: str = "digits"
    """Data set: digits (scikit-learn's bundled 8x8 digits) | cifar10 | svhn | stl10 | imagefolder."""
    root: str | None = None
    """Folder of the data set (for imagefolder: the folder holding train/ and test/). Not used by digits."""
    download: bool = False
    """Let torchvision download a missing data set into root (never done silently)."""
    cache_dir: str | None = None
    """Where decoded image-folder trees are cached as uint8 tensors (default: <root>/.ppll_cache)."""
    train_subset: int | None = None
    """Use only the first N training images (after a seeded shuffle); None = all."""
    test_subset: int | None = None
    """Use only the first N test images; None = all."""
    augment: bool = True
    """Random crop with padding (and horizontal flip where the data set allows it) on training batches."""


@dataclass
class LocalConfig:
    """How the model is cut into locally trained blocks and how the pipeline runs them."""

    stages: int = 2
    """K: number of blocks, one per pipeline stage (K = 1 is end-to-end backprop)."""
    partition: str = "parameters"
    """Split method: uniform | parameters | profile | explicit boundaries such as "0,5,9"."""
    aux: str = "conv"
    """Auxiliary head kind: conv | mlp-sr | vit | next-blocks."""
    aux_hidden: int = 128
    """Hidden width of the auxiliary heads' classifier."""
    aux_next_blocks: int = 1
    """For aux=next-blocks: how many of the next stage's first layers the head copies."""
    micro_batches: int = 1
    """M: micro-batches per mini-batch; each stage accumulates their gradients and steps once."""
    queue_depth: int = 2
    """Bound of every queue between stages (pipeline runtimes)."""
    runtime: str = "processes"
    """Where stages run: sequential (one process, in turn) | threads | processes (one process per stage)."""
    timeout_s: float = 300.0
    """Longest wait for a neighbour stage before the run stops with an error."""
    engine: str = "native"
    """Who runs the stages with runtime=processes: native (ppll_ext's stage loop) | deepspeed (the DeepSpeed
    adapter, LocalPipelineEngine, configured by local.deepspeed_config)."""
    deepspeed_config: str | None = None
    """engine=deepspeed: a ds_config JSON (None: ZeRO stage 0, nothing else). Its optimizer/scheduler sections, if
    any, replace optim.*; batch sizes, accumulation and clipping always come from train.batch_size,
    local.micro_batches and optim.grad_clip, and bf16 from train.autocast=bf16, so both engines train alike."""
    data_parallel: int = 1
    """engine=deepspeed: data-parallel replicas per stage (processes = stages x data_parallel)."""


@dataclass
class OptimConfig:
    """Every block gets its own optimizer and schedule built from these values."""

    name: str = "sgd"
    """Optimizer: sgd | adam | adamw."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    schedule: str = "cosine"
    """Learning-rate schedule per optimizer step: cosine | constant."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    grad_clip: float | None = None
    """Clip each block's gradient norm to this value (per stage, never across stages)."""


@dataclass
class TrainConfig:
    """The training loop."""

    method: str = "local"
    """local (local learning, any runtime) | bp (end-to-end backprop, one process)."""
    epochs: int = 30
    """Passes over the training set."""
    batch_size: int = 64
    """Mini-batch size (one optimizer step per stage per mini-batch)."""
    eval_batch_size: int = 500
    """Batch size used for evaluation."""
    seed: int = 0
    """Seed of model initialisation, data order and augmentation."""
    device: str = "cpu"
    """cpu | cuda (threads runtime: stage k on cuda:k; processes: cuda:local_rank)."""
    autocast: str = "none"
    """Mixed precision: none | bf16 | fp16."""
    threads: int = 0
    """torch threads per process (0 = leave torch's default)."""
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
    on_nan: str = "error"
    """A NaN/inf local loss: error (stop, naming stage and step) | skip (that stage skips that step, logged)."""
    trace: str | None = None
    """Write a Chrome-trace / Perfetto JSON of every stage's forward, send, backward, step and waits here."""


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


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's annotated type; ConfigError if it cannot be."""
    origin = get_origin(hint)
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _apply(section_obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(section_obj))
    names = [f.name for f in dataclasses.fields(section_obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            valid = ", ".join(prefix + n for n in names)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {valid}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        current = getattr(section_obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of keys, got {value!r}")
            _apply(current, value, f"{full}.")
        else:
            setattr(section_obj, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> dict[str, Any]:
    """Turn 'a.b=value' into {'a': {'b': value}}, the value parsed as YAML (so 0.1, true, null work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then each `key=value` override; validated at the end."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file to --config")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (model:, data:, ...)")
        _apply(cfg, data, "")
    for text in overrides:
        _apply(cfg, parse_override(text), "")
    validate(cfg)
    return cfg


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Reject values that cannot work, before any work is done."""
    _choice(cfg.data.name, ("digits", "cifar10", "svhn", "stl10", "imagefolder"), "data.name")
    _choice(cfg.local.aux, ("conv", "mlp-sr", "vit", "next-blocks"), "local.aux")
    _choice(cfg.local.runtime, ("sequential", "threads", "processes"), "local.runtime")
    _choice(cfg.optim.name, ("sgd", "adam", "adamw"), "optim.name")
    _choice(cfg.optim.schedule, ("cosine", "constant"), "optim.schedule")
    _choice(cfg.train.method, ("local", "bp"), "train.method")
    _choice(cfg.train.autocast, ("none", "bf16", "fp16"), "train.autocast")
    _choice(cfg.train.on_nan, ("error", "skip"), "train.on_nan")
    _choice(cfg.local.engine, ("native", "deepspeed"), "local.engine")
    for key, value, low in (
        ("local.stages", cfg.local.stages, 1),
        ("local.micro_batches", cfg.local.micro_batches, 1),
        ("local.queue_depth", cfg.local.queue_depth, 1),
        ("local.data_parallel", cfg.local.data_parallel, 1),
        ("train.epochs", cfg.train.epochs, 1),
        ("train.batch_size", cfg.train.batch_size, 1),
        ("train.eval_batch_size", cfg.train.eval_batch_size, 1),
    ):
        if value < low:
            raise ConfigError(f"{key}={value} must be at least {low}")
    if cfg.train.save_every < 0 or cfg.train.keep < 1:
        raise ConfigError(f"train.save_every={cfg.train.save_every} must be >= 0 and train.keep={cfg.train.keep} >= 1")
    if cfg.train.save_every and not cfg.train.save_dir:
        raise ConfigError("train.save_every needs a run directory: set train.save_dir (or --save-dir DIR)")
    if cfg.train.batch_size % cfg.local.micro_batches:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by local.micro_batches="
            f"{cfg.local.micro_batches}; choose a batch size that is a multiple of M"
        )
