"""Parametric contrastive learning: PaCo (``method=paco``) and GPaCo (``method=gpaco``).

PaCo: Cui et al., ICCV 2021, "Parametric Contrastive Learning"; GPaCo: Cui et al., TPAMI 2023, "Generalized
Parametric Contrastive Learning". Reference: dvlab-research/Parametric-Contrastive-Learning, ``PaCo/LT/losses.py::
PaCoLoss``, ``PaCo/LT/moco/builder.py::MoCo`` and ``PaCo/LT/paco_cifar.py`` (PaCo), ``GPaCo/LT/losses.py::PaCoLoss``,
``GPaCo/LT/moco/builder.py`` and ``GPaCo/LT/paco_cifar.py`` (GPaCo), at commit fe56535.

The loss (:func:`paco_loss`): for each anchor i (a normalised projection, label y_i) the contrast set is the C
learnable class centres, whose logits are the classifier's, logit-adjusted by the training prior and divided by
``supt`` (``(head(f_i) + log(pi + 1e-9)) / supt``, pi = class frequencies of the training set, tau = 1: the
reference's ``cal_weight_for_classes``), followed by every projection of ``features`` but the anchor itself
(``z_i . z_j / temperature``; ``gamma`` weighs them in the denominator). Positives: the anchor's own centre (weight
``beta``, optionally label-smoothed, GPaCo's ``smooth``) and every same-label projection (weight ``alpha``);
``L_i = -sum_j w_ij log p_ij / sum_j w_ij``, averaged over the anchors. A sample with no same-label projection keeps
its centre as positive, so with beta > 0 no anchor lacks a positive. The reference's ``temperature /
base_temperature`` factor is 1 in both CIFAR trainers (base_temperature defaults to temperature) and is left out.

- PaCo (CIFAR trainer, MoCo style): anchors are the B queries (view 0, the trained network); the contrast set is
  queries, keys (view 1, through a momentum copy of the backbone and projector, m = 0.999, updated before the keys are
  computed) and a queue of K = 1024 past keys with their labels. The queue (K x dim, initialised as the reference:
  Gaussian rows normalised along the queue axis, random labels), its pointer and the momentum encoder are buffers
  and modules of the method: the checkpoint carries them and a resumed run is identical. The loss reads the queue as
  it was before this batch's keys are enqueued (``features = cat(q, k, queue)``, then enqueue k).
- GPaCo (CIFAR trainer): no momentum encoder: both views go through the trained network (separately, so BatchNorm
  sees each view alone, as the reference's two calls), anchors are all 2B projections, the classifier's logits of
  both views are the centre logits, the queue holds the view-1 projections (detached); projector Linear-ReLU-Linear-
  ReLU-Linear (no BatchNorm).

Where ltbench differs: the reference asserts K % (global batch) == 0 and drops the last batch; here the queue
pointer wraps around (identical when K is a multiple of the batch). The reference shuffles the key batch across GPUs
for BatchNorm; on one GPU that is a no-op; under torchrun each rank's key encoder normalises its own keys, which are
gathered for the queue as the reference does. Cutout of view 0 acts on the normalised image (the run's feed does).
The run's loss and re-weighting are replaced by the PaCo loss (``loss=ce``, ``reweight=none`` are required).
"""

from __future__ import annotations

import copy
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


# ----------------------------------------------------------------------------------------------------------- loss
def paco_loss(
    features: Tensor,
    labels: Tensor,
    sup_logits: Tensor,
    n_anchors: int,
    log_prior: Tensor | None,
    alpha: float,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 0.05,
    supt: float = 1.0,
    smooth: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """The PaCo loss (``PaCo/LT/losses.py::PaCoLoss.forward``; with ``smooth``, ``GPaCo/LT/losses.py``).

    ``features``: N L2-normalised projections, the first ``n_anchors`` are the anchors; ``labels``: their N labels;
    ``sup_logits``: the classifier's logits of the anchors (n_anchors x C); ``log_prior``: log(pi + 1e-9) per class
    (None: no logit adjustment). As the reference, the row maximum (the anchor's self-similarity counted) is
    subtracted and 1e-12 added inside the log of the denominator (with temperature 0.05 the self term can be far
    above the rest, so the 1e-12 is visible at 1e-7 relative)."""
    n, c = n_anchors, sup_logits.shape[1]
    y = labels[:n]
    dt = torch.promote_types(torch.promote_types(features.dtype, sup_logits.dtype), torch.float32)  # fp32 at least
    features, sup = features.to(dt), sup_logits.to(dt)
    sup = sup if log_prior is None else sup + log_prior.to(dt)
    logits = torch.cat([sup / supt, features[:n] @ features.T / temperature], dim=1)
    self_mask = torch.zeros(n, len(features), dtype=torch.bool, device=features.device)
    self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=features.device)
    same = ((y[:, None] == labels[None, :]) & ~self_mask).to(logits.dtype)
    onehot = F.one_hot(y, c).to(logits.dtype)
    if smooth:
        onehot = smooth / (c - 1) * (1 - onehot) + (1 - smooth) * onehot
    positives = torch.cat([onehot * beta, same * alpha], dim=1)
    weight = torch.cat([torch.ones_like(onehot), gamma * (~self_mask).to(logits.dtype)], dim=1)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # the row maximum includes the anchor's self
    log_prob = logits - torch.log((logits.exp() * weight).sum(1, keepdim=True) + 1e-12)
    per_anchor = -(positives * log_prob).sum(1) / positives.sum(1)
    return per_anchor if reduction == "none" else per_anchor.mean()


# ---------------------------------------------------------------------------------------------------------- queue
class KeyQueue(nn.Module):
    """A ring of K keys (K x dim) and their labels; ``ptr``: where the next key goes. Buffers: checkpointed."""

    keys: Tensor
    labels: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int, num_classes: int, gen: torch.Generator) -> None:
        super().__init__()
        # the reference's initialisation: randn(K, dim) normalised along dim 0 (the queue axis), random labels
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=gen), dim=0))
        self.register_buffer("labels", torch.randint(0, num_classes, (size,), generator=gen))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: Tensor, labels: Tensor) -> None:
        """Write ``keys`` (and labels) at ``ptr`` onwards, wrapping around; ``ptr`` moves by their number (the
        last K when more than K come). No host sync: the positions are computed on the device."""
        size = len(self.keys)
        keys, labels = keys[-size:], labels[-size:]
        idx = (self.ptr + torch.arange(len(keys), device=self.ptr.device)) % size
        self.keys[idx] = keys.detach().to(self.keys.dtype)
        self.labels[idx] = labels.to(self.labels.dtype)
        self.ptr.copy_((self.ptr + len(keys)) % size)


def gather_ranks(t: Tensor) -> Tensor:
    """All ranks' ``t`` concatenated in rank order (the reference's ``concat_all_gather``); ``t`` on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class PaCoConfig(MethodConfig):
    """PaCo's CIFAR-100-LT settings (``PaCo/LT/sh/CIFAR100_train_imb0.01.sh``: alpha 0.01, beta 1, gamma 1,
    moco-t 0.05, moco-k 1024, moco-dim 32, moco-m 0.999 (the trainer's default), feat_dim 64, mlp on)."""

    name: str = "paco"
    alpha: float = 0.01  # weight of the same-label projections among the positives
    beta: float = 1.0  # weight of the anchor's class centre among the positives
    gamma: float = 1.0  # weight of the projections in the denominator
    temperature: float = 0.05  # moco-t
    supt: float = 1.0  # divides the (logit-adjusted) centre logits
    smooth: float = 0.0  # label smoothing of the centre positive (GPaCo's option; 0 in both CIFAR trainers)
    logit_adjust: bool = True  # add log(training prior + 1e-9) to the centre logits (cal_weight_for_classes)
    queue: int = 1024  # moco-k
    dim: int = 32  # moco-dim: projection size
    hidden_dim: int = 0  # projector hidden width; 0: the backbone's feature size (the reference's dim_mlp)
    momentum: float = 0.999  # moco-m; the key encoder's EMA (GPaCo has none: momentum_encoder false)
    momentum_encoder: bool = True
    blur: float = 0.5  # probability of the Gaussian blur of the key view (SimAugment)

    tasks = ("classification",)
    reads = ("images",)

    def __post_init__(self) -> None:
        ok = self.alpha >= 0 and self.beta > 0 and self.gamma >= 0 and self.temperature > 0 and self.supt > 0
        ok = ok and 0 <= self.smooth < 1 and self.queue >= 1 and self.dim >= 1 and self.hidden_dim >= 0
        if not ok or not 0 <= self.momentum < 1 or not 0 <= self.blur <= 1:
            raise ConfigError(
                f"method={self.name}: alpha, gamma >= 0, beta, temperature, supt > 0, smooth in [0, 1), queue and dim"
                " >= 1, hidden_dim >= 0, momentum in [0, 1) and blur in [0, 1] are needed"
            )

    def check(self, root: Any) -> None:
        what = f"method={self.name}"
        if root.semi is not None:
            raise ConfigError(f"{what} does not combine with semi={root.semi.name}")
        if root.loss.name != "ce" or root.reweight.name != "none":
            raise ConfigError(f"{what} is its own loss (logit-adjusted class centres + contrast): use loss=ce "
                              f"reweight=none, not loss={root.loss.name} reweight={root.reweight.name}")  # fmt: skip
        if root.synth.name != "none":
            raise ConfigError(f"{what} makes two views of each image; it does not combine with synth={root.synth.name}")
        if root.model.head != "linear":
            raise ConfigError(f"{what} takes its class centres from a linear head (model.head=linear)")


@dataclass
class GPaCoConfig(PaCoConfig):
    """GPaCo's CIFAR settings (``GPaCo/LT/paco_cifar.py`` defaults and ``sh/CIFAR/CIFAR100_train.sh``: alpha 0.01,
    moco-t 0.07, moco-k 1024, moco-dim 128; no momentum encoder; key-view blur p 0.2 (``augmentation_aug_cifar``))."""

    name: str = "gpaco"
    temperature: float = 0.07
    dim: int = 128
    momentum_encoder: bool = False
    blur: float = 0.2


# ---------------------------------------------------------------------------------------------------------- network
def projector(d: int, hidden: int, out: int, batchnorm: bool) -> nn.Sequential:
    """PaCo: Linear -> BN -> ReLU -> Linear; GPaCo: Linear -> ReLU -> Linear -> ReLU -> Linear (the MoCo builders'
    ``encoder_q.fc`` replacements)."""
    if batchnorm:
        return nn.Sequential(
            nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))  # fmt: skip


class PaCoNet(nn.Module):
    """The model with the projector: ``forward(views)`` -> (classifier logits, normalised projections), the views'
    outputs concatenated in order; each view is its own forward pass (its own BatchNorm batch)."""

    model: Any  # the run's network: ``features`` and ``head``
    projector: nn.Module

    def __init__(self, model: nn.Module, proj: nn.Module) -> None:
        super().__init__()
        self.model, self.projector = model, proj

    def features(self, x: Tensor) -> Tensor:
        return self.model.features(x)

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        logits, z = [], []
        for v in views:
            f = self.model.features(v)
            logits.append(self.model.head(f))
            z.append(F.normalize(self.projector(f).float(), dim=1))
        return torch.cat(logits), torch.cat(z)


class PaCo(Extension):
    """PaCo / GPaCo on top of the stage's supervised method (its optimiser groups; its loss is replaced)."""

    inputs = "raw"
    log_prior: Tensor
    base: Any  # the stage's supervised method (its task)

    def __init__(self, cfg: PaCoConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__(base, f"method={cfg.name}")
        self.cfg = cfg
        self.mean, self.std = ctx.data.mean, ctx.data.std
        self.augment = ctx.cfg.augment
        self.size: int | None = getattr(ctx.cfg.dataset, "image_size", None) if ctx.data.kind == "files" else None
        counts = torch.as_tensor(ctx.stats.counts, dtype=torch.float32)
        self.register_buffer("log_prior", (counts / counts.sum() + 1e-9).log())
        d = int(model.feature_dim)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, f"method-{cfg.name}-queue"))
        self.queue = KeyQueue(cfg.queue, cfg.dim, len(ctx.stats.counts), gen)
        with torch.random.fork_rng(devices=[]):  # the projector's initialisation: a function of the seed alone
            torch.manual_seed(derive_seed(ctx.cfg.seed, f"method-{cfg.name}-projector"))
            self.projector = projector(d, cfg.hidden_dim or d, cfg.dim, batchnorm=cfg.momentum_encoder)
        self.key_encoder: PaCoNet | None = None
        if cfg.momentum_encoder:  # a frozen copy, moved by momentum (not by the optimiser)
            self.key_encoder = PaCoNet(copy.deepcopy(model), copy.deepcopy(self.projector))
            for p in self.key_encoder.parameters():
                p.requires_grad_(False)

    def wrap(self, model: nn.Module) -> nn.Module:
        return PaCoNet(model, self.projector)

    def views(self, x: Tensor, gen: torch.Generator) -> list[Tensor]:
        """[view 0: the run's augmentation (query), view 1: SimAugment with blur p ``blur`` (key)], normalised."""
        from ltbench.data.augment import augment_batch, cutout, normalize
        from ltbench.data.views import normalize01
        from ltbench.methods.contrastive import files_view, sim_augment

        if self.size is not None:
            v0 = normalize01(files_view(x, gen, self.size), self.mean, self.std)
        else:
            v0 = normalize(augment_batch(x, self.augment, gen), self.mean, self.std)
            v0 = cutout(v0, self.augment.cutout, gen) if self.augment.cutout else v0
        return [v0, normalize01(sim_augment(x, gen, self.size, self.cfg.blur), self.mean, self.std)]

    @torch.no_grad()
    def momentum_update(self, net: nn.Module) -> None:
        """key = m key + (1 - m) query, parameters only (each encoder keeps its own BatchNorm statistics)."""
        from ltbench.methods.supervised import unwrapped

        assert self.key_encoder is not None
        query = getattr(unwrapped(net), "_orig_mod", unwrapped(net))
        for k, q in zip(self.key_encoder.parameters(), query.parameters()):
            k.mul_(self.cfg.momentum).add_(q.detach(), alpha=1 - self.cfg.momentum)

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, y, n = self.cfg, batch.y, len(batch)
        v0, v1 = self.views(batch.x, ep.gen)
        with autocast(v0.device, ep.amp):
            if self.key_encoder is not None:  # PaCo: queries from the network, keys from the momentum encoder
                logits, q = net([v0])
                with torch.no_grad():
                    self.momentum_update(net)
                    _, k = self.key_encoder([v1])
                anchors, features = n, torch.cat([q, k.detach()])
            else:  # GPaCo: both views through the network, all 2B are anchors
                logits, features = net([v0, v1])
                k, anchors = features[n:], 2 * n
        logits = logits.float()
        queue, queue_labels = self.queue.keys.clone(), self.queue.labels.clone()
        loss = paco_loss(torch.cat([features.float(), queue]), torch.cat([y, y, queue_labels]), logits, anchors,
                         self.log_prior if cfg.logit_adjust else None, cfg.alpha, cfg.beta, cfg.gamma,
                         cfg.temperature, cfg.supt, cfg.smooth)  # fmt: skip
        self.queue.push(gather_ranks(k.detach().float()), gather_ranks(y))
        sums = self.base.task.step_sums(logits[:n].detach(), y)
        return loss, {**sums, "mean_loss_paco": loss.detach().double() * n}


for _name, _schema in (("paco", PaCoConfig), ("gpaco", GPaCoConfig)):
    METHODS.register(_name, _schema)(PaCo)
