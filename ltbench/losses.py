"""Losses for long-tailed classification, and per-class re-weighting.

Every loss is a small ``nn.Module`` called as ``loss(logits, target, weight=None, reduction="mean")``:

- ``weight`` is an optional per-class weight vector (C,); sample i's loss is multiplied by ``weight[target_i]``.
- ``reduction="none"`` returns the per-sample losses, ``"sum"`` their sum, ``"mean"`` their mean; with weights,
  ``"mean"`` is the weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (PyTorch's ``cross_entropy(weight=...)``
  convention, which the CIFAR-LT reference code uses for CE-DRW and LDAM-DRW).

Class counts are buffers, so ``.to(device)`` moves them: no loss knows the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import LossConfig, ReweightConfig
from ltbench.errors import ConfigError


def reduce_loss(per_sample: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str):
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        if weight is None:
            return per_sample.mean()
        return per_sample.sum() / weight[target].sum()
    raise ValueError(f"unknown reduction {reduction!r}")


class LTLoss(nn.Module):
    """Base class: subclasses implement ``per_sample(logits, target)`` (unweighted)."""

    def __init__(self, class_counts: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("counts", torch.as_tensor(list(class_counts), dtype=torch.float32))

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits, target, weight: torch.Tensor | None = None, reduction: str = "mean"):
        loss = self.per_sample(logits.float(), target)
        if weight is not None:
            loss = loss * weight.to(loss.dtype)[target]
        return reduce_loss(loss, target, weight, reduction)


class CrossEntropy(LTLoss):
    def __init__(self, class_counts, label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts)
        self.label_smoothing = label_smoothing

    def adjust(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Hook for losses that are cross-entropy on transformed logits."""
        return logits

    def per_sample(self, logits, target):
        return F.cross_entropy(
            self.adjust(logits, target), target, reduction="none", label_smoothing=self.label_smoothing
        )


class LogitAdjusted(CrossEntropy):
    """Logit-adjusted loss (Menon et al. 2021): CE on ``logits + tau * log(prior)``.

    With tau=1 this is balanced softmax (Ren et al. 2020), since log(count) and log(prior) differ by a constant
    that softmax ignores.
    """

    def __init__(self, class_counts, tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts, label_smoothing)
        self.tau = tau

    def adjust(self, logits, target):
        prior = self.counts / self.counts.sum()
        return logits + self.tau * torch.log(prior)


class LDAM(CrossEntropy):
    """Label-distribution-aware margin loss (Cao et al. 2019).

    margin_j = K / n_j^(1/4) with K chosen so the largest margin is ``max_m``; the target logit is reduced by its
    class's margin and all logits are scaled by ``s`` before cross-entropy. Expects cosine logits in [-1, 1].
    """

    def __init__(self, class_counts, max_m: float = 0.5, s: float = 30.0, label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts, label_smoothing)
        m = self.counts.pow(-0.25)
        self.register_buffer("margins", m * (max_m / m.max()))
        self.s = s

    def adjust(self, logits, target):
        margin = F.one_hot(target, logits.shape[1]).to(logits.dtype) * self.margins[target][:, None]
        return self.s * (logits - margin)


class Focal(LTLoss):
    """Softmax focal loss (Lin et al. 2017): ``(1 - p_t)^gamma * CE``; gamma=0 is cross-entropy."""

    def __init__(self, class_counts, gamma: float = 1.0) -> None:
        super().__init__(class_counts)
        self.gamma = gamma

    def per_sample(self, logits, target):
        ce = F.cross_entropy(logits, target, reduction="none")
        p_t = torch.exp(-ce)
        return (1.0 - p_t).pow(self.gamma) * ce


class SigmoidFocal(LTLoss):
    """One-vs-all sigmoid focal loss summed over classes, as in the class-balanced loss (Cui et al. 2019).

    ``alpha`` (optional) weights the positive term by alpha and the negatives by 1 - alpha.
    """

    def __init__(self, class_counts, gamma: float = 1.0, alpha: float | None = None) -> None:
        super().__init__(class_counts)
        self.gamma, self.alpha = gamma, alpha

    def per_sample(self, logits, target):
        y = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        p = torch.sigmoid(logits)
        p_t = y * p + (1 - y) * (1 - p)
        loss = (1 - p_t).pow(self.gamma) * bce
        if self.alpha is not None:
            loss = (y * self.alpha + (1 - y) * (1 - self.alpha)) * loss
        return loss.sum(dim=1)


LOSSES: dict[str, Callable[[LossConfig, Sequence[int]], LTLoss]] = {
    "ce": lambda c, n: CrossEntropy(n, c.label_smoothing),
    "focal": lambda c, n: Focal(n, c.gamma),
    "sigmoid_focal": lambda c, n: SigmoidFocal(n, c.gamma, c.alpha),
    "ldam": lambda c, n: LDAM(n, c.max_m, c.s, c.label_smoothing),
    "balanced_softmax": lambda c, n: LogitAdjusted(n, 1.0, c.label_smoothing),
    "logit_adjust": lambda c, n: LogitAdjusted(n, c.tau, c.label_smoothing),
}


def build_loss(cfg: LossConfig, class_counts: Sequence[int]) -> LTLoss:
    if cfg.name not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.name!r}; choose one of {', '.join(LOSSES)}")
    if cfg.label_smoothing and cfg.name in ("focal", "sigmoid_focal"):
        raise ConfigError(f"loss.label_smoothing is not defined for loss={cfg.name}")
    if cfg.alpha is not None and cfg.name != "sigmoid_focal":
        raise ConfigError("loss.alpha applies to loss=sigmoid_focal only (re-weight softmax losses with reweight=...)")
    return LOSSES[cfg.name](cfg, class_counts)


# --------------------------------------------------------------------------------------------- re-weighting


def class_weights(name: str, class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor | None:
    """Per-class loss weights, normalised to sum to the number of classes (None for ``none``)."""
    n = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if name == "none":
        return None
    if name == "inverse":
        w = 1.0 / n
    elif name == "sqrt_inverse":
        w = n.rsqrt()
    elif name == "effective_number":
        # Cui et al. 2019: effective number E_n = (1 - beta^n) / (1 - beta); weight = 1 / E_n.
        w = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    else:
        raise ConfigError(f"unknown reweight {name!r}; choose one of none, inverse, sqrt_inverse, effective_number")
    return (w / w.sum() * len(n)).float()


class Reweighting:
    """Per-class weights as a function of the epoch: deferred re-weighting switches on at ``start_epoch``."""

    def __init__(self, cfg: ReweightConfig, class_counts: Sequence[int]) -> None:
        self.start_epoch = cfg.start_epoch
        self.weights = class_weights(cfg.name, class_counts, cfg.beta)

    def at(self, epoch: int) -> torch.Tensor | None:
        if self.weights is None or epoch < self.start_epoch:
            return None
        return self.weights


def mixed_loss(
    loss_fn: LTLoss,
    logits: torch.Tensor,
    y_a: torch.Tensor,
    y_b: torch.Tensor,
    lam: torch.Tensor,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    """Loss of a mixed batch: ``lam_i * L(y_a_i) + (1 - lam_i) * L(y_b_i)``, per-sample ``lam``.

    With class weights the mean is normalised by the mixed weights ``lam_i w_{a_i} + (1 - lam_i) w_{b_i}``, so it
    reduces to the weighted mean above when lam is 0 or 1.
    """
    la = loss_fn(logits, y_a, weight, reduction="none")
    lb = loss_fn(logits, y_b, weight, reduction="none")
    total = (lam * la + (1 - lam) * lb).sum()
    if weight is None:
        return total / len(y_a)
    return total / (lam * weight[y_a] + (1 - lam) * weight[y_b]).sum()
