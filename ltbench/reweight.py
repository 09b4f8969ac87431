"""Re-weighting: per-bin loss weights (classes, or regression label bins), registered by name.

A weighting is a function of the training counts per bin; :class:`Reweighting` switches it on at ``start`` of the
epochs (deferred re-weighting, DRW: Cao et al. 2019). Weights are normalised to sum to the number of bins, so the
loss scale of a balanced set is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ltbench.config import ReweightConfig, epoch_at
from ltbench.errors import ConfigError
from ltbench.registry import Registry

WeightFn = Callable[[ReweightConfig, torch.Tensor], torch.Tensor | None]
REWEIGHTS: Registry[WeightFn] = Registry("reweight", ReweightConfig)


@dataclass
class EffectiveNumberConfig(ReweightConfig):
    name: str = "effective_number"
    beta: float = 0.9999  # Cui et al. 2019, the CIFAR-LT setting

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError("reweight.beta must be in [0, 1)")


def normalized(raw: torch.Tensor) -> torch.Tensor:
    """Weights scaled to sum to the number of bins (float32)."""
    return (raw / raw.sum() * len(raw)).float()


@REWEIGHTS.register("none", ReweightConfig)
def _none(cfg: ReweightConfig, n: torch.Tensor) -> None:
    """No re-weighting."""
    return None


@REWEIGHTS.register("inverse", ReweightConfig)
def _inverse(cfg: ReweightConfig, n: torch.Tensor) -> torch.Tensor:
    """w proportional to 1 / n, summing to the number of classes."""
    return normalized(1.0 / n)


@REWEIGHTS.register("sqrt_inverse", ReweightConfig)
def _sqrt_inverse(cfg: ReweightConfig, n: torch.Tensor) -> torch.Tensor:
    """w proportional to 1 / sqrt(n), summing to the number of classes."""
    return normalized(n.rsqrt())


@REWEIGHTS.register("effective_number", EffectiveNumberConfig)
def _effective_number(cfg: ReweightConfig, n: torch.Tensor) -> torch.Tensor:
    """Class-balanced weights (Cui et al. 2019): 1 / E_n with E_n = (1 - beta^n) / (1 - beta), summing to the
    number of classes."""
    beta = cfg.beta  # type: ignore[attr-defined]
    return normalized((1.0 - beta) / (1.0 - torch.pow(beta, n)))


def weights_for(cfg: ReweightConfig, counts: Sequence[int]) -> torch.Tensor | None:
    """The weights per bin of a re-weighting (each option scales its own weights), float32; None: unweighted."""
    w = REWEIGHTS.build(cfg, torch.as_tensor(list(counts), dtype=torch.float64))
    return None if w is None else w.float()


def class_weights(name: str, class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor | None:
    """Per-class weights of a named weighting, normalised to sum to the number of classes (None for ``none``)."""
    schema = REWEIGHTS.schema(name)
    assert schema is not None
    cfg = schema(name=name, beta=beta) if name == "effective_number" else schema(name=name)
    return weights_for(cfg, class_counts)


class Reweighting:
    """Per-bin weights as a function of the epoch: deferred re-weighting switches on at ``start`` of the stage's
    ``epochs`` (DRW: 0.8, epoch 160 of 200, the first lr decay of the reference recipe)."""

    def __init__(self, cfg: ReweightConfig, counts: Sequence[int], epochs: int) -> None:
        self.start_epoch = epoch_at(cfg.start, epochs)
        self.weights = weights_for(cfg, counts)

    def at(self, epoch: int) -> torch.Tensor | None:
        if self.weights is None or epoch < self.start_epoch:
            return None
        return self.weights
