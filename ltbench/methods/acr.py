"""ACR (Wei & Gan, CVPR 2023, "Towards Realistic Long-Tailed Semi-Supervised Learning: Consistency Is All You
Need"): adaptive consistency regularisation on FixMatch, ``semi=acr``.

Two heads on the shared features: the standard head (FixMatch's) and a balanced head, which classifies at test time
(on the EMA model). Per step, with the labeled prior ``py`` (the labeled set's class frequencies) and ``adj(t) =
log(py^t + 1e-12)``:

- labeled: the run's loss on the standard head, plus CE(balanced logits + adj(tau2)) on the balanced head;
- unlabeled, a weak view and two strong views: the standard head learns, on both strong views, the argmax of
  softmax(weak - adj(tau)) where it or the plain softmax(weak) is confident (>= ``threshold``); the balanced head
  learns the argmax of softmax(weak - adj(tau12)) where it or the balanced head's own softmax is confident;
- the adaptive tau: the unlabeled class distribution is estimated from the balanced head's confident pseudo-labels
  (an EMA with ``ema_u``); its symmetric KL distances to three anchors, the labeled prior ("consistent"), uniform and
  the reversed prior, are averaged over each period of ``period`` steps (ACR's "epoch" of ``eval_step`` 500 steps),
  and at the start of the next period tau = tau1 * softmax(KL)[consistent] (far from the consistent anchor: tau
  near tau1, the prior removed twice; close to it: tau near 0). Estimation starts after ``est_epoch`` periods.

``anchors=false`` is ACR-dagger of SimPro (Du et al., ICML 2024, Tables 1-2: "ACR without anchor distributions";
LeapLabTHU/SimPro ``ACR_d/train.py``): the standard head's pseudo-labels keep the fixed ``adj(tau1)`` for the whole
run (the reference computes the anchor-driven tau and discards it: ``adjustment_l1 = compute_adjustment_by_py(py_con,
tau1)``); everything else is ACR's, including the estimate of the unlabeled distribution (kept for the record, it
changes nothing). ``sh/ACR_d.sh`` runs it with ACR's defaults (mu 1, threshold 0.95, ema_u 0.99, lr 0.03, 250,000
steps, batch 64) on every dataset, CIFAR-100 included (where SimPro itself takes threshold 0.2).

``estimate``: ``counts`` (default) makes the batch's estimate the histogram of confident pseudo-labels (the paper);
``presence`` is what the reference code computes: ``now_mask[targets_u_b] += mask`` with repeated indices writes
each class once, so a class counts 1 if a confident pseudo-label names it (on CUDA, which duplicate wins is not
defined; here: any confident one).

Reference: Gank0078/ACR ``train.py`` (``main``: ``py_con``/``py_uni``/``py_rev``, the adjustments; ``train``: the
losses, ``now_mask``, ``count_KL``, the tau update); defaults from its README commands and ``sh/ACR_d.sh`` of
LeapLabTHU/SimPro (mu 1, threshold 0.95, ema_u 0.99, tau1 = tau12 = tau2 = 2, EMA 0.999, est-epoch 5). USB has no
ACR; the name is the paper's. Where ltbench differs: ``py`` is the labeled set's exact frequencies (the reference
counts one pass of its drop-last loader); the estimate and the KL sums are all-reduced under DDP; the state (u_py,
the KL sums, tau, the step count) is in buffers, so a run resumed mid-period is identical (the reference zeroes the
KL sums on resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ltbench.config import added
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.methods import SEMI
from ltbench.methods.semi import ABCNet, FixMatch, FixMatchConfig, mu_batch
from ltbench.methods.ssp import HeadNet

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


@dataclass
class ACRConfig(FixMatchConfig):
    name: str = "acr"
    mu: float = 1.0
    tau1: float = 2.0  # the largest adaptive tau (taumax); also the tau before the first update
    tau12: float = 2.0  # the balanced head's pseudo-label adjustment
    tau2: float = 2.0  # the balanced head's labeled logit adjustment
    ema_u: float = 0.99
    est_epoch: int = 5  # estimation in periods with index > est_epoch
    period: int = 500  # steps of ACR's "epoch" (eval_step): the tau update period
    estimate: str = "counts"  # counts | presence
    anchors: bool = added(True)  # false: ACR-dagger (SimPro's ACR_d), tau fixed at tau1

    @property  # type: ignore[override]
    def label_suffix(self) -> str:
        return "+FixMatch+ACR" if self.anchors else "+FixMatch+ACR-dagger"

    def check(self, root: Any) -> None:
        super().check(root)
        if self.estimate not in ("counts", "presence"):
            raise ConfigError(f"semi.estimate must be counts or presence, got {self.estimate!r}")
        if not (0 <= self.ema_u < 1 and self.period >= 1 and self.est_epoch >= 0 and self.tau1 >= 0):
            raise ConfigError("semi.ema_u in [0, 1), semi.period >= 1, semi.est_epoch >= 0 and semi.tau1 >= 0")


def adjustment(py: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """ACR's ``compute_adjustment_by_py``: log(py^tau + 1e-12)."""
    return torch.log(py**tau + 1e-12)


def sym_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 KL(q || p) + 0.5 KL(p || q) as the reference writes it with ``KLDivLoss(reduction="sum")``."""
    return 0.5 * F.kl_div(p.log(), q, reduction="sum") + 0.5 * F.kl_div(q.log(), p, reduction="sum")


def acr_pseudo(
    w: torch.Tensor, w_b: torch.Tensor, adj_1: torch.Tensor, adj_12: torch.Tensor, threshold: float
) -> dict[str, torch.Tensor]:
    """The targets and masks of a step from the weak view's logits of both heads (no gradient)."""
    conf, target = torch.softmax(w - adj_1, -1).max(-1)
    conf_h2, target_h2 = torch.softmax(w - adj_12, -1).max(-1)
    conf_b, target_b = torch.softmax(w_b, -1).max(-1)
    conf_t = torch.softmax(w, -1).max(-1).values
    return {
        "target": target,
        "mask": (conf >= threshold) | (conf_t >= threshold),  # mask_ss_t
        "target_h2": target_h2,
        "mask_h2": (conf_b >= threshold) | (conf_h2 >= threshold),  # mask_ss_b_h2
        "target_b": target_b,
        "mask_b": conf_b >= threshold,
    }


def acr_unlabeled_loss(strong: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked CE over the two strong views (``strong``: their logits, view 1 then view 2), the mean over both."""
    return (F.cross_entropy(strong, target.repeat(2), reduction="none") * mask.repeat(2).float()).mean()


def batch_estimate(target_b: torch.Tensor, mask_b: torch.Tensor, num_classes: int, how: str) -> torch.Tensor:
    """This batch's (unnormalised) class counts of confident balanced-head pseudo-labels."""
    counts = torch.bincount(target_b, weights=mask_b.float(), minlength=num_classes)
    return counts if how == "counts" else (counts > 0).float()


@SEMI.register("acr", ACRConfig)
class ACR(FixMatch):
    """FixMatch with a balanced head and adaptive, anchor-distribution-driven logit adjustment of pseudo-labels."""

    def add_modules(self, model: nn.Module, ctx: StageContext) -> None:
        k = ctx.data.num_classes
        self.balanced_head = nn.Linear(model.feature_dim, k)
        counts = torch.as_tensor(ctx.stats.counts, dtype=torch.float32)
        self.register_buffer("py_con", counts / counts.sum())
        self.register_buffer("u_py", torch.full((k,), 1.0 / k))
        self.register_buffer("count_kl", torch.zeros(3))
        self.register_buffer("tau", torch.tensor(float(self.cfg.tau1)))  # type: ignore[attr-defined]
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._t: int | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        return ABCNet(model, self.balanced_head)

    def unlabeled_batch(self, batch_size: int, num_labeled: int, num_unlabeled: int) -> int:
        return mu_batch(self.cfg.mu, batch_size)

    def anchors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        py = self.py_con
        return py, torch.full_like(py, 1.0 / len(py)), py.flip(0)

    def update_tau(self) -> None:
        """At a period's start (after ``est_epoch`` periods): tau from the previous period's mean KL distances."""
        cfg: ACRConfig = self.cfg  # type: ignore[assignment]
        kl = self.count_kl / cfg.period
        tau = cfg.tau1 * torch.exp(kl[0]) / torch.exp(kl).sum()  # taumin 0 + (taumax - taumin) * KL_softmax
        self.tau.copy_(torch.where(torch.isnan(tau), self.tau, tau))

    def estimate(self, target_b: torch.Tensor, mask_b: torch.Tensor) -> None:
        """The EMA of the unlabeled distribution and the period's KL sums (skipped when nothing is confident)."""
        cfg: ACRConfig = self.cfg  # type: ignore[assignment]
        now = batch_estimate(target_b, mask_b, len(self.u_py), cfg.estimate)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(now, op=dist.ReduceOp.SUM if cfg.estimate == "counts" else dist.ReduceOp.MAX)
        ok = now.sum() > 0
        u_py = cfg.ema_u * self.u_py + (1 - cfg.ema_u) * now / now.sum().clamp(min=1e-12)
        self.u_py.copy_(torch.where(ok, u_py, self.u_py))
        kl = torch.stack([sym_kl(a, self.u_py) for a in self.anchors()])
        self.count_kl.add_(torch.where(ok, kl, torch.zeros_like(kl)))

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg: ACRConfig = self.cfg  # type: ignore[assignment]
        assert batch.unlabeled is not None
        if self._t is None:
            self._t = int(self.steps)
        t, self._t = self._t, self._t + 1
        self.steps += 1
        period = t // cfg.period
        if t % cfg.period == 0:
            if period > cfg.est_epoch and cfg.anchors:  # ACR-dagger: tau stays tau1
                self.update_tau()
            self.count_kl.zero_()
        self._net[:] = [net]
        weak, strong, strong1 = self.views3(batch.unlabeled.x, ep.gen)
        with autocast(batch.x.device, ep.amp):
            out, out_b = net(torch.cat([batch.x, weak, strong, strong1]))
        loss, lu, p = self.losses(out.float(), out_b.float(), batch.y, len(batch))
        if period > cfg.est_epoch:
            self.estimate(p["target_b"], p["mask_b"])
        self.stats.add(p["target"], p["mask"], batch.unlabeled.y)
        sums = self.base.task.step_sums(out_b[: len(batch)], batch.y)  # type: ignore[union-attr]
        return loss, {**sums, "mean_loss_u": lu.detach().double() * len(batch)}

    def losses(self, out: torch.Tensor, out_b: torch.Tensor, y: torch.Tensor, n: int):
        """(loss, unlabeled loss, pseudo-labels) of a step from both heads' logits (labeled, weak, strong, strong)."""
        cfg: ACRConfig = self.cfg  # type: ignore[assignment]
        w, s, s1 = out[n:].chunk(3)
        w_b, s_b, s1_b = out_b[n:].chunk(3)
        lx = self.base.loss_fn(out[:n], y, self.base.weight)  # type: ignore[union-attr]
        lx_b = F.cross_entropy(out_b[:n] + adjustment(self.py_con, cfg.tau2), y)
        p = acr_pseudo(w.detach(), w_b.detach(), adjustment(self.py_con, self.tau), adjustment(self.py_con, cfg.tau12),
                       cfg.threshold)  # fmt: skip
        lu = acr_unlabeled_loss(torch.cat([s, s1]), p["target"], p["mask"])
        lu_b = acr_unlabeled_loss(torch.cat([s_b, s1_b]), p["target_h2"], p["mask_h2"])
        return lx + lx_b + cfg.lambda_u * (lu + lu_b), lu, p

    def views3(self, u: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A weak view and two independent strong views (ACR's ``TransformFixMatch``)."""
        from ltbench.data.views import normalize01, rand_augment, weak_view

        weak, strong = self.views(u, gen)
        strong1 = rand_augment(weak_view(u, gen), gen, n=self.cfg.ops, cutout=self.cfg.cutout)
        return weak, strong, normalize01(strong1, self.mean, self.std)

    def eval_model(self, model: nn.Module) -> nn.Module:
        ema = self.ema.module  # an ABCNet: its backbone with the balanced head classifies (ACR's test_acc_b)
        return HeadNet(ema.model, ema.head)

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        return {**super().row_extras(ep), "acr_tau": round(float(self.tau), 4)}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "acr": {"tau": float(self.tau), "u_py": self.u_py.tolist()}}
