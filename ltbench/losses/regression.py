"""Regression losses for imbalanced targets.

The model predicts ``(y - center) / scale`` (see :mod:`ltbench.tasks.regression`); every loss here compares the
prediction with the target on that scale. Following the DIR reference code (YyzHarry/imbalanced-regression,
``loss.py``), a weighted loss is the plain batch mean of ``w_i * l_i`` (not divided by the sum of the weights): the
re-weightings of regression (:mod:`ltbench.methods.dir`) scale their weights to a mean of 1 over the training set.

- ``mse``, ``l1``, ``huber``: the element losses.
- ``focal_r``: Focal-R (Yang et al. 2021): ``l * m^gamma`` with ``m = 2 sigmoid(beta |e|) - 1`` (or ``tanh(beta |e|)``).
- ``bmse``: Balanced MSE (Ren et al. 2022, jiawei-ren/BalancedMSE ``balanaced_mse.py``): GAI (a Gaussian mixture prior
  fitted to the training targets), BMC (batch Monte-Carlo over the batch's targets) and BNI (numerical integration
  over the label bins), with the noise scale sigma fixed or learnt; each ends by multiplying by ``2 sigma^2``
  (detached), which restores the MSE scale. BNI's bucket of label bin k sits at the bin's start (``get_bucket_info``
  of imdb-wiki-dir/datasets.py: the integer age k; ``bucket_centers=midpoint``: k + width / 2). Settings left null
  take the reference's value for the dataset at compose time (:data:`BMSE_REFERENCE`): the DIR code
  (imdb-wiki-dir/train.py, preprocess_gmm.py) fits 8 components to the training labels and learns sigma at lr 0.01;
  the synthetic benchmark (synthetic_benchmark/main_1d.py) fits 1 component (``dist=normal``) or 64 (``exp``) to
  10,000 draws of the generating distribution (``gmm_prior=generator``) and learns sigma at lr 0.001.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import LossConfig
from ltbench.errors import ConfigError
from ltbench.losses import LOSSES, LTLoss, batch_mean
from ltbench.optim import ParamGroup


class RegressionLoss(LTLoss):
    """Base of the regression losses: ``residual`` is prediction minus normalised target; the mean divides by the
    batch size whatever the weights (the DIR convention)."""


    def __init__(self, stats) -> None:
        super().__init__(stats)
        self.register_buffer("center", torch.tensor(float(getattr(stats, "center", 0.0))))
        self.register_buffer("scale", torch.tensor(float(getattr(stats, "scale", 1.0))))

    def prediction(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.reshape(len(outputs), -1)[:, 0]

    def normalized(self, target: torch.Tensor) -> torch.Tensor:
        return (target.float() - self.center) / self.scale

    def residual(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.prediction(outputs) - self.normalized(target)

    def reduce(self, per_sample, w, reduction):
        return batch_mean(per_sample, w, reduction)


@dataclass
class MSEConfig(LossConfig):
    name: str = "mse"
    tasks = ("regression",)
    hint = "add task=regression (or use a classification loss: ce, focal, ldam, ...)"


@dataclass
class L1Config(MSEConfig):
    name: str = "l1"


@LOSSES.register("mse", MSEConfig)
class MSE(RegressionLoss):
    """Mean squared error."""

    def per_sample(self, outputs, target):
        return self.residual(outputs, target).pow(2)


@LOSSES.register("l1", L1Config)
class L1(RegressionLoss):
    """Mean absolute error (the AgeDB-DIR / IMDB-WIKI-DIR training loss)."""

    def per_sample(self, outputs, target):
        return self.residual(outputs, target).abs()


@dataclass
class HuberConfig(MSEConfig):
    name: str = "huber"
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError("loss.beta must be > 0")


@LOSSES.register("huber", HuberConfig)
class Huber(RegressionLoss):
    """Huber: 0.5 e^2 / beta where |e| < beta, |e| - 0.5 beta elsewhere."""

    def __init__(self, stats, beta: float = 1.0) -> None:
        super().__init__(stats)
        self.beta = beta

    @classmethod
    def from_config(cls, cfg, stats):
        return cls(stats, cfg.beta)

    def per_sample(self, outputs, target):
        e = self.residual(outputs, target).abs()
        return torch.where(e < self.beta, 0.5 * e * e / self.beta, e - 0.5 * self.beta)


@dataclass
class FocalRConfig(MSEConfig):
    name: str = "focal_r"
    base: str = "l1"  # l1 | mse
    beta: float = 0.2
    gamma: float = 1.0
    activate: str = "sigmoid"  # sigmoid | tanh

    def __post_init__(self) -> None:
        if self.base not in ("l1", "mse") or self.activate not in ("sigmoid", "tanh"):
            raise ConfigError("loss.base must be l1 or mse and loss.activate sigmoid or tanh")


@LOSSES.register("focal_r", FocalRConfig)
class FocalR(RegressionLoss):
    """Focal-R (Yang et al. 2021): the L1 or MSE of a sample scaled by m^gamma, m = 2 sigmoid(beta |e|) - 1."""

    def __init__(self, stats, base: str = "l1", beta: float = 0.2, gamma: float = 1.0, activate: str = "sigmoid"):
        super().__init__(stats)
        self.base, self.beta, self.gamma, self.activate = base, beta, gamma, activate

    @classmethod
    def from_config(cls, cfg, stats):
        return cls(stats, cfg.base, cfg.beta, cfg.gamma, cfg.activate)

    def per_sample(self, outputs, target):
        e = self.residual(outputs, target)
        loss = e.abs() if self.base == "l1" else e * e
        a = self.beta * e.abs()
        m = 2 * torch.sigmoid(a) - 1 if self.activate == "sigmoid" else torch.tanh(a)
        return loss * m.pow(self.gamma)


# ------------------------------------------------------------------------------------------------ Balanced MSE


def fit_gmm(x: torch.Tensor, k: int, iters: int = 200, reg: float = 1e-6) -> tuple[torch.Tensor, ...]:
    """A 1-D Gaussian mixture by EM: (weights, means, variances), deterministic (means start at the quantiles).

    The reference fits sklearn's GaussianMixture(n_components=8) to the training labels; this is the same model,
    fitted without sklearn."""
    x = x.double().flatten()
    k = max(1, min(k, int(x.unique().numel())))
    means = torch.quantile(x, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    var = torch.full((k,), float(x.var()) / k + reg, dtype=torch.float64)
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    for _ in range(iters):
        logp = weights.log() - 0.5 * (var.log() + math.log(2 * math.pi)) - 0.5 * (x[:, None] - means) ** 2 / var
        resp = torch.softmax(logp, dim=1)
        nk = resp.sum(0).clamp(min=1e-12)
        weights, means = nk / len(x), (resp * x[:, None]).sum(0) / nk
        var = (resp * (x[:, None] - means) ** 2).sum(0) / nk + reg
    return weights.float(), means.float(), var.float()


# The Balanced MSE reference's settings per dataset: (GMM components, GMM fitted to, sigma lr); "default" for the
# DIR datasets (imdb-wiki-dir/preprocess_gmm.py --K 8 on the training labels, train.py --sigma_lr 1e-2).
BMSE_REFERENCE: dict[str, Any] = {
    "default": lambda ds: (8, "train", 0.01),
    "synthetic_dir": lambda ds: (1 if ds.dist == "normal" else 64, "generator", 0.001),  # main_1d.py
}


@dataclass
class BMSEConfig(LossConfig):
    name: str = "bmse"
    method: str = "gai"  # gai | bmc | bni
    noise_sigma: float = 1.0  # initial sigma, on the scale the model predicts (the reference: 1.0; RRT runs 10.0)
    learn_noise: bool = True  # sigma is a parameter trained with its own lr (not scheduled), as in the reference
    sigma_lr: float | None = None  # null: the reference's for the dataset (0.01; synthetic_dir 0.001)
    gmm_components: int | None = None  # GAI; null: the reference's (8; synthetic_dir 1 for dist=normal, 64 for exp)
    gmm_prior: str | None = None  # GAI fitted to: train (the training targets) | generator (synthetic_dir's law)
    bucket_centers: str = "label"  # BNI: label (bin k at its start, the reference) | midpoint (k + width / 2)

    def __post_init__(self) -> None:
        if self.method not in ("gai", "bmc", "bni"):
            raise ConfigError(f"loss.method must be gai, bmc or bni, got {self.method!r}")
        if not (self.noise_sigma > 0 and (self.sigma_lr or 0) >= 0 and (self.gmm_components or 1) >= 1):
            raise ConfigError("loss.noise_sigma must be > 0, loss.sigma_lr >= 0, loss.gmm_components >= 1")
        if self.gmm_prior not in (None, "train", "generator") or self.bucket_centers not in ("label", "midpoint"):
            raise ConfigError("loss.gmm_prior must be train or generator, loss.bucket_centers label or midpoint")

    def resolve(self, dataset: Any) -> None:
        """Fill the null settings with the reference's for the dataset (idempotent)."""
        name = str(getattr(dataset, "name", ""))
        k, prior, lr = BMSE_REFERENCE.get(name, BMSE_REFERENCE["default"])(dataset)
        self.gmm_components = k if self.gmm_components is None else self.gmm_components
        self.gmm_prior = prior if self.gmm_prior is None else self.gmm_prior
        self.sigma_lr = lr if self.sigma_lr is None else self.sigma_lr
        if self.gmm_prior == "generator" and name != "synthetic_dir":
            raise ConfigError(f"loss.gmm_prior=generator needs dataset=synthetic_dir (dataset={name} has no known law)")

    tasks = ("regression",)
    hint = "add task=regression (or use a classification loss: ce, focal, ldam, ...)"

    def check(self, root) -> None:
        self.resolve(root.dataset)
        if root.reweight.name != "none":
            raise ConfigError("loss=bmse balances the loss itself: use it with reweight=none (as the reference)")


def bucket_positions(centers: list[float], where: str) -> torch.Tensor:
    """BNI's bucket positions from the bin midpoints: ``label``, the bin's start (the reference's integer label k
    for one-year bins from 0); ``midpoint``, as they are. The bins are of equal width (``bin_edges``)."""
    c = torch.as_tensor(centers, dtype=torch.float32)
    if where == "midpoint" or len(c) < 2:
        return c
    return c - (c[1] - c[0]) / 2


@LOSSES.register("bmse", BMSEConfig)
class BalancedMSE(RegressionLoss):
    """Balanced MSE (Ren et al. 2022): the MSE of the balanced target distribution, GAI / BMC / BNI."""

    def __init__(self, stats, method="gai", noise_sigma=1.0, learn_noise=True, sigma_lr=0.01, components=8,
                 prior: str = "train", centers: str = "label") -> None:  # fmt: skip
        super().__init__(stats)
        self.method, self.sigma_lr = method, sigma_lr
        self.noise_sigma = nn.Parameter(torch.tensor(float(noise_sigma)), requires_grad=learn_noise)
        if method == "gai":
            targets = getattr(stats, "prior_targets" if prior == "generator" else "targets", None)
            if targets is None:
                what = "draws of the generating law (synthetic_dir)" if prior == "generator" else "training targets"
                raise ConfigError(f"loss=bmse method=gai needs the {what} of a regression dataset")
            for name, value in zip(("gmm_pi", "gmm_mu", "gmm_var"), fit_gmm(self.normalized(targets), components)):
                self.register_buffer(name, value)
        if method == "bni":
            counts = torch.as_tensor(stats.counts, dtype=torch.float32)
            keep = counts > 0
            centers = self.normalized(bucket_positions(stats.centers, centers))
            self.register_buffer("bucket_centers", centers[keep])
            self.register_buffer("bucket_log_weights", (counts[keep] / counts[keep].sum()).log())

    @classmethod
    def from_config(cls, cfg, stats):
        k, prior, lr = BMSE_REFERENCE["default"](None)  # a config that was not composed: the DIR settings
        return cls(stats, cfg.method, cfg.noise_sigma, cfg.learn_noise, lr if cfg.sigma_lr is None else cfg.sigma_lr,
                   cfg.gmm_components or k, cfg.gmm_prior or prior, cfg.bucket_centers)  # fmt: skip

    def param_groups(self) -> list[ParamGroup]:
        if not self.noise_sigma.requires_grad:
            return []
        return [ParamGroup("noise_sigma", [self.noise_sigma], weight_decay=0.0, fixed_lr=self.sigma_lr)]

    def sample_weights(self, target, weight):
        return None  # balanced by construction; the config refuses a re-weighting with it

    def per_sample(self, outputs, target):
        p, y = self.prediction(outputs), self.normalized(target)
        var = self.noise_sigma**2
        if self.method == "bmc":
            logits = -0.5 * (p[:, None] - y[None, :]) ** 2 / var  # row i: every target of the batch
            loss = F.cross_entropy(logits, torch.arange(len(y), device=y.device), reduction="none")
        elif self.method == "bni":
            mse = (p - y) ** 2 / (2 * var)
            balancing = torch.logsumexp(
                -0.5 * (p[:, None] - self.bucket_centers) ** 2 / var + self.bucket_log_weights, 1
            )
            loss = mse + balancing
        else:  # gai
            mse = (p - y) ** 2 / (2 * var) + 0.5 * var.log()
            v = self.gmm_var + var
            comp = self.gmm_pi.log() - 0.5 * v.log() - 0.5 * (p[:, None] - self.gmm_mu) ** 2 / v
            loss = mse + torch.logsumexp(comp, 1)
        return loss * (2 * var).detach()
