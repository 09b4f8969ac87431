"""SADE (Zhang et al., NeurIPS 2022, "Self-Supervised Aggregation of Diverse Experts for Test-Agnostic Long-Tailed
Recognition"): skill-diverse experts (``method=sade``) and the test-time self-supervised aggregation of their
outputs (``classifier=sade_tta``), on the multi-expert model (``model=ride_resnet32``, three experts).

Reference: Vanint/SADE-AgnosticLT, ``model/loss.py::DiverseExpertLoss`` (the experts' losses),
``test_training_cifar.py`` (``test_training``: the aggregation; ``main``: its optimiser and stopping rule),
``configs/config_cifar100_ir100_sade.json`` and ``configs/test_time_cifar100_ir100_sade.json`` (the recipes).

``method=sade``: with z_j = s * cos_j (s = ``cosine_scale`` = 30, the reference model's scale; 1 for a linear head)
and pi the training prior,

    L = CE(z_1, y) + CE(z_2 + log(pi + eps), y) + CE(z_3 + log(pi + eps) - tau log(pi_inv + eps), y)

(eps = 1e-9, tau = 2): a forward (long-tailed) expert, a uniform (Balanced Softmax) expert and a backward expert
trained for an inversely long-tailed distribution, summed. ``pi_inv`` is the prior with its values reversed in
rank (the largest count gets the smallest prior: ``DiverseExpertLoss.inverse_prior``); classes of equal count
are ranked by a stable sort (the reference's ``torch.sort`` leaves their order to the implementation). The
network's output is the mean of the three experts' raw logits: without ``classifier=sade_tta`` that is SADE's
number, the paper's "no test-time aggregation" setting.

``classifier=sade_tta`` (the test-time stage; it TRAINS ON THE UNLABELED TEST IMAGES, so its numbers are
test-time adapted: the record says so and the run's label carries ``+TTA(test)``): the experts are frozen (the
backbone in eval mode, BatchNorm statistics those of training) and only three aggregation weights w (initially
1/3 each) learn. Each test image gives two views (RandomCrop(32, padding=4), ColorJitter(0.4, 0.4, 0.4, 0.1)
p 0.8, RandomGrayscale p 0.2, GaussianBlur sigma ~ U[0.1, 2] p 0.2, horizontal flip, as the reference's
``train_trsfm``); with a(x) = sum_j softmax(w)_j z_j(x), the loss is the negative prediction stability
``-mean_i cos(softmax(a(v1_i)), softmax(a(v2_i)))`` (cosine eps 1e-6). SGD lr 0.1, momentum 0.9, nesterov, weight
decay 5e-4 (on w too, as the reference), constant lr, 5 epochs; after an epoch in which any softmax(w)_j rounded to
two decimals falls under ``stop_below`` = 0.05 the weights are kept as they are (the reference's ``break``). The
test outputs are then sum_j softmax(w)_j z_j. Labels of the test set are never read by the stage.

Where ltbench differs: the stage's loop counts its steps by the stage's sampler over the training set (ceil(N_train
/ batch) steps an epoch), so an epoch is one pass over a fresh permutation of the test set in that many steps of
ceil(N_test / steps) images (CIFAR-100-LT ratio 100: 85 steps of 118 images; the reference: 79 of 128); the
"train_acc" column of that stage is 0 (no labels). The views use ltbench's batched ops (a true Gaussian kernel,
PIL's blur is a box approximation) and the dataset's own normalisation (the reference's CIFAR-10 constants).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.classifier import CLASSIFIERS, ClassifierMethod, FrozenBackbone, RetrainConfig
from ltbench.config import ScheduleConfig
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError, LtbenchError
from ltbench.methods import METHODS, Method, MethodConfig
from ltbench.methods.balpoe import PRIOR_EPS, LogitAdjustedExperts, check_expert_method, expert_scale, log_prior
from ltbench.methods.ride import _check_experts
from ltbench.models.ride import ExpertHead

if TYPE_CHECKING:
    from ltbench.contracts import StageContext

# ------------------------------------------------------------------------------------------------ the experts


def inverse_prior(prior: torch.Tensor) -> torch.Tensor:
    """The prior's values reversed in rank: class c gets the value of rank C-1-rank(c) (stable sort for ties)."""
    value, idx0 = torch.sort(prior, stable=True)
    rank = torch.argsort(idx0, stable=True)
    return value.index_select(0, len(prior) - 1 - rank)


def sade_biases(counts: torch.Tensor, tau: float, eps: float = PRIOR_EPS) -> torch.Tensor:
    """3 x C logit biases of the forward, uniform and backward experts: 0, log(pi + eps),
    log(pi + eps) - tau log(pi_inv + eps)."""
    prior = counts.double() / counts.double().sum()
    lp = log_prior(counts, eps).double()
    backward = lp - tau * torch.log(inverse_prior(prior) + eps)
    return torch.stack([torch.zeros_like(lp), lp, backward]).float()


@dataclass
class SadeConfig(MethodConfig):
    name: str = "sade"
    tau: float = 2.0  # DiverseExpertLoss tau (config_cifar100_ir100_sade.json): the backward expert's strength
    cosine_scale: float = 30.0  # s of the experts' cosine classifiers (expert_resnet_cifar.py ResNet_s(s=30))

    tasks = ("classification",)
    hint = "SADE adjusts class logits: a classification method"

    def __post_init__(self) -> None:
        if not self.cosine_scale > 0 or not math.isfinite(self.tau):
            raise ConfigError("method.cosine_scale must be > 0 and method.tau finite")

    def check(self, root: Any) -> None:
        check_expert_method(root, "method=sade", experts=3)


@METHODS.register("sade", SadeConfig)
class SadeMethod(LogitAdjustedExperts):
    """SADE: forward / uniform / backward logit-adjusted experts, their losses summed (DiverseExpertLoss)."""

    reduce = "sum"

    def __init__(self, cfg: SadeConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        counts = torch.as_tensor(list(ctx.stats.counts), dtype=torch.float64)
        bias = sade_biases(counts, cfg.tau)
        super().__init__("method=sade", ctx, base, bias, expert_scale(ctx.cfg, cfg.cosine_scale))
        self.tau = cfg.tau

    def summary(self) -> dict[str, Any]:
        return {"sade": {"tau": self.tau, "logit_scale": self.scale, "experts": ["forward", "uniform", "backward"]}}


# ------------------------------------------------------------------------------------------------ test-time views

BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = 6  # ceil(3 x the largest sigma): one kernel size for every image


def tta_view(x_uint8: torch.Tensor, gen: torch.Generator, mean: Any, std: Any) -> torch.Tensor:
    """One view per image of SADE's test-time augmentation (``test_training_cifar.py`` ``train_trsfm``), normalised:
    RandomCrop(H, padding=4) with zero fill, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale p 0.2,
    GaussianBlur sigma ~ U[0.1, 2] p 0.2, horizontal flip p 0.5. Every draw comes from ``gen`` (CPU), the same
    draws whatever the images' device."""
    from ltbench.data.augment import random_crop, random_flip
    from ltbench.data.views import color_jitter, gray, normalize01, to_float01
    from ltbench.methods.contrastive import gaussian_blur

    n = len(x_uint8)
    x = to_float01(random_crop(x_uint8, 4, gen))
    jitter_on = torch.rand(n, generator=gen) < 0.8
    lo, hi = torch.tensor([0.6, 0.6, 0.6, -0.1]), torch.tensor([1.4, 1.4, 1.4, 0.1])
    factors = lo + (hi - lo) * torch.rand(n, 4, generator=gen)
    order = torch.rand(n, 4, generator=gen).argsort(dim=1)
    gray_on = torch.rand(n, generator=gen) < 0.2
    blur_on = torch.rand(n, generator=gen) < 0.2
    sigma = torch.empty(n).uniform_(*BLUR_SIGMA, generator=gen)

    def where(on: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(on.to(old.device)[:, None, None, None], new, old)

    if bool(jitter_on.any()):
        x = where(jitter_on, color_jitter(x, factors, order), x)
    x = where(gray_on, gray(x).expand_as(x), x)
    if bool(blur_on.any()):
        x = where(blur_on, gaussian_blur(x, sigma, radius=BLUR_RADIUS), x)
    return normalize01(random_flip(x, gen), mean, std)


# ------------------------------------------------------------------------------------------------ the aggregation


def aggregate(weight: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_j softmax(w)_j logits_j: ``weight`` (E,) raw aggregation weights, ``logits`` E x N x C -> N x C."""
    return torch.einsum("e,enc->nc", weight.softmax(0).to(logits.dtype), logits)


def stability_loss(weight: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
    """-mean_i cos(softmax(a(v1_i)), softmax(a(v2_i))): the negative prediction stability of the aggregated
    prediction over two views (expert logits E x N x C each; ``torch.nn.CosineSimilarity(dim=1, eps=1e-6)``)."""
    p1 = aggregate(weight, view1).softmax(1)
    p2 = aggregate(weight, view2).softmax(1)
    return -F.cosine_similarity(p1, p2, dim=1, eps=1e-6).mean()


def should_stop(weight: torch.Tensor, below: float) -> bool:
    """The reference's rule after an epoch: some softmax(w)_j, rounded to two decimals, is under ``below``."""
    w = weight.detach().double().softmax(0)
    return bool(((w * 100).round() / 100 < below).any())


class AggregatedHead(nn.Module):
    """The frozen experts' classifiers and the learned aggregation weights: ``forward`` = sum_j softmax(w)_j z_j on
    the model's output scale. ``stopped_at`` (epoch, 0: still learning) and ``kept`` (the weights at that epoch) are
    buffers, so a saved or resumed model aggregates alike; once stopped, ``kept`` is used and w gets no gradient."""

    kept: torch.Tensor
    stopped_at: torch.Tensor

    def __init__(self, experts: ExpertHead) -> None:
        super().__init__()
        self.experts = experts
        for p in self.experts.parameters():
            p.requires_grad_(False)
        e = experts.num_experts
        self.weight = nn.Parameter(torch.full((e,), 1.0 / e))  # aggregation_weight.data.fill_(1/3)
        self.register_buffer("kept", torch.full((e,), 1.0 / e))
        self.register_buffer("stopped_at", torch.zeros((), dtype=torch.long))

    def effective(self) -> torch.Tensor:
        return torch.where(self.stopped_at > 0, self.kept, self.weight)

    def aggregation(self) -> torch.Tensor:
        """softmax of the weights in use: the experts' shares of the output."""
        return self.effective().detach().softmax(0)

    def expert_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.experts.expert_logits(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return aggregate(self.effective(), self.experts.expert_logits(features))


def _tta_schedule() -> ScheduleConfig:
    # test_time_cifar100_ir100_sade.json: 5 epochs, batch 128, SGD lr 0.1, momentum 0.9, nesterov, wd 5e-4, no lr
    # schedule (the optimiser's lr throughout)
    return ScheduleConfig(epochs=5, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          warmup=0.0, decay="step", milestones=[])  # fmt: skip


@dataclass
class SadeTTAConfig(RetrainConfig):
    """sade_tta: SADE's test-time self-supervised aggregation of the frozen experts, on the unlabeled test images."""

    name: str = "sade_tta"
    schedule: ScheduleConfig = field(default_factory=_tta_schedule)
    augment: bool = False  # the training images only count the steps: no augmentation needed
    stop_below: float = 0.05  # stop once a rounded expert share is under it (test_training_cifar.py main)
    logit_scale: float | None = None  # null: the training method's cosine_scale (30) for a cosine head, else 1

    label_suffix: ClassVar[str | None] = "+TTA(test)"  # its numbers are test-time adapted on the test images
    reads = ("images",)

    def __post_init__(self) -> None:
        if not 0 <= self.stop_below < 1 or (self.logit_scale is not None and not self.logit_scale > 0):
            raise ConfigError("classifier.stop_below must be in [0, 1) and classifier.logit_scale > 0")

    def check(self, root: Any) -> None:
        super().check(root)
        _check_experts(root, "classifier=sade_tta", 2)
        from ltbench.data.lists import ImageFilesConfig

        if isinstance(root.dataset, ImageFilesConfig):
            raise ConfigError(f"classifier=sade_tta adapts on tensor-held (CIFAR-scale) test images; "
                              f"dataset={root.dataset.name} reads image files")  # fmt: skip


class AggregationMethod(Method):
    """Trains the aggregation weights on two views of unlabeled test images per step (:func:`stability_loss`).

    Each epoch (on_epoch_start) draws a permutation of the test set from ``ep.gen`` and splits one pass over it into
    the epoch's steps; the step ignores the labeled batch of the stage's stream."""

    def __init__(self, cfg: SadeTTAConfig, ctx: StageContext, head: AggregatedHead, scale: float) -> None:
        super().__init__()
        if ctx.data.test_x is None:
            raise LtbenchError(f"classifier=sade_tta needs the test images as tensors; {ctx.data.name} has none")
        self.cfg, self.scale = cfg, scale
        self._head = (head,)  # a reference, not a submodule: the head's weights are the trained net's
        self.mean, self.std, self.info = ctx.data.mean, ctx.data.std, ctx.info
        self.test_x = ctx.data.test_x  # uint8, moved to the device at the first step (not state: no buffer)
        self.chunks: list[torch.Tensor] = []
        self.calls = 0

    @property
    def head(self) -> AggregatedHead:
        return self._head[0]

    def on_epoch_start(self, ep: Epoch) -> None:
        world = self.info.world_size
        steps = max(1, -(-ep.size // (self.cfg.schedule.batch_size // world)))
        n = len(self.test_x)
        per_step = -(-n // steps)  # one pass over the test set in the epoch's steps
        per_step = -(-per_step // world) * world  # a multiple of the processes: each rank gets as many
        need = steps * per_step
        perm = torch.cat([torch.randperm(n, generator=ep.gen) for _ in range(-(-need // n))])[:need]
        self.chunks = [c[self.info.rank :: world] if world > 1 else c for c in perm.view(steps, per_step)]
        self.calls = 0

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = batch.x.device
        if self.test_x.device != device:
            self.test_x = self.test_x.to(device)
        idx = self.chunks[min(self.calls, len(self.chunks) - 1)].to(device)
        self.calls += 1
        x = self.test_x[idx]
        views = torch.cat([tta_view(x, ep.gen, self.mean, self.std), tta_view(x, ep.gen, self.mean, self.std)])
        with autocast(device, ep.amp):
            z = net(views)
        z = self.scale * z.float()
        p = z.softmax(1)
        similarity = F.cosine_similarity(p[: len(x)], p[len(x) :], dim=1, eps=1e-6).mean()
        return -similarity, {"mean_stability": similarity.detach().double() * len(batch)}

    def on_epoch_end(self, ep: Epoch) -> None:
        h = self.head
        if int(h.stopped_at) == 0 and should_stop(h.weight, self.cfg.stop_below):
            with torch.no_grad():
                h.kept.copy_(h.weight)
                h.stopped_at.fill_(ep.index + 1)

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        shares = self.head.aggregation().cpu().tolist()
        return {
            **{f"expert{j}_share": round(v, 6) for j, v in enumerate(shares)},
            "stopped": bool(self.head.stopped_at),
        }


class SadeTTA(ClassifierMethod):
    """classifier=sade_tta: an :class:`AggregatedHead` on the frozen stage-1 experts, trained on unlabeled test images
    (ClassifierStage's ``head`` / ``method`` / ``chosen`` interface); the record marks the numbers test-time adapted."""

    def head(self, model: nn.Module, head_name: str, num_classes: int) -> AggregatedHead:
        if not isinstance(model.head, ExpertHead):
            raise LtbenchError("classifier=sade_tta needs the experts' head of a multi-expert model")
        return AggregatedHead(copy.deepcopy(model.head))

    def method(self, ctx: StageContext, net: FrozenBackbone) -> AggregationMethod:
        cfg: SadeTTAConfig = self.cfg
        scale = cfg.logit_scale or expert_scale(ctx.cfg, getattr(ctx.cfg.method, "cosine_scale", 30.0))
        self.scale = float(scale)
        return AggregationMethod(cfg, ctx, net.head, self.scale)  # type: ignore[arg-type]

    def chosen(self, head: nn.Module) -> dict[str, Any]:
        assert isinstance(head, AggregatedHead)
        stopped = int(head.stopped_at)
        shares = head.aggregation().cpu().tolist()
        return {"test_time_adapted": True, "adapted_on": "test images, unlabeled (two views each)",
                "expert_shares": [round(v, 6) for v in shares], "stopped_after_epoch": stopped or None,
                "logit_scale": getattr(self, "scale", None)}  # fmt: skip


CLASSIFIERS.register("sade_tta", SadeTTAConfig)(SadeTTA)
