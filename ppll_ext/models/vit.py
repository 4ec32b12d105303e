"""Vision Transformer (torchvision's) cut into patch embedding, encoder blocks and head."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ppll_ext.errors import ConfigError
from ppll_ext.models.layered import LayeredModel

if TYPE_CHECKING:
    from torchvision.models import VisionTransformer


class PatchEmbed(nn.Module):
    """Patchify, prepend the class token, add position embeddings and dropout, as `VisionTransformer` does."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.image_size = vit.image_size
        self.patch_size = vit.patch_size
        self.hidden_dim = vit.hidden_dim
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            side = self.image_size
            raise ConfigError(f"ViT expects {side}x{side} images, got {h}x{w}; set image_size to the square image side")
        p = self.patch_size
        x = self.conv_proj(x).reshape(n, self.hidden_dim, (h // p) * (w // p)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class Head(nn.Module):
    """Final LayerNorm, class token, classifier: the end of `VisionTransformer.forward`."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.ln = vit.encoder.ln
        self.heads = vit.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def vit_layered(
    image_size: int,
    patch_size: int,
    depth: int,
    hidden_dim: int,
    heads: int,
    mlp_dim: int,
    dropout: float,
    num_classes: int,
    in_channels: int = 3,
) -> LayeredModel:
    """A torchvision VisionTransformer and its depth+2 layers (patch embedding, encoder blocks, head)."""
    if patch_size < 1 or image_size % patch_size:
        raise ConfigError(
            f"ViT patch_size={patch_size} does not divide image_size={image_size}; choose a divisor of {image_size}"
        )
    if heads < 1 or hidden_dim % heads:
        raise ConfigError(f"ViT hidden_dim={hidden_dim} is not divisible by heads={heads}; change one of them")
    if depth < 1:
        raise ConfigError(f"ViT depth={depth} must be at least 1")
    from torchvision.models import VisionTransformer  # imported here: torchvision costs ~1 s per process start

    vit = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=depth,
        num_heads=heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        dropout=dropout,
        num_classes=num_classes,
    )
    if in_channels != 3:
        conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / (in_channels * patch_size * patch_size)))
        nn.init.zeros_(conv.bias)
        vit.conv_proj = conv
    layers = [PatchEmbed(vit), *vit.encoder.layers, Head(vit)]
    return LayeredModel(model=vit, layers=layers, name="vit")
