"""RIDE's multi-expert CIFAR ResNet (Wang et al., ICLR 2021, "Long-tailed Recognition by Routing Diverse
Distribution-Aware Experts").

Reference: frank-xwang/RIDE-LongTailRecognition, ``model/ldam_drw_resnets/ride_resnet_cifar.py::ResNet_s``. The stem
(conv 3x3 + BN + ReLU) and the first stage are shared; every expert has its own second and third stage and its own
classifier. ``reduce_dimension`` gives each expert 3/4 of the single network's widths (24 and 48 channels instead of
32 and 64 for ResNet-32), so three experts cost about as much as 1.5 networks. The network's output is the mean of
the experts' logits (``torch.stack(outs, dim=1).mean(dim=1)`` in the reference).

ltbench's model contract holds: ``features(x)`` is the concatenation of the experts' pooled features
(N x num_experts*D, expert 0 first) and ``head`` (:class:`ExpertHead`) splits it back into the experts' chunks, applies
each expert's classifier and averages, so ``forward(x) == head(features(x))``, decoupled classifier stages (a cRT
classifier on the concatenated features, LWS scales on the mean) and feature predictions keep working.
:meth:`RideResNet.expert_logits` gives every expert's logits (E x N x C) for the RIDE loss.

Logit scale: with ``head: cosine`` each expert's classifier gives cosines in [-1, 1] (ltbench's cosine-head
convention); the loss applies its own scale (LDAM's s = 30, which is the reference's ``s = 30`` that the model applies
in ``_separate_part``), so the margins and the scale act exactly as in the reference's ``RIDELoss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.errors import ConfigError
from ltbench.models import MODELS, NetConfig
from ltbench.models.heads import build_head
from ltbench.models.resnet_cifar import BasicBlock


@dataclass
class RideResNetConfig(NetConfig):
    name: str = "ride_resnet32"
    depth: int = 32  # 6n+2: n basic blocks per stage (shared stage 1, per-expert stages 2 and 3)
    width: int = 16  # channels of the shared stem and first stage
    num_experts: int = 3  # the reference's CIFAR setting (configs/config_imbalance_cifar100_ride.json)
    # reference `reduce_dimension=True`: each expert's stages 2/3 get 3/4 of 2*width / 4*width (24/48 at width 16)
    reduce_dimension: bool = True
    layer2_width: int | None = None  # explicit widths override the rule above (the reference's layer2_output_dim)
    layer3_width: int | None = None
    head: str = "cosine"  # the reference's use_norm=True (NormedLinear, cosine logits)

    def __post_init__(self) -> None:
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ConfigError(f"model.depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {self.depth}")
        for key in ("width", "num_experts", "layer2_width", "layer3_width"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {value}")

    @property
    def expert_widths(self) -> tuple[int, int]:
        """Channels of each expert's second and third stage."""
        return expert_widths(self.width, self.reduce_dimension, self.layer2_width, self.layer3_width)

    def check(self, root: Any) -> None:
        super().check(root)
        classifier = getattr(root, "classifier", None)
        if classifier is not None and classifier.name == "tau_norm":
            raise ConfigError(
                f"classifier=tau_norm normalises one linear classifier; model={self.name} has one per expert"
            )


def expert_widths(width: int, reduce: bool, layer2: int | None = None, layer3: int | None = None) -> tuple[int, int]:
    """(stage-2, stage-3) channels of one expert: ``layer2``/``layer3`` if given, else 2w/4w, times 3/4 with
    ``reduce`` (ride_resnet_cifar.py: 24/48 instead of 32/64 at w = 16)."""
    w2, w3 = 2 * width, 4 * width
    if reduce:
        w2, w3 = max(1, w2 * 3 // 4), max(1, w3 * 3 // 4)
    return (layer2 or w2, layer3 or w3)


class ExpertHead(nn.Module):
    """One classifier per expert on its chunk of the concatenated features; ``forward`` = the mean of the experts'
    logits. ``in_features`` is one expert's feature size."""

    def __init__(self, num_experts: int, in_features: int, out_dim: int, head: str = "cosine") -> None:
        super().__init__()
        self.num_experts, self.in_features = num_experts, in_features
        self.heads = nn.ModuleList(build_head(head, in_features, out_dim) for _ in range(num_experts))

    def expert_logits(self, features: torch.Tensor) -> torch.Tensor:
        """E x N x C: expert j's classifier on the j-th chunk of ``features`` (N x E*D)."""
        chunks = features.split(self.in_features, dim=1)
        if len(chunks) != self.num_experts:
            raise ValueError(f"features of width {features.shape[1]} are not {self.num_experts} x {self.in_features}")
        return torch.stack([h(c) for h, c in zip(self.heads, chunks)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.expert_logits(features).mean(0)


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class RideResNet(nn.Module):
    """Shared stem + first stage, then ``num_experts`` branches (second and third stage, global average pooling)."""

    def __init__(
        self,
        depth: int = 32,
        width: int = 16,
        num_classes: int = 10,
        num_experts: int = 3,
        widths: tuple[int, int] = (24, 48),
        head: str = "cosine",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        w2, w3 = widths
        self.num_experts, self.expert_dim = num_experts, w3
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _stage(width, width, n, 1)
        self.experts = nn.ModuleList(
            nn.Sequential(_stage(width, w2, n, 2), _stage(w2, w3, n, 2)) for _ in range(num_experts)
        )
        self.feature_dim = num_experts * w3
        self.head = ExpertHead(num_experts, w3, num_classes, head)
        for m in self.modules():  # the reference's _weights_init: Kaiming-normal conv and linear weights
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(F.relu(self.bn1(self.conv1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """N x E*D: the experts' globally pooled features, concatenated in expert order."""
        s = self.shared(x)
        return torch.cat([F.adaptive_avg_pool2d(e(s), 1).flatten(1) for e in self.experts], dim=1)

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        """E x N x C: every expert's logits (what the RIDE loss reads)."""
        return self.head.expert_logits(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("ride_resnet32", RideResNetConfig)
def _ride_resnet(cfg: RideResNetConfig, out_dim: int, data=None) -> RideResNet:
    """RIDE multi-expert CIFAR ResNet (Wang et al. 2021): shared stem and stage 1, per-expert stages 2-3 and heads."""
    return RideResNet(cfg.depth, cfg.width, out_dim, cfg.num_experts, cfg.expert_widths, cfg.head)
