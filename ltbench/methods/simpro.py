"""SimPro (Du, Han & Huang, ICML 2024, "SimPro: A Simple Probabilistic Framework Towards Realistic Long-Tailed
Semi-Supervised Learning"): ``semi=simpro``, for an unlabeled class distribution that is not known.

The model's logits are read as the class-conditional part; the class prior is a separate parameter, estimated by EM.
Per step (the E-step): soft pseudo-labels softmax(weak logits + log(pi_u^tau + 1e-12)) with ``pi_u`` the current
estimate of the unlabeled class distribution, kept where their top probability reaches ``threshold``; the loss
(the M-step for the network) is CE(logits + log(pi^tau + 1e-12)) on a weak and a strong view of the labeled batch
(divided by ``scale_ratio``: the unlabeled set's batches per labeled-set pass, the reference's ``u_len / l_len``) plus
the masked soft-target CE of both strong views of the unlabeled batch, where ``pi`` is the estimated distribution of
all training data, labeled and unlabeled. The closed-form M-step for the priors runs every ``period`` steps (the
reference's ``eval_step`` 500): ``pi_u <- ema_u pi_u + (1 - ema_u) S / (|S| + 1)`` with S the period's sum of kept
pseudo-labels, and ``pi <- ema_u pi + (1 - ema_u) (C + S) / |C + S|`` with C the period's labeled class counts.
Start: ``pi_u`` uniform, ``pi`` the labeled distribution. The EMA model classifies with its plain logits.

The unlabeled protocols of the paper (consistent, uniform, reversed, middle, head-tail) are dataset settings:
``dataset.unlabeled_ratio`` (= imbalance_ratio: consistent; 1: uniform) and ``dataset.unlabeled_order``
(``reversed``, ``middle``, ``head_tail``).

Reference: LeapLabTHU/SimPro ``SimPro/train.py`` (``train``: the losses, ``dis_unlabeled``,
``count_labeled_dataset``, the end-of-epoch updates; ``main``: ``py_con``, ``py_uni``) and ``sh/SimPro.sh`` (the
CIFAR-10 settings: mu 8, threshold 0.95, tau 2, ema_u 0.9, lr 0.17, 43,000 steps; CIFAR-100: threshold 0.2, tau 1).
Where ltbench differs: the priors' sums are all-reduced under DDP (the reference's ranks keep their own), and they
and the step count are buffers, so a run resumed mid-period is identical. SimPro replaces the run's labeled loss, so
it takes ``loss=ce`` and ``reweight=none`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.methods import SEMI, Method
from ltbench.methods.semi import FixMatch, FixMatchConfig, mu_batch

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


@dataclass
class SimProConfig(FixMatchConfig):
    name: str = "simpro"
    mu: float = 8.0
    tau: float = 2.0  # CIFAR-10; the reference uses 1.0 on CIFAR-100
    ema_u: float = 0.9
    period: int = 500  # steps between M-steps of the priors (the reference's eval_step)
    label_suffix = "+SimPro"

    def check(self, root: Any) -> None:
        super().check(root)
        if root.loss.name != "ce" or root.reweight.name != "none":
            raise ConfigError(
                f"semi=simpro trains the labeled batch with its own prior-adjusted CE: it takes loss=ce and "
                f"reweight=none, not loss={root.loss.name} reweight={root.reweight.name}"
            )
        if not (0 <= self.ema_u < 1 and self.period >= 1 and self.tau >= 0):
            raise ConfigError("semi.ema_u in [0, 1), semi.period >= 1 and semi.tau >= 0 are needed")


def simpro_loss(
    logits_l: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    strong: torch.Tensor,
    adapt_dis: torch.Tensor,
    estimated_dis: torch.Tensor,
    tau: float,
    threshold: float,
    scale_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labeled loss, unlabeled loss, soft pseudo-labels, mask) of a step. ``logits_l``: both labeled views (weak
    then strong), ``y`` their labels once; ``w``: the weak unlabeled view; ``strong``: both strong views."""
    adj_u, adj = torch.log(estimated_dis**tau + 1e-12), torch.log(adapt_dis**tau + 1e-12)
    pseudo = torch.softmax(w.detach() + adj_u, -1)
    mask = pseudo.max(-1).values >= threshold
    lx = F.cross_entropy(logits_l + adj, y.repeat(2)) / scale_ratio
    lu = (F.cross_entropy(strong + adj, pseudo.repeat(2, 1), reduction="none") * mask.repeat(2).float()).mean()
    return lx, lu, pseudo, mask


@SEMI.register("simpro", SimProConfig)
class SimPro(FixMatch):
    """Probabilistic pseudo-labelling with EM-estimated class priors of the labeled and unlabeled data."""

    inputs = "raw"  # the feed hands over the uint8 labeled images: the method makes both of their views

    def __init__(self, cfg: SimProConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__(cfg, ctx, model, base)
        k = ctx.data.num_classes
        counts = torch.as_tensor(ctx.stats.counts, dtype=torch.float32)
        self.register_buffer("adapt_dis", counts / counts.sum())  # pi: labeled and unlabeled data
        self.register_buffer("estimated_dis", torch.full((k,), 1.0 / k))  # pi_u
        self.register_buffer("dis_unlabeled", torch.zeros(k))
        self.register_buffer("count_labeled", torch.zeros(k))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._t: int | None = None
        assert ctx.data.unlabeled_y is not None
        batch = ctx.cfg.schedule.batch_size
        n_l, n_u = len(ctx.data.train_y), len(ctx.data.unlabeled_y)
        self.scale_ratio = max(n_u // mu_batch(cfg.mu, batch), 1) / max(n_l // batch, 1)  # u_len / l_len

    def m_step(self) -> None:
        """The closed-form update of both priors from the last period's sums, which are then reset."""
        cfg: SimProConfig = self.cfg  # type: ignore[assignment]
        s, c = self.dis_unlabeled, self.count_labeled
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(s)
            dist.all_reduce(c)
        self.estimated_dis.mul_(cfg.ema_u).add_(s / (s.sum() + 1), alpha=1 - cfg.ema_u)
        both = c + s
        self.adapt_dis.mul_(cfg.ema_u).add_(both / both.sum(), alpha=1 - cfg.ema_u)
        s.zero_()
        c.zero_()

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ltbench.data.views import normalize01, rand_augment, weak_view

        cfg: SimProConfig = self.cfg  # type: ignore[assignment]
        u = batch.unlabeled
        assert u is not None
        if self._t is None:
            self._t = int(self.steps)
        if self._t > 0 and self._t % cfg.period == 0:
            self.m_step()
        self._t += 1
        self.steps += 1
        self._net[:] = [net]
        n = len(batch)
        l_w = normalize01(weak_view(batch.x, ep.gen), self.mean, self.std)
        l_s = normalize01(rand_augment(weak_view(batch.x, ep.gen), ep.gen, n=cfg.ops, cutout=cfg.cutout), self.mean,
                          self.std)  # fmt: skip
        weak, strong = self.views(u.x, ep.gen)
        strong1 = normalize01(rand_augment(weak_view(u.x, ep.gen), ep.gen, n=cfg.ops, cutout=cfg.cutout), self.mean,
                              self.std)  # fmt: skip
        with autocast(batch.x.device, ep.amp):
            out = net(torch.cat([l_w, l_s, weak, strong, strong1])).float()
        m = len(weak)
        lx, lu, pseudo, mask = simpro_loss(out[: 2 * n], batch.y, out[2 * n : 2 * n + m], out[2 * n + m :],
                                           self.adapt_dis, self.estimated_dis, cfg.tau, cfg.threshold,
                                           self.scale_ratio)  # fmt: skip
        self.count_labeled += torch.bincount(batch.y, minlength=len(self.count_labeled)).float()
        self.dis_unlabeled += (pseudo * mask.unsqueeze(1)).sum(0)
        self.stats.add(pseudo.argmax(1), mask, u.y)
        sums = self.base.task.step_sums(out[:n], batch.y)  # type: ignore[union-attr]
        return lx + cfg.lambda_u * lu, {**sums, "mean_loss_u": lu.detach().double() * n}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "simpro": {"pi_u": self.estimated_dis.tolist(), "pi": self.adapt_dis.tolist()}}
