"""Classifier-stage methods with their own loss and training rules: MiSLAS, weight balancing, OLTR.

Each is a ``classifier=<name>`` option of the classifier stage (:class:`ltbench.stages.ClassifierStage`): it gives the
stage a head, the backbone's mode (:class:`~ltbench.classifier.FrozenBackbone`: frozen, BatchNorm re-estimated, or
fine-tuned) and the :class:`~ltbench.methods.Method` the stage trains with.

- ``mislas`` (Zhong et al., CVPR 2021, "Improving Calibration for Long-Tailed Recognition"): the stage-1 classifier
  is fine-tuned (not re-initialised) times a learned per-class scale (LWS), with label-aware smoothing, class-balanced
  sampling and optional shift learning on BatchNorm. Reference: dvlab-research/MiSLAS ``train_stage2.py``,
  ``methods.py``.
- ``wb`` (Alshammari et al., CVPR 2022, "Long-Tailed Recognition via Weight Balancing"): the classifier retrained with
  the class-balanced loss, a large weight decay and MaxNorm by projected gradient descent. Reference:
  ShadeAlsha/LTR-weight-balancing ``demo2_second-stage-training.py``, ``utils/class_balanced_loss.py``,
  ``utils/regularizers.py``, ``utils/trainval.py``.
- ``oltr`` (Liu et al., CVPR 2019, "Large-Scale Long-Tailed Recognition in an Open World"): head-to-tail transfer by
  a dynamic meta-embedding over a memory of class centroids, with the discriminative centroid loss. Reference:
  zhmiao/OpenLongTailRecognition-OLTR ``models/MetaEmbeddingClassifier.py``, ``models/CosNormClassifier.py``,
  ``loss/DiscCentroidsLoss.py``, ``run_networks.py``, ``config/ImageNet_LT/stage_2_meta_embedding.py``.

Learning-rate factors. The references train some parameters at a fraction of the stage's lr (MiSLAS: the classifier
at ``lr_factor`` x lr next to the LWS scales at lr; OLTR: the backbone and the centroids at 0.01 next to the
classifier at 0.1), each in its own optimiser group with its own weight decay. The training method declares these
groups (:meth:`ltbench.methods.Method.param_groups`: a group with its own ``lr_scale`` and ``weight_decay`` takes
its parameters out of the model's groups), so every optimiser trains them as the reference's separate group does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.classifier import CLASSIFIERS, ClassifierMethod, FrozenBackbone, RetrainConfig, ScaledHead
from ltbench.config import ScheduleConfig
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.losses import LTLoss
from ltbench.methods import Method
from ltbench.methods.supervised import Supervised
from ltbench.optim import ParamGroup
from ltbench.tasks import Task

if TYPE_CHECKING:
    from ltbench.contracts import StageContext

LAS_SHAPES = ("concave", "linear", "convex", "exp")


# ------------------------------------------------------------------------------------------------ configs


def _mislas_schedule() -> ScheduleConfig:
    # MiSLAS config/cifar*/..._stage2_mislas.yaml: 10 epochs, batch 128, SGD lr 0.1 momentum 0.9, wd 2e-4; the lr
    # follows 0.5 lr (1 + cos(pi epoch / 10)) per epoch (train_stage2.py adjust_learning_rate), no warm-up
    return ScheduleConfig(epochs=10, batch_size=128, lr=0.1, weight_decay=2e-4, warmup=0.0, decay="cosine",
                          milestones=[])  # fmt: skip


def _wb_schedule() -> ScheduleConfig:
    # weight balancing demo2: 10 epochs, batch 64, SGD lr 0.01 momentum 0.9, weight decay 0.1, cosine to 0
    return ScheduleConfig(epochs=10, batch_size=64, lr=0.01, weight_decay=0.1, warmup=0.0, decay="cosine",
                          milestones=[])  # fmt: skip


def _oltr_schedule() -> ScheduleConfig:
    # OLTR stage_2_meta_embedding.py: 60 epochs, batch 128, classifier lr 0.1 (momentum 0.9, wd 5e-4), x0.1 every
    # 20 epochs (StepLR(20, 0.1)): milestones 1/3 and 2/3 of the epochs
    return ScheduleConfig(epochs=60, batch_size=128, lr=0.1, weight_decay=5e-4, warmup=0.0, decay="step",
                          milestones=[1 / 3, 2 / 3], gamma=0.1)  # fmt: skip


def _check_factors(root: Any, name: str, factors: dict[str, float]) -> None:
    for key, value in factors.items():
        if not value > 0:
            raise ConfigError(f"classifier.{key} must be > 0, got {value}")


def _check_linear_head(root: Any, name: str, why: str) -> None:
    if root.model.head != "linear":
        raise ConfigError(f"classifier={name} needs a linear stage-1 head (model.head=linear): {why}")


@dataclass
class MiSLASConfig(RetrainConfig):
    """MiSLAS stage 2. Defaults: the reference's CIFAR-10-LT ratio-100 config (cifar10_imb001_stage2_mislas.yaml)."""

    name: str = "mislas"
    schedule: ScheduleConfig = field(default_factory=_mislas_schedule)
    sampler: str = "class_balanced"  # the reference's ClassAwareSampler (see MiSLAS below)
    eps_head: float = 0.3  # smoothing of the largest class (smooth_head)
    eps_tail: float = 0.0  # smoothing of the smallest class (smooth_tail)
    shape: str = "concave"  # concave | linear | convex | exp: how smoothing goes from tail to head
    power: float | None = None  # the exponent of shape=exp
    shift_bn: bool = False  # re-estimate the backbone's BatchNorm statistics on the class-balanced stream
    lr_factor: float = 0.5  # the classifier's lr / the stage's lr (the LWS scales train at the stage's lr)

    def check(self, root: Any) -> None:
        super().check(root)
        for key in ("eps_head", "eps_tail"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"classifier.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.shape not in LAS_SHAPES:
            raise ConfigError(f"classifier.shape must be one of {', '.join(LAS_SHAPES)}, got {self.shape!r}")
        if self.shape == "exp" and (self.power is None or self.power <= 0):
            raise ConfigError("classifier.shape=exp needs classifier.power > 0")
        _check_factors(root, self.name, {"lr_factor": self.lr_factor})


@dataclass
class WBConfig(RetrainConfig):
    """Weight balancing stage 2 (the reference's CIFAR-100-LT ratio-100 demo)."""

    name: str = "wb"
    schedule: ScheduleConfig = field(default_factory=_wb_schedule)
    sampler: str = "instance"  # the reference's shuffled loader: the loss does the balancing
    beta: float = 0.9999  # effective-number class weights of the class-balanced loss
    thresh: float = 0.1  # MaxNorm radius: min norm + thresh * (max norm - min norm) of the stage-1 class weights
    shift_bn: bool = False  # the paper freezes the backbone; true: BN statistics follow the stream (the code's train())

    def check(self, root: Any) -> None:
        super().check(root)
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"classifier.beta must be in [0, 1), got {self.beta}")
        if self.thresh < 0:
            raise ConfigError(f"classifier.thresh must be >= 0, got {self.thresh}")
        _check_linear_head(root, self.name, "MaxNorm bounds the norms of the class weight vectors")


@dataclass
class OLTRConfig(RetrainConfig):
    """OLTR stage 2 (the reference's ImageNet-LT stage-2 config; OLTR published no CIFAR config)."""

    name: str = "oltr"
    schedule: ScheduleConfig = field(default_factory=_oltr_schedule)
    sampler: str = "class_balanced"  # the reference's ClassAwareSampler
    finetune_backbone: bool = True  # the reference fine-tunes the features (see OLTR below for why we follow it)
    backbone_lr_factor: float = 0.1  # features at 0.01 while the classifier trains at 0.1
    centroid_lr_factor: float = 0.1  # the centroids' own SGD at 0.01
    reach_scale: float = 10.0  # reachability = reach_scale / distance to the nearest centroid
    cos_scale: float = 16.0  # CosNorm classifier scale
    dc_weight: float = 0.01  # weight of the discriminative centroid loss in the total loss
    repel_weight: float = 0.01  # weight of its repelling term
    margin: float = 10.0  # margin of the repelling term (mean squared distance to the other classes' centroids)

    def check(self, root: Any) -> None:
        super().check(root)
        factors = {"centroid_lr_factor": self.centroid_lr_factor}
        if self.finetune_backbone:
            factors["backbone_lr_factor"] = self.backbone_lr_factor
        _check_factors(root, self.name, factors)
        for key in ("reach_scale", "cos_scale"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"classifier.{key} must be > 0, got {getattr(self, key)}")
        for key in ("dc_weight", "repel_weight", "margin"):
            if getattr(self, key) < 0:
                raise ConfigError(f"classifier.{key} must be >= 0, got {getattr(self, key)}")
        _check_linear_head(root, self.name, "its hallucinator starts from the stage-1 linear classifier")


# ------------------------------------------------------------------------------------------------ lr factors


def lr_factor_group(name: str, params: Iterable[nn.Parameter], factor: float, weight_decay: float) -> ParamGroup:
    """``params`` trained at ``factor`` x the stage's lr with weight decay ``weight_decay`` (the reference's
    separate optimiser group)."""
    return ParamGroup(name, [p for p in params if p.requires_grad], lr_scale=factor, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------------ MiSLAS


def las_epsilons(
    counts: Iterable[int], eps_head: float, eps_tail: float, shape: str = "concave", power: float | None = None
) -> torch.Tensor:
    """The smoothing factor eps_y of each class (MiSLAS ``methods.py::LabelAwareSmoothing``), float32.

    With n_1 the largest and n_K the smallest count and t_y = (n_y - n_K) / (n_1 - n_K) in [0, 1]:

    - concave (default): eps_y = eps_K + (eps_1 - eps_K) sin(pi t_y / 2)
    - linear:            eps_y = eps_K + (eps_1 - eps_K) t_y
    - convex:            eps_y = eps_1 + (eps_1 - eps_K) sin(3 pi / 2 + pi t_y / 2)
    - exp:               eps_y = eps_K + (eps_1 - eps_K) t_y^power

    (eps_1 = ``eps_head``, eps_K = ``eps_tail``.) Every shape gives eps_K to the smallest class and eps_1 to the
    largest. Computed in float64 like the reference's numpy, then cast. A balanced set (n_1 = n_K) has t_y = 1: every
    class gets eps_head (the reference divides by zero there).
    """
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    span = n.max() - n.min()
    t = (n - n.min()) / span if span > 0 else torch.ones_like(n)
    head, tail = eps_head, eps_tail
    if shape == "concave":
        eps = tail + (head - tail) * torch.sin(math.pi * t / 2)
    elif shape == "linear":
        eps = tail + (head - tail) * t
    elif shape == "convex":
        eps = head + (head - tail) * torch.sin(1.5 * math.pi + math.pi * t / 2)
    elif shape == "exp" and power is not None:
        eps = tail + (head - tail) * t.pow(power)
    else:
        raise ValueError(f"unknown label-aware smoothing shape {shape!r} (exp needs a power)")
    return eps.float()


class LabelAwareSmoothing(LTLoss):
    """Label-aware smoothing (Zhong et al. 2021): ``(1 - eps_y) * (-log p_y) + eps_y * mean_k(-log p_k)`` per
    sample, averaged over the batch; eps_y from :func:`las_epsilons` (head classes smooth the most)."""

    def __init__(self, counts, eps_head: float, eps_tail: float, shape: str = "concave", power: float | None = None):
        super().__init__(counts)
        self.register_buffer("eps", las_epsilons(self.counts.tolist(), eps_head, eps_tail, shape, power))

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=1)
        eps = self.eps[target]
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        return (1 - eps) * nll + eps * (-logp.mean(dim=1))


# ------------------------------------------------------------------------------------------------ weight balancing


def effective_number_weights(counts: Iterable[int], beta: float) -> torch.Tensor:
    """w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes (Cui et al. 2019), float32.
    Counts are taken as at least 1 (an empty class would divide by zero)."""
    n = torch.as_tensor(list(counts), dtype=torch.float64).clamp(min=1)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(w)).float()


class CBSoftmaxBCE(LTLoss):
    """The class-balanced loss of weight balancing's stage 2: ``CB_loss(..., loss_type="softmax", beta=0.9999)`` of
    ShadeAlsha/LTR-weight-balancing ``utils/class_balanced_loss.py``.

    Despite its name the "softmax" variant is a *binary* cross-entropy between the softmax probabilities and the
    one-hot target, each row weighted by its class's effective-number weight, averaged over all B x C entries::

        p = softmax(z),  t = onehot(y),  w = effective_number_weights(counts, beta)   (sum C)
        L = 1/(B C) sum_i sum_k  w_{y_i} * -[ t_ik log p_ik + (1 - t_ik) log(1 - p_ik) ]

    (``F.binary_cross_entropy(p, t, weight=w[y] per row)``, whose logs are clamped at -100 as in the reference;
    gamma is unused by this variant.) Per sample: ``w_{y_i} * mean_k BCE_ik``; the batch mean is the reference's.
    """

    def __init__(self, counts, beta: float = 0.9999) -> None:
        super().__init__(counts)
        self.register_buffer("class_weights", effective_number_weights(self.counts.tolist(), beta))

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = logits.float().softmax(dim=1)
        t = F.one_hot(target, p.shape[1]).to(p.dtype)
        bce = F.binary_cross_entropy(p, t, reduction="none")
        return self.class_weights[target] * bce.mean(dim=1)


class MaxNorm(nn.Module):
    """MaxNorm by projected gradient descent (``utils/regularizers.py::MaxNorm_via_PGD``, thresh 0.1, L2).

    The radius is set once, from the stage-1 classifier before stage 2: ``delta = min_c ||w_c|| + thresh *
    (max_c ||w_c|| - min_c ||w_c||)`` over the rows w_c of the weight matrix (the bias is not constrained: its
    threshold is infinite there). :meth:`project` rescales every row with ``||w_c|| > delta`` to norm delta
    (``w_c <- delta w_c / ||w_c||``) and leaves the others untouched. ``delta`` is a buffer, so a resumed stage keeps
    the radius of the stage-1 classifier.
    """

    def __init__(self, weight: torch.Tensor, thresh: float) -> None:
        super().__init__()
        norms = weight.detach().float().flatten(1).norm(dim=1)
        self.register_buffer("delta", norms.min() + thresh * (norms.max() - norms.min()))

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> None:
        norms = weight.flatten(1).norm(dim=1).view(-1, *[1] * (weight.dim() - 1))
        delta = self.delta.to(weight.dtype)
        weight.copy_(torch.where(norms > delta, weight * (delta / norms), weight))


# ------------------------------------------------------------------------------------------------ OLTR


class CosNorm(nn.Module):
    """OLTR's cosine classifier (``models/CosNormClassifier.py``): ``x_hat = ||x|| / (1 + ||x||) * x / ||x||``,
    ``logits = scale * x_hat . w_k / ||w_k||``; weights uniform in +-1/sqrt(d) (the reference's init)."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.scale = scale
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=1, keepdim=True)
        squashed = norm / (1 + norm) * (x / norm.clamp(min=1e-12))
        return self.scale * squashed @ F.normalize(self.weight, dim=1).T


class MetaEmbeddingHead(nn.Module):
    """OLTR's dynamic meta-embedding classifier (``models/MetaEmbeddingClassifier.py``) on direct features v::

        memory M = centroids c_k (C x d; no gradient through the memory here)
        r        = reach_scale / min_k ||v - c_k||            (reachability: 10 / gamma)
        o        = softmax(hallucinator(v)),  v_memory = o M  (hallucinator: Linear(d, C), the stage-1 classifier)
        e        = tanh(selector(v))                          (concept selector: Linear(d, d))
        v_meta   = r * (v + e * v_memory)
        logits   = CosNorm(v_meta)                            (scale 16)

    The centroids are this module's parameter (so the final network carries its memory), set to the class means of
    the stage-1 training features when the stage starts and then moved by the discriminative centroid loss only.
    """

    def __init__(self, hallucinator: nn.Module, feature_dim: int, num_classes: int, reach_scale: float = 10.0,
                 cos_scale: float = 16.0) -> None:  # fmt: skip
        super().__init__()
        self.hallucinator = hallucinator
        self.selector = nn.Linear(feature_dim, feature_dim)
        self.cosnorm = CosNorm(feature_dim, num_classes, cos_scale)
        self.centroids = nn.Parameter(torch.zeros(num_classes, feature_dim))
        self.reach_scale = reach_scale

    def meta_embedding(self, v: torch.Tensor) -> torch.Tensor:
        memory = self.centroids.detach().to(v.dtype)
        dist = torch.cdist(v, memory, compute_mode="donot_use_mm_for_euclid_dist")  # exact distances
        reach = self.reach_scale / dist.min(dim=1, keepdim=True).values.clamp(min=1e-12)  # v on a centroid: 1e-12
        v_memory = self.hallucinator(v).softmax(dim=1) @ memory
        return reach * (v + torch.tanh(self.selector(v)) * v_memory)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.cosnorm(self.meta_embedding(v))


class _Attract(torch.autograd.Function):
    """The attracting term of the discriminative centroid loss with the reference's own gradients
    (``loss/DiscCentroidsLoss.py::DiscCentroidsLossFunc``): value ``sum_i ||f_i - c_{y_i}||^2 / (2B)``; gradient
    ``(f_i - c_{y_i}) / B`` (times the upstream gradient) for the features, and the centre-loss update
    ``sum_{i: y_i = k} (c_k - f_i) / (1 + n_k) / B`` for centroid k (n_k: its samples in the batch), which the
    reference does *not* multiply by the upstream gradient: the centroids move at their own rate whatever the loss's
    weight in the total (as in Wen et al. 2016's centre loss)."""

    @staticmethod
    def forward(ctx: Any, f: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(f, y, c)
        return (f - c[y]).pow(2).sum() / (2 * len(y))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor]:
        f, y, c = ctx.saved_tensors
        diff = c[y] - f
        grad_f = -grad * diff / len(y) if ctx.needs_input_grad[0] else None
        counts = 1 + torch.bincount(y, minlength=len(c)).to(c.dtype)
        grad_c = torch.zeros_like(c).index_add_(0, y, diff) / counts[:, None] / len(y)
        return grad_f, None, grad_c


def disc_centroid_loss(
    f: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor, margin: float = 10.0, repel_weight: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLTR's discriminative centroid loss (``loss/DiscCentroidsLoss.py``): (total, attract, repel) with::

        attract = sum_i ||f_i - c_{y_i}||^2 / (2B)                       (gradients: :class:`_Attract`)
        repel   = clamp(margin - 1/(B C) sum_i sum_{k != y_i} ||f_i - c_k||^2, 0, 1e6)
        total   = attract + repel_weight * repel

    (the repelling sum runs over the B x C distance matrix with each sample's own class zeroed, divided by B C.)
    """
    b, num_classes = len(y), len(centroids)
    attract = _Attract.apply(f, y, centroids)
    sq = (f * f).sum(1, keepdim=True) + (centroids * centroids).sum(1)[None, :] - 2 * f @ centroids.T
    sq = sq.masked_fill(F.one_hot(y, num_classes).bool(), 0.0)
    repel = (margin - sq.sum() / (b * num_classes)).clamp(0.0, 1e6)
    return attract + repel_weight * repel, attract, repel


def feature_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x D means of the (unnormalised) features of each class; zero for a class without samples
    (OLTR ``run_networks.py::centroids_cal``)."""
    labels = labels.to(features.device)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


class OLTRNet(nn.Module):
    """What the OLTR stage optimises: one forward gives the logits and the discriminative centroid loss of the direct
    features, so under DistributedDataParallel every trained parameter (the centroids too) is reached from its
    outputs. The centroid loss runs in float32 outside autocast (its squared distances cancel badly in bf16)."""

    def __init__(self, net: FrozenBackbone, margin: float, repel_weight: float) -> None:
        super().__init__()
        self.net, self.margin, self.repel_weight = net, margin, repel_weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.head_input(x)
        logits = self.net.head(f)
        with torch.autocast(f.device.type, enabled=False):
            dc, _, _ = disc_centroid_loss(f.float(), y, self.net.head.centroids, self.margin, self.repel_weight)
        return logits, dc


# ------------------------------------------------------------------------------------------------ the methods


class ClassifierTraining(Supervised):
    """Supervised training of the classifier stage, with parameter groups at a factor of the lr
    (:func:`lr_factor_group`) and an optional MaxNorm projection of the classifier weight after each epoch's training
    pass (weight balancing's ``train_model`` calls ``pgdFunc.PGD(model)`` once per epoch, after the training phase)."""

    def __init__(self, loss_fn: LTLoss, task: Task, factors: list[ParamGroup] | None = None,
                 maxnorm: MaxNorm | None = None, weight: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__(loss_fn, task)
        self.factors = list(factors or [])
        self.maxnorm = maxnorm
        self._weight = [weight] if weight is not None else []  # a list: the stage's module owns the parameter

    def on_epoch_end(self, ep: Epoch) -> None:
        if self.maxnorm is not None:
            self.maxnorm.project(self._weight[0])

    def param_groups(self) -> list[ParamGroup]:
        return [*self.factors, *super().param_groups()]


class OLTRTraining(Method):
    """OLTR stage 2: ``CE(logits, y) + dc_weight * disc_centroid_loss`` (``stage_2_meta_embedding.py``: performance
    loss weight 1, feature loss weight 0.01), through :class:`OLTRNet`."""

    def __init__(self, task: Task, cfg: OLTRConfig, factors: list[ParamGroup]) -> None:
        super().__init__()
        self.task, self.cfg, self.factors = task, cfg, factors

    def wrap(self, net: nn.Module) -> nn.Module:
        assert isinstance(net, FrozenBackbone)
        return OLTRNet(net, self.cfg.margin, self.cfg.repel_weight)

    def step(self, model: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(batch.x.device, ep.amp):
            logits, dc = model(batch.x, batch.y)
        ce = F.cross_entropy(logits.float(), batch.y)
        n = len(batch)
        sums = {"mean_ce": ce.detach().double() * n, "mean_dc_loss": dc.detach().double() * n}
        return ce + self.cfg.dc_weight * dc, {**self.task.step_sums(logits, batch.y), **sums}

    def param_groups(self) -> list[ParamGroup]:
        return list(self.factors)


# ------------------------------------------------------------------------------------------------ the options


class MiSLAS(ClassifierMethod):
    """MiSLAS stage 2 (Zhong et al. 2021): the stage-1 classifier x LWS scales, label-aware smoothing.

    As the reference's ``train_stage2.py``: the classifier is loaded from stage 1 and fine-tuned at ``lr_factor`` x
    the lr, ``logits = s * classifier(f)`` with a per-class scale s (LearnableWeightScaling, init 1) at the lr, both in
    one SGD (weight decay on both, 2e-4), cosine over 10 epochs; the backbone is frozen, and with ``shift_bn`` its
    BatchNorm statistics are re-estimated on the class-balanced stream (its parameters stay frozen). Sampling:
    ltbench's ``class_balanced`` sampler (a class uniformly, then one of its images, i.i.d.) stands for the
    reference's ClassAwareSampler (classes cycled, 4 images per class visit): both give each class the same expected
    share of a stage-2 epoch of N_train images (the reference stops its loader after ceil(N_train / batch) steps).
    """

    @property
    def backbone_mode(self) -> str:
        return "shift_bn" if self.cfg.shift_bn else "frozen"

    def head(self, model: nn.Module, head_name: str, num_classes: int) -> nn.Module:
        return ScaledHead(copy.deepcopy(model.head), num_classes, frozen=False)

    def method(self, ctx: StageContext, net: FrozenBackbone) -> Method:
        c = self.cfg
        loss = LabelAwareSmoothing(ctx.stats, c.eps_head, c.eps_tail, c.shape, c.power)
        factors = [] if c.lr_factor == 1 else [lr_factor_group("classifier", net.head.head.parameters(),
                                                               c.lr_factor, c.schedule.weight_decay)]  # fmt: skip
        return ClassifierTraining(loss, ctx.task, factors)

    def chosen(self, head: nn.Module) -> dict[str, Any]:
        assert isinstance(head, ScaledHead)
        return {"scales": [round(float(v), 4) for v in head.scales.detach().cpu()]}


class WeightBalancing(ClassifierMethod):
    """Weight balancing stage 2 (Alshammari et al. 2022): the stage-1 classifier (weight and bias) retrained with
    :class:`CBSoftmaxBCE`, weight decay 0.1 and :class:`MaxNorm` (radius from the stage-1 weights, projection after
    every epoch), instance sampling, SGD lr 0.01 cosine over 10 epochs, batch 64.

    BatchNorm: the paper learns the classifier on the features of the first stage, so by default the backbone is
    frozen with its stage-1 statistics, as in every other classifier stage here. The reference code freezes the
    backbone's parameters but calls ``model.train()``, so its BN running statistics drift on the stage-2 stream:
    ``shift_bn: true`` reproduces that.
    """

    @property
    def backbone_mode(self) -> str:
        return "shift_bn" if self.cfg.shift_bn else "frozen"

    def head(self, model: nn.Module, head_name: str, num_classes: int) -> nn.Module:
        head = copy.deepcopy(model.head)
        for p in head.parameters():
            p.requires_grad_(True)
        return head

    def method(self, ctx: StageContext, net: FrozenBackbone) -> Method:
        self.maxnorm = MaxNorm(net.head.weight, self.cfg.thresh)
        loss = CBSoftmaxBCE(ctx.stats, self.cfg.beta)
        return ClassifierTraining(loss, ctx.task, maxnorm=self.maxnorm, weight=net.head.weight)

    def chosen(self, head: nn.Module) -> dict[str, Any]:
        norms = head.weight.detach().float().flatten(1).norm(dim=1).cpu()
        return {
            "maxnorm_delta": round(float(self.maxnorm.delta), 6),
            "class_norms": [round(float(v), 4) for v in norms],
        }


class OLTR(ClassifierMethod):
    """OLTR stage 2 (Liu et al. 2019): the dynamic meta-embedding head (:class:`MetaEmbeddingHead`) trained with
    cross-entropy + 0.01 x the discriminative centroid loss, class-balanced sampling, 60 epochs (x0.1 every 20).

    Why OLTR for head-to-tail transfer (and not Yin et al. 2019's feature transfer learning): OLTR has official code
    that fixes every constant that matters (r = 10 / gamma, the tanh selector, the softmax hallucinator from the
    stage-1 classifier, CosNorm scale 16, centroid-loss margin 10 and weights 0.01 / 0.01, class-aware sampling, two
    stages), so the port to a CIFAR backbone is mechanical. FTL has no public code; its transfer needs an encoder /
    decoder split, a PCA of the regular classes' intra-class variance and an alternating schedule tuned for 320-d
    face embeddings over thousands of identities; with 10 classes and 64-d features the regular / under-represented
    split and that PCA are ill-defined, so it would be a guess. Neither published CIFAR-LT numbers.

    The backbone is fine-tuned by default (``finetune_backbone``), at 0.1 x the lr as the reference's features
    (0.01 vs 0.1), BatchNorm in train mode: the discriminative centroid loss is a loss on the direct features (it
    pulls each toward its class centroid and pushes it from the others); on a frozen backbone it would only move the
    memory, and half of the method would be gone. ``finetune_backbone: false`` gives the decoupled variant (frozen
    features, the memory still learnt). Dropped from the reference: the modulated attention on the feature map and
    the extra ``fc_add`` layer its ResNet-10 adds in stage 2 (the memory lives on the backbone's pooled features),
    and the open-set threshold (ltbench evaluates closed-set). Sampling: ltbench's ``class_balanced`` sampler for
    the reference's ClassAwareSampler (4 images per class visit), N_train images per epoch as the reference's
    ``epoch_steps``. The centroids start at the class means of the stage-1
    features of the un-augmented training images (eval mode), as ``centroids_cal``; they train at 0.1 x the lr
    (their own SGD at 0.01), with the reference's centre-loss update.
    """

    @property
    def backbone_mode(self) -> str:
        return "finetune" if self.cfg.finetune_backbone else "frozen"

    def head(self, model: nn.Module, head_name: str, num_classes: int) -> nn.Module:
        hallucinator = copy.deepcopy(model.head)
        for p in hallucinator.parameters():
            p.requires_grad_(True)
        return MetaEmbeddingHead(hallucinator, model.feature_dim, num_classes, self.cfg.reach_scale,
                                 self.cfg.cos_scale)  # fmt: skip

    def method(self, ctx: StageContext, net: FrozenBackbone) -> Method:
        c = self.cfg
        feats = ctx.predict(net.backbone, "train", features=True)  # the stage-1 features (a resumed stage reloads)
        centroids = feature_means(feats, ctx.data.train_y, ctx.data.num_classes)
        with torch.no_grad():
            net.head.centroids.copy_(centroids.to(net.head.centroids.device))
        wd = c.schedule.weight_decay
        factors = []
        if c.centroid_lr_factor != 1:
            factors.append(lr_factor_group("centroids", [net.head.centroids], c.centroid_lr_factor, wd))
        if c.finetune_backbone and c.backbone_lr_factor != 1:
            factors.append(lr_factor_group("backbone", net.backbone.parameters(), c.backbone_lr_factor, wd))
        return OLTRTraining(ctx.task, c, factors)


CLASSIFIERS.register("mislas", MiSLASConfig)(MiSLAS)
CLASSIFIERS.register("wb", WBConfig)(WeightBalancing)
CLASSIFIERS.register("oltr", OLTRConfig)(OLTR)
