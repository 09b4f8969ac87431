"""Wide ResNet WRN-depth-widen in the layout of the TF FixMatch code (``libml/models.py``), the semi-supervised CIFAR
backbone of FixMatch, DARP, ABC and USB.

WRN-28-2: a 3x3 stem conv (3 -> 16), 3 groups of (depth - 4) / 6 = 4 pre-activation basic blocks with 32/64/128
channels (16 * widen * 1/2/4) and strides 1/2/2, then BN -> LeakyReLU -> global average pool; about 1.47M
parameters with a 10-way linear head. LeakyReLU slope 0.1, BN momentum 0.001 (TF's 0.999), no dropout, no conv
biases (as DARP/ABC; USB's stem has a bias, TF's convs all have one). BN eps is PyTorch's 1e-5 (as ABC/USB;
TF's is 1e-3).
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


@dataclass
class WRNConfig(NetConfig):
    name: str = "wrn"
    depth: int = 28  # 6n + 4: n blocks per group
    widen: int = 2  # channels 16 * widen * (1, 2, 4)
    leaky: float = 0.1  # LeakyReLU negative slope
    bn_momentum: float = 0.001  # PyTorch convention (TF momentum 0.999)

    def __post_init__(self) -> None:
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ConfigError(f"model.depth must be 6n+4 (10, 16, 22, 28, 40...), got {self.depth}")
        if self.widen < 1:
            raise ConfigError(f"model.widen must be >= 1, got {self.widen}")
        if self.leaky < 0:
            raise ConfigError(f"model.leaky must be >= 0, got {self.leaky}")
        if not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"model.bn_momentum must be in (0, 1], got {self.bn_momentum}")


class PreActBlock(nn.Module):
    """TF FixMatch ``residual``: o = conv(act(bn(conv(act(bn(x)))))) + shortcut.

    conv1 always reads the activated input act(bn1(x)), as in the TF original (and DARP); the ABC/USB port feeds the
    raw x to conv1 in the first block of groups 2 and 3. The shortcut is x itself, or a 1x1 conv (with the block's
    stride) when the channels or the resolution change; ``activate_before_residual`` (first block of group 1) makes
    the shortcut read the activated input too.
    """

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool, leaky: float, mom: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=mom)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=mom)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout or stride != 1 else None
        self.activate_before_residual = activate_before_residual
        self.leaky = leaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.leaky_relu(self.bn1(x), self.leaky)
        res = act if self.activate_before_residual else x
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(act)), self.leaky))
        return (res if self.shortcut is None else self.shortcut(res)) + out


class WideResNet(nn.Module):
    """WRN-depth-widen (TF FixMatch layout); ``features`` = the pooled 16 * 4 * widen vector, ``head`` its classifier.

    Init as USB: kaiming_normal (fan_out) convs, BN weight 1 and bias 0, xavier_normal Linear weight with zero bias.
    """

    def __init__(
        self,
        depth: int = 28,
        widen: int = 2,
        num_classes: int = 10,
        head: str = "linear",
        leaky: float = 0.1,
        bn_momentum: float = 0.001,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ConfigError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40...), got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        blocks, cin = [], 16
        for group, cout in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for i in range(n):
                stride = 2 if (group > 0 and i == 0) else 1
                blocks.append(PreActBlock(cin, cout, stride, group == 0 and i == 0, leaky, bn_momentum))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.leaky = leaky
        self.feature_dim = cin
        self.head = build_head(head, cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = F.leaky_relu(self.bn(out), self.leaky)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("wrn", WRNConfig)
def _wrn(cfg: WRNConfig, out_dim: int, data: Any = None) -> WideResNet:
    """Wide ResNet (TF FixMatch layout, pre-activation, LeakyReLU 0.1); wrn28_2 = 1.47M parameters."""
    return WideResNet(cfg.depth, cfg.widen, out_dim, cfg.head, cfg.leaky, cfg.bn_momentum)
