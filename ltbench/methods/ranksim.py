"""RankSim (Gong, Mori & Tung, ICML 2022, "RankSim: Ranking Similarity Regularization for Deep Imbalanced
Regression"): ``method=ranksim``.

The loss of a step is ``L_run(head(f), y) + gamma * L_RankSim(f, y)`` with ``f = model.features(x)``, the features
the regressor reads (the reference's ``encoding``: before FDS and dropout). ``L_run`` is the run's loss through the
stage's supervised method, its re-weighting (LDS included) with it, so ``reweight=sqinv reweight.lds=true
method=ranksim`` is the paper's "SQINV + LDS + RankSim".

The regulariser (``agedb-dir/ranksim.py::batchwise_ranking_regularizer`` of BorealisAI/ranksim-imbalanced-regression):

1. the batch is reduced to one sample per distinct label, drawn uniformly among that label's samples (the reference
   draws with Python's ``random.choice``; here from the epoch's stream ``ep.gen``), ordered by label; a batch whose
   labels are all distinct is used as it is;
2. ``S = normalize(f) normalize(f)^T`` (cosine similarities of the M kept samples);
3. for every row i: label ranks ``rank(-|y_i - y_j|)`` and feature ranks ``rank(S_ij)`` over j, where
   ``rank(s)_j = (position of s_j in descending order + 1) / M`` (``ranking.py::rank_normalised``);
4. ``L = sum_i mean_j (rank(S_i)_j - rank(-|y_i - y|)_j)^2``: a sum over the rows, not a mean (the reference's
   ``loss += F.mse_loss(...)``), so the term grows with the number of distinct labels in a batch.

The feature ranks are differentiated as a blackbox (Vlastelica et al., ICLR 2020; ``ranking.py::TrueRanker``): for
an incoming gradient g, ``d rank / d s = -(rank(s) - rank(s + lambda g)) / (lambda + 1e-8)`` with ``lambda`` =
``interpolation_lambda``. Ties (equal label distances on both sides of y_i) are broken by position: of tied
entries the later one ranks first, which is what the reference's ``argsort(argsort(s).flip(1))`` gives when its
sort is stable (CPU); its unstable CUDA sort may break them otherwise. A batch with a single distinct label has
M = 1 and a zero term.

Settings: ``gamma`` 100 and ``interpolation_lambda`` 2 (the README commands of every dataset of the reference;
its ``train.py`` defaults are 0 and 1). The reference trains AgeDB-DIR with batch 64 and lr 2.5e-4 for RankSim.

With FDS (``method=ranksim_fds``: the ``method.fds`` section, FDS's settings as ``method=fds`` has them, every one
overridable as ``method.fds.ks=9``; null in ``method=ranksim``): the features go through FDS's calibration before the
head (:class:`ltbench.methods.dir.FDS`: per-bucket statistics of the epoch's uncalibrated features, from
``start_smooth`` on the training features re-calibrated), and RankSim regularises the calibrated features the head
reads. That is the reference's semantics: its ``FDS.smooth`` (``agedb-dir/resnet.py``) writes the calibrated values
into the ``encoding`` tensor in place, so the ``encoding`` that ``forward`` returns to the regulariser is the
calibrated one from ``start_smooth`` on (the raw one before). FDS's statistics are buffers of this method and of the
trained network: checkpointed, a resumed run is identical. Synthesis (``synth=``) is refused, as its mixed batches
have no single label per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltbench.config import MethodConfig, added
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.methods import METHODS, Extension, Method
from ltbench.methods.dir import FDS, FDSConfig, build_fds

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


def normalized_rank(s: Tensor) -> Tensor:
    """Row-wise ``(position in descending order + 1) / n`` (1/n: the largest entry); ties: the later entry first."""
    n = s.shape[1]
    ascending = torch.argsort(s, dim=1, stable=True)
    pos = torch.empty_like(ascending)
    pos.scatter_(1, ascending, torch.arange(n, device=s.device).expand_as(ascending).contiguous())
    return (n - pos).to(s.dtype) / n  # (n - 1 - ascending position) + 1


class BlackboxRank(torch.autograd.Function):
    """Normalised ranks with the blackbox gradient ``-(rank(s) - rank(s + lambda g)) / (lambda + 1e-8)``."""

    @staticmethod
    def forward(ctx: Any, s: Tensor, lam: float) -> Tensor:
        r = normalized_rank(s)
        ctx.lam = lam
        ctx.save_for_backward(s, r)
        return r

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        s, r = ctx.saved_tensors
        return (normalized_rank(s + ctx.lam * grad) - r) / (ctx.lam + 1e-8), None


def unique_label_subset(y: Tensor, gen: torch.Generator) -> Tensor:
    """Indices of one sample per distinct label of ``y`` (uniform among that label's samples, from ``gen``, CPU),
    ordered by label; ``arange(len(y))`` when the labels are all distinct (no draw is made then)."""
    values, inverse = torch.unique(y.flatten(), return_inverse=True)
    if len(values) == len(y):
        return torch.arange(len(y), device=y.device)
    keys = torch.randperm(len(y), generator=gen).to(y.device)  # distinct keys: the smallest per label wins
    least = torch.full((len(values),), len(y), dtype=keys.dtype, device=y.device)
    least = least.scatter_reduce(0, inverse, keys, reduce="amin")
    chosen = torch.nonzero(keys == least[inverse]).flatten()
    return chosen[torch.argsort(inverse[chosen])]


def ranksim_loss(features: Tensor, y: Tensor, lam: float) -> Tensor:
    """``sum_i mean_j (rank(S_i)_j - rank(-|y_i - y|)_j)^2`` over the given samples (no de-duplication here);
    ``features``: M x D (flattened), ``y``: M labels (any shape with M elements)."""
    z = F.normalize(features.reshape(len(features), -1).float(), dim=1)
    sim = z @ z.T
    yy = y.reshape(-1).float()
    label_ranks = normalized_rank(-(yy[:, None] - yy[None, :]).abs())
    feature_ranks = BlackboxRank.apply(sim, lam)
    return ((feature_ranks - label_ranks) ** 2).mean(1).sum()


def batch_ranksim(features: Tensor, y: Tensor, lam: float, gen: torch.Generator) -> Tensor:
    """The reference's batchwise regulariser: :func:`ranksim_loss` on :func:`unique_label_subset` of the batch."""
    keep = unique_label_subset(y, gen)
    return ranksim_loss(features[keep], y.reshape(-1)[keep], lam)


@dataclass
class RankSimConfig(MethodConfig):
    name: str = "ranksim"
    gamma: float = 100.0  # weight of the regulariser (the reference's --regularization_weight)
    interpolation_lambda: float = 2.0  # blackbox interpolation strength (the reference's --interpolation_lambda)
    # FDS between the features and the head (method=ranksim_fds fills it with FDS's settings); null: no FDS
    fds: FDSConfig | None = added(None)

    def __post_init__(self) -> None:
        if not self.gamma >= 0 or not self.interpolation_lambda > 0:
            raise ConfigError("method=ranksim: gamma must be >= 0 and interpolation_lambda > 0")

    tasks = ("regression",)  # it ranks by label distance

    def check(self, root: Any) -> None:
        check_feature_regularizer(self, root)


def check_feature_regularizer(cfg: Any, root: Any) -> None:
    """RankSim's and ConR's cross-section rules: no synthesis, no semi-supervised method; ``cfg.fds`` resolved to the
    DIR reference's settings for the dataset (FDS's own check)."""
    if root.synth.name != "none":  # mixed or synthetic samples have no single label to rank or contrast by
        raise ConfigError(f"method={cfg.name} does not combine with synth={root.synth.name}")
    if getattr(root, "semi", None) is not None:
        raise ConfigError(f"method={cfg.name} does not combine with semi={root.semi.name}")
    if cfg.fds is not None:
        cfg.fds.check(root)


class FeatureNet(nn.Module):
    """The model as the stage trains it under a feature regulariser: ``forward(x, bins)`` -> (outputs, features,
    head features). ``features`` are the model's; with FDS (``fds``) and ``bins`` (the FDS buckets of the first
    ``len(bins)`` samples) those samples' features are calibrated before the head, the others' pass as they are;
    ``head features`` is what the head read (``features`` when nothing is calibrated)."""

    def __init__(self, model: nn.Module, fds: FDS | None = None) -> None:
        super().__init__()
        self.model = model
        if fds is not None:  # no FDS: no extra entries in the state dict (checkpoints of method=ranksim unchanged)
            self.fds = fds

    def forward(self, x: Tensor, bins: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        f = self.model.features(x)
        g = f
        if bins is not None:
            n = len(bins)
            g = self.fds.calibrate(f[:n], bins)
            g = torch.cat([g, f[n:]]) if n < len(f) else g
        return self.model.head(g), f, g


class FeatureRegularizer(Extension):
    """Base of RankSim and ConR: the stage's supervised method, the model as a :class:`FeatureNet` and, with
    ``cfg.fds``, FDS (the ``fds`` buffers, updated at the end of every epoch as ``method=fds`` does)."""

    def __init__(self, cfg: Any, ctx: StageContext, model: nn.Module, base: Method | None, what: str) -> None:
        super().__init__(base, what)
        self.cfg = cfg
        self.fds: FDS | None = None
        if cfg.fds is not None:
            self.fds, self.bin_of = build_fds(cfg.fds, ctx, model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return FeatureNet(model, self.fds)

    def fds_bins(self, y: Tensor, ep: Epoch) -> tuple[Tensor | None, Tensor | None]:
        """(the FDS buckets of ``y``, those buckets when this epoch calibrates): (None, None) without FDS."""
        if self.fds is None:
            return None, None
        bins = self.bin_of(y)
        return bins, bins if ep.index >= self.cfg.fds.start_smooth else None

    def fds_observe(self, feats: Tensor, bins: Tensor | None, ep: Epoch) -> None:
        """Add the (uncalibrated) features of the batch's samples to the epoch's FDS statistics."""
        if self.fds is not None and bins is not None and ep.index >= self.cfg.fds.start_update:
            self.fds.accumulate(feats[: len(bins)], bins)

    def on_epoch_start(self, ep: Epoch) -> None:
        super().on_epoch_start(ep)
        if self.fds is not None:
            self.fds.reset_sums()

    def on_epoch_end(self, ep: Epoch) -> None:
        if self.fds is not None and ep.index >= self.cfg.fds.start_update:
            self.fds.update(first=ep.index == self.cfg.fds.start_update)

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        extra = {"fds_smooth": ep.index >= self.cfg.fds.start_smooth} if self.fds is not None else {}
        return {**super().row_extras(ep), **extra}

    def summary(self) -> dict[str, Any]:
        return {"fds": {"bins_with_statistics": int(self.fds.seen_bins.sum())}} if self.fds is not None else {}


@METHODS.register("ranksim", RankSimConfig)
class RankSim(FeatureRegularizer):
    """The run's loss plus ``gamma`` x RankSim on the features the head reads, on top of the stage's supervised
    method (with FDS: the calibrated features, see the module docstring)."""

    def __init__(self, cfg: RankSimConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__(cfg, ctx, model, base, "method=ranksim")

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[Tensor, dict[str, Tensor]]:
        bins, smooth = self.fds_bins(batch.y, ep)
        with autocast(batch.x.device, ep.amp):
            out, feats, head_feats = net(batch.x, smooth)
        self.fds_observe(feats, bins, ep)
        loss = self.base.loss_fn(out, batch.y, self.base.weight)  # type: ignore[attr-defined]
        reg = batch_ranksim(head_feats, batch.y, self.cfg.interpolation_lambda, ep.gen)
        sums = self.base.task.step_sums(out, batch.y)  # type: ignore[attr-defined]
        return loss + self.cfg.gamma * reg, {**sums, "mean_ranksim": reg.detach().double() * len(batch)}
