"""BalPoE (Sanchez Aimar et al., CVPR 2023, "Balanced Product of Calibrated Experts for Long-Tailed Recognition"):
``method=balpoe``, a product of logit-adjusted experts on the multi-expert model (``model=ride_resnet32``).

Reference: emasa/BalPoE-CalibratedLT, ``model/loss.py::BSExpertLoss`` (the loss), ``utils/util.py::parse_tau_list``
and ``limits_sequence`` (the experts' lambdas), ``utils/util.py::adjusted_model_wrapper`` (the test-time
combination), ``utils/combiner.py::Combiner.mixup`` (mixup) and ``configs/mixup/standard_training/
config_cifar{10,100}_ir100_bs-experts.json`` (the recipe).

Expert j (logits z_j = s * cos_j of its cosine classifier, s = ``cosine_scale`` = 30, the reference's model scale;
s = 1 for a linear head) is trained with the logit-adjusted cross-entropy of its own lambda_j (the reference's
``tau_list``):

    L = 1/E sum_j CE(z_j + lambda_j log(pi + eps), y),    pi the training class prior, eps = 1e-9

lambda_j = 0 is plain cross-entropy (the long-tailed "head" expert), 1 Balanced Softmax, 2 an inverse-prior expert.
The default lambdas are ``limits_sequence``: E values evenly spaced over [tau_min, tau_max] = [0, 2] ([0, 1, 2] for
three experts, the published setting), whose mean is 1: the test-time combination, the mean of the experts' raw
logits (a product of experts: the mean of log-probabilities up to a constant), is then Fisher-consistent for the
balanced error, i.e. unbiased for a uniform test distribution. The reference's optional post-hoc correction adds
log(test prior) to every expert; ltbench's test splits are balanced, where that is a constant and changes nothing.

Calibration: the paper trains with mixup (one lam ~ Beta(alpha, alpha) per batch, the loss lam L(y_a) + (1 - lam)
L(y_b), ``Combiner.mixup`` with ``target_mix_strategy = mix_input``): that is ltbench's ``synth=mixup``, applied by
this method on the expert logits (alpha 0.4 on CIFAR-100-LT, 0.8 on CIFAR-10-LT: the experiment presets).

The experts' losses are the method's own: the run's loss must be ``ce`` and its re-weighting ``none`` (refused
otherwise, at compose time). :class:`LogitAdjustedExperts` is shared with SADE (``ltbench.methods.sade``), whose
experts are logit-adjusted cross-entropies too, with other biases and a sum instead of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.methods import METHODS, Extension, Method, MethodConfig
from ltbench.methods.ride import ExpertsNet, _check_experts, _num_experts

if TYPE_CHECKING:
    from ltbench.contracts import StageContext

PRIOR_EPS = 1e-9  # BSExpertLoss(eps=1e-9) and DiverseExpertLoss: log(prior + 1e-9)


def limits_sequence(num_experts: int, tau_min: float, tau_max: float) -> list[float]:
    """E lambdas evenly spaced over [tau_min, tau_max]; one expert gets their mean (``utils/util.py``)."""
    if num_experts == 1:
        return [(tau_min + tau_max) / 2.0]
    return [tau_min + (tau_max - tau_min) * i / (num_experts - 1) for i in range(num_experts)]


def log_prior(counts: torch.Tensor, eps: float = PRIOR_EPS) -> torch.Tensor:
    """log(pi_c + eps), pi the class prior from the training counts (a class without images gets log(eps))."""
    prior = counts.double() / counts.double().sum()
    return torch.log(prior + eps).float()


def expert_losses(logits: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E x N per-sample cross-entropies of the adjusted logits ``logits[j] + bias[j]`` (logits E x N x C, bias
    E x C): ``F.cross_entropy(logits[j] + bias[j], y)`` of the references, before the batch mean."""
    adjusted = logits + bias.to(logits.dtype)[:, None, :]
    e, n, c = adjusted.shape
    return F.cross_entropy(adjusted.reshape(e * n, c), y.repeat(e), reduction="none").view(e, n)


def mixed_expert_losses(
    logits: torch.Tensor, bias: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """(E,) batch-mean losses of a mixed batch: lam_i L(y_a_i) + (1 - lam_i) L(y_b_i) per sample (the Combiner's
    ``lambda_ * loss_a + (1 - lambda_) * loss_b``: per batch the same as mixing the batch means)."""
    lam = lam.to(logits.dtype)
    per = lam * expert_losses(logits, bias, y_a) + (1 - lam) * expert_losses(logits, bias, y_b)
    return per.mean(1)


def expert_scale(root: Any, cosine_scale: float) -> float:
    """The scale of the experts' logits: ``cosine_scale`` for a cosine head (the reference's s), 1 for a linear one."""
    return float(cosine_scale) if root.model.head == "cosine" else 1.0


def check_expert_method(root: Any, what: str, experts: int | None = None) -> None:
    """Rules of a method that brings the experts' own losses: a multi-expert model (exactly ``experts`` of them when
    given), loss=ce, no re-weighting, no semi-supervised method (feature-space synthesis is refused for every method
    that replaces the supervised step, by the config's own rule)."""
    _check_experts(root, what, 1)
    n = _num_experts(root)
    if experts is not None and n != experts:
        raise ConfigError(f"{what} trains exactly {experts} experts; model.num_experts={n}")
    if root.loss.name != "ce":
        raise ConfigError(
            f"{what} brings the experts' own logit-adjusted losses: use loss=ce, not loss={root.loss.name}"
        )
    if root.reweight.name != "none":
        raise ConfigError(f"{what} does not combine with reweight={root.reweight.name} (use reweight=none)")
    if root.semi is not None:
        raise ConfigError(f"{what} trains every expert with its own loss; it does not combine with semi=...")


@dataclass
class BalPoEConfig(MethodConfig):
    name: str = "balpoe"
    # the experts' lambdas (the reference's tau_list); null: limits_sequence(num_experts, tau_min, tau_max)
    taus: list[float] | None = None
    tau_min: float = 0.0
    tau_max: float = 2.0
    cosine_scale: float = 30.0  # s of the experts' cosine classifiers (expert_resnet_cifar.py ResNet_s(s=30))

    tasks = ("classification",)
    hint = "BalPoE adjusts class logits: a classification method"

    def __post_init__(self) -> None:
        if not self.cosine_scale > 0 or self.tau_min > self.tau_max:
            raise ConfigError("method.cosine_scale must be > 0 and method.tau_min <= method.tau_max")

    def lambdas(self, num_experts: int) -> list[float]:
        return list(self.taus) if self.taus is not None else limits_sequence(num_experts, self.tau_min, self.tau_max)

    def check(self, root: Any) -> None:
        check_expert_method(root, "method=balpoe")
        n = _num_experts(root)
        if self.taus is not None and len(self.taus) != n:
            raise ConfigError(f"method.taus has {len(self.taus)} values for model.num_experts={n}")


class LogitAdjustedExperts(Extension):
    """Every expert trained with the cross-entropy of its adjusted logits ``s z_j + bias_j`` (``bias``: E x C, a
    buffer), combined by ``reduce`` ("mean": BalPoE, "sum": SADE); mixup from the stage's supervised method (its
    synthesis switches) on the expert logits. The network's output, the mean of the raw expert logits, is what
    the run evaluates (the references' ``final_out``)."""

    reduce = "mean"
    bias: torch.Tensor

    def __init__(self, what: str, ctx: StageContext, base: Method | None, bias: torch.Tensor, scale: float) -> None:
        super().__init__(base, what)
        self.scale = scale
        self.register_buffer("bias", bias.float())

    def wrap(self, model: nn.Module) -> nn.Module:
        return ExpertsNet(model)

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b: Any = self.base  # the stage's Supervised method: its synthesis switch and task
        x, y = batch.x, batch.y
        mixed = b.synth.mix(x, y, ep.gen) if (b.synth_on and b.synth.mixes) else None
        with autocast(x.device, ep.amp):
            z = net(mixed.x if mixed else x)
        z = self.scale * z.float()
        if mixed is not None:
            per_expert = mixed_expert_losses(z, self.bias, mixed.y_a, mixed.y_b, mixed.lam)
        else:
            per_expert = expert_losses(z, self.bias, y).mean(1)
        loss = per_expert.mean() if self.reduce == "mean" else per_expert.sum()
        n = len(y)
        sums = b.task.step_sums(z.mean(0), y)
        return loss, {**sums, **{f"mean_expert{j}_loss": v.detach().double() * n for j, v in enumerate(per_expert)}}


@METHODS.register("balpoe", BalPoEConfig)
class BalPoEMethod(LogitAdjustedExperts):
    """BalPoE: expert j on CE(z_j + lambda_j log pi), averaged over the experts (BSExpertLoss)."""

    def __init__(self, cfg: BalPoEConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        counts = torch.as_tensor(list(ctx.stats.counts), dtype=torch.float64)
        lambdas = cfg.lambdas(int(model.num_experts))  # type: ignore[arg-type]
        bias = torch.tensor(lambdas, dtype=torch.float32)[:, None] * log_prior(counts)[None, :]
        super().__init__("method=balpoe", ctx, base, bias, expert_scale(ctx.cfg, cfg.cosine_scale))
        self.lambdas = lambdas

    def summary(self) -> dict[str, Any]:
        mean = sum(self.lambdas) / len(self.lambdas)
        return {"balpoe": {"lambdas": self.lambdas, "lambda_mean": mean, "logit_scale": self.scale}}
