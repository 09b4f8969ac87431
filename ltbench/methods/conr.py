"""ConR (Keramati, Meng & Evans, ICLR 2024, "ConR: Contrastive Regularizer for Deep Imbalanced Regression"):
``method=conr``.

The loss of a step is ``L_run(head(f), y) + beta * L_ConR(f, y, p)`` with ``f = model.features(x)`` (the
reference's ``encoding``) and ``p`` the batch's predictions on the label scale, detached. ``L_run`` is the run's
loss through the stage's supervised method, its re-weighting (LDS included) with it.

The regulariser (``agedb-dir/loss.py::ConR`` of BorealisAI/ConR), for the N samples of the batch with normalised
features q, labels y, predictions p and sample weights w (the re-weighting's; 1 without one):

- positives of anchor i: ``P(i) = {j != i : |y_i - y_j| <= w_thr}`` (``window``); negatives:
  ``N(i) = {j : |y_i - y_j| > w_thr and |p_i - p_j| <= w_thr}`` (wrongly close in prediction);
- ``s_ij = q_i . q_j / temperature``; pushing weight of a negative ``w_i exp(e |y_i - y_j|)`` (``e``: pushing power);
- ``D_i = sum_j exp(s_ij [j in P(i)]) + sum_{j in N(i)} w_i exp(e |y_i - y_j|) exp(s_ij)``: the first sum runs over
  every j, so each non-positive j (i itself included) adds exp(0) = 1, exactly as the reference's
  ``torch.exp(pos).sum(1)`` on the masked product does;
- ``L_i = -1/|P(i)| sum_{p in P(i)} (s_ip - log D_i)``; ``L = mean_i w_i L_i [N(i) not empty]``.

Computed in the log domain, in float64 after the float32 similarities (logsumexp; the reference exponentiates in
float32: the same numbers where that does not overflow, to float32 precision). An anchor without positives has
``L_i = 0`` (the reference divides 0 by 0: NaN; with its two views every anchor has its other view as a positive,
so it never happens there).

Views (``views=2``, the reference's training loop): every sample gets three views, made on the device from the raw
batch (``inputs = "raw"``) with the run's training augmentation: view 0 for the run's loss, views 1 and 2 for ConR
(on their 2B features and 2B detached predictions, labels and weights repeated, as the reference's
``torch.cat((imgs_c[0], imgs_c[1]))``). On AgeDB-DIR / IMDB-WIKI-DIR the augmentation is DIR's (RandomCrop with
16-pixel zero padding, flip: the reference's ``reg_aug`` applied three times); feature vectors have no augmentation,
so their views are copies. The 3B views go through the network as one batch (BatchNorm sees all of them; the
reference makes two forwards, B and 2B). ``views=1``: ConR on view 0's features and predictions only (one forward;
anchors without a label neighbour within ``window`` then have no positive and do not pull).

Settings (the reference's AgeDB command, ``train.py --conr -w 1.0 --beta 4.0 -e 0.01``): ``window`` 1 (in label
units: years on AgeDB), ``beta`` 4, ``e`` 0.01, ``temperature`` 0.07: ``ConR`` overrides its ``t`` argument with
0.07 on its first line, so the ``-t 0.2`` of ``agedb-dir/README.md`` and of its argparse never takes effect.

With FDS (``method=conr_fds``: the ``method.fds`` section, FDS's settings as ``method=fds`` has them, each
overridable as ``method.fds.ks=9``; null in ``method=conr``), as the reference's ``train.py --fds`` does: view 0's
features are calibrated by FDS before the head (from ``start_smooth`` on) and feed FDS's statistics (uncalibrated);
the ConR views are not calibrated (the reference's ``model(imgs_c, ..., reg=False)`` skips ``FDS.smooth``), so ConR
contrasts their raw features and its predictions come from them. With ``views=1`` (no reference), ConR takes view
0's calibrated features and the predictions made from them. Synthesis (``synth=``) is refused, as mixed samples have
no single label.
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
from ltbench.methods import METHODS, Method
from ltbench.methods.dir import FDSConfig
from ltbench.methods.ranksim import FeatureRegularizer, check_feature_regularizer

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


def conr_loss(
    features: Tensor,
    y: Tensor,
    preds: Tensor,
    weights: Tensor | None = None,
    window: float = 1.0,
    temperature: float = 0.07,
    e: float = 0.01,
) -> Tensor:
    """ConR on N samples: ``features`` N x D, ``y`` and ``preds`` (detached, label scale) N values each,
    ``weights`` N per-sample weights (None: 1). See the module docstring for the formula."""
    q = F.normalize(features.reshape(len(features), -1).float(), dim=1)
    yy, pp = y.reshape(-1).double(), preds.detach().reshape(-1).double()
    w = torch.ones_like(yy) if weights is None else weights.reshape(-1).double()
    l_dist = (yy[:, None] - yy[None, :]).abs()
    near = l_dist <= window
    pos = near & ~torch.eye(len(yy), dtype=torch.bool, device=yy.device)
    neg = ~near & ((pp[:, None] - pp[None, :]).abs() <= window)
    s = (q @ q.T).double() / temperature  # float64 from here: L_i is a small difference of terms near 1 / t
    pos_terms = s * pos  # non-positive entries are 0: exp(0) = 1 each in D_i, as the reference
    neg_terms = (w.log()[:, None] + e * l_dist + s).masked_fill(~neg, float("-inf"))
    log_d = torch.logsumexp(torch.cat([pos_terms, neg_terms], dim=1), dim=1)
    n_pos = pos.sum(1)
    per_anchor = -((s - log_d[:, None]) * pos).sum(1) / n_pos.clamp(min=1)
    return (w * per_anchor * neg.any(1)).mean().float()


def dir_view(x: Tensor, gen: torch.Generator, mean: Any, std: Any) -> Tensor:
    """DIR's training view of a resized uint8 batch (``ltbench.data.agedb.dir_transforms``: RandomCrop(padding 16),
    horizontal flip, normalise), batched on the device."""
    from ltbench.data.augment import normalize, random_crop, random_flip

    return normalize(random_flip(random_crop(x, 16, gen), gen), mean, std)


@dataclass
class ConRConfig(MethodConfig):
    name: str = "conr"
    beta: float = 4.0  # weight of the regulariser (--beta)
    window: float = 1.0  # label / prediction distance threshold, in label units (-w)
    temperature: float = 0.07  # the value the reference's ConR() uses (it overrides its t argument)
    e: float = 0.01  # pushing power: negatives weighted by exp(e |y_i - y_j|) (-e)
    views: int = 2  # 2: ConR on two more views of every sample (the reference); 1: on the regression view
    # FDS between the features and the head of the regression view (method=conr_fds fills it); null: no FDS
    fds: FDSConfig | None = added(None)

    def __post_init__(self) -> None:
        ok = self.beta >= 0 and self.window >= 0 and self.temperature > 0 and self.e >= 0
        if not ok or self.views not in (1, 2):
            raise ConfigError("method=conr: beta, window and e must be >= 0, temperature > 0 and views 1 or 2")

    tasks = ("regression",)  # it contrasts by label distance
    reads = ("images", "features")  # it makes its views of stored images or feature vectors

    def check(self, root: Any) -> None:
        check_feature_regularizer(self, root)


@METHODS.register("conr", ConRConfig)
class ConR(FeatureRegularizer):
    """The run's loss on view 0 plus ``beta`` x ConR on views 1 and 2 (``views=2``) or on view 0 (``views=1``), on
    top of the stage's supervised method; the views go through the network in one batch."""

    inputs = "raw"  # the feed hands over the stored samples; the method makes and normalises its views

    def __init__(self, cfg: ConRConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__(cfg, ctx, model, base, "method=conr")
        self.center, self.scale = float(ctx.stats.center), float(ctx.stats.scale)
        self.kind, self.mean, self.std = ctx.data.kind, ctx.data.mean, ctx.data.std
        self.dir_files = ctx.data.kind == "files" and ctx.data.transforms is not None  # AgeDB-DIR, IMDB-WIKI-DIR
        self.augment, self.size = ctx.cfg.augment, getattr(ctx.cfg.dataset, "image_size", None)

    def view(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """One training view of the raw batch, as the feed makes it: feature vectors as they are; DIR's image files
        with DIR's transform; other image files with the feed's RandomResizedCrop view; tensor images with the run's
        ``augment`` (crop, flip, ..., normalise, Cutout)."""
        from ltbench.data.augment import augment_batch, cutout, normalize
        from ltbench.data.views import normalize01
        from ltbench.methods.contrastive import files_view

        if self.kind == "features":
            return x
        if self.dir_files:
            return dir_view(x, gen, self.mean, self.std)
        if self.kind == "files":
            return normalize01(files_view(x, gen, int(self.size or x.shape[-1])), self.mean, self.std)
        v = normalize(augment_batch(x, self.augment, gen), self.mean, self.std)
        return cutout(v, self.augment.cutout, gen) if self.augment.cutout else v

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[Tensor, dict[str, Tensor]]:
        base, cfg, y, n = self.base, self.cfg, batch.y, len(batch)
        views = [self.view(batch.x, ep.gen) for _ in range(1 if cfg.views == 1 else 3)]
        bins, smooth = self.fds_bins(y, ep)  # FDS calibrates view 0 only (the first n samples)
        with autocast(batch.x.device, ep.amp):
            out, feats, head_feats = net(torch.cat(views) if len(views) > 1 else views[0], smooth)
        self.fds_observe(feats, bins, ep)
        loss = base.loss_fn(out[:n], y, base.weight)  # type: ignore[attr-defined]
        w = base.loss_fn.sample_weights(y, base.weight)  # type: ignore[attr-defined]
        c_out, c_feats = (out, head_feats) if cfg.views == 1 else (out[n:], feats[n:])
        k = len(c_out) // n
        preds = c_out.detach().reshape(len(c_out), -1)[:, 0].float() * self.scale + self.center  # the label scale
        reg = conr_loss(c_feats, y.repeat(k), preds, None if w is None else w.repeat(k), cfg.window, cfg.temperature,
                        cfg.e)  # fmt: skip
        sums = base.task.step_sums(out[:n], y)  # type: ignore[attr-defined]
        return loss + cfg.beta * reg, {**sums, "mean_conr": reg.detach().double() * n}
