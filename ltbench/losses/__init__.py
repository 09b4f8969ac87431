"""Losses: small ``nn.Module``s registered by name, each with its own config schema.

Every loss is called as ``loss(outputs, target, weight=None, reduction="mean")``:

- ``weight`` is an optional per-bin weight vector (classes for classification); sample i's loss is multiplied by
  ``weight[bin(target_i)]``.
- ``reduction="none"`` returns the per-sample losses, ``"sum"`` their sum, ``"mean"`` their mean; with weights,
  ``"mean"`` is the weighted mean ``sum_i w_i l_i / sum_i w_i`` (PyTorch's ``cross_entropy(weight=...)``
  convention, which the CIFAR-LT reference code uses for CE-DRW and LDAM-DRW). A loss whose reference normalises
  differently says so and overrides :meth:`LTLoss.reduce`.

Label statistics are buffers, so ``.to(device)`` moves them: no loss knows the device. A loss may own parameters
(a learnable noise scale, say); the optimiser of its stage trains them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ltbench.config import LossConfig
from ltbench.optim import ParamGroup
from ltbench.registry import Registry
from ltbench.tasks import LabelStats, as_stats

LOSSES: Registry[type[LTLoss]] = Registry("loss", LossConfig)


def reduce_loss(per_sample: torch.Tensor, w: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce weighted per-sample losses; ``w`` holds each sample's weight (None: unweighted)."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean() if w is None else per_sample.sum() / w.sum()
    raise ValueError(f"unknown reduction {reduction!r}")


def batch_mean(per_sample: torch.Tensor, w: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Like :func:`reduce_loss`, but ``"mean"`` always divides by the batch size, weights or not (the convention
    of the focal and class-balanced reference code)."""
    return per_sample.mean() if reduction == "mean" else reduce_loss(per_sample, w, reduction)


class LTLoss(nn.Module):
    """Base class: subclasses implement ``per_sample(outputs, target)`` (unweighted) and ``from_config``."""


    def __init__(self, counts: Sequence[int] | LabelStats) -> None:
        super().__init__()
        stats = as_stats(counts)
        self.bin_of = stats.bin_of
        self.register_buffer("counts", torch.as_tensor(list(stats.counts), dtype=torch.float32))

    @classmethod
    def from_config(cls, cfg: LossConfig, stats: LabelStats) -> LTLoss:
        return cls(stats)

    def per_sample(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weighted(self, outputs: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Per-sample losses with each sample's weight ``w`` applied (default: multiplied)."""
        loss = self.per_sample(outputs, target)
        return loss if w is None else loss * w

    def sample_weights(self, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | None:
        return None if weight is None else weight[self.bin_of(target)]

    def reduce(self, per_sample: torch.Tensor, w: torch.Tensor | None, reduction: str) -> torch.Tensor:
        return reduce_loss(per_sample, w, reduction)

    def param_groups(self) -> list[ParamGroup]:
        """The loss's own trainable parameters, as optimiser groups (default: one group, if any)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroup("loss", params)] if params else []

    def prepare(self, model: nn.Module) -> list[str]:
        """Set up the model for this loss before training (e.g. a prior-matching bias); returns parameter-name
        patterns to train without weight decay."""
        return []

    def forward(self, outputs, target, weight: torch.Tensor | None = None, reduction: str = "mean"):
        w = self.sample_weights(target, weight)
        if w is not None:
            w = w.float()
        return self.reduce(self.weighted(outputs.float(), target, w), w, reduction)


def build_loss(cfg: LossConfig, stats: LabelStats | Sequence[int]) -> LTLoss:
    """The loss registered under ``cfg.name``, for these label statistics (or plain class counts)."""
    return LOSSES.get(cfg.name).builder.from_config(cfg, as_stats(stats))


def mixed_loss(
    loss_fn: LTLoss,
    outputs: torch.Tensor,
    y_a: torch.Tensor,
    y_b: torch.Tensor,
    lam: torch.Tensor,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    """Loss of a mixed batch: ``lam_i * L(y_a_i) + (1 - lam_i) * L(y_b_i)``, per-sample ``lam``.

    With weights the loss's own mean is taken with the mixed weights ``lam_i w_{a_i} + (1 - lam_i) w_{b_i}``, so it
    reduces to the loss's weighted mean when lam is 0 or 1.
    """
    la = loss_fn(outputs, y_a, weight, reduction="none")
    lb = loss_fn(outputs, y_b, weight, reduction="none")
    per = lam * la + (1 - lam) * lb
    if weight is None:
        return per.sum() / len(y_a)
    wa, wb = weight[loss_fn.bin_of(y_a)], weight[loss_fn.bin_of(y_b)]
    return loss_fn.reduce(per, lam * wa + (1 - lam) * wb, "mean")
