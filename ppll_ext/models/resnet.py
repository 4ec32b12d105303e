"""CIFAR ResNet (He et al. 2016, 6n+2 layers) as used by InfoPro and DGL, cut into stem, blocks and head."""

from __future__ import annotations

import torch
from torch import nn

from ppll_ext.errors import ConfigError
from ppll_ext.models.layered import LayeredModel


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out-of-place ops only: the input may be a detached tensor another stage still needs.
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Stem(nn.Module):
    """relu(bn1(conv1(x))) of a CifarResNet, holding the model's own conv1 and bn1."""

    def __init__(self, conv1: nn.Conv2d, bn1: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)))


class Head(nn.Module):
    """Global average pool, flatten and the model's own fc."""

    def __init__(self, avgpool: nn.AdaptiveAvgPool2d, fc: nn.Linear) -> None:
        super().__init__()
        self.avgpool = avgpool
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: three groups of n BasicBlocks at width, 2*width, 4*width channels."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"ResNet depth={depth} is not 6n+2 with n >= 1; use e.g. 20, 32, 56 or 110")
        if width < 1:
            raise ConfigError(f"ResNet width={width} must be at least 1")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._group(width, width, n, stride=1)
        self.layer2 = self._group(width, 2 * width, n, stride=2)
        self.layer3 = self._group(2 * width, 4 * width, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def layer_list(self) -> list[nn.Module]:
        """[Stem, every BasicBlock in order, Head], sharing this model's modules."""
        blocks = [*self.layer1, *self.layer2, *self.layer3]
        return [Stem(self.conv1, self.bn1), *blocks, Head(self.avgpool, self.fc)]


def resnet_layered(depth: int, num_classes: int, in_channels: int = 3, width: int = 16) -> LayeredModel:
    """A CifarResNet and its 3n+2 layers (stem, blocks, head)."""
    model = CifarResNet(depth, num_classes, in_channels=in_channels, width=width)
    return LayeredModel(model=model, layers=model.layer_list(), name=f"resnet{depth}")
