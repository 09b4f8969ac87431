"""DARP (Kim et al., NeurIPS 2020, "Distribution Aligning Refinery of Pseudo-label for Imbalanced Semi-supervised
Learning") on FixMatch, as the USB benchmark runs it: ``semi=darp``.

The weak view's class probabilities of every unlabeled image are kept (``pseudo_orig``, one row per unlabeled
image, the latest prediction). After the warm-up (epochs with ``index > warmup * epochs``: USB's
``darp_warmup_epochs`` 200 of its 256 epochs), every ``refine_every``-th step (USB's ``darp_num_refine_iter``, counted
over the whole stage as USB's global iteration) the whole table is refined so that its class sums match the target
distribution (USB: the labeled class distribution scaled to the unlabeled set's size): first the ``alpha``-scaled
top-k re-normalisation (``estimate_pseudo``), then ``iter_t`` rounds of the dual coordinate ascent of the paper's
convex problem (``opt_solver``: a row normalisation, then per class the root of a monotone equation found by the
secant method, scipy ``newton`` without a derivative, tolerance ``newton_tol``, at most ``newton_iter`` steps). The
refined table (``pseudo_refine``) gives the pseudo-labels (argmax) until the next refinement; the confidence mask
stays that of the current prediction (USB: the masking hook runs before the pseudo-labelling hook; the original
DARP code masks on the refined label's probability instead). Both tables and the step count are buffers, so a
checkpoint carries them and a resumed run is identical.

References: microsoft/Semi-supervised-learning ``semilearn/imb_algorithms/darp/darp.py`` and ``utils.py``
(``DARPPseudoLabelingHook``), bbuing9/DARP ``common.py`` (``estimate_pseudo``, ``opt_solver``). Where ltbench differs:
the solver runs batched on the device in float64 (the reference: numpy, float32 inputs, a Python loop over classes),
a class the target gives no image (a class absent from the labeled set) is left out of the problem and gets
probability 0 (the reference's secant method cannot converge on it and raises), and a secant iteration that does
not converge keeps its last value (the reference raises). Under DDP every rank's predictions are gathered, so all
ranks keep the same tables (USB's ranks keep their own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.methods import SEMI, Method
from ltbench.methods.semi import FixMatch, FixMatchConfig

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


@dataclass
class DARPConfig(FixMatchConfig):
    name: str = "darp"
    warmup: float = 0.78125  # refinement in epochs with index > warmup * epochs (USB: epoch > 200 of 256)
    alpha: float = 2.0  # darp_alpha: top alpha * target_k images of class k in the re-normalisation
    iter_t: int = 10  # darp_iter_T: rounds of the solver
    refine_every: int = 10  # darp_num_refine_iter: steps between refinements
    newton_tol: float = 0.1  # USB: 0.1 (the original DARP code: 0.3 on CIFAR-100 and STL-10)
    newton_iter: int = 30
    label_suffix = "+FixMatch+DARP"

    def check(self, root: Any) -> None:
        super().check(root)
        if not (0 <= self.warmup <= 1 and self.alpha > 0 and self.iter_t >= 1 and self.refine_every >= 1):
            raise ConfigError("semi.warmup in [0, 1], semi.alpha > 0, semi.iter_t >= 1 and semi.refine_every >= 1")
        if not (self.newton_tol > 0 and self.newton_iter >= 1):
            raise ConfigError("semi.newton_tol > 0 and semi.newton_iter >= 1 are needed")


def estimate_pseudo(target: torch.Tensor, q: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DARP's ``estimate_pseudo``: per class k, a one in column k for the ``int(alpha * target_k)`` rows of highest
    ``q[:, k]``, and the class weights ``(target_k + 1e-6) / (sum of those probabilities + 1e-6)``."""
    num = (alpha * target).long().clamp(max=len(q))  # int() of a non-negative number
    sorted_q, order = q.sort(dim=0, descending=True, stable=True)
    top = torch.arange(len(q), device=q.device).unsqueeze(1) < num.unsqueeze(0)  # (N, K): rank < num_k
    labels = torch.zeros_like(q).scatter_(0, order, top.to(q.dtype))
    k_probs = (sorted_q * top).sum(0)
    return labels, (target + 1e-6) / (k_probs + 1e-6)


def secant(f: Any, x0: torch.Tensor, tol: float, maxiter: int) -> torch.Tensor:
    """Roots of K independent scalar equations ``f(x)[k] = 0`` by scipy.optimize.newton's secant method (no
    derivative; the same start ``x0 (1 + 1e-4) +- 1e-4``, the same update and stop rule ``|p - p1| <= tol``), one
    batched evaluation of ``f`` a step. A component whose two last values are equal stops at their mean; one that
    does not converge in ``maxiter`` steps keeps its last value (scipy raises in both cases)."""
    p0 = x0.clone()
    p1 = x0 * (1 + 1e-4)
    p1 = p1 + torch.where(p1 >= 0, 1e-4, -1e-4)
    q0, q1 = f(p0), f(p1)
    swap = q1.abs() < q0.abs()
    p0, p1, q0, q1 = torch.where(swap, p1, p0), torch.where(swap, p0, p1), torch.where(swap, q1, q0), torch.where(
        swap, q0, q1)  # fmt: skip
    done = torch.zeros_like(x0, dtype=torch.bool)
    out = p1.clone()
    for _ in range(maxiter):
        same = q1 == q0
        r, s = q0 / q1, q1 / q0
        p = torch.where(q1.abs() > q0.abs(), (-r * p1 + p0) / (1 - r), (-s * p0 + p1) / (1 - s))
        p = torch.where(same, (p1 + p0) / 2, p)
        stop = ~done & (same | ((p - p1).abs() <= tol))
        out = torch.where(done, out, p)
        done = done | stop
        if bool(done.all()):
            break
        p0, q0 = torch.where(done, p0, p1), torch.where(done, q0, q1)
        p1 = torch.where(done, p1, p)
        q1 = torch.where(done, q1, f(p1))
    return out


def opt_solver(probs: torch.Tensor, target: torch.Tensor, iters: int, tol: float, maxiter: int) -> torch.Tensor:
    """DARP's ``opt_solver`` in float64: the refined (N, K) table, each row summing to 1, each column's sum close to
    ``target`` (rows weighted by the inverse entropy of ``probs``). ``target`` must be positive."""
    p = probs.double()
    w = 1 / (-(p * torch.log(p + 1e-6)).sum(1))
    a_e = p / math.e
    c = target.double()
    y = torch.exp(-torch.ones(1, p.shape[1], dtype=p.dtype, device=p.device) / w.unsqueeze(1))
    prev = torch.zeros_like(c)
    for _ in range(iters):
        x = 1 / (a_e * y).sum(1)
        ax = a_e * x.unsqueeze(1)

        def f(nu: torch.Tensor, ax: torch.Tensor = ax) -> torch.Tensor:
            return (ax * torch.exp(-nu.unsqueeze(0) / w.unsqueeze(1))).sum(0) - c

        prev = secant(f, prev, tol, maxiter)
        y = torch.exp(-prev.unsqueeze(0) / w.unsqueeze(1))
    x = 1 / (a_e * y).sum(1)
    return (a_e * x.unsqueeze(1) * y).to(probs.dtype)


def darp_refine(q: torch.Tensor, target: torch.Tensor, alpha: float, iters: int, tol: float, maxiter: int):
    """One refinement of the table ``q`` (N, K) towards the class sums ``target`` (USB's ``refine_pseudo_labels``
    on a refinement step): re-normalisation by ``estimate_pseudo``, then ``opt_solver``. Classes with a zero target
    are left out: the solver runs on the other columns (rows re-normalised) and those columns are 0."""
    labels, weights = estimate_pseudo(target, q, alpha)
    scaled = q * (labels * weights.unsqueeze(0)) + 1e-6
    scaled = scaled / scaled.sum(1, keepdim=True)
    keep = target > 0
    if bool(keep.all()):
        return opt_solver(scaled, target, iters, tol, maxiter)
    part = scaled[:, keep] / scaled[:, keep].sum(1, keepdim=True)
    out = torch.zeros_like(q)
    out[:, keep] = opt_solver(part, target[keep], iters, tol, maxiter)
    return out


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (equal shapes), concatenated in rank order; ``t`` itself outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@SEMI.register("darp", DARPConfig)
class DARP(FixMatch):
    """FixMatch whose pseudo-labels come from DARP's distribution-aligned refinement of all unlabeled predictions."""

    def __init__(self, cfg: DARPConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__(cfg, ctx, model, base)
        assert ctx.data.unlabeled_y is not None
        n_u, k = len(ctx.data.unlabeled_y), ctx.data.num_classes
        counts = torch.as_tensor(ctx.stats.counts, dtype=torch.float32)
        self.register_buffer("target", counts / counts.sum() * n_u)  # USB: the labeled distribution x |U|
        self.register_buffer("pseudo_orig", torch.full((n_u, k), 1.0 / k))
        self.register_buffer("pseudo_refine", torch.full((n_u, k), 1.0 / k))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._t: int | None = None  # the host copy of ``steps`` (read once, after a resume's load_state_dict)

    def refine(self, index: torch.Tensor, probs: torch.Tensor, ep: Epoch) -> torch.Tensor:
        """The step's targets (N_batch, K): the current probabilities during the warm-up, then rows of the refined
        table (refined again on every ``refine_every``-th step of the stage)."""
        cfg: DARPConfig = self.cfg  # type: ignore[assignment]
        if self._t is None:
            self._t = int(self.steps)
        t = self._t
        self._t += 1
        self.steps += 1
        self.pseudo_orig[_gathered(index)] = _gathered(probs)
        if not ep.index > cfg.warmup * ep.epochs:
            return probs
        if t % cfg.refine_every == 0:
            self.pseudo_refine.copy_(
                darp_refine(self.pseudo_orig, self.target, cfg.alpha, cfg.iter_t, cfg.newton_tol, cfg.newton_iter)
            )
        return self.pseudo_refine[index]

    def darp_loss(self, logits: torch.Tensor, batch: Batch, n: int, m: int, ep: Epoch) -> tuple[torch.Tensor, ...]:
        """USB's FixMatch step with DARP's pseudo-labelling hook: the mask from the current confidence, the label
        from the refined distribution."""
        u = batch.unlabeled
        assert u is not None and u.index is not None
        lx = self.base.loss_fn(logits[:n], batch.y, self.base.weight)  # type: ignore[union-attr]
        weak, strong = logits[n : n + m].detach().float(), logits[n + m :].float()
        probs = weak.softmax(1)
        mask = probs.max(1).values >= self.cfg.threshold
        pseudo = self.refine(u.index.to(probs.device), probs, ep).argmax(1)
        lu = (F.cross_entropy(strong, pseudo, reduction="none") * mask).mean()
        self.stats.add(pseudo, mask, u.y)
        return lx + self.cfg.lambda_u * lu, lu

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, n, m = self.forward_all(net, batch, ep)
        loss, lu = self.darp_loss(out, batch, n, m, ep)
        sums = self.base.task.step_sums(out[:n], batch.y)  # type: ignore[union-attr]
        return loss, {**sums, "mean_loss_u": lu.detach().double() * n}
