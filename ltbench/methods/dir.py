"""Deep imbalanced regression (Yang et al. 2021, "Delving into Deep Imbalanced Regression"): label and feature
distribution smoothing.

- ``reweight=sqinv`` / ``reweight=inv`` (with ``reweight.lds=true``: LDS): per-bin weights from the (smoothed) label
  density, as ``_prepare_weights`` of YyzHarry/imbalanced-regression: the training counts per bin are square-rooted
  (``sqinv``) or clipped to ``clip`` (``inv``; the AgeDB code clips to [5, 1000]), convolved with a symmetric kernel
  (LDS) with zero padding, inverted, and scaled so that the mean weight over the training samples is 1. The ``inv``
  counts are integers there, and ``scipy.ndimage.convolve1d`` returns the input's dtype: the smoothed counts are
  truncated to integers (``lds_truncate=true``, the default; ``false`` keeps them in float, ltbench's earlier
  variant, which a smoothing meant as a density estimate arguably wants). The square-rooted ``sqinv`` counts are
  floats in the reference, so nothing is truncated there.
- ``method=fds``: FDS. Per label bin, a running mean and variance (per feature dimension) of the features the
  regressor reads, updated at the end of every epoch with momentum; smoothed across bins with the same kind of kernel
  (normalised to sum 1, reflect padding); from ``start_smooth`` on, training features are re-calibrated:
  ``(z - mu_b) * sqrt(clamp(var~_b / var_b, clip)) + mu~_b``. Evaluation uses the features as they are. The
  statistics are kept for the buckets ``bucket_start .. bucket_num - 1`` of the dataset's label bins: bins below
  are pooled into the first, bins above into the last (the reference's ``bucket_start=3, bucket_num=100`` on AgeDB:
  ages <= 3 in bucket 3, >= 99 in bucket 99).

Settings left null take the reference's value for the dataset at compose time (``check``), so the record and the
run's hash carry the value used (:data:`REFERENCE`): ``reweight.clip`` ([5, 1000] on AgeDB-DIR / IMDB-WIKI-DIR,
none on STS-B-DIR, whose ``tasks.py`` does not clip), ``method.clip`` ([0.1, 10]; STS-B-DIR's ``util.py``: [0.5, 2])
and ``method.bucket_start`` / ``bucket_num`` (AgeDB-DIR: 3 / 100; IMDB-WIKI-DIR: 0 / 100; else all the bins).

Where ltbench's FDS differs from the reference code, on purpose: the statistics are those of the epoch's own
(uncalibrated) features, accumulated on the device during the epoch (the reference makes a second pass over the
training set and, because it calibrates in place, measures already-calibrated features); the previous epoch's
statistics are a copy (the reference's ``running_mean_last_epoch = running_mean`` makes them the same tensor); bins
without samples are filled from their neighbours before smoothing (as the reference's STS-B code does; its AgeDB
code leaves them at mean 0 and variance 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import ReweightConfig
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.methods import METHODS, Method, MethodConfig
from ltbench.reweight import REWEIGHTS

if TYPE_CHECKING:
    from ltbench.contracts import StageContext

KERNELS = ("gaussian", "triang", "laplace")


def gaussian_of_delta(ks: int, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d`` of a length-``ks`` delta (mode 'reflect', truncate 4), as the reference
    builds its Gaussian window: the sampled Gaussian, normalised to sum 1, folded back at the borders."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    out = np.zeros(ks)
    center = (ks - 1) // 2
    for i in range(ks):
        for k, w in enumerate(g):
            j = (i + k - radius) % (2 * ks)  # reflect: ... c b a | a b c ... c | c b a ...
            if j >= ks:
                j = 2 * ks - 1 - j
            if j == center:
                out[i] += w
    return out


def kernel_shape(kernel: str, ks: int, sigma: float) -> np.ndarray:
    """The unnormalised window of length ``ks`` (odd): gaussian, triangular or Laplace."""
    half = (ks - 1) // 2
    if kernel == "gaussian":
        return gaussian_of_delta(ks, sigma)
    if kernel == "triang":  # scipy.signal.windows.triang for odd ks
        return 1.0 - np.abs(np.arange(ks) - half) / ((ks + 1) / 2)
    return np.exp(-np.abs(np.arange(-half, half + 1)) / sigma) / (2 * sigma)  # laplace


def lds_window(kernel: str, ks: int, sigma: float) -> np.ndarray:
    """The LDS window: normalised so its peak is 1 (``get_lds_kernel_window`` of the reference)."""
    w = kernel_shape(kernel, ks, sigma)
    return w / w.max()


def fds_window(kernel: str, ks: int, sigma: float) -> np.ndarray:
    """The FDS window: normalised to sum 1 (``FDS._get_kernel_window`` of the reference)."""
    w = kernel_shape(kernel, ks, sigma)
    return w / w.sum()


# The DIR reference's per-dataset settings (YyzHarry/imbalanced-regression): inverse-weight clip (agedb-dir and
# imdb-wiki-dir datasets.py _prepare_weights; sts-b-dir tasks.py: none), FDS variance-ratio clip (utils.py
# calibrate_mean_var: [0.1, 10]; sts-b-dir util.py: [0.5, 2]) and FDS buckets (train.py --bucket_start/--bucket_num:
# 3 / 100 for AgeDB, 0 / 100 for IMDB-WIKI; sts-b-dir: 0 / 50, all its bins). Other datasets: no weight clip, FDS
# clip [0.1, 10], every bin a bucket.
REFERENCE: dict[str, dict[str, Any]] = {
    "agedb_dir": {"inv_clip": [5.0, 1000.0], "fds_clip": [0.1, 10.0], "buckets": (3, 100)},
    "imdbwiki_dir": {"inv_clip": [5.0, 1000.0], "fds_clip": [0.1, 10.0], "buckets": (0, 100)},
    "stsb_dir": {"inv_clip": None, "fds_clip": [0.5, 2.0], "buckets": (0, None)},
}
_OTHER: dict[str, Any] = {"inv_clip": None, "fds_clip": [0.1, 10.0], "buckets": (0, None)}


def reference_setting(dataset: str, key: str) -> Any:
    """The DIR reference's ``key`` for ``dataset`` (see :data:`REFERENCE`)."""
    return REFERENCE.get(dataset, _OTHER)[key]


def _check_kernel(kernel: str, ks: int, sigma: float, what: str) -> None:
    if kernel not in KERNELS or ks < 1 or ks % 2 == 0 or not sigma > 0:
        raise ConfigError(f"{what}: kernel must be one of {KERNELS}, ks an odd number >= 1 and sigma > 0")


# ------------------------------------------------------------------------------------------------ LDS weights


@dataclass
class DensityConfig(ReweightConfig):
    """sqinv / inv: weights 1 / (the smoothed) density of the label bins; ``lds``: smooth it (LDS)."""

    name: str = "sqinv"
    lds: bool = False
    kernel: str = "gaussian"
    ks: int = 5
    sigma: float = 2.0
    # inv: counts clipped to [lo, hi] before smoothing; null: the reference's for the dataset (AgeDB: [5, 1000])
    clip: list[float] | None = None
    lds_truncate: bool = True  # inv + lds: smoothed counts truncated to integers, as the reference; false: float

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_kernel(self.kernel, self.ks, self.sigma, "reweight")
        if self.clip is not None and (len(self.clip) != 2 or self.clip[0] > self.clip[1]):
            raise ConfigError("reweight.clip is [low, high] (or null)")

    tasks = ("regression",)  # it weights regression label bins
    hint = "for classes use reweight=inverse or sqrt_inverse"

    def check(self, root: Any) -> None:
        if self.clip is None and self.name == "inv":  # resolved once: a saved config keeps the value used
            self.clip = reference_setting(root.dataset.name, "inv_clip")


def density_weights(cfg: DensityConfig, counts: torch.Tensor) -> torch.Tensor:
    """Per-bin weights, scaled so that the mean over the training samples is 1."""
    v = counts.double().numpy()
    v = np.sqrt(v) if cfg.name == "sqinv" else (np.clip(v, *cfg.clip) if cfg.clip is not None else v)
    if cfg.lds:  # scipy.ndimage.convolve1d(mode="constant"): zero padding; the window is symmetric
        v = np.convolve(v, lds_window(cfg.kernel, cfg.ks, cfg.sigma), mode="same")
        if cfg.name == "inv" and cfg.lds_truncate:  # convolve1d of integer counts returns integers (C cast)
            v = np.trunc(v)
    w = np.where(v > 0, 1.0 / np.where(v > 0, v, 1.0), 0.0)  # bins without density have no sample to weigh
    n = counts.double().numpy()
    w *= n.sum() / max((n * w).sum(), 1e-12)
    return torch.as_tensor(w, dtype=torch.float32)


for _name in ("sqinv", "inv"):
    REWEIGHTS.register(_name, DensityConfig)(density_weights)


# ------------------------------------------------------------------------------------------------ FDS


@dataclass
class FDSConfig(MethodConfig):
    name: str = "fds"
    kernel: str = "gaussian"
    ks: int = 5
    sigma: float = 2.0
    momentum: float = 0.9  # weight of the history in the running statistics
    start_update: int = 0  # first epoch (0-indexed) whose features update the statistics
    start_smooth: int = 1  # first epoch whose training features are calibrated
    # variance-ratio clip; null: the reference's for the dataset ([0.1, 10]; STS-B-DIR: [0.5, 2])
    clip: list[float] | None = None
    # the label bins that have statistics: bucket_start .. bucket_num - 1, bins outside pooled into the end buckets;
    # null: the reference's for the dataset (AgeDB-DIR: 3 / 100; IMDB-WIKI-DIR: 0 / 100; else 0 / all the bins)
    bucket_start: int | None = None
    bucket_num: int | None = None

    def __post_init__(self) -> None:
        _check_kernel(self.kernel, self.ks, self.sigma, "method")
        bad_clip = self.clip is not None and (len(self.clip) != 2 or not 0 < self.clip[0] <= self.clip[1])
        if not 0 <= self.momentum < 1 or bad_clip:
            raise ConfigError("method.momentum must be in [0, 1) and method.clip [low, high] with 0 < low <= high")
        start = self.bucket_start or 0
        if start < 0 or (self.bucket_num is not None and self.bucket_num <= start):
            raise ConfigError("method.bucket_start must be >= 0 and method.bucket_num > bucket_start (or null)")

    def resolve(self, dataset: str, num_bins: int) -> None:
        """Fill the null settings with the reference's for ``dataset`` (idempotent)."""
        if self.clip is None:
            self.clip = list(reference_setting(dataset, "fds_clip"))
        start, num = reference_setting(dataset, "buckets")
        if self.bucket_start is None:
            self.bucket_start = start
        if self.bucket_num is None:
            self.bucket_num = num if num is not None else num_bins
        if self.bucket_num <= self.bucket_start:
            raise ConfigError(f"method.bucket_num ({self.bucket_num}) must be > method.bucket_start "
                              f"({self.bucket_start})")  # fmt: skip

    tasks = ("regression",)  # it smooths features over regression label bins

    def check(self, root: Any) -> None:
        self.resolve(root.dataset.name, int(getattr(root.dataset, "num_bins", 0) or 0))
        if root.synth.name != "none":  # its step calibrates the features of the batch as it is: no mixed batches
            raise ConfigError(f"method=fds does not combine with synth={root.synth.name}")


class FDS(nn.Module):
    """Per-bin feature statistics and the calibration of features with them (buffers: checkpointed, resumable)."""

    def __init__(self, cfg: FDSConfig, feature_dim: int, num_bins: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.as_tensor(fds_window(cfg.kernel, cfg.ks, cfg.sigma), dtype=torch.float32))
        for name, fill in (("running_mean", 0.0), ("running_var", 1.0), ("smoothed_mean", 0.0), ("smoothed_var", 1.0)):
            self.register_buffer(name, torch.full((num_bins, feature_dim), fill))
        self.register_buffer("seen_bins", torch.zeros(num_bins, dtype=torch.bool))  # bins that ever had a sample
        self.reset_sums()

    def reset_sums(self) -> None:
        self._n: torch.Tensor | None = None
        self._s: torch.Tensor | None = None
        self._ss: torch.Tensor | None = None

    def accumulate(self, features: torch.Tensor, bins: torch.Tensor) -> None:
        """Add a batch's features to the epoch's per-bin sums (float64, on the device: no host sync)."""
        f = features.detach().double()
        nb = self.running_mean.shape[0]
        if self._n is None:
            self._n = torch.zeros(nb, dtype=torch.float64, device=f.device)
            self._s = torch.zeros(nb, f.shape[1], dtype=torch.float64, device=f.device)
            self._ss = torch.zeros_like(self._s)
        self._n.index_add_(0, bins, torch.ones(len(bins), dtype=torch.float64, device=f.device))
        self._s.index_add_(0, bins, f)  # type: ignore[union-attr]
        self._ss.index_add_(0, bins, f * f)  # type: ignore[union-attr]

    def update(self, first: bool) -> None:
        """End of an epoch: fold its statistics into the running ones (the first update replaces them), then
        smooth across bins."""
        if self._n is None:
            return
        n, s, ss = self._n, self._s, self._ss
        seen = n > 0
        mean = s / n.clamp(min=1)[:, None]
        var = (ss - n[:, None] * mean * mean) / (n - 1).clamp(min=1)[:, None]  # unbiased where n > 1
        factor = 0.0 if first else self.cfg.momentum
        rm, rv = self.running_mean, self.running_var
        rm[seen] = ((1 - factor) * mean[seen] + factor * rm[seen].double()).float()
        rv[seen] = ((1 - factor) * var[seen].clamp(min=0) + factor * rv[seen].double()).float()
        self.seen_bins |= seen
        self.smoothed_mean.copy_(self._smooth(_fill_empty(rm, self.seen_bins)))
        self.smoothed_var.copy_(self._smooth(_fill_empty(rv, self.seen_bins)))
        self.reset_sums()

    def _smooth(self, stats: torch.Tensor) -> torch.Tensor:
        half = (self.cfg.ks - 1) // 2
        x = stats.T[:, None, :]  # D x 1 x bins: every feature dimension smoothed across bins
        if half:
            x = F.pad(x, (half, half), mode="reflect" if stats.shape[0] > half else "replicate")
        return F.conv1d(x, self.window.view(1, 1, -1)).squeeze(1).T

    def calibrate(self, features: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """(z - mu_b) * sqrt(clamp(var~_b / var_b)) + mu~_b per dimension where var_b > 0; z elsewhere."""
        m1, v1 = self.running_mean[bins], self.running_var[bins]
        m2, v2 = self.smoothed_mean[bins], self.smoothed_var[bins]
        ratio = (v2 / v1.clamp(min=1e-12)).clamp(*(self.cfg.clip or reference_setting("", "fds_clip")))
        out = (features.float() - m1) * ratio.sqrt() + m2
        return torch.where(v1 > 0, out, features.float()).to(features.dtype)


def _fill_empty(stats: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """Bins that never had a sample take the values of their nearest filled neighbours (linear between two)."""
    idx = torch.nonzero(filled).flatten()
    if len(idx) == 0 or bool(filled.all()):
        return stats
    pos = torch.arange(len(filled), device=stats.device)
    right = torch.searchsorted(idx, pos).clamp(max=len(idx) - 1)
    left = (right - 1).clamp(min=0)
    use_left = (idx[right] > pos) & (right > 0)
    lo, hi = torch.where(use_left, idx[left], idx[right]), idx[right]
    t = ((pos - lo) / (hi - lo).clamp(min=1)).clamp(0, 1)[:, None].to(stats.dtype)
    return torch.where(filled[:, None], stats, stats[lo] * (1 - t) + stats[hi] * t)


def bucket_map(bin_of: Any, start: int, num: int) -> Any:
    """target -> FDS bucket index: the label bin clamped into ``start .. num - 1``, counted from ``start`` (the
    reference's ``labels <= bucket_start`` / ``labels >= bucket_num - 1`` pooling, agedb-dir/fds.py)."""

    def of(y: torch.Tensor) -> torch.Tensor:
        return bin_of(y).clamp(start, num - 1) - start

    return of


class FDSNet(nn.Module):
    """The model with FDS between its features and its head: ``forward(x, bins, smooth)`` -> (outputs, features)."""

    def __init__(self, model: nn.Module, fds: FDS) -> None:
        super().__init__()
        self.model, self.fds = model, fds

    def forward(self, x: torch.Tensor, bins: torch.Tensor | None = None, smooth: bool = False):
        f = self.model.features(x)
        g = self.fds.calibrate(f, bins) if smooth and bins is not None else f
        return self.model.head(g), f


def build_fds(cfg: FDSConfig, ctx: StageContext, model: nn.Module) -> tuple[FDS, Any]:
    """The FDS statistics of a stage and its target -> bucket map: ``method=fds``'s, and ``method.fds`` of
    ``method=ranksim_fds`` / ``conr_fds`` (a method that keeps the FDS as its attribute ``fds`` checkpoints it)."""
    cfg.resolve(str(getattr(ctx.data, "name", "")), ctx.stats.num_bins)  # already resolved when composed
    start, num = int(cfg.bucket_start or 0), int(cfg.bucket_num or 1)
    return FDS(cfg, model.feature_dim, num - start), bucket_map(ctx.stats.bin_of, start, num)


@METHODS.register("fds", FDSConfig)
class FDSMethod(Method):
    """FDS on top of the supervised method of the stage (its loss, re-weighting and synthesis)."""

    def __init__(self, cfg: FDSConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__()
        self.cfg, self.base = cfg, base
        self.fds, self.bin_of = build_fds(cfg, ctx, model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return FDSNet(model, self.fds)

    def on_epoch_start(self, ep: Epoch) -> None:
        self.base.on_epoch_start(ep)
        self.fds.reset_sums()

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bins = self.bin_of(batch.y)
        with autocast(batch.x.device, ep.amp):
            out, feats = net(batch.x, bins, ep.index >= self.cfg.start_smooth)
        if ep.index >= self.cfg.start_update:
            self.fds.accumulate(feats, bins)
        loss = self.base.loss_fn(out, batch.y, self.base.weight)  # type: ignore[attr-defined]
        return loss, self.base.task.step_sums(out, batch.y)  # type: ignore[attr-defined]

    def on_epoch_end(self, ep: Epoch) -> None:
        if ep.index >= self.cfg.start_update:
            self.fds.update(first=ep.index == self.cfg.start_update)

    def param_groups(self):
        return self.base.param_groups()

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        return {**self.base.row_extras(ep), "fds_smooth": ep.index >= self.cfg.start_smooth}

    def summary(self) -> dict[str, Any]:
        return {"fds": {"bins_with_statistics": int(self.fds.seen_bins.sum())}}
