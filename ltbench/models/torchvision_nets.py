"""ImageNet-scale backbones from torchvision (randomly initialised: long-tail benchmarks forbid ImageNet weights),
with ltbench's heads so every loss, strategy and the two-stage schedule work unchanged."""

from __future__ import annotations

import torch
from torch import nn

from ltbench.models import MODELS, NetConfig
from ltbench.models.heads import build_head


def _backbone(arch: str) -> nn.Module:
    from torchvision.models import resnet50, resnext50_32x4d
    from torchvision.models.resnet import BasicBlock, ResNet

    if arch == "resnet10":  # one basic block per stage: the ImageNet-LT baseline of Liu et al. 2019 / Kang et al. 2020
        return ResNet(BasicBlock, [1, 1, 1, 1])
    if arch == "resnet50":
        return resnet50()
    if arch == "resnext50":
        return resnext50_32x4d()
    raise ValueError(arch)


class TorchvisionNet(nn.Module):
    def __init__(self, arch: str, num_classes: int, head: str = "linear") -> None:
        super().__init__()
        net = _backbone(arch)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self.head = build_head(head, self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _torchvision(cfg: NetConfig, out_dim: int, data=None) -> TorchvisionNet:
    """A torchvision ImageNet backbone, randomly initialised, with an ltbench head."""
    return TorchvisionNet(cfg.name, out_dim, cfg.head)


for _arch in ("resnet10", "resnet50", "resnext50"):
    MODELS.register(_arch, NetConfig)(_torchvision)
