"""Classification losses for long-tailed data: cross-entropy, logit adjustment / balanced softmax, LDAM, focal."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ltbench.config import LossConfig
from ltbench.errors import ConfigError
from ltbench.losses import LOSSES, LTLoss, batch_mean


def _check_smoothing(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError("loss.label_smoothing must be in [0, 1)")


@dataclass
class ClassificationLossConfig(LossConfig):
    """Base of the classification losses' schemas: they need class logits."""

    tasks = ("classification",)
    hint = "for regression use loss=mse, l1, huber, focal_r or bmse"


@dataclass
class CEConfig(ClassificationLossConfig):
    name: str = "ce"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_smoothing(self.label_smoothing)


@LOSSES.register("ce", CEConfig)
class CrossEntropy(LTLoss):
    """Cross-entropy (optionally label-smoothed)."""

    def __init__(self, class_counts, label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts)
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg, stats):
        return cls(stats, cfg.label_smoothing)

    def adjust(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Hook for losses that are cross-entropy on transformed logits."""
        return logits

    def per_sample(self, logits, target):
        return F.cross_entropy(
            self.adjust(logits, target), target, reduction="none", label_smoothing=self.label_smoothing
        )


@dataclass
class LogitAdjustConfig(ClassificationLossConfig):
    name: str = "logit_adjust"
    tau: float = 1.0  # Menon et al. 2021: tau=1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_smoothing(self.label_smoothing)


@LOSSES.register("logit_adjust", LogitAdjustConfig)
class LogitAdjusted(CrossEntropy):
    """Logit-adjusted loss (Menon et al. 2021): CE on ``logits + tau * log(prior)``.

    With tau=1 this is balanced softmax (Ren et al. 2020), since log(count) and log(prior) differ by a constant
    that softmax ignores.
    """

    def __init__(self, class_counts, tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts, label_smoothing)
        self.tau = tau

    @classmethod
    def from_config(cls, cfg, stats):
        return cls(stats, cfg.tau, cfg.label_smoothing)

    def adjust(self, logits, target):
        prior = self.counts / self.counts.sum()
        return logits + self.tau * torch.log(prior)


@dataclass
class BalancedSoftmaxConfig(ClassificationLossConfig):
    name: str = "balanced_softmax"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_smoothing(self.label_smoothing)


@LOSSES.register("balanced_softmax", BalancedSoftmaxConfig)
class BalancedSoftmax(LogitAdjusted):
    """Balanced softmax (Ren et al. 2020): cross-entropy on logits + log(class count)."""

    @classmethod
    def from_config(cls, cfg, stats):
        return cls(stats, 1.0, cfg.label_smoothing)


@dataclass
class LDAMConfig(ClassificationLossConfig):
    name: str = "ldam"
    max_m: float = 0.5  # largest margin (Cao et al. 2019)
    s: float = 30.0  # logit scale (Cao et al. 2019)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_smoothing(self.label_smoothing)

    def check(self, root) -> None:
        super().check(root)
        if root.model.head != "cosine":
            raise ConfigError("loss=ldam needs the cosine-normalised head (model.head=cosine)")


@LOSSES.register("ldam", LDAMConfig)
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

    @classmethod
    def from_config(cls, cfg, stats):
        return cls(stats, cfg.max_m, cfg.s, cfg.label_smoothing)

    def adjust(self, logits, target):
        margin = F.one_hot(target, logits.shape[1]).to(logits.dtype) * self.margins[target][:, None]
        return self.s * (logits - margin)


@dataclass
class FocalConfig(ClassificationLossConfig):
    name: str = "focal"
    gamma: float = 1.0  # the CIFAR-LT focal baseline of Cao et al. 2019; 0 is cross-entropy

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ConfigError("loss.gamma must be >= 0")


@LOSSES.register("focal", FocalConfig)
class Focal(LTLoss):
    """Softmax focal loss (Lin et al. 2017): ``(1 - p_t)^gamma * CE``; gamma=0 is cross-entropy.

    With class weights it follows the code behind the CB-focal rows of Cao et al. 2019 (kaidic/LDAM-DRW,
    ``losses.py``, ``FocalLoss(weight=w)``): the weight enters before the modulating factor, c_i = w_y * CE_i,
    loss_i = (1 - exp(-c_i))^gamma * c_i, and the mean divides by the batch size, not by the sum of the weights.
    """

    def __init__(self, class_counts, gamma: float = 1.0) -> None:
        super().__init__(class_counts)
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg, stats):
        return cls(stats, cfg.gamma)

    def per_sample(self, logits, target):
        return self.weighted(logits, target, None)

    def weighted(self, logits, target, w):
        ce = F.cross_entropy(logits, target, reduction="none")
        c = ce if w is None else w * ce
        return (1.0 - torch.exp(-c)).pow(self.gamma) * c

    def reduce(self, per_sample, w, reduction):
        return batch_mean(per_sample, w, reduction)


@dataclass
class SigmoidFocalConfig(ClassificationLossConfig):
    name: str = "sigmoid_focal"
    gamma: float = 1.0
    alpha: float | None = None  # weight of the positive term (negatives get 1 - alpha)
    # Cui et al. 2019: the classifier bias starts at -log(C-1), so every sigmoid starts at the prior 1/C, and gets
    # no weight decay (richardaecn/class-balanced-loss, src/model_base.py and src/cifar_main.py)
    prior_bias: bool = True

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ConfigError("loss.gamma must be >= 0")


@LOSSES.register("sigmoid_focal", SigmoidFocalConfig)
class SigmoidFocal(LTLoss):
    """One-vs-all sigmoid focal loss summed over classes, as in the class-balanced loss (Cui et al. 2019).

    ``alpha`` (optional) weights the positive term by alpha and the negatives by 1 - alpha. A class weight w_y
    multiplies all C binary terms of a sample, and the mean divides by the number of positives, i.e. the batch size
    (richardaecn/class-balanced-loss, ``src/cifar_main.py``, ``focal_loss``). ``prior_bias``: the classifier bias
    starts at -log(C-1) (every sigmoid at 1/C) and is trained without weight decay.
    """

    def __init__(self, class_counts, gamma: float = 1.0, alpha: float | None = None, prior_bias: bool = False) -> None:
        super().__init__(class_counts)
        self.gamma, self.alpha, self.prior_bias = gamma, alpha, prior_bias

    @classmethod
    def from_config(cls, cfg, stats):
        return cls(stats, cfg.gamma, cfg.alpha, cfg.prior_bias)

    def reduce(self, per_sample, w, reduction):
        return batch_mean(per_sample, w, reduction)

    def prepare(self, model):
        bias = getattr(getattr(model, "head", None), "bias", None)
        if not self.prior_bias or bias is None:
            return []
        with torch.no_grad():
            bias.fill_(-math.log(max(len(self.counts) - 1, 1)))
        return ["head.bias"]

    def per_sample(self, logits, target):
        y = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        p = torch.sigmoid(logits)
        p_t = y * p + (1 - y) * (1 - p)
        loss = (1 - p_t).pow(self.gamma) * bce
        if self.alpha is not None:
            loss = (y * self.alpha + (1 - y) * (1 - self.alpha)) * loss
        return loss.sum(dim=1)
