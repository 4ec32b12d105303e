"""Models cut into ordered layers: CIFAR ResNets and torchvision's ViT, built from a `ModelConfig`."""

from __future__ import annotations

from ppll_ext.config import ModelConfig
from ppll_ext.errors import ConfigError
from ppll_ext.models.layered import LayeredModel, original_names
from ppll_ext.models.resnet import CifarResNet, resnet_layered
from ppll_ext.models.vit import vit_layered

RESNET_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
MODEL_NAMES: tuple[str, ...] = (*RESNET_DEPTHS, "vit")


def build_model(cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int) -> LayeredModel:
    """The model named by `cfg.name`, shaped for the data set's channels, image side and class count."""
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
    raise ConfigError(f"model.name={cfg.name!r} is not one of {', '.join(MODEL_NAMES)}")


__all__ = [
    "MODEL_NAMES",
    "CifarResNet",
    "LayeredModel",
    "build_model",
    "original_names",
    "resnet_layered",
    "vit_layered",
]
