"""Synthetic samples made inside the training batch.

Three kinds, applied at different points of the batch pipeline:

- *replacements* (``smote``, ``noise``) act on the raw uint8 images before augmentation: a sample of class c is
  replaced by a synthetic one with probability ``1 - n_c / n_max``. Under random over-sampling (where a fraction
  ``1 - n_c / n_max`` of each class's entries are repeats) this turns the repeats into synthetic images, which is
  what SMOTE does; the largest class is never touched.
- *mixing* (``mixup``, ``remix``) acts on the normalised float batch and returns two label vectors and a
  per-sample label weight, consumed by :func:`ltbench.losses.mixed_loss`. Mixing applies to every class; remix's
  label rule favours the minority class of each pair.
- *feature-space* synthesis (``manifold_mixup``, ``feature_smote``) acts inside the network's forward, through a
  hook on the model (:meth:`Synthesizer.feature_edit`): manifold mixup mixes hidden representations (by default the
  pooled features the head reads), feature SMOTE appends synthetic features of the under-represented classes of the
  batch to the head's input. Neither changes the model: both work with any model whose forward is
  ``head(features(x))`` (every ltbench model, and the frozen backbone of the classifier stage); mixing inside a
  CIFAR ResNet (``layer1``, ``layer2``) hooks the last block of that stage.

Feature SMOTE's choices (no peer implementation reports numbers for it): the neighbours come from a bank of the
latest feature of every training image of the oversampled classes (every class but the largest), refreshed after
every step, not from the batch, whose rare classes have one sample or none; each class of the batch is filled toward
the batch's largest class (``amount`` of the gap), so the histogram the head trains on is balanced whatever the
sampler (under class-balanced sampling little is added); gradients reach the head, and the backbone through h_i
(``detach: true``: head only), never through the banked h_nn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ltbench.config import SynthConfig, epoch_at
from ltbench.errors import ConfigError, LtbenchError
from ltbench.registry import Registry

SYNTHS: Registry[type[Synthesizer]] = Registry("synth", SynthConfig)


@dataclass
class MixupConfig(SynthConfig):
    name: str = "mixup"
    alpha: float = 1.0  # lam ~ Beta(alpha, alpha)
    reads = ("images", "features")  # it mixes inputs (token ids do not mix)


_CLASSES_HINT = "for regression use synth=mixup or manifold_mixup"


@dataclass
class RemixConfig(MixupConfig):
    name: str = "remix"
    kappa: float = 3.0  # count ratio above which the label goes to the minority class (Chou et al. 2020)
    tau: float = 0.5  # mixing-weight threshold (Chou et al. 2020)
    tasks = ("classification",)  # its label rule favours the minority class of a pair
    hint = _CLASSES_HINT


@dataclass
class SmoteConfig(SynthConfig):
    name: str = "smote"
    k: int = 5  # nearest same-class neighbours (Chawla et al. 2002)
    tasks = ("classification",)  # it replaces the repeats of an over-sampled class
    hint = _CLASSES_HINT


@dataclass
class NoiseConfig(SynthConfig):
    name: str = "noise"
    sigma: float = 0.1  # std of the Gaussian noise, on the [0, 1] pixel scale
    tasks = ("classification",)  # it replaces the repeats of an over-sampled class
    hint = _CLASSES_HINT


# Where manifold mixup mixes. "pool": the pooled features the head reads (Zhang et al. 2021, BagofTricks-LT
# MANIFOLD_MIX_UP.LOCATION "pool"; any model). "input", "layer1", "layer2": the input, or the output of the first or
# second stage of a CIFAR ResNet; "hidden": one of these three drawn uniformly per batch (Verma et al. 2019,
# vikasverma1077/manifold_mixup supervised/models/preresnet.py, mixup_hidden). After the third stage is not offered:
# the global average pool is linear, so mixing there is mixing at "pool".
MIX_LAYERS = ("pool", "input", "layer1", "layer2", "hidden")
_HIDDEN = ("input", "layer1", "layer2")
CIFAR_RESNETS = ("resnet32", "cifar_resnet")  # the model names of ltbench.models.resnet_cifar


def _step_is_supervised(root, name: str) -> None:
    """Feature-space synthesis hooks the model anew for every batch, in the supervised method's step."""
    if root.method is not None:
        raise ConfigError(f"synth={name} acts in the supervised step, which method={root.method.name} replaces")
    if root.compile != "none":  # new hooks and new draws each batch: a recompilation each step
        raise ConfigError(f"synth={name} hooks the model anew for every batch, which torch.compile cannot keep; "
                          "use compile=none")  # fmt: skip


@dataclass
class ManifoldMixupConfig(SynthConfig):
    name: str = "manifold_mixup"
    alpha: float = 1.0  # lam ~ Beta(alpha, alpha)
    layer: str = "pool"  # one of MIX_LAYERS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer not in MIX_LAYERS:
            raise ConfigError(f"synth.layer must be one of {', '.join(MIX_LAYERS)}, got {self.layer!r}")
        if not self.alpha > 0:
            raise ConfigError(f"synth.alpha must be > 0, got {self.alpha}")

    def check(self, root) -> None:
        # Regression is allowed, as for input mixup: the loss is lam L(y_a) + (1-lam) L(y_b); for MSE that is
        # (f - (lam y_a + (1-lam) y_b))^2 + a constant, i.e. mixup of the targets.
        _step_is_supervised(root, self.name)
        if self.layer != "pool" and root.model.name not in CIFAR_RESNETS:
            raise ConfigError(
                f"synth.layer={self.layer} mixes inside a CIFAR ResNet (model=resnet32); model={root.model.name} "
                "mixes at synth.layer=pool"
            )


@dataclass
class FeatureSmoteConfig(SynthConfig):
    name: str = "feature_smote"
    k: int = 5  # nearest same-class neighbours (Chawla et al. 2002)
    amount: float = 1.0  # fraction of each class's gap to the batch's largest class that is filled
    detach: bool = False  # true: synthetic features train the head only (no gradient through h_i)
    tasks = ("classification",)  # it fills classes toward the batch's largest
    hint = _CLASSES_HINT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1 or not 0 < self.amount <= 1:
            raise ConfigError("synth.k must be >= 1 and synth.amount in (0, 1]")

    def check(self, root) -> None:
        _step_is_supervised(root, self.name)


@dataclass
class Mixed:
    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor  # per-sample weight of y_a in the label


def beta_sample(alpha: float, gen: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw from a torch generator (torch's Beta has no generator argument)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator) -> Mixed:
    """mixup (Zhang et al. 2018): one lam ~ Beta(alpha, alpha) per batch; partner j = perm(i)."""
    lam = beta_sample(alpha, gen)
    perm = torch.randperm(len(y), generator=gen).to(y.device)
    x_mix = lam * x + (1 - lam) * x[perm]
    return Mixed(x_mix, y, y[perm], torch.full((len(y),), lam, device=x.device))


def remix_labels(
    lam: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, counts: torch.Tensor, kappa: float, tau: float
) -> torch.Tensor:
    """Remix (Chou et al. 2020) label weight of y_a, given the input weight ``lam`` of x_a.

    0 if n_a / n_b >= kappa and lam < tau (x_a is the majority sample and contributes little: the label goes to
    the minority y_b); 1 if n_a / n_b <= 1/kappa and 1 - lam < tau (the symmetric case); lam otherwise.
    """
    ratio = counts[y_a].double() / counts[y_b].double()
    lam_y = lam.clone()
    lam_y[(ratio >= kappa) & (lam < tau)] = 0.0
    lam_y[(ratio <= 1.0 / kappa) & (1 - lam < tau)] = 1.0
    return lam_y


def knn_within_class(x: torch.Tensor, y: torch.Tensor, classes: list[int], k: int) -> torch.Tensor:
    """For every image of ``classes``, the indices of its k nearest same-class images (L2 on pixels).

    Returns an N x k tensor (-1 where not computed: other classes, or fewer than 2 images in the class).
    """
    nbrs = torch.full((len(y), k), -1, dtype=torch.long)
    flat = x.reshape(len(x), -1).float()
    for c in classes:
        members = torch.nonzero(y == c).flatten()
        if len(members) < 2:
            continue
        kk = min(k, len(members) - 1)
        for chunk in members.split(1024):
            d = torch.cdist(flat[chunk], flat[members])
            d[torch.arange(len(chunk)), torch.searchsorted(members, chunk)] = float("inf")  # not itself
            near = d.topk(kk, largest=False).indices
            nbrs[chunk, :kk] = members[near]
            if kk < k:  # pad by repeating the nearest ones
                nbrs[chunk, kk:] = members[near[:, torch.arange(k - kk) % kk]]
    return nbrs


# ------------------------------------------------------------------------------------------ feature space


def mix_rows(t: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """lam * t + (1 - lam) * t[perm]: row i mixed with row perm(i)."""
    return lam * t + (1 - lam) * t[perm]


def stage_end(net: nn.Module, stage: int) -> nn.Module:
    """The last block of stage ``stage`` (1-based) of a CIFAR ResNet: its output is "after layer<stage>"."""
    from ltbench.models.resnet_cifar import CifarResNet

    if not isinstance(net, CifarResNet):
        raise ConfigError(f"synth.layer=layer{stage} mixes inside a CIFAR ResNet; this model is {type(net).__name__}")
    n = len(net.layers) // 3  # 3 stages of n blocks (ltbench.models.resnet_cifar)
    return net.layers[stage * n - 1]


def _head(net: nn.Module) -> nn.Module:
    head = getattr(net, "head", None)
    if not isinstance(head, nn.Module):
        raise LtbenchError(f"feature-space synthesis needs a model with a head module; {type(net).__name__} has none")
    return head


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class ManifoldMix:
    """Manifold mixup of one batch (Verma et al. 2019): the representation at ``layer`` of sample i becomes
    ``lam h_i + (1 - lam) h_perm(i)``, the forward continues from there, and the loss is
    ``lam L(y_i) + (1 - lam) L(y_perm(i))`` through the run's loss (:func:`ltbench.losses.mixed_loss`, with the
    re-weighting as for input mixup)."""

    lam: float
    perm: torch.Tensor
    layer: str  # "pool", "input", "layer1" or "layer2"

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return mix_rows(x, self.lam, self.perm.to(x.device)) if self.layer == "input" else x

    def installed(self, net: nn.Module):
        """A context in which ``net``'s forward mixes at the layer (a hook: the model itself is unchanged)."""
        if self.layer == "pool":  # the head's input: the pooled features (any model with a ``head``)
            pre = lambda m, args: (mix_rows(args[0], self.lam, self.perm.to(args[0].device)), *args[1:])  # noqa: E731
            return _hooks([_head(net).register_forward_pre_hook(pre)])
        if self.layer == "input":
            return _hooks([])
        post = lambda m, args, out: mix_rows(out, self.lam, self.perm.to(out.device))  # noqa: E731
        return _hooks([stage_end(net, int(self.layer[-1])).register_forward_hook(post)])

    def loss(self, loss_fn, out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        from ltbench.losses import mixed_loss

        lam = torch.full((len(y),), self.lam, device=out.device)
        return mixed_loss(loss_fn, out, y, y[self.perm.to(y.device)], lam, weight)

    def sums(self, out: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        return {}


def manifold_mix(n: int, alpha: float, layer: str, gen: torch.Generator) -> ManifoldMix:
    """The draws of one batch, in this order from ``gen``: lam ~ Beta(alpha, alpha), the permutation, and for
    ``layer="hidden"`` the layer (uniform over input / layer1 / layer2)."""
    lam = beta_sample(alpha, gen)
    perm = torch.randperm(n, generator=gen)
    if layer == "hidden":
        layer = _HIDDEN[int(torch.randint(0, len(_HIDDEN), (1,), generator=gen))]
    return ManifoldMix(lam, perm, layer)


def _all_ranks(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` in rank order (the rows may differ in number); ``t`` itself in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    padded = t.new_zeros((int(max(sizes)), *t.shape[1:]))
    padded[: len(t)] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


class FeatureBank(nn.Module):
    """The latest training feature of every image of the oversampled classes: feature SMOTE's neighbours.

    Row r holds the (detached, float32) feature the head last read for one training image, written after every
    step, so a neighbour is at most one epoch old (in stage 2, with a frozen backbone, it is exact up to the
    augmentation). ``filled`` (kept on the CPU, so deciding what to synthesise never waits for the device) marks
    the rows written so far. Both are checkpointed with the method: a resumed run continues with the same bank.
    Under several processes every rank writes every rank's features, so the banks stay identical.
    Memory: one feature per image of an oversampled class (CIFAR-10-LT, ResNet-32: 12k x 64 floats, 3 MB).
    """

    def __init__(self, train_y: torch.Tensor, classes: list[int], num_classes: int) -> None:
        super().__init__()
        y = train_y.cpu().long()
        member = torch.isin(y, torch.as_tensor(classes, dtype=torch.long))
        self.num_classes = num_classes
        self.row_of = torch.full((len(y),), -1, dtype=torch.long)  # training index -> row (-1: not banked)
        self.row_of[member] = torch.arange(int(member.sum()))
        self.row_class_cpu = y[member]
        self.register_buffer("row_class", y[member].clone(), persistent=False)
        self.register_buffer("feats", torch.zeros(0, 0))  # R x D once the first features are written
        self.filled = torch.zeros(len(self.row_class_cpu), dtype=torch.bool)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"filled": self.filled.clone()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.filled = state["filled"].cpu().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "feats")
        if saved is not None:  # the bank's width is that of the features: take the checkpoint's shape
            self.feats = torch.zeros(saved.shape, dtype=saved.dtype, device=self.feats.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def available(self, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per sample (CPU): how many filled rows of its class there are, not counting its own."""
        per_class = torch.bincount(self.row_class_cpu[self.filled], minlength=self.num_classes)
        own = (rows >= 0) & self.filled[rows.clamp(min=0)]
        return torch.where(rows >= 0, per_class[y] - own.long(), 0)

    def write(self, index: torch.Tensor, h: torch.Tensor) -> None:
        """Store the features ``h`` (N x D, any device) of the training images ``index`` (CPU) that are banked."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            index = _all_ranks(index.to(h.device)).cpu()
            h = _all_ranks(h)
        rows = self.row_of[index]
        pos = torch.nonzero(rows >= 0).flatten()
        if len(pos) == 0:
            return
        uniq, inv = torch.unique(rows[pos], return_inverse=True)
        last = torch.full((len(uniq),), -1, dtype=torch.long).scatter_reduce(0, inv, pos, "amax")  # repeats: last
        if self.feats.numel() == 0:
            self.feats = torch.zeros(len(self.row_class_cpu), h.shape[1], device=h.device)
        self.feats[uniq.to(h.device)] = h[last.to(h.device)].detach().float()
        self.filled[uniq] = True

    def nearest(self, q: torch.Tensor, q_class: torch.Tensor, q_row: torch.Tensor, k: int) -> torch.Tensor:
        """Rows of the k nearest filled same-class features of each query (L2), nearest first, never its own row
        (``q_row``, CPU; -1: none). Rows past a query's available count are meaningless: callers pick below it."""
        r = self.feats.shape[0]
        filled = self.filled.to(q.device)
        out = []
        step = max(1, 2**24 // max(r, 1))  # at most 16M distances at once
        for s in range(0, len(q), step):
            d = torch.cdist(q[s : s + step].float(), self.feats)
            bad = (self.row_class[None, :] != q_class[s : s + step, None]) | ~filled[None, :]
            d = d.masked_fill(bad, float("inf"))
            own = torch.nonzero(q_row[s : s + step] >= 0).flatten()
            d[own.to(q.device), q_row[s : s + step][own].to(q.device)] = float("inf")
            out.append(d.topk(min(k, r), largest=False).indices)
        return torch.cat(out)


def smote_bases(y: torch.Tensor, eligible: torch.Tensor, num_classes: int, amount: float, gen: torch.Generator):
    """The batch position of the base sample of every synthetic feature (CPU).

    With m_c samples of class c in the batch and m_max the largest, class c gets round(amount * (m_max - m_c))
    synthetic features, spread evenly over its ``eligible`` samples (those of an oversampled class with a banked
    neighbour): each is the base of q or q + 1 of them, the q + 1 going to a random subset (one uniform key per
    sample drawn from ``gen``). A class without an eligible sample gets none.
    """
    m = torch.bincount(y, minlength=num_classes)
    a = torch.bincount(y[eligible], minlength=num_classes)
    need = torch.floor(amount * (m.max() - m).double() + 0.5).long() * (a > 0)
    key = torch.rand(len(y), generator=gen, dtype=torch.float64)
    order = torch.argsort(y.double() * 3 + torch.where(eligible, key, 2.0))  # by class, eligible first, at random
    start = torch.cumsum(m, 0) - m
    rank = torch.empty_like(y)
    rank[order] = torch.arange(len(y)) - start[y[order]]
    a_y = a[y].clamp(min=1)
    count = torch.where(eligible, need[y] // a_y + (rank < need[y] % a_y).long(), 0)
    return torch.repeat_interleave(torch.arange(len(y)), count)


class FeatureSmote:
    """Feature SMOTE on one batch (Chawla et al. 2002, on the features the head reads): for the base samples of
    :func:`smote_bases`, ``h_i + u (h_nn - h_i)`` with u ~ U(0, 1) and h_nn one of the k nearest same-class banked
    features of h_i (uniformly), labelled y_i, appended to the head's input. Gradients flow to the head, and to the
    backbone through h_i (weight 1 - u) unless ``detach``; never through h_nn (a banked, detached feature). The loss
    is the run's loss over the real and synthetic rows together (with the re-weighting); the batch's own features
    are then written to the bank. Draws from ``gen`` before the forward, in order: the base keys, u, the pick."""

    def __init__(self, bank: FeatureBank, y: torch.Tensor, index: torch.Tensor, cfg, gen: torch.Generator) -> None:
        self.bank, self.y, self.index, self.detach = bank, y, index, cfg.detach
        self.rows = bank.row_of[index]
        avail = bank.available(y, self.rows)
        self.base = smote_bases(y, avail > 0, bank.num_classes, cfg.amount, gen)
        self.u = torch.rand(len(self.base), generator=gen)
        kk = avail.clamp(max=cfg.k)[self.base]
        self.pick = (torch.rand(len(self.base), generator=gen) * kk).long().clamp(max=kk - 1)
        self.k = cfg.k
        self.neighbour_rows: torch.Tensor | None = None  # set by the forward (for tests and diagnostics)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def synthesize(self, h: torch.Tensor) -> torch.Tensor:
        dev, hd = h.device, h.detach()
        if len(self.base):
            uniq, inv = torch.unique(self.base, return_inverse=True)
            near = self.bank.nearest(hd[uniq.to(dev)], self.y[uniq].to(dev), self.rows[uniq], self.k)
            self.neighbour_rows = near[inv.to(dev), self.pick.to(dev)]
            hb = (hd if self.detach else h)[self.base.to(dev)]
            nb = self.bank.feats[self.neighbour_rows].to(h.dtype)
            h = torch.cat([h, hb + self.u.to(dev, h.dtype)[:, None] * (nb - hb)])
        self.bank.write(self.index, hd[: len(self.y)])
        return h

    def installed(self, net: nn.Module):
        pre = lambda m, args: (self.synthesize(args[0]), *args[1:])  # noqa: E731
        return _hooks([_head(net).register_forward_pre_hook(pre)])

    def loss(self, loss_fn, out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if len(out) != len(y) + len(self.base):
            raise LtbenchError("synth=feature_smote needs a model whose forward is head(features(x))")
        return loss_fn(out, torch.cat([y, y[self.base.to(y.device)]]), weight)

    def sums(self, out: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        return {"mean_synthetic": torch.tensor(float(len(self.base)), dtype=torch.float64, device=out.device)}


class Synthesizer:
    """The synthetic samples of one option for one training set. One subclass per option, registered with its
    schema; ``kind`` says where in the batch pipeline it acts:

    - ``replace``: on the raw uint8 batch before augmentation (:meth:`replace`; the feed calls it);
    - ``mix``: on the normalised batch, two label vectors and a weight (:meth:`mix`; the supervised step);
    - ``feature``: inside the network's forward through a hook (:meth:`feature_edit`; the supervised step);
    - ``none``: nothing.

    Every option shares the replacement probabilities ``1 - n_c / n_max`` and the stop epoch (``synth.stop``)."""

    kind: ClassVar[str] = "none"

    def __init__(
        self,
        cfg: SynthConfig,
        train_x: torch.Tensor | None,
        train_y: torch.Tensor,
        counts: list[int],
        epochs: int | None = None,
    ) -> None:
        self.stop_epoch = None if cfg.stop is None or epochs is None else epoch_at(cfg.stop, epochs)
        self.cfg = cfg
        self.counts = torch.as_tensor(counts, dtype=torch.float64)
        # Probability that a sample of class c is replaced: 1 - n_c / n_max (0 for the largest class).
        self.replace_p = 1.0 - self.counts / self.counts.max()
        self.minority = [c for c in range(len(counts)) if self.replace_p[c] > 0]
        self.train_y = train_y.cpu()
        self.bank: FeatureBank | None = None  # feature SMOTE's: a module, checkpointed by the method that trains

    def active(self, epoch: int) -> bool:
        return self.kind != "none" and (self.stop_epoch is None or epoch < self.stop_epoch)

    @property
    def mixes(self) -> bool:
        return self.kind == "mix"

    @property
    def replaces(self) -> bool:
        return self.kind == "replace"

    @property
    def in_features(self) -> bool:
        return self.kind == "feature"

    def replace(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, train_x: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replacements on a uint8 batch (``kind == "replace"``); returns the batch and the mask of replaced samples."""
        raise NotImplementedError(f"synth={self.cfg.name} does not replace samples")

    def mix(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Mixed:
        """The mixed batch (``kind == "mix"``)."""
        raise NotImplementedError(f"synth={self.cfg.name} does not mix inputs")

    def feature_edit(self, y: torch.Tensor, index: torch.Tensor | None, gen: torch.Generator) -> Any:
        """What the feature-space synthesis does to one batch of labels ``y`` (training indices ``index``, CPU),
        its draws made (``kind == "feature"``)."""
        raise NotImplementedError(f"synth={self.cfg.name} does not act on features")


def build_synth(
    cfg: SynthConfig, train_x: torch.Tensor | None, train_y: torch.Tensor, counts: list[int], epochs: int | None = None
) -> Synthesizer:
    """The registered synthesizer of ``cfg.name`` for this training set."""
    return SYNTHS.get(cfg.name).builder(cfg, train_x, train_y, counts, epochs)


SYNTHS.register("none", SynthConfig)(Synthesizer)


@SYNTHS.register("mixup", MixupConfig)
class Mixup(Synthesizer):
    """mixup (Zhang et al. 2018): x = lam x_i + (1 - lam) x_j, lam ~ Beta(alpha, alpha), both labels weighted."""

    kind = "mix"

    def mix(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Mixed:
        return mixup(x, y, self.cfg.alpha, gen)  # type: ignore[attr-defined]


@SYNTHS.register("remix", RemixConfig)
class Remix(Mixup):
    """Remix (Chou et al. 2020): mixup's inputs, the label of a pair given to its minority class (kappa, tau)."""

    def mix(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Mixed:
        m = super().mix(x, y, gen)
        c = self.cfg
        m.lam = remix_labels(m.lam, m.y_a, m.y_b, self.counts.to(y.device), c.kappa, c.tau)  # type: ignore[attr-defined]
        return m


class _Replacing(Synthesizer):
    """Options that replace the repeats of an over-sampled class on the raw uint8 pixels (tensor data only)."""

    kind = "replace"

    def __init__(self, cfg: SynthConfig, train_x: torch.Tensor | None, train_y: torch.Tensor, counts: list[int],
                 epochs: int | None = None) -> None:  # fmt: skip
        if train_x is None:
            raise ConfigError(
                f"synth={cfg.name} works on CIFAR-scale tensor data only (image files have no pixel array)"
            )
        super().__init__(cfg, train_x, train_y, counts, epochs)

    def replace(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, train_x: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(y)
        chosen = torch.rand(n, generator=gen, dtype=torch.float64) < self.replace_p[y.cpu()]
        synth, chosen = self.synthesize(x, idx, train_x, chosen, gen)
        synth = synth.round_().clamp_(0, 255).to(torch.uint8)
        mask = chosen.to(x.device)
        return torch.where(mask[:, None, None, None], synth, x), mask

    def synthesize(self, x: torch.Tensor, idx: torch.Tensor, train_x: torch.Tensor, chosen: torch.Tensor,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Float synthetic images for the whole batch, and the mask of those that may replace their original."""
        raise NotImplementedError


@SYNTHS.register("smote", SmoteConfig)
class Smote(_Replacing):
    """SMOTE (Chawla et al. 2002): x + u (x_nn - x), x_nn one of the k nearest same-class images (L2 on pixels)."""

    def __init__(self, cfg: SynthConfig, train_x: torch.Tensor | None, train_y: torch.Tensor, counts: list[int],
                 epochs: int | None = None) -> None:  # fmt: skip
        super().__init__(cfg, train_x, train_y, counts, epochs)
        assert train_x is not None
        self.neighbours = knn_within_class(train_x, train_y.cpu(), self.minority, cfg.k)  # type: ignore[attr-defined]

    def synthesize(self, x: torch.Tensor, idx: torch.Tensor, train_x: torch.Tensor, chosen: torch.Tensor,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        n = len(x)
        nb = self.neighbours[idx.cpu()]
        pick = nb[torch.arange(n), torch.randint(0, nb.shape[1], (n,), generator=gen)]
        chosen &= pick >= 0
        u = torch.rand(n, generator=gen).to(x.device)[:, None, None, None]
        partner = train_x[pick.clamp(min=0).to(train_x.device)].to(x.device).float()
        return x.float() + u * (partner - x.float()), chosen


@SYNTHS.register("noise", NoiseConfig)
class Noise(_Replacing):
    """Gaussian noise of ``sigma`` (on the [0, 1] pixel scale) added to the replaced images."""

    def synthesize(self, x: torch.Tensor, idx: torch.Tensor, train_x: torch.Tensor, chosen: torch.Tensor,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        noise = torch.randn(x.shape, generator=gen).to(x.device) * (self.cfg.sigma * 255.0)  # type: ignore[attr-defined]
        return x.float() + noise, chosen


@SYNTHS.register("manifold_mixup", ManifoldMixupConfig)
class ManifoldMixup(Synthesizer):
    """Manifold mixup (Verma et al. 2019): mixing hidden representations (:class:`ManifoldMix`)."""

    kind = "feature"

    def feature_edit(self, y: torch.Tensor, index: torch.Tensor | None, gen: torch.Generator) -> ManifoldMix:
        c = self.cfg
        return manifold_mix(len(y), c.alpha, c.layer, gen)  # type: ignore[attr-defined]


@SYNTHS.register("feature_smote", FeatureSmoteConfig)
class FeatureSmoteSynth(Synthesizer):
    """SMOTE on the features the head reads, from a bank of every oversampled image's latest feature."""

    kind = "feature"

    def __init__(self, cfg: SynthConfig, train_x: torch.Tensor | None, train_y: torch.Tensor, counts: list[int],
                 epochs: int | None = None) -> None:  # fmt: skip
        super().__init__(cfg, train_x, train_y, counts, epochs)
        self.bank = FeatureBank(self.train_y, self.minority, len(counts))

    def feature_edit(self, y: torch.Tensor, index: torch.Tensor | None, gen: torch.Generator) -> FeatureSmote:
        assert self.bank is not None
        if index is None:
            raise LtbenchError("synth=feature_smote needs the training indices of the batch")
        return FeatureSmote(self.bank, self.train_y[index.cpu()], index.cpu(), self.cfg, gen)  # type: ignore[arg-type]
