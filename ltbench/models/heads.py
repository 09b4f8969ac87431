"""Classifier heads: each maps features (N x D) to logits (N x C)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Linear):
    """A plain linear classifier with bias."""


class CosineHead(nn.Module):
    """Cosine-normalised classifier: logits are cos(feature, w_c) in [-1, 1] (no bias).

    LDAM multiplies these by its scale s. Initialised as in the LDAM reference: uniform(-1, 1) columns
    renormalised to unit norm.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


HEADS = {"linear": LinearHead, "cosine": CosineHead}


def build_head(name: str, in_features: int, out_dim: int) -> nn.Module:
    from ltbench.errors import ConfigError

    if name not in HEADS:
        raise ConfigError(f"unknown model.head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name](in_features, out_dim)
