"""Models: a backbone with ``features(x) -> N x D`` and a ``head`` (``feature_dim`` -> outputs), registered by name.

The head is separate so that stages can change it (decoupled classifier retraining, a rotation head for
self-supervised pre-training) without touching the backbone. Short names keep saved configs stable when code moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ltbench.config import ModelConfig
from ltbench.errors import ConfigError
from ltbench.registry import Registry

MODELS: Registry[Any] = Registry("model", ModelConfig)


@dataclass
class NetConfig(ModelConfig):
    """A model with one of ltbench's heads (``linear``, ``cosine``). ``reads``: the inputs it takes (declared)."""

    reads = ("images",)

    def check(self, root: Any) -> None:
        from ltbench.models.heads import HEADS

        if self.head not in HEADS:
            raise ConfigError(f"unknown model.head {self.head!r}; choose one of {', '.join(HEADS)}")


def build_model(cfg: ModelConfig, out_dim: int, data: Any = None) -> nn.Module:
    """The model registered under ``cfg.name`` with ``out_dim`` outputs; ``data`` (the dataset) lets a model size
    its input (a vocabulary, a feature count)."""
    return MODELS.get(cfg.name).builder(cfg, out_dim, data)
