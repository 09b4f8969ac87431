"""GLMC (Du et al., CVPR 2023, "Global and Local Mixture Consistency Cumulative Learning for Long-tailed Visual
Recognitions"): ``method=glmc``.

The reference is ynu-yangpeng/GLMC, ``GLMC-2023/Trainer.py::Trainer.train`` (the step), ``utils/util.py``
(``GLMC_mixed``, ``rand_bbox``), ``model/ResNet_cifar.py::ResNet_modify`` (the heads) and ``main.py`` (the second,
re-weighted loader). Every step:

1. Two batches: the stage's batch (the run's sampler: instance sampling, shuffled, as the reference's
   ``train_loader``) and a re-sampled batch of the same size, drawn i.i.d. with replacement with per-sample weight
   ``n_y^-q`` (``q = resample_weighting``; the reference's ``WeightedRandomSampler``: class probability proportional
   to ``n_k^(1-q)``; q = 0 is uniform over the training images, q = 1 class-balanced). Each image of both batches
   gets two independent views of the run's training augmentation (the reference's ``TwoCropTransform``).
2. One ``lam ~ Beta(mix_alpha, mix_alpha)`` per step (``GLMC_mixed``'s own draw, ``alpha=1``: the trainer's
   ``--beta 0.5`` draw is never used), shared by both mixtures: global mixup ``lam x1 + (1 - lam) x1'`` of the first
   views, and local CutMix of the second views: the box of ``rand_bbox`` (side ``ceil(s sqrt(1 - lam))`` per axis,
   centre uniform, half-sides ``side // 2`` clipped at the border) is pasted from the re-sampled view. Both mixed
   labels are ``lam y + (1 - lam) y'`` (the CutMix label is not corrected for the clipped box, as the reference).
3. The network: backbone features -> the balance head ``fc`` (the method's), the re-balanced head (the run's
   ``model.head``: the reference's ``fc_cb``, the one evaluated), the projection ``z = projector(f)`` (D -> 128) and
   the prediction ``p = predictor(z)`` (128 -> 128); one forward per mixture, so BatchNorm normalises each mixed
   batch on its own statistics, as the reference's two calls.
4. ``L = alpha_t (CE(fc(mix), y_mix) + CE(fc(cut), y_cut)) + (1 - alpha_t) (CE_w(fc_cb(mix)) + CE_w(fc_cb(cut)))
   + contrast_weight (S(p_mix, z_cut) + S(p_cut, z_mix))``: soft-label cross-entropies ``-mean_i sum_k t_ik log
   softmax_ik``, the re-balanced targets weighting each one-hot part by ``w_k = n_k^-label_weighting`` normalised to
   sum to C (``Trainer.update_weight``; not renormalised per sample), ``S(p, z) = -mean cos(p, stop_grad(z))``
   (SimSiam), and the cumulative weight ``alpha_t = 1 - (t / T)^2`` of the 0-based epoch t of T.

Invariants:

- The evaluated network is the run's model: backbone + ``model.head`` (the re-balanced branch, ``fc_cb``); the test
  applies no logit adjustment or other post-hoc re-balancing (``Trainer.validate`` / ``test.py`` call
  ``model(x, train=False)``, which returns ``fc_cb`` logits). The reference's "+ MaxNorm" rows
  (``utils/regularizers.py::MaxNorm_via_PGD``, not wired into its trainer) are not implemented.
- The balance head, projector and predictor belong to the method (its ``state_dict``: checkpointed), initialised
  with Kaiming-normal weights and PyTorch's default biases (``ResNet_modify``'s ``_weights_init``) from a seed of
  their own, trained by the stage's optimiser with the model's settings (the reference decays every parameter).
- Every random draw of a step comes from ``ep.gen``, in this order: the re-sampled indices, the two views of the
  stage's batch, the two views of the re-sampled batch, ``lam``, the box centre (row, then column). The method keeps
  no state across steps (``alpha_t`` is a function of the epoch), so a resumed run is identical.
- Under torchrun every rank draws its own re-sampled batch, ``lam`` and box (the reference trains on one process).
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
from ltbench.synth import beta_sample

if TYPE_CHECKING:
    from ltbench.contracts import StageContext
    from ltbench.tasks import Task

Box = tuple[int, int, int, int]  # rows [r1, r2), columns [c1, c2)


@dataclass
class GLMCConfig(MethodConfig):
    """GLMC; the defaults are the reference README's CIFAR-100-LT ratio-100 command (``--resample_weighting 0.0
    --label_weighting 1.2 --contrast_weight 4``)."""

    name: str = "glmc"
    resample_weighting: float = 0.0  # q: the re-sampled batch draws image i with weight n_{y_i}^-q
    label_weighting: float = 1.2  # the re-balanced targets weight class k by n_k^-label_weighting (sum C)
    contrast_weight: float = 4.0  # weight of the global-local consistency (SimSiam) term
    mix_alpha: float = 1.0  # lam ~ Beta(mix_alpha, mix_alpha), shared by mixup and CutMix (GLMC_mixed's alpha=1)
    proj_dim: int = 128  # projector D -> proj_dim, predictor proj_dim -> proj_dim (ResNet_modify's hidden_dim)
    tasks = ("classification",)  # soft class labels
    reads = ("images",)  # mixup and CutMix of images
    hint = "GLMC mixes images and their class labels"

    def __post_init__(self) -> None:
        ok = self.resample_weighting >= 0 and self.label_weighting >= 0 and self.contrast_weight >= 0
        if not ok or not self.mix_alpha > 0 or self.proj_dim < 1:
            raise ConfigError(
                "method=glmc: resample_weighting, label_weighting, contrast_weight >= 0, mix_alpha > 0 and "
                "proj_dim >= 1 are needed"
            )

    def check(self, root: Any) -> None:
        if root.semi is not None:
            raise ConfigError(f"method=glmc does not combine with semi={root.semi.name}")
        if root.loss.name != "ce" or getattr(root.loss, "label_smoothing", 0.0) != 0:
            raise ConfigError(f"method=glmc trains with its own soft-label cross-entropies: use loss=ce, not "
                              f"loss={root.loss.name} (without label smoothing)")  # fmt: skip
        extra = [f"{k}={getattr(root, k).name}" for k in ("reweight", "synth") if getattr(root, k).name != "none"]
        if extra:
            raise ConfigError(f"method=glmc re-weights its labels and mixes its inputs itself: it does not combine "
                              f"with {' or '.join(extra)} (use none)")  # fmt: skip
        if root.model.head != "linear":
            raise ConfigError(f"method=glmc's re-balanced branch is a linear head (model.head=linear), "
                              f"not {root.model.head}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- pure functions
def cumulative_alpha(epoch: int, epochs: int) -> float:
    """``1 - (t / T)^2`` for the 0-based epoch t of T (``Trainer.train``): 1 at the start, the weight of the balance
    branch; the re-balanced branch gets ``1 - alpha``."""
    return 1.0 - (epoch / epochs) ** 2


def label_weights(counts: Tensor, exponent: float) -> Tensor:
    """``w_k = n_k^-exponent`` normalised to sum to C (``Trainer.update_weight``); a class without training images
    counts as one image."""
    w = counts.double().clamp(min=1).pow(-exponent)
    return (w / w.sum() * len(w)).float()


def sample_weights(train_y: Tensor, counts: Tensor, q: float) -> Tensor:
    """Per-image weight ``n_{y_i}^-q`` of the re-sampled stream (``main.py``'s ``samples_weight``; the reference's
    normalisation of the class weights does not change the draws)."""
    return counts.double().clamp(min=1).pow(-q)[train_y.long()]


def cutmix_box(h: int, w: int, lam: float, gen: torch.Generator) -> Box:
    """``rand_bbox`` of ``utils/util.py`` for an N x C x h x w batch: sides ``ceil(s sqrt(1 - lam))``, centre drawn
    uniformly (row, then column, from ``gen``), the box ``[c - side // 2, c + side // 2)`` clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    side_r, side_c = math.ceil(h * cut), math.ceil(w * cut)
    cr = int(torch.randint(0, h, (1,), generator=gen))
    cc = int(torch.randint(0, w, (1,), generator=gen))
    return box_at(h, w, side_r, side_c, cr, cc)


def box_at(h: int, w: int, side_r: int, side_c: int, cr: int, cc: int) -> Box:
    """The clipped box of sides ``side_r`` x ``side_c`` around the centre (cr, cc)."""
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return clip(cr - side_r // 2, h), clip(cr + side_r // 2, h), clip(cc - side_c // 2, w), clip(cc + side_c // 2, w)


def glmc_mix(org1: Tensor, org2: Tensor, inv1: Tensor, inv2: Tensor, lam: float, box: Box) -> tuple[Tensor, Tensor]:
    """(global mixup ``lam org1 + (1 - lam) inv1``, local CutMix: ``org2`` with the box pasted from ``inv2``); the
    inputs are not changed (the reference pastes into ``org2`` in place)."""
    r1, r2, c1, c2 = box
    cut = org2.clone()
    cut[:, :, r1:r2, c1:c2] = inv2[:, :, r1:r2, c1:c2]
    return lam * org1 + (1 - lam) * inv1, cut


def mixed_targets(y: Tensor, y2: Tensor, lam: float, num_classes: int, weights: Tensor | None = None) -> Tensor:
    """``lam onehot(y) + (1 - lam) onehot(y2)``, each one-hot part scaled by ``weights[class]`` when given."""
    a, b = F.one_hot(y, num_classes).float(), F.one_hot(y2, num_classes).float()
    if weights is not None:
        a, b = a * weights, b * weights
    return lam * a + (1 - lam) * b


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """``-mean_i sum_k t_ik log softmax(logits)_ik``."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """``-mean cos(p, stop_grad(z))`` (``Trainer.SimSiamLoss``, its "simplified" form)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def glmc_loss(
    mix: tuple[Tensor, ...],
    cut: tuple[Tensor, ...],
    y: Tensor,
    y2: Tensor,
    lam: float,
    weights: Tensor,
    alpha: float,
    contrast_weight: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The step's loss from the (balance logits, re-balanced logits, z, p) of the mixup and the CutMix batch, and
    its three parts (balance, re-balance, consistency), each before its weight."""
    c = mix[0].shape[1]
    t, t_w = mixed_targets(y, y2, lam, c), mixed_targets(y, y2, lam, c, weights)
    balance = soft_ce(mix[0], t) + soft_ce(cut[0], t)
    rebalance = soft_ce(mix[1], t_w) + soft_ce(cut[1], t_w)
    consistency = simsiam_loss(mix[3], cut[2]) + simsiam_loss(cut[3], mix[2])
    loss = alpha * balance + (1 - alpha) * rebalance + contrast_weight * consistency
    return loss, {"balance": balance, "rebalance": rebalance, "consistency": consistency}


# ---------------------------------------------------------------------------------------------------- the net
class GLMCNet(nn.Module):
    """The model with the method's heads: ``forward(x_mix, x_cut)`` -> for each batch, (balance logits, re-balanced
    logits = ``model.head``, z, p); each batch is a forward of its own (its own BatchNorm statistics), in one call
    (one forward for DistributedDataParallel)."""

    def __init__(self, model: nn.Module, fc: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.model, self.fc, self.projector, self.predictor = model, fc, projector, predictor

    def features(self, x: Tensor) -> Tensor:
        return self.model.features(x)  # type: ignore[operator]

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        f = self.model.features(x)  # type: ignore[operator]
        z = self.projector(f)
        return self.fc(f), self.model.head(f), z, self.predictor(z)  # type: ignore[operator]

    def forward(self, x_mix: Tensor, x_cut: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return self.branches(x_mix), self.branches(x_cut)


def kaiming_linear(d_in: int, d_out: int) -> nn.Linear:
    """``nn.Linear`` with a Kaiming-normal weight (``_weights_init``) and PyTorch's default bias."""
    layer = nn.Linear(d_in, d_out)
    nn.init.kaiming_normal_(layer.weight)
    return layer


# ------------------------------------------------------------------------------------------------- the method
@METHODS.register("glmc", GLMCConfig)
class GLMC(Extension):
    """GLMC on top of the stage's supervised method (its task and epoch hooks; its loss is not used)."""

    inputs = "raw"  # the uint8 images: the method makes two views of each (and of the re-sampled images)

    def __init__(self, cfg: GLMCConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__(base, "method=glmc")
        self.cfg, self.feed, self.augment = cfg, ctx.feed, ctx.cfg.augment
        self.mean, self.std = ctx.data.mean, ctx.data.std
        self.size: int | None = getattr(ctx.cfg.dataset, "image_size", None) if ctx.data.kind == "files" else None
        counts = torch.tensor(ctx.stats.counts)
        self.num_classes = len(counts)
        self.sample_w = sample_weights(ctx.data.train_y, counts, cfg.resample_weighting)  # CPU, not state
        self.label_w: Tensor
        self.register_buffer("label_w", label_weights(counts, cfg.label_weighting), persistent=False)
        self.task: Task = base.task  # type: ignore[union-attr, assignment]
        d, k = int(model.feature_dim), cfg.proj_dim  # type: ignore[arg-type]
        with torch.random.fork_rng(devices=[]):  # the heads' initialisation: a function of the seed alone
            torch.manual_seed(derive_seed(ctx.cfg.seed, "method-glmc-heads"))
            self.fc = kaiming_linear(d, self.num_classes)
            self.projector = kaiming_linear(d, k)
            self.predictor = kaiming_linear(k, k)

    def wrap(self, model: nn.Module) -> nn.Module:
        return GLMCNet(model, self.fc, self.projector, self.predictor)

    def view(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """One normalised training view of a raw uint8 batch: the feed's augmentation (tensor images: crop, flip,
        ... , Cutout as ``augment`` says; image files: the feed's RandomResizedCrop + flip + jitter, batched)."""
        from ltbench.data.augment import augment_batch, cutout, normalize

        if self.size is not None:
            from ltbench.data.views import normalize01
            from ltbench.methods.contrastive import files_view

            return normalize01(files_view(x, gen, self.size), self.mean, self.std)
        v = normalize(augment_batch(x, self.augment, gen), self.mean, self.std)
        return cutout(v, self.augment.cutout, gen) if self.augment.cutout else v

    def resampled(self, n: int, gen: torch.Generator) -> Batch:
        """``n`` raw training images drawn with replacement, image i with probability proportional to
        ``sample_w[i]`` (from ``gen``)."""
        idx = torch.multinomial(self.sample_w, n, replacement=True, generator=gen)
        return next(iter(self.feed.train(idx, batch_size=n, augment=None, synth=None, synth_on=False, gen=gen,
                                         raw=True)))  # fmt: skip

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[Tensor, dict[str, Tensor]]:
        x, y, n = batch.x, batch.y, len(batch)
        other = self.resampled(n, ep.gen)
        org1, org2 = self.view(x, ep.gen), self.view(x, ep.gen)
        inv1, inv2 = self.view(other.x, ep.gen), self.view(other.x, ep.gen)
        lam = beta_sample(self.cfg.mix_alpha, ep.gen)
        box = cutmix_box(org2.shape[2], org2.shape[3], lam, ep.gen)
        x_mix, x_cut = glmc_mix(org1, org2, inv1, inv2, lam, box)
        with autocast(x.device, ep.amp):
            mix, cut = net(x_mix, x_cut)
        mix, cut = tuple(t.float() for t in mix), tuple(t.float() for t in cut)
        alpha = cumulative_alpha(ep.index, ep.epochs)
        y2 = other.y.to(y.device)
        loss, parts = glmc_loss(mix, cut, y, y2, lam, self.label_w, alpha, self.cfg.contrast_weight)
        sums = self.task.step_sums(mix[1].detach(), y)  # the re-balanced head (fc_cb) on the mixup batch
        return loss, {**sums, **{f"mean_loss_{k}": v.detach().double() * n for k, v in parts.items()}}

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        return {**self.base.row_extras(ep), "glmc_alpha": round(cumulative_alpha(ep.index, ep.epochs), 6)}

    def summary(self) -> dict[str, Any]:
        return {"glmc": {"evaluated": "the re-balanced branch (model.head, the reference's fc_cb), no adjustment"}}


__all__ = [
    "GLMC", "GLMCConfig", "GLMCNet", "box_at", "cumulative_alpha", "cutmix_box", "glmc_loss", "glmc_mix",
    "label_weights", "mixed_targets", "sample_weights", "simsiam_loss", "soft_ce",
]  # fmt: skip
