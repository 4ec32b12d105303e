"""Models cut into ordered layers: CIFAR ResNets, torchvision's ViT and Hugging Face GPT-2 / Llama causal LMs,
built from a `ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ppll_ext.errors import ConfigError, quote
from ppll_ext.models.hf import LM_MODELS, check_pretrained, hf_config, hf_layered, max_positions, read_hf_config
from ppll_ext.models.layered import LayeredModel, original_names
from ppll_ext.models.resnet import CifarResNet, resnet_layered
from ppll_ext.models.vit import vit_layered

RESNET_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
MODEL_NAMES: tuple[str, ...] = (*RESNET_DEPTHS, "vit", *LM_MODELS)
# The type of model.name, built from MODEL_NAMES so that the config accepts exactly what build_model builds.
ModelName = Literal.__getitem__(MODEL_NAMES)


@dataclass
class ModelConfig:
    """Which network to build; its input shape and class count come from the data set."""

    name: ModelName = "resnet8"
    """Model: resnet8 | resnet20 | resnet32 | resnet56 | resnet110 (CIFAR ResNets, 6n+2 layers) | vit | gpt2 | llama
    (Hugging Face causal language models, task lm)."""
    width: int = 16
    """ResNet: channels of the first group (the groups use width, 2*width, 4*width)."""
    patch_size: int = 4
    """ViT: side of the square patches."""
    depth: int = 6
    """ViT, GPT-2, Llama: number of transformer blocks."""
    hidden_dim: int = 192
    """ViT, GPT-2, Llama: token width."""
    heads: int = 3
    """ViT, GPT-2, Llama: attention heads per block."""
    kv_heads: int | None = None
    """Llama: key/value heads (grouped-query attention); None = heads."""
    mlp_dim: int = 384
    """ViT, GPT-2, Llama: hidden width of each block's MLP."""
    dropout: float = 0.0
    """ViT, GPT-2, Llama: dropout inside the blocks."""
    max_positions: int | None = None
    """GPT-2, Llama: longest sequence the position embeddings cover; None = data.seq_len."""
    hf_config: str | None = None
    """GPT-2, Llama: a Hugging Face config.json (or the folder holding it) that replaces the size fields above; the
    weights still start from train.seed."""
    pretrained: str | None = None
    """GPT-2, Llama: a local folder saved with save_pretrained (config.json + weights) to start from; nothing is
    downloaded."""

    def check(self) -> None:
        """Reject a model section that cannot be built (ConfigError with the model.* key), before any work is done."""
        if self.name not in MODEL_NAMES:
            raise ConfigError(f"model.name={quote(self.name)} is not one of {', '.join(MODEL_NAMES)}", key="model.name")
        for field, value in (("width", self.width), ("patch_size", self.patch_size), ("depth", self.depth),
                             ("hidden_dim", self.hidden_dim), ("heads", self.heads), ("mlp_dim", self.mlp_dim),
                             ("kv_heads", self.kv_heads or 1), ("max_positions", self.max_positions or 1)):
            if value < 1:
                raise ConfigError(f"model.{field}={quote(value)} must be at least 1", key=f"model.{field}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)", key="model.dropout")
        if self.name not in LM_MODELS:
            for field in ("hf_config", "pretrained"):
                if getattr(self, field) is not None:
                    raise ConfigError(f"model.{field} is for the Hugging Face language models (gpt2, llama), not "
                                      f"model.name={quote(self.name)}; drop it", key=f"model.{field}")
        if self.hf_config is not None and self.pretrained is not None:
            raise ConfigError("model.hf_config and model.pretrained both say which architecture to build; "
                              "model.pretrained brings its own config.json, so drop model.hf_config",
                              key="model.hf_config")
        if self.hf_config is not None:
            read_hf_config(self.hf_config, self.name)
        if self.pretrained is not None:
            check_pretrained(self.pretrained, self.name)

    @property
    def is_lm(self) -> bool:
        """A causal language model (task lm)."""
        return self.name in LM_MODELS


def build_model(cfg: ModelConfig, *, num_classes: int, in_channels: int = 3, image_size: int = 32,
                seq_len: int = 128) -> LayeredModel:
    """The model named by `cfg.name`, shaped for the data: image channels and side (vision), class count or
    vocabulary size (`num_classes`), sequence length (language models)."""
    cfg.check()
    if cfg.name in RESNET_DEPTHS:
        return resnet_layered(RESNET_DEPTHS[cfg.name], num_classes, in_channels=in_channels, width=cfg.width)
    if cfg.name == "vit":
        return vit_layered(
            image_size=image_size,
            patch_size=cfg.patch_size,
            depth=cfg.depth,
            hidden_dim=cfg.hidden_dim,
            heads=cfg.heads,
            mlp_dim=cfg.mlp_dim,
            dropout=cfg.dropout,
            num_classes=num_classes,
            in_channels=in_channels,
        )
    if cfg.name in LM_MODELS:
        if cfg.pretrained is not None:
            layered = hf_layered(pretrained=cfg.pretrained)
        elif cfg.hf_config is not None:
            layered = hf_layered(read_hf_config(cfg.hf_config, cfg.name))
        else:
            layered = hf_layered(hf_config(cfg.name, vocab_size=num_classes, max_positions=cfg.max_positions or seq_len,
                                           depth=cfg.depth, hidden_dim=cfg.hidden_dim, heads=cfg.heads,
                                           kv_heads=cfg.kv_heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout))
        _check_lm_fits(cfg, layered, num_classes, seq_len)
        return layered
    raise ConfigError(f"model.name={quote(cfg.name)} is not one of {', '.join(MODEL_NAMES)}", key="model.name")


def _check_lm_fits(cfg: ModelConfig, layered: LayeredModel, vocab_size: int, seq_len: int) -> None:
    """ConfigError when the tokenizer's ids or data.seq_len do not fit the language model's config."""
    config = layered.model.config
    source = "model.pretrained" if cfg.pretrained else "model.hf_config" if cfg.hf_config else "model.max_positions"
    if config.vocab_size < vocab_size:
        raise ConfigError(f"the model's vocab_size={config.vocab_size} ({source}) is smaller than the tokenizer's "
                          f"{vocab_size} ids; use the tokenizer the model was made for (data.tokenizer)",
                          key="data.tokenizer")
    if max_positions(config) < seq_len:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the {max_positions(config)} positions of the model "
                          f"({source}); lower data.seq_len", key="data.seq_len")


__all__ = [
    "LM_MODELS",
    "MODEL_NAMES",
    "RESNET_DEPTHS",
    "CifarResNet",
    "LayeredModel",
    "ModelConfig",
    "ModelName",
    "build_model",
    "original_names",
    "resnet_layered",
    "vit_layered",
]
