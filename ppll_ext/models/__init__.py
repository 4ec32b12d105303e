"""Models cut into ordered layers: CIFAR ResNets and torchvision's ViT, built from a `ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ppll_ext.errors import ConfigError
from ppll_ext.models.layered import LayeredModel, original_names
from ppll_ext.models.resnet import CifarResNet, resnet_layered
from ppll_ext.models.vit import vit_layered

RESNET_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
MODEL_NAMES: tuple[str, ...] = (*RESNET_DEPTHS, "vit")
# The type of model.name, built from MODEL_NAMES so that the config accepts exactly what build_model builds.
ModelName = Literal.__getitem__(MODEL_NAMES)


@dataclass
class ModelConfig:
    """Which network to build; its input shape and class count come from the data set."""

    name: ModelName = "resnet8"
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

    def check(self) -> None:
        """Reject a model section that cannot be built (ConfigError with the model.* key), before any work is done."""
        if self.name not in MODEL_NAMES:
            raise ConfigError(f"model.name={self.name!r} is not one of {', '.join(MODEL_NAMES)}", key="model.name")
        for field, value in (("width", self.width), ("patch_size", self.patch_size), ("depth", self.depth),
                             ("hidden_dim", self.hidden_dim), ("heads", self.heads), ("mlp_dim", self.mlp_dim)):
            if value < 1:
                raise ConfigError(f"model.{field}={value} must be at least 1", key=f"model.{field}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)", key="model.dropout")


def build_model(cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int) -> LayeredModel:
    """The model named by `cfg.name`, shaped for the data set's channels, image side and class count."""
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
    raise ConfigError(f"model.name={cfg.name!r} is not one of {', '.join(MODEL_NAMES)}", key="model.name")


__all__ = [
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
