"""A multi-layer perceptron over feature vectors (tabular data; ``hidden: []`` is a linear model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ltbench.errors import ConfigError
from ltbench.models import MODELS, NetConfig
from ltbench.models.heads import build_head


@dataclass
class MLPConfig(NetConfig):
    reads = ("features",)

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128, 128])  # [] is a linear model
    dropout: float = 0.0
    batchnorm: bool = True

    def __post_init__(self) -> None:
        if any(h < 1 for h in self.hidden) or not 0 <= self.dropout < 1:
            raise ConfigError("model.hidden sizes must be >= 1 and model.dropout in [0, 1)")


class MLP(nn.Module):
    """Linear -> (BatchNorm) -> ReLU -> (Dropout) per hidden layer; ``features`` is the last hidden layer."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, head: str, dropout: float, bn: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), *([nn.BatchNorm1d(h)] if bn else []), nn.ReLU()]
            layers += [nn.Dropout(dropout)] if dropout else []
            d = h
        self.trunk = nn.Sequential(*layers)
        self.feature_dim = d
        self.head = build_head(head, d, out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("mlp", MLPConfig)
def _mlp(cfg: MLPConfig, out_dim: int, data: Any = None) -> MLP:
    """A multi-layer perceptron over the dataset's feature vectors."""
    if data is None or data.train_x is None or data.train_x.dim() != 2:
        raise ConfigError("model=mlp needs a dataset of feature vectors (N x D)")
    return MLP(int(data.train_x.shape[1]), list(cfg.hidden), out_dim, cfg.head, cfg.dropout, cfg.batchnorm)
