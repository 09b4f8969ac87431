"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, 3 stages, parameter-free ("option A") shortcuts.

ResNet-32 is n=5: 16/32/64 channels and about 0.46M parameters with a 10-way linear head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.errors import ConfigError
from ltbench.models import MODELS, NetConfig
from ltbench.models.heads import build_head


@dataclass
class CifarResNetConfig(NetConfig):
    name: str = "resnet32"
    depth: int = 32  # 6n+2
    width: int = 16  # channels of the first stage (16/32/64); tests use tiny models

    def __post_init__(self) -> None:
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ConfigError(f"model.depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {self.depth}")
        if self.width < 1:
            raise ConfigError(f"model.width must be >= 1, got {self.width}")


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes  # channels to add in the shortcut
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        # Option A: subsample spatially, zero-pad the new channels (no parameters).
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 32, width: int = 16, num_classes: int = 10, head: str = "linear") -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = in_planes
        self.head = build_head(head, in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _cifar_resnet(cfg: CifarResNetConfig, out_dim: int, data=None) -> CifarResNet:
    """CIFAR ResNet (He et al. 2016): 6n+2 layers, option-A shortcuts; resnet32 = 0.46M parameters."""
    return CifarResNet(cfg.depth, cfg.width, out_dim, cfg.head)


MODELS.register("resnet32", CifarResNetConfig)(_cifar_resnet)
MODELS.register("cifar_resnet", CifarResNetConfig)(_cifar_resnet)
