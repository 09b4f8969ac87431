"""CoSSL (Fan, Dai, Kukleva & Schiele, CVPR 2022, "CoSSL: Co-Learning of Representation and Classifier for Imbalanced
Semi-Supervised Learning"; YUE-FAN/CoSSL) on FixMatch, as the USB benchmark runs it (microsoft/Semi-supervised-learning
``semilearn/imb_algorithms/cossl/cossl.py`` and ``utils.py``; its config/classic_cv_imb/fixmatch_cossl/*.yaml):
``semi=cossl``.

A second linear head on the features, the teacher (USB ``teacher_classifier``), joins FixMatch.

- Epochs with ``index < B``, ``B = round(warmup * epochs)`` (USB ``cossl_warm_epoch`` 200 of its 256 epochs:
  ``warmup`` 0.78125, so the boundary scales with ``schedule.epochs``): plain FixMatch; the teacher is not trained.
- At the start of epoch ``B``, the TFE warm-up (USB ``classifier_warmup``) on the EMA network's features (eval mode):
  a bias-free head imprinted with the normalised class means of the labeled features (weak view) scores every image;
  per class c with ``N_c < N_max``, ``N_max - N_c`` tail-class feature enhancements (TFE) ``l f_a + (1 - l) f_b``
  (``f_a`` a random labeled feature of c, ``f_b`` the next of the other classes' labeled features and the unlabeled
  features (strong view, scored on the weak view) by descending probability of c, ``l ~ Beta(0.75, 0.75)``) join
  the labeled features; a fresh linear head trains on this balanced set (Adam lr 1e-3, weight decay ``tfe_warm_wd``
  on its weight, batch ``tfe_warm_bs``, ``tfe_warm_epochs`` x ``tfe_warm_iters`` steps) with an EMA
  (``tfe_warm_ema``): the head initialises the trained teacher, its EMA the EMA network's teacher.
- Epochs with ``index >= B``, co-learning: each step also draws a class-balanced labeled batch (weights 1 / N_y, with
  replacement) and as many unlabeled images, both in the ``tfe_augment`` view, and takes their EMA features; a
  labeled feature of class y is mixed with probability ``(N_max - N_y) / N_max`` into ``lam f_x + (1 - lam) f_u``,
  ``lam ~ U(max_lam, 1)`` (:func:`tfe_mix`); the teacher's cross-entropy on them joins the loss (so the stage's
  optimiser steps the teacher, as USB's), and a second optimiser of the teacher alone (SGD, lr ``tfe_warm_lr``, the
  schedule's momentum and Nesterov flag, weight decay ``tfe_warm_wd`` except on the bias: USB ``tfe_optimizer``)
  steps it again on the same gradients. The EMA network with the teacher head is evaluated (USB evaluates
  ``logits_tfe`` of its EMA model from ``cossl_warm_epoch`` on; before, the student).

Invariants: every draw of the warm-up comes from generators of (seed, B) and every draw of a step from the epoch's
stream, never from the global RNG; the teacher, its EMA, the second optimiser's momentum and the warm-up's outcome
are buffers or parameters of the method, so a run killed after the boundary resumes to identical numbers (and one
killed before it warms up identically at ``B``).

Where ltbench differs from USB (each stated so results can be compared):
- ``mixup_index``: USB's port draws the mixing probability as ``mixup_prob[label.argmax()]`` of an *integer* label,
  i.e. class 0's probability for every sample (0 on head-first labeled sets: no mixing at all); the default
  ``label`` uses each sample's class (the paper and YUE-FAN/CoSSL, whose labels are one-hot); ``first`` is USB's.
- ``teacher_pseudo``: USB's port takes FixMatch's pseudo-labels from the student head (its ``train_step`` is
  FixMatch's); YUE-FAN/CoSSL takes them from the teacher head on the EMA network's weak-view features (True).
- The per-step EMA features are computed in eval mode (YUE-FAN/CoSSL ``ema_model.eval()``; USB's EMA copy is never
  put in eval mode, so its BatchNorm uses the TFE batch's statistics); as a consequence USB's ``cossl_tfe_u_ratio``
  (1: the size of an unlabeled batch of which the first B images are used) changes nothing and is not a setting.
- The per-step class-balanced and unlabeled batches are drawn per step (USB: a WeightedRandomSampler pass and a
  shuffled pass, cycled). A class without labeled images gets no TFE features and a zero imprinted weight (USB
  fails on it); a class needing more enhancements than there are other features reuses them cyclically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltbench.core import Batch, Epoch, Totals, autocast
from ltbench.errors import ConfigError
from ltbench.methods import SEMI, Method
from ltbench.methods.semi import FixMatch, FixMatchConfig
from ltbench.methods.ssp import HeadNet
from ltbench.seeding import derive_seed, generator

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


@dataclass
class CoSSLConfig(FixMatchConfig):
    name: str = "cossl"
    warmup: float = 0.78125  # co-learning from epoch round(warmup * epochs) (USB cossl_warm_epoch 200 of 256)
    max_lam: float = 0.6  # cossl_max_lam: per-step TFE lam ~ U(max_lam, 1)
    tfe_augment: str = "strong"  # cossl_tfe_augment: the view of the per-step TFE images (strong | weak)
    tfe_warm_epochs: int = 10  # cossl_tfe_warm_epoch
    tfe_warm_iters: int = 1024  # steps per warm-up epoch (USB: num_eval_iter, 1024 in its imbalanced CIFAR configs)
    tfe_warm_lr: float = 0.02  # cossl_tfe_warm_lr: lr of the teacher's own optimiser during co-learning
    tfe_warm_adam_lr: float = 1e-3  # the warm-up's Adam lr (fixed in USB's classifier_warmup)
    tfe_warm_ema: float = 0.999  # cossl_tfe_warm_ema_decay
    tfe_warm_wd: float = 5e-4  # cossl_tfe_warm_wd
    tfe_warm_bs: int = 64  # cossl_tfe_warm_bs
    mixup_index: str = "label"  # label: each sample's class (paper); first: USB's label.argmax() (class 0)
    teacher_pseudo: bool = False  # True: pseudo-labels from the teacher (YUE-FAN/CoSSL); False: the student (USB)
    label_suffix = "+FixMatch+CoSSL"

    def check(self, root: Any) -> None:
        super().check(root)
        if not (0 <= self.warmup <= 1 and 0 <= self.max_lam <= 1):
            raise ConfigError("semi.warmup in [0, 1] and semi.max_lam in [0, 1] are needed")
        if self.tfe_augment not in ("strong", "weak") or self.mixup_index not in ("label", "first"):
            raise ConfigError("semi.tfe_augment must be strong|weak and semi.mixup_index label|first")
        if min(self.tfe_warm_epochs, self.tfe_warm_iters, self.tfe_warm_bs) < 1:
            raise ConfigError("semi.tfe_warm_epochs, semi.tfe_warm_iters and semi.tfe_warm_bs must be >= 1")
        if not (self.tfe_warm_lr > 0 and self.tfe_warm_adam_lr > 0 and 0 <= self.tfe_warm_ema < 1):
            raise ConfigError("semi.tfe_warm_lr > 0, semi.tfe_warm_adam_lr > 0, semi.tfe_warm_ema in [0, 1) needed")
        if self.tfe_warm_wd < 0:
            raise ConfigError("semi.tfe_warm_wd must be >= 0")
        if root.schedule.optimizer != "sgd":
            raise ConfigError("semi=cossl trains its teacher with SGD as USB: schedule.optimizer must be sgd")


# ------------------------------------------------------------------------------------------------ the parts


def boundary(warmup: float, epochs: int) -> int:
    """The first co-learning epoch (0-based): ``round(warmup * epochs)``; ``epochs`` or more: never."""
    return math.floor(warmup * epochs + 0.5)


def mixup_probs(counts: list[int] | torch.Tensor, index: str = "label") -> torch.Tensor:
    """Per class, the per-step TFE probability ``(N_max - N_c) / N_max`` (0 for the largest class); ``first``: class
    0's for every class (USB's ``mixup_prob[label.argmax()]`` of an integer label)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    p = (n.max() - n) / n.max().clamp(min=1)
    return p[:1].expand_as(p).clone() if index == "first" else p


def tfe_mix(
    fx: torch.Tensor, y: torch.Tensor, fu: torch.Tensor, prob: torch.Tensor, r: torch.Tensor, u: torch.Tensor,
    max_lam: float,
) -> torch.Tensor:  # fmt: skip
    """The per-step TFE features: row i is ``lam_i fx_i + (1 - lam_i) fu_i`` where ``r_i < prob[y_i]``, with
    ``lam_i = max_lam + (1 - max_lam) u_i`` (``r``, ``u``: uniform [0, 1) draws, one per row), else ``fx_i``."""
    lam = (max_lam + (1 - max_lam) * u.to(fx.device, torch.float32)).unsqueeze(1)
    mix = (r.to(prob.device) < prob[y.to(prob.device)]).to(fx.device).unsqueeze(1)
    return torch.where(mix, lam * fx + (1 - lam) * fu[: len(fx)], fx)


def imprint(feats: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """USB ``weight_imprint``: rows are the L2-normalised class means of ``feats`` (a class without any: zeros)."""
    w = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    for c in range(num_classes):
        sel = feats[y == c]
        if len(sel):
            m = sel.mean(0)
            w[c] = m / m.norm(p=2)
    return w


def tfe_balanced_set(
    fl: torch.Tensor, yl: torch.Tensor, pl: torch.Tensor, fu: torch.Tensor, pu: torch.Tensor,
    counts: list[int], rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """USB ``TFE``: the labeled features ``fl`` (labels ``yl``) and, per class c with ``N_c < N_max`` (``counts``),
    ``N_max - N_c`` enhanced features ``l fl[a] + (1 - l) other[b]``: ``a`` drawn with replacement among c's
    labeled features, ``other`` the other classes' labeled features then the unlabeled ``fu``, sorted by their
    probability of c (``pl``, ``pu``) descending, ``b = 0, 1, ...``, ``l ~ Beta(0.75, 0.75)`` (``rng``: per class,
    the choice then the lambdas, as USB draws them). Returns the features and their labels."""
    k, top = len(counts), max(counts)
    per_cls = [torch.nonzero(yl == c).flatten() for c in range(k)]
    feats, labels = [fl], [yl]
    for c in range(k):
        need = top - counts[c]
        if need <= 0 or len(per_cls[c]) == 0:
            continue
        cur = fl[per_cls[c]]
        other_idx = torch.cat([per_cls[j] for j in range(k) if j != c])
        others, probs = torch.cat([fl[other_idx], fu]), torch.cat([pl[other_idx, c], pu[:, c]])
        others = others[torch.sort(probs, descending=True, stable=True).indices]
        a = torch.as_tensor(rng.choice(len(cur), need, replace=True), device=fl.device)
        lam = torch.as_tensor(rng.beta(0.75, 0.75, size=need), dtype=fl.dtype, device=fl.device).unsqueeze(1)
        b = torch.arange(need, device=fl.device) % len(others)
        feats.append(lam * cur[a] + (1 - lam) * others[b])
        labels.append(torch.full((need,), c, dtype=yl.dtype, device=yl.device))
    return torch.cat(feats), torch.cat(labels)


def linear_init(head: nn.Linear, gen: torch.Generator) -> None:
    """``nn.Linear.reset_parameters``' distribution (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias), drawn
    from ``gen``."""
    bound = 1 / math.sqrt(head.in_features)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def train_warm_head(
    feats: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: CoSSLConfig, gen: torch.Generator
) -> tuple[nn.Linear, nn.Linear]:
    """USB ``classifier_warmup``'s training: a fresh linear head (drawn from ``gen``) on the balanced features, Adam
    (lr ``tfe_warm_adam_lr``, L2 ``tfe_warm_wd`` on the weight only), cross-entropy, ``tfe_warm_epochs`` epochs of
    ``tfe_warm_iters`` steps of shuffled ``tfe_warm_bs`` batches (drop last; each epoch a new pass, cycled); returns
    the head and its EMA (decay ``tfe_warm_ema``, from the initial head)."""
    head = nn.Linear(feats.shape[1], num_classes).to(feats.device)
    linear_init(head, gen)
    ema = nn.Linear(feats.shape[1], num_classes).to(feats.device)
    ema.load_state_dict(head.state_dict())
    opt = torch.optim.Adam([{"params": [head.weight], "weight_decay": cfg.tfe_warm_wd},
                            {"params": [head.bias], "weight_decay": 0.0}], lr=cfg.tfe_warm_adam_lr)  # fmt: skip
    bs = min(cfg.tfe_warm_bs, len(feats))
    per_pass = len(feats) // bs
    for _ in range(cfg.tfe_warm_epochs):
        order = torch.zeros(0, dtype=torch.long)
        for step in range(cfg.tfe_warm_iters):
            if step % per_pass == 0:
                order = torch.randperm(len(feats), generator=gen)[: per_pass * bs].view(per_pass, bs)
            idx = order[step % per_pass].to(feats.device)
            loss = F.cross_entropy(head(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), head.parameters()):
                    e.mul_(cfg.tfe_warm_ema).add_(p * (1 - cfg.tfe_warm_ema))
    return head, ema


class TeacherSGD(nn.Module):
    """The teacher's own optimiser (USB ``tfe_optimizer``: torch SGD, dampening 0, weight decay on the weight only),
    its momentum in buffers so that a checkpoint carries it: ``step(head)`` uses the gradients already there."""

    started: torch.Tensor
    buf_weight: torch.Tensor
    buf_bias: torch.Tensor

    def __init__(self, head: nn.Linear, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> None:
        super().__init__()
        self.lr, self.momentum, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
        self.register_buffer("buf_weight", torch.zeros_like(head.weight))
        self.register_buffer("buf_bias", torch.zeros_like(head.bias))
        self.register_buffer("started", torch.tensor(False))

    @torch.no_grad()
    def step(self, head: nn.Linear) -> None:
        if head.weight.grad is None:
            return
        first = not bool(self.started)
        for p, buf, wd in ((head.weight, self.buf_weight, self.wd), (head.bias, self.buf_bias, 0.0)):
            if p.grad is None:
                continue
            d = p.grad + wd * p if wd else p.grad.clone()
            if self.momentum:
                buf.copy_(d) if first else buf.mul_(self.momentum).add_(d)
                d = d + self.momentum * buf if self.nesterov else buf.clone()
            p.sub_(self.lr * d)
        self.started.fill_(True)


class CoSSLNet(HeadNet):
    """The model with the teacher head: ``forward(x, extra)`` -> (the student's logits of ``x``, the teacher's logits
    of the features ``extra``, or None), so that the teacher is trained inside the (DDP) forward."""

    model: nn.Module
    head: nn.Linear

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None):  # type: ignore[override]
        out = self.model(x)
        return out, (self.head(extra.to(out.dtype)) if extra is not None else None)


# ------------------------------------------------------------------------------------------------ the method


@SEMI.register("cossl", CoSSLConfig)
class CoSSL(FixMatch):
    """CoSSL (Fan et al. 2022): FixMatch, then a TFE-trained teacher head co-learning with it, which classifies."""

    cfg: CoSSLConfig
    base: Any  # the stage's supervised method: its loss_fn, weight and task
    warmed: torch.Tensor
    prob: torch.Tensor
    balance: torch.Tensor
    tfe_counts: torch.Tensor

    def __init__(self, cfg: CoSSLConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__(cfg, ctx, model, base)
        counts = [int(c) for c in ctx.stats.counts]
        self.counts, self.num_classes = counts, ctx.data.num_classes
        self.register_buffer("warmed", torch.tensor(False))
        self.register_buffer("prob", mixup_probs(counts, cfg.mixup_index).float())
        n = torch.as_tensor(counts, dtype=torch.float64)
        self.register_buffer("balance", (1 / n.clamp(min=1)) * (n > 0))  # class-balanced sampling: 1 / N_y
        self._weights = self.balance.cpu()[ctx.data.train_y.cpu()]  # per labeled image (derived, not state)
        self.register_buffer("tfe_counts", torch.zeros(self.num_classes, dtype=torch.long))
        sched = ctx.cfg.schedule
        self.sgd = TeacherSGD(self.teacher, cfg.tfe_warm_lr, sched.momentum, sched.nesterov, cfg.tfe_warm_wd)
        self.first = boundary(cfg.warmup, sched.epochs)
        self._feed, self._seed, self._batch = ctx.feed, ctx.seed, sched.eval_batch_size
        self._train_y = ctx.data.train_y
        assert ctx.data.unlabeled_y is not None
        self._num_u = len(ctx.data.unlabeled_y)
        self._loss_t: torch.Tensor | None = None

    def add_modules(self, model: nn.Module, ctx: StageContext) -> None:
        self.teacher = nn.Linear(int(model.feature_dim), ctx.data.num_classes)  # type: ignore[arg-type]
        with torch.no_grad():  # overwritten by the warm-up; no draw from the global RNG
            self.teacher.weight.zero_()
            self.teacher.bias.zero_()

    def wrap(self, model: nn.Module) -> nn.Module:
        return CoSSLNet(model, self.teacher)

    # -------------------------------------------------------------------------------------- features and views

    def tfe_view(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from ltbench.data.views import normalize01, rand_augment, weak_view

        v = weak_view(x, gen)
        if self.cfg.tfe_augment == "strong":
            v = rand_augment(v, gen, n=self.cfg.ops, cutout=self.cfg.cutout)
        return normalize01(v, self.mean, self.std)

    def ema_net(self) -> CoSSLNet:
        return cast(CoSSLNet, self.ema.module)

    @torch.no_grad()
    def ema_features(self, x: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """The EMA network's features of normalised images, in eval mode (float32)."""
        net = self.ema_net().model
        net.eval()
        with autocast(x.device, amp):
            return cast(torch.Tensor, net.features(x)).float()  # type: ignore[operator]

    def _labeled(self, idx: torch.Tensor, gen: torch.Generator) -> Batch:
        return next(self._feed.train(idx, batch_size=len(idx), augment=None, synth=None, synth_on=False, gen=gen,
                                     raw=True))  # fmt: skip

    # ------------------------------------------------------------------------------------------------ warm-up

    def on_epoch_start(self, ep: Epoch) -> None:
        super().on_epoch_start(ep)
        if ep.index >= self.first and not bool(self.warmed):
            self.warm_up(ep)

    def _pass(self, n: int, get, view, gen: torch.Generator, amp: bool) -> list[torch.Tensor]:
        """EMA features of a whole set in order, one list per view in ``view`` (raw batches from ``get``)."""
        outs: list[list[torch.Tensor]] = [[] for _ in view]
        for start in range(0, n, self._batch):
            x = get(torch.arange(start, min(start + self._batch, n))).x
            for o, v in zip(outs, view):
                o.append(self.ema_features(v(x, gen), amp))
        return [torch.cat(o) for o in outs]

    def warm_up(self, ep: Epoch) -> None:
        """USB ``classifier_warmup`` at the boundary: imprint, TFE, train a head and its EMA on the balanced set;
        they become the teacher and the EMA network's teacher. Draws: generators of (seed, boundary epoch)."""
        from ltbench.data.views import normalize01, rand_augment, weak_view

        gen = generator(self._seed, self.first, "cossl-warmup")
        rng = np.random.default_rng(derive_seed(self._seed, self.first, "cossl-tfe"))
        weak = lambda x, g: normalize01(weak_view(x, g), self.mean, self.std)  # noqa: E731
        strong = lambda x, g: normalize01(rand_augment(weak_view(x, g), g, n=self.cfg.ops, cutout=self.cfg.cutout),  # noqa: E731
                                          self.mean, self.std)  # fmt: skip
        n_l, n_u = len(self._train_y), self._num_u
        y = self._train_y.to(self.prob.device)
        lab = lambda i: self._labeled(i, gen)  # noqa: E731
        (f_imp,) = self._pass(n_l, lab, [weak], gen, ep.amp)  # weight imprinting: one pass of weak views
        w = imprint(f_imp, y, self.num_classes)
        (fl,) = self._pass(n_l, lab, [weak], gen, ep.amp)  # TFE: another pass
        fu_s, fu_w = self._pass(n_u, lambda i: next(self._feed.unlabeled(i, len(i))), [strong, weak], gen, ep.amp)
        pl, pu = (fl @ w.t()).softmax(1), (fu_w @ w.t()).softmax(1)
        feats, labels = tfe_balanced_set(fl, y, pl, fu_s, pu, self.counts, rng)
        with torch.enable_grad():
            head, ema = train_warm_head(feats, labels, self.num_classes, self.cfg, gen)
        with torch.no_grad():
            self.teacher.load_state_dict(head.state_dict())
            self.ema_net().head.load_state_dict(ema.state_dict())
        self.tfe_counts.copy_(torch.bincount(labels, minlength=self.num_classes).to(self.tfe_counts))
        self.warmed.fill_(True)

    # ------------------------------------------------------------------------------------------------ a step

    def tfe_batch(self, n: int, ep: Epoch) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's TFE features (EMA features of a class-balanced labeled batch of ``n``, mixed with those of
        ``n`` unlabeled images) and their labels; every draw from ``ep.gen``."""
        idx = torch.multinomial(self._weights, n, replacement=True, generator=ep.gen)
        u_idx = torch.randperm(self._num_u, generator=ep.gen)[:n]
        lb = self._labeled(idx, ep.gen)
        xu = next(self._feed.unlabeled(u_idx, len(u_idx))).x
        fx = self.ema_features(self.tfe_view(lb.x, ep.gen), ep.amp)
        fu = self.ema_features(self.tfe_view(xu, ep.gen), ep.amp)
        r, u = torch.rand(n, generator=ep.gen), torch.rand(n, generator=ep.gen)
        return tfe_mix(fx, lb.y.to(fx.device), fu, self.prob, r, u, self.cfg.max_lam), lb.y.to(fx.device)

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        u = batch.unlabeled
        assert u is not None
        self._net[:] = [net]
        weak, strong = self.views(u.x, ep.gen)
        co = bool(self.warmed)
        feats, ty = self.tfe_batch(len(batch), ep) if co else (None, None)
        with autocast(batch.x.device, ep.amp):
            out, t_logits = net(torch.cat([batch.x, weak, strong]), feats)
        n, m = len(batch), len(weak)
        lx = self.base.loss_fn(out[:n], batch.y, self.base.weight)
        if co and self.cfg.teacher_pseudo:  # YUE-FAN/CoSSL: the teacher on the EMA network's weak-view features
            with torch.no_grad():
                probs = self.teacher(self.ema_features(weak, ep.amp)).float().softmax(1)
        else:
            probs = out[n : n + m].detach().float().softmax(1)
        conf, pseudo = probs.max(1)
        mask = conf >= self.cfg.threshold
        lu = (F.cross_entropy(out[n + m :].float(), pseudo, reduction="none") * mask).mean()
        self.stats.add(pseudo, mask, u.y)
        loss = lx + self.cfg.lambda_u * lu
        sums = {**self.base.task.step_sums(out[:n], batch.y), "mean_loss_u": lu.detach().double() * n}
        if t_logits is not None and ty is not None:
            lt = F.cross_entropy(t_logits.float(), ty)
            loss = loss + lt
            sums["mean_loss_teacher"] = lt.detach().double() * n
        return loss, sums

    def after_step(self, ep: Epoch, totals: Totals) -> None:
        if bool(self.warmed):
            self.sgd.step(self.teacher)  # USB: the tfe optimiser steps after the stage's optimiser, before the EMA
        super().after_step(ep, totals)

    # ------------------------------------------------------------------------------------------------ outputs

    def eval_model(self, model: nn.Module) -> nn.Module:
        ema = self.ema_net()  # a CoSSLNet: from the boundary on, its backbone with the teacher head classifies
        return HeadNet(ema.model, ema.head) if bool(self.warmed) else ema.model

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        return {**super().row_extras(ep), "co_learning": int(bool(self.warmed))}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "cossl_boundary_epoch": self.first, "cossl_teacher": bool(self.warmed),
                "cossl_tfe_set": self.tfe_counts.tolist()}  # fmt: skip


__all__ = ["CoSSL", "CoSSLConfig", "TeacherSGD", "boundary", "imprint", "mixup_probs", "tfe_balanced_set", "tfe_mix"]
