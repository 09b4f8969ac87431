"""Supervised contrastive learning next to the classifier: BCL, SupCon and KCL (``method=bcl|supcon|kcl``).

Every training image gets three views, made on the device from the raw uint8 batch (``inputs = "raw"``): view 0 for the
classifier, views 1 and 2 for the contrastive loss; the 3B images go through the backbone in one batch (so BatchNorm
sees all of them, as in the references). The loss of a step is

    alpha * L_run(logits of view 0, y) + beta * L_contrastive(z of views 1 and 2, y [, class prototypes])

where ``L_run`` is the run's own loss through the stage's supervised method (its re-weighting included): the BCL
preset sets ``loss=logit_adjust`` (tau 1), which is BCL's "logit compensation" (``loss/logitadjust.py::LogitAdjust``
of FlamieZhu/Balanced-Contrastive-Learning). The classifier is the run's ``model.head`` and the network evaluated
after the stage is the run's model; the projection head and the prototype head belong to the method (checkpointed
with it, trained by the stage's optimiser with the model's settings, dropped after the stage).

- ``bcl`` (Zhu et al., CVPR 2022, "Balanced Contrastive Learning for Long-Tailed Visual Recognition"; BalSCL of
  ``loss/contrastive.py``): the contrast set is the 2B projections plus C class prototypes
  ``c_k = normalize(head_fc(w_k))`` made from the classifier's weight vectors (class-complement), and the
  denominator averages within each class (class-averaging):
  ``D_i = sum_k 1/|A_k minus i| sum_{a in A_k, a != i} exp(z_i.a / tau)``;
  ``L_i = -1/|P(i)| sum_{p in P(i)} (z_i.p / tau - log D_i)``, P(i) = every other item of the anchor's class
  (the prototype included), averaged over the 2B anchors. ``class_averaging`` / ``class_complement`` switch the two
  parts off (the paper's ablations).
- ``supcon`` (Khosla et al. 2020, the L_out form of HobbitLong/SupContrast ``losses.py::SupConLoss``): the 2B
  projections only, ``D_i = sum_{a != i} exp(z_i.a / tau)``, P(i) = the other views of the anchor's class.
- ``kcl`` (Kang et al., ICLR 2021, "Exploring Balanced Feature Spaces for Representation Learning"; the batch form
  of LTH14/targeted-supcon ``tsc_cifar_loss.py::SupConLoss`` with ``k > 0``): SupCon's denominator, but P(i) = the
  anchor's other view plus min(k, available) views drawn uniformly without replacement (from ``ep.gen``) among the
  other views of its class, so every class pulls with the same number of positives.

Views (the CIFAR ports of BCL: YuMJie/ConCutMix ``main.py`` ``cl_views=uncutout-sim``, sumyeongahn/CUDA_LTR
``cifar/aug/transforms.py``): view 0 is the run's own training augmentation (``augment``: the BCL preset sets crop +
flip + torchvision's CIFAR-10 AutoAugment, ConCutMix's ``CIFAR10Policy`` view without Cutout; image-file datasets:
the feed's RandomResizedCrop + flip + colour jitter, batched); views 1 and 2 are SimAugment:
:func:`ltbench.data.views.simsiam_view` (RandomResizedCrop 0.2-1, flip, colour jitter 0.4/0.4/0.4/0.1 p 0.8,
grayscale p 0.2) then a Gaussian blur (sigma ~ U[0.1, 2], with probability ``blur``: 0.5 in both ports).

Heads (CIFAR ports: 64 -> 512 -> BN -> ReLU -> 128; official ``models/resnext.py::BCLModel``): ``projector`` =
Linear(D, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, feat_dim) on the backbone features, L2-normalised; the
prototype head ``head_fc`` has the same shape and reads the raw classifier weight vectors, so the contrastive loss
also trains the classifier. Classifier: ``model.head=linear`` (the default; both CIFAR ports' scripts run a plain
``nn.Linear``) uses its weight rows; ``model.head=cosine`` is the official ``NormedLinear`` (weight D x C, columns),
whose cosine logits the method multiplies by ``cosine_scale`` (30, the official ``s``) before the run's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltbench.config import MethodConfig
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.methods import METHODS, Extension, Method
from ltbench.seeding import derive_seed

if TYPE_CHECKING:
    from ltbench.contracts import StageContext

# synth options that act on the raw images before augmentation (applied here, since the feed hands over raw images)
REPLACING_SYNTHS = ("none", "smote", "noise")
BLUR_SIGMA = (0.1, 2.0)  # MoCo v2 / SimCLR GaussianBlur([.1, 2.]) of both CIFAR ports


# --------------------------------------------------------------------------------------------------------- losses
def contrast_log_prob(
    z: Tensor, labels: Tensor, contrast: Tensor, contrast_labels: Tensor, temperature: float, average: bool
) -> tuple[Tensor, Tensor]:
    """log(exp(z_i.a_j / tau) / D_i) for every anchor i (rows: the N = len(z) anchors, which are the first N items of
    ``contrast``) and contrast item j, and the mask of same-label items other than the anchor itself.

    ``average``: BCL's class-averaged D_i, every item weighted by 1 / |A_k minus i| (A_k: the items of its class);
    else SupCon's D_i = sum over every item but the anchor. Computed with logsumexp (BCL's code subtracts the row
    maximum instead: the same numbers)."""
    n = len(z)
    logits = z @ contrast.T / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=z.device)
    same = (labels[:, None] == contrast_labels[None, :]) & ~self_mask
    terms = logits
    if average:  # |A_k| of item j's class, by comparison (no bincount: no host sync on a GPU)
        count = (contrast_labels[:, None] == contrast_labels[None, :]).sum(0).to(logits.dtype)
        terms = logits - (count[None, :] - same.to(logits.dtype)).log()
    log_d = torch.logsumexp(terms.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    return logits - log_d, same


def _mean_over_positives(log_prob: Tensor, positives: Tensor, reduction: str) -> Tensor:
    """-1/|P(i)| sum_{p in P(i)} log_prob[i, p] per anchor; averaged over the anchors unless reduction="none"."""
    pos = positives.to(log_prob.dtype)
    per_anchor = -(pos * log_prob).sum(1) / pos.sum(1)
    return per_anchor if reduction == "none" else per_anchor.mean()


def balscl_loss(
    z: Tensor,
    y: Tensor,
    centers: Tensor | None,
    temperature: float,
    class_averaging: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """BalSCL (Zhu et al. 2022, FlamieZhu/Balanced-Contrastive-Learning ``loss/contrastive.py::BalSCL.forward``).

    ``z``: the 2B L2-normalised projections (views 1 then views 2), ``y``: their labels (2B), ``centers``: the C
    normalised class prototypes (prototype k has label k; None: no class-complement). Anchors are the 2B projections
    only; positives are every other item of the anchor's class, the prototype included."""
    contrast, labels = z, y
    if centers is not None:
        contrast = torch.cat([z, centers])
        labels = torch.cat([y, torch.arange(len(centers), device=y.device)])
    log_prob, same = contrast_log_prob(z, y, contrast, labels, temperature, class_averaging)
    return _mean_over_positives(log_prob, same, reduction)


def supcon_loss(
    z: Tensor, y: Tensor, temperature: float, positives: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """SupCon's L_out (Khosla et al. 2020): ``-1/|P(i)| sum_p log(exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau))``
    averaged over the 2B anchors; ``positives`` (2B x 2B, default: every other view of the class) gives KCL's P(i).
    No ``temperature / base_temperature`` factor: the method's ``beta`` is the loss weight."""
    log_prob, same = contrast_log_prob(z, y, z, y, temperature, average=False)
    return _mean_over_positives(log_prob, same if positives is None else positives, reduction)


def kcl_positives(y: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """KCL's positive mask for the 2B projections (views 1 then views 2, labels ``y`` = the batch's labels twice):
    anchor i's other view, plus min(k, available) of the other views of its class (its own two views excluded),
    drawn uniformly without replacement: random keys from ``gen`` (CPU), the k smallest among the candidates
    (LTH14/targeted-supcon ``tsc_cifar_loss.py`` draws the same set one positive at a time)."""
    n = len(y)
    idx = torch.arange(n, device=y.device)
    other_view = torch.zeros(n, n, dtype=torch.bool, device=y.device)
    other_view[idx, (idx + n // 2) % n] = True
    candidates = (y[:, None] == y[None, :]) & ~other_view
    candidates.fill_diagonal_(False)
    keys = torch.rand(n, n, generator=gen).to(y.device).masked_fill(~candidates, 2.0)
    chosen = torch.zeros_like(candidates)
    if k > 0 and n > 0:
        chosen.scatter_(1, keys.topk(min(k, n), dim=1, largest=False).indices, True)
    return (chosen & candidates) | other_view


# ---------------------------------------------------------------------------------------------------------- views
def gaussian_blur(x: Tensor, sigma: Tensor, radius: int | None = None) -> Tensor:
    """Per-image Gaussian blur of a float N x C x H x W batch, ``sigma`` (N,) per image: a separable kernel
    exp(-t^2 / 2 sigma^2) normalised to sum 1 over t = -radius..radius (default ceil(3 max sigma)), reflect padding,
    as torchvision ``gaussian_blur(kernel_size=2 radius + 1, sigma)``. (The ports blur PIL images with
    ``ImageFilter.GaussianBlur(radius=sigma)``, which approximates the Gaussian by box filters.)"""
    n, c, h, w = x.shape
    r = int(torch.ceil(3 * sigma.max()).item()) if radius is None else radius
    if n == 0 or r == 0:
        return x
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t[None, :] / sigma.float()[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device, x.dtype).repeat_interleave(c, 0)  # (N C) x K
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def sim_augment(x: Tensor, gen: torch.Generator, size: int | None, blur: float) -> Tensor:
    """SimAugment of the BCL CIFAR ports -> float [0, 1]: ``simsiam_view`` (RandomResizedCrop 0.2-1, flip, colour
    jitter p 0.8, grayscale p 0.2), then a Gaussian blur, sigma ~ U[0.1, 2], with probability ``blur`` per image.
    The blur draws are made whatever ``blur`` is (the stream does not depend on the setting)."""
    from ltbench.data.views import simsiam_view

    v = simsiam_view(x, gen, size)
    on = torch.rand(len(v), generator=gen) < blur
    sigma = torch.empty(len(v)).uniform_(*BLUR_SIGMA, generator=gen)
    if bool(on.any()):  # one kernel size for every image (3 x the largest sigma): an image's blur is its own
        blurred = gaussian_blur(v, sigma, radius=math.ceil(3 * BLUR_SIGMA[1]))
        v = torch.where(on.to(v.device)[:, None, None, None], blurred, v)
    return v


def files_view(x: Tensor, gen: torch.Generator, size: int) -> Tensor:
    """The feed's training view of image files, batched -> float [0, 1]: RandomResizedCrop(size, scale 0.08-1),
    flip, ColorJitter(0.4, 0.4, 0.4, 0) (``ltbench.data.images.train_transform``; no antialiasing, see
    ``ltbench.data.views.resized_crop``)."""
    from ltbench.data.augment import random_flip
    from ltbench.data.views import color_jitter, resized_crop, rrc_params, to_float01

    n, _, h, w = x.shape
    top, left, height, width = rrc_params(n, h, w, gen, scale=(0.08, 1.0))
    v = random_flip(resized_crop(to_float01(x), top, left, height, width, (size, size)), gen)
    factors = 0.6 + 0.8 * torch.rand(n, 3, generator=gen)  # brightness, contrast, saturation in [0.6, 1.4]
    return color_jitter(v, factors, torch.rand(n, 3, generator=gen).argsort(dim=1))


# ---------------------------------------------------------------------------------------------------- the method
@dataclass
class ContrastiveConfig(MethodConfig):
    """Shared settings. CIFAR values of both BCL ports (ConCutMix ``run_files/cifar10_imb100.sh``, CUDA_LTR
    ``cifar/losses/bcl.py::BCLLoss``): alpha 2, beta 0.6, temperature 0.1, heads 512 -> 128."""

    alpha: float = 2.0  # weight of the run's loss on view 0 (0: no view 0, contrastive learning only)
    beta: float = 0.6  # weight of the contrastive loss
    temperature: float = 0.1
    hidden_dim: int = 512  # projection MLP: feature_dim -> hidden_dim -> BN -> ReLU -> feat_dim
    feat_dim: int = 128
    blur: float = 0.5  # probability of the Gaussian blur on views 1 and 2
    cosine_scale: float = 30.0  # logit scale of a cosine classifier (model.head=cosine): the official NormedLinear s

    def __post_init__(self) -> None:
        ok = self.alpha >= 0 and self.beta >= 0 and self.alpha + self.beta > 0 and self.temperature > 0
        if not ok or self.hidden_dim < 1 or self.feat_dim < 1 or not 0 <= self.blur <= 1 or self.cosine_scale <= 0:
            raise ConfigError(
                f"method={self.name}: alpha, beta >= 0 (not both 0), temperature > 0, hidden_dim and feat_dim >= 1, "
                "blur in [0, 1] and cosine_scale > 0 are needed"
            )

    tasks = ("classification",)  # it contrasts classes
    reads = ("images",)  # augmented views of images

    def check(self, root: Any) -> None:
        what = f"method={self.name}"
        if root.semi is not None:
            raise ConfigError(f"{what} does not combine with semi={root.semi.name}")
        if root.synth.name not in REPLACING_SYNTHS:
            raise ConfigError(f"{what} makes three views of each image; synth={root.synth.name} mixes inputs "
                              "(synth=none, smote or noise combine)")  # fmt: skip
        if root.model.head not in ("linear", "cosine"):
            raise ConfigError(f"{what} makes class prototypes from a linear or cosine head, not {root.model.head}")

    @property
    def prototypes(self) -> bool:
        """Whether the method makes class prototypes (BCL's class-complement)."""
        return False


@dataclass
class BCLConfig(ContrastiveConfig):
    name: str = "bcl"
    class_averaging: bool = True  # the class-averaged denominator
    class_complement: bool = True  # the C class prototypes in every batch

    @property
    def prototypes(self) -> bool:
        return self.class_complement


@dataclass
class SupConConfig(ContrastiveConfig):
    name: str = "supcon"


@dataclass
class KCLConfig(ContrastiveConfig):
    name: str = "kcl"
    k: int = 6  # positives drawn per anchor besides its other view (the TSC README's KCL command: --K 6)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError("method.k (positives per anchor) must be >= 1")


def mlp_head(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear (BCL's ``head`` / ``head_fc``; PyTorch's default init, as ConCutMix)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out))  # fmt: skip


def class_weights(head: nn.Module) -> Tensor:
    """The classifier's weight vectors, one row per class: a linear head's weight (C x D), a cosine head's
    weight transposed (it is stored D x C, as the official NormedLinear)."""
    from ltbench.models.heads import CosineHead

    return head.weight.T if isinstance(head, CosineHead) else head.weight  # type: ignore[return-value]


class ContrastiveNet(nn.Module):
    """The model with the method's heads: ``forward(x, n, start)`` -> (classifier logits of the first n images,
    normalised projections of the images from ``start`` on, normalised class prototypes or None).

    The projector runs on every image of the batch (BatchNorm statistics over all views, as the references, which
    project the three views and discard view 0's projections); the prototypes are ``normalize(head_fc(w_k))``."""

    def __init__(self, model: nn.Module, projector: nn.Module, prototyper: nn.Module | None) -> None:
        super().__init__()
        self.model, self.projector, self.prototyper = model, projector, prototyper

    def features(self, x: Tensor) -> Tensor:
        return self.model.features(x)

    def forward(self, x: Tensor, n: int, start: int) -> tuple[Tensor, Tensor, Tensor | None]:
        f = self.model.features(x)
        logits = self.model.head(f[:n])
        z = F.normalize(self.projector(f)[start:].float(), dim=1)
        centers = None
        if self.prototyper is not None:
            centers = F.normalize(self.prototyper(class_weights(self.model.head)).float(), dim=1)
        return logits, z, centers


class Contrastive(Extension):
    """Three views per image: the run's loss on view 0, a supervised contrastive loss on views 1 and 2 (BCL, SupCon
    or KCL), on top of the stage's supervised method. Its optimiser groups are the base's: the heads train inside the
    wrapped module, with the model's settings."""

    inputs = "raw"  # the feed hands over the uint8 images; the method makes and normalises its views

    def __init__(self, cfg: ContrastiveConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__(base, f"method={cfg.name}")
        self.cfg = cfg
        self.mean, self.std = ctx.data.mean, ctx.data.std
        self.augment = ctx.cfg.augment
        self.size: int | None = ctx.cfg.dataset.image_size if ctx.data.kind == "files" else None
        synth = getattr(base, "synth", None)
        self.train_x = ctx.feed.train_x if synth is not None and synth.replaces else None
        from ltbench.models.heads import CosineHead

        self.scale = cfg.cosine_scale if isinstance(model.head, CosineHead) else 1.0
        d, h, k = model.feature_dim, cfg.hidden_dim, cfg.feat_dim
        with torch.random.fork_rng(devices=[]):  # the heads' initialisation: a function of the seed alone
            torch.manual_seed(derive_seed(ctx.cfg.seed, f"method-{cfg.name}-heads"))
            self.projector = mlp_head(d, h, k)
            self.prototyper = mlp_head(d, h, k) if cfg.prototypes else None

    def wrap(self, model: nn.Module) -> nn.Module:
        return ContrastiveNet(model, self.projector, self.prototyper)

    def views(self, x: Tensor, gen: torch.Generator) -> list[Tensor]:
        """[view 0 (when alpha > 0), view 1, view 2], normalised, in this order of draws from ``gen``."""
        from ltbench.data.augment import augment_batch, cutout, normalize
        from ltbench.data.views import normalize01

        out = []
        if self.cfg.alpha > 0:
            if self.size is not None:  # image files: the feed's RandomResizedCrop + flip + jitter, batched
                out.append(normalize01(files_view(x, gen, self.size), self.mean, self.std))
            else:  # tensor images: exactly what the feed does with the run's augment settings
                v0 = normalize(augment_batch(x, self.augment, gen), self.mean, self.std)
                out.append(cutout(v0, self.augment.cutout, gen) if self.augment.cutout else v0)
        for _ in range(2):
            out.append(normalize01(sim_augment(x, gen, self.size, self.cfg.blur), self.mean, self.std))
        return out

    def contrastive_loss(self, z: Tensor, y: Tensor, centers: Tensor | None, gen: torch.Generator) -> Tensor:
        """The configured loss on the 2B projections (views 1 then views 2) with labels ``y`` (2B)."""
        cfg = self.cfg
        if isinstance(cfg, KCLConfig):
            return supcon_loss(z, y, cfg.temperature, kcl_positives(y, cfg.k, gen))
        if isinstance(cfg, BCLConfig):
            return balscl_loss(z, y, centers, cfg.temperature, cfg.class_averaging)
        return supcon_loss(z, y, cfg.temperature)

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[Tensor, dict[str, Tensor]]:
        x, y, n = batch.x, batch.y, len(batch)
        synth = getattr(self.base, "synth", None)
        if self.train_x is not None and getattr(self.base, "synth_on", False) and batch.index is not None:
            x, _ = synth.replace(x, y, batch.index, self.train_x, ep.gen)  # type: ignore[union-attr]
        with_ce = self.cfg.alpha > 0
        with autocast(x.device, ep.amp):
            logits, z, centers = net(torch.cat(self.views(x, ep.gen)), n, n if with_ce else 0)
        logits = logits.float() * self.scale
        l_con = self.contrastive_loss(z, y.repeat(2), centers, ep.gen)
        loss = self.cfg.beta * l_con
        if with_ce:  # the run's loss (and re-weighting) on view 0
            l_ce = self.base.loss_fn(logits, y, self.base.weight)  # type: ignore[attr-defined]
            loss = loss + self.cfg.alpha * l_ce
        else:  # no view 0: the training accuracy is that of the classifier (no classification loss) on view 1
            l_ce, logits = torch.zeros((), device=x.device), logits.detach()
        sums = self.base.task.step_sums(logits, y)  # type: ignore[attr-defined]
        return loss, {**sums, "mean_loss_ce": l_ce.detach().double() * n, "mean_loss_con": l_con.detach().double() * n}


for _name, _schema in (("bcl", BCLConfig), ("supcon", SupConConfig), ("kcl", KCLConfig)):
    METHODS.register(_name, _schema)(Contrastive)
