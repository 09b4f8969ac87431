"""Imbalanced semi-supervised methods on FixMatch: DARP, ACR and SimPro against transcriptions of their reference code
(values and gradients on identical logits, through the methods' own ``step``), their edge cases, SimPro's unlabeled
protocols, and a tiny run of each that resumes inside its stage to the numbers of an uninterrupted run.

The reference functions below are transcribed (the ``.cuda()`` calls dropped, argument objects made explicit):
- DARP: microsoft/Semi-supervised-learning ``semilearn/imb_algorithms/darp/utils.py``, ``DARPPseudoLabelingHook``
  (``refine_pseudo_labels``, ``estimate_pseudo``, ``opt_solver``, ``f``; the same functions as bbuing9/DARP
  ``common.py``), and the FixMatch step of ``semilearn/algorithms/fixmatch/fixmatch.py`` (``train_step``);
- ACR: Gank0078/ACR ``train.py`` (``compute_adjustment_by_py`` and the body of ``train``: the tau update at an
  epoch's start and one step's losses, ``now_mask``, ``u_py`` and ``count_KL``);
- SimPro: LeapLabTHU/SimPro ``SimPro/train.py`` (the body of ``train``: one step and the end-of-epoch updates) and
  ``SimPro/dataset/cifar.py`` (``make_imb_data``).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at, make_cifar
from scipy import optimize
from torch import nn

from ltbench.core import Batch, Epoch
from ltbench.data.ssl import CifarSSLConfig
from ltbench.methods.acr import ACR, ACRConfig
from ltbench.methods.darp import DARP, DARPConfig, darp_refine, secant
from ltbench.methods.simpro import SimPro, SimProConfig
from ltbench.runner import run

# ------------------------------------------------------------------------------------------ reference transcriptions


class RefDARPHook:
    """USB ``DARPPseudoLabelingHook`` (state and ``refine_pseudo_labels`` as written, CPU)."""

    def __init__(self, warmup_epochs, alpha, iter_T, num_refine_iter, dataset_len, num_classes, target_disb):
        self.warmup_epochs, self.alpha, self.iter_T = warmup_epochs, alpha, iter_T
        self.num_refine_iter, self.num_classes, self.dataset_len = num_refine_iter, num_classes, dataset_len
        self.target_disb = torch.tensor(target_disb)
        self.pseudo_orig = torch.ones(self.dataset_len, self.num_classes) / self.num_classes
        self.pseudo_refine = torch.ones(self.dataset_len, self.num_classes) / self.num_classes

    @torch.no_grad()
    def refine_pseudo_labels(self, idx_u, targets_u, batch_idx, epoch):
        self.pseudo_orig[idx_u, :] = targets_u.data.cpu().to(self.pseudo_orig.dtype)
        self.pseudo_orig_backup = self.pseudo_orig.clone()
        if epoch > self.warmup_epochs:
            if batch_idx % self.num_refine_iter == 0:
                targets_u, weights_u = self.estimate_pseudo(self.target_disb, self.pseudo_orig)
                scale_term = targets_u * weights_u.reshape(1, -1)
                self.pseudo_orig = (self.pseudo_orig * scale_term + 1e-6) / (self.pseudo_orig * scale_term + 1e-6).sum(
                    dim=1, keepdim=True
                )
                opt_res = self.opt_solver(self.pseudo_orig, self.target_disb, self.iter_T)
                self.pseudo_refine = opt_res
                targets_u = opt_res[idx_u.to(opt_res.device)].detach()
                self.pseudo_orig = self.pseudo_orig_backup
            else:
                targets_u = self.pseudo_refine[idx_u.to(self.pseudo_refine.device)]
        return targets_u

    @torch.no_grad()
    def estimate_pseudo(self, q_y, saved_q):
        pseudo_labels = torch.zeros(len(saved_q), self.num_classes)
        k_probs = torch.zeros(self.num_classes)
        for i in range(1, self.num_classes + 1):
            i = self.num_classes - i
            num_i = int(self.alpha * q_y[i])
            sorted_probs, idx = saved_q[:, i].sort(dim=0, descending=True)
            pseudo_labels[idx[:num_i], i] = 1
            k_probs[i] = sorted_probs[:num_i].sum()
        return pseudo_labels, (q_y + 1e-6) / (k_probs + 1e-6)

    @staticmethod
    def f(x, a, b, c, d):
        return np.sum(a * b * np.exp(-1 * x / c)) - d

    def opt_solver(self, probs, target_distb, num_iter, num_newton=30):
        entropy = (-1 * probs * torch.log(probs + 1e-6)).sum(1)
        weights = 1 / entropy
        N, K = probs.size(0), probs.size(1)
        A, w, lam, nu, r, c = probs.numpy(), weights.numpy(), np.ones(N), np.ones(K), np.ones(N), target_distb.numpy()
        A_e = A / math.e
        X = np.exp(-1 * lam / w)
        Y = np.exp(-1 * nu.reshape(1, -1) / w.reshape(-1, 1))
        prev_Y = np.zeros(K)
        X_t, Y_t = X, Y
        for _n in range(num_iter):
            denom = np.sum(A_e * Y_t, 1)
            X_t = r / denom
            Y_t = np.zeros(K)
            for i in range(K):
                Y_t[i] = optimize.newton(
                    self.f, prev_Y[i], maxiter=num_newton, args=(A_e[:, i], X_t, w, c[i]), tol=1.0e-01
                )
            prev_Y = Y_t
            Y_t = np.exp(-1 * Y_t.reshape(1, -1) / w.reshape(-1, 1))
        denom = np.sum(A_e * Y_t, 1)
        X_t = r / denom
        return torch.Tensor(A_e * X_t.reshape(-1, 1) * Y_t)


def ref_fixmatch_darp_loss(hook, logits_x_lb, y_lb, logits_x_ulb_w, logits_x_ulb_s, idx_ulb, it, epoch, p_cutoff):
    """USB FixMatch ``train_step`` (lambda_u 1) with DARP's pseudo-labelling hook (hard labels)."""
    sup_loss = F.cross_entropy(logits_x_lb, y_lb, reduction="mean")
    probs_x_ulb_w = torch.softmax(logits_x_ulb_w.detach(), dim=-1)
    max_probs, _ = torch.max(probs_x_ulb_w, dim=-1)
    mask = max_probs.ge(p_cutoff).to(max_probs.dtype)
    targets_u = hook.refine_pseudo_labels(idx_ulb, probs_x_ulb_w, it, epoch)
    pseudo_label = torch.argmax(targets_u, dim=-1)
    unsup_loss = (F.cross_entropy(logits_x_ulb_s, pseudo_label, reduction="none") * mask).mean()
    return sup_loss + 1.0 * unsup_loss


def ref_compute_adjustment_by_py(py, tro):
    return torch.log(py**tro + 1e-12)


def ref_acr_tau(args, count_KL):
    """ACR ``train``: the start of an epoch with ``epoch > args.est_epoch``."""
    count_KL = count_KL / args.eval_step
    KL_softmax = (torch.exp(count_KL[0])) / (torch.exp(count_KL[0]) + torch.exp(count_KL[1]) + torch.exp(count_KL[2]))
    tau = args.taumin + (args.taumax - args.taumin) * KL_softmax
    if math.isnan(tau) is False:
        args.adjustment_l1 = ref_compute_adjustment_by_py(args.py_con, tau)


def ref_acr_step(args, logits, logits_b, targets_x, batch_size, epoch, count_KL):
    """ACR ``train``: one step's loss (after the forward) and the estimate (``mask_l`` all true: CIFAR)."""
    KL_div = nn.KLDivLoss(reduction="sum")
    logits_x = logits[:batch_size]
    logits_u_w, logits_u_s, logits_u_s1 = logits[batch_size:].chunk(3)
    Lx = F.cross_entropy(logits_x, targets_x, reduction="mean")
    logits_x_b = logits_b[:batch_size]
    logits_u_w_b, logits_u_s_b, logits_u_s1_b = logits_b[batch_size:].chunk(3)
    Lx_b = F.cross_entropy(logits_x_b + args.adjustment_l2, targets_x, reduction="mean")
    pseudo_label = torch.softmax((logits_u_w.detach() - args.adjustment_l1) / args.T, dim=-1)
    pseudo_label_h2 = torch.softmax((logits_u_w.detach() - args.adjustment_l12) / args.T, dim=-1)
    pseudo_label_b = torch.softmax(logits_u_w_b.detach() / args.T, dim=-1)
    pseudo_label_t = torch.softmax(logits_u_w.detach() / args.T, dim=-1)
    max_probs, targets_u = torch.max(pseudo_label, dim=-1)
    max_probs_h2, targets_u_h2 = torch.max(pseudo_label_h2, dim=-1)
    max_probs_b, targets_u_b = torch.max(pseudo_label_b, dim=-1)
    max_probs_t, _targets_u_t = torch.max(pseudo_label_t, dim=-1)
    mask = max_probs.ge(args.threshold)
    mask_h2 = max_probs_h2.ge(args.threshold)
    mask_b = max_probs_b.ge(args.threshold)
    mask_t = max_probs_t.ge(args.threshold)
    mask_ss_b_h2 = mask_b + mask_h2
    mask_ss_t = mask + mask_t
    mask = mask.float()
    mask_b = mask_b.float()
    mask_ss_b_h2 = mask_ss_b_h2.float()
    mask_ss_t = mask_ss_t.float()
    mask_twice_ss_b_h2 = torch.cat([mask_ss_b_h2, mask_ss_b_h2], dim=0)
    mask_twice_ss_t = torch.cat([mask_ss_t, mask_ss_t], dim=0)
    logits_u_s_twice = torch.cat([logits_u_s, logits_u_s1], dim=0)
    targets_u_twice = torch.cat([targets_u, targets_u], dim=0)
    targets_u_h2_twice = torch.cat([targets_u_h2, targets_u_h2], dim=0)
    logits_u_s_b_twice = torch.cat([logits_u_s_b, logits_u_s1_b], dim=0)
    now_mask = torch.zeros(args.num_classes)
    mask_l = torch.ones(len(targets_u_b), dtype=torch.bool)
    if epoch > args.est_epoch:
        now_mask[targets_u_b] += mask_l * mask_b
        if now_mask.sum() > 0:
            now_mask = now_mask / now_mask.sum()
            args.u_py = args.ema_u * args.u_py + (1 - args.ema_u) * now_mask
            KL_con = 0.5 * KL_div(args.py_con.log(), args.u_py) + 0.5 * KL_div(args.u_py.log(), args.py_con)
            KL_uni = 0.5 * KL_div(args.py_uni.log(), args.u_py) + 0.5 * KL_div(args.u_py.log(), args.py_uni)
            KL_rev = 0.5 * KL_div(args.py_rev.log(), args.u_py) + 0.5 * KL_div(args.u_py.log(), args.py_rev)
            count_KL[0] = count_KL[0] + KL_con
            count_KL[1] = count_KL[1] + KL_uni
            count_KL[2] = count_KL[2] + KL_rev
    Lu = (F.cross_entropy(logits_u_s_twice, targets_u_twice, reduction="none") * mask_twice_ss_t).mean()
    Lu_b = (F.cross_entropy(logits_u_s_b_twice, targets_u_h2_twice, reduction="none") * mask_twice_ss_b_h2).mean()
    return Lx + Lu + Lx_b + Lu_b


def ref_simpro_step(args, logits, batch_size, targets_l, dis_unlabeled, count_labeled_dataset):
    """SimPro ``train``: one step's loss after the forward, and the E-step sums."""
    logits_l_w, logits_l_s = logits[:batch_size], logits[batch_size : batch_size * 2]
    logits_u_w, logits_u_s, logits_u_s1 = logits[batch_size * 2 :].chunk(3)
    pseudo_label = torch.softmax(logits_u_w.detach() + args.adjustment_u, dim=-1)
    max_probs, _ = torch.max(pseudo_label, dim=-1)
    mask = max_probs.ge(args.threshold)
    count_labeled_dataset += torch.bincount(targets_l, minlength=args.num_classes)
    dis_unlabeled += torch.sum(pseudo_label[mask], dim=0)
    mask = mask.float()
    mask_twice = torch.cat([mask, mask], dim=0)
    logits_u_s_twice = torch.cat([logits_u_s, logits_u_s1], dim=0)
    targets_u_twice = torch.cat([pseudo_label, pseudo_label], dim=0)
    logits_l = torch.cat([logits_l_w, logits_l_s], dim=0)
    targets_l = torch.cat([targets_l, targets_l], dim=0)
    Lx = F.cross_entropy(logits_l + args.adjustment, targets_l, reduction="mean") / args.scale_ratio
    Lu = (F.cross_entropy(logits_u_s_twice + args.adjustment, targets_u_twice, reduction="none") * mask_twice).mean()
    return Lx + Lu


def ref_simpro_epoch_end(args, dis_unlabeled, count_labeled_dataset):
    estimated_dis = dis_unlabeled / (dis_unlabeled.sum() + 1)
    args.estimated_dis = args.estimated_dis * args.ema_u + (estimated_dis) * (1 - args.ema_u)
    count_forward = count_labeled_dataset + dis_unlabeled
    args.adapt_dis = args.adapt_dis * args.ema_u + (count_forward / count_forward.sum()) * (1 - args.ema_u)


def ref_make_imb_data(max_num, class_num, gamma, flag=1, flag_LT=0):
    mu = np.power(1 / gamma, 1 / (class_num - 1))
    class_num_list = []
    for i in range(class_num):
        if i == (class_num - 1):
            class_num_list.append(int(max_num / gamma))
        else:
            class_num_list.append(int(max_num * np.power(mu, i)))
    if flag == 0 and flag_LT == 1:
        class_num_list = list(reversed(class_num_list))
    if flag == 0 and flag_LT == 2:
        random.shuffle(class_num_list)
    if flag == 0 and flag_LT == 3:
        cls_num_array = np.array(class_num_list)
        idx_centric = list(range(0, class_num, 2))[::-1] + list(range(1, class_num, 2))
        class_num_list = cls_num_array[idx_centric].tolist()
    if flag == 0 and flag_LT == 4:
        cls_num_array = np.array(class_num_list)
        idx_off_centric = list(range(1, class_num, 2)) + list(range(0, class_num, 2))[::-1]
        class_num_list = cls_num_array[idx_off_centric].tolist()
    return list(class_num_list)


# ------------------------------------------------------------------------------------------------------- harness

K = 5


class _Base(nn.Module):
    """The parts of the supervised method the semi methods use: its loss (plain CE), weights and task sums."""

    weight = None
    task = SimpleNamespace(step_sums=lambda out, y: {})

    def loss_fn(self, out, y, w):
        return F.cross_entropy(out, y)


class _Tiny(nn.Module):
    feature_dim = 3

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(3, 3), nn.Linear(3, K)

    def features(self, x):
        return self.body(x.float().mean((2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


class _Fixed(nn.Module):
    """A 'network' whose outputs are given logits (parameters, so their gradients can be read)."""

    def __init__(self, *logits):
        super().__init__()
        self.out = nn.ParameterList([nn.Parameter(t.clone()) for t in logits])

    def forward(self, x):
        assert len(x) == len(self.out[0])
        return self.out[0] if len(self.out) == 1 else tuple(self.out)


def _ctx(counts, n_u, batch_size=4):
    data = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=K, unlabeled_y=torch.zeros(n_u).long(),
                           train_y=torch.zeros(sum(counts)).long())  # fmt: skip
    return SimpleNamespace(data=data, stats=SimpleNamespace(counts=counts),
                           cfg=SimpleNamespace(schedule=SimpleNamespace(batch_size=batch_size)))  # fmt: skip


def _batch(y, index, g, truth=None):
    u = torch.randint(0, 255, (len(index), 3, 8, 8), generator=g, dtype=torch.uint8)
    truth = torch.zeros(len(index)).long() if truth is None else truth
    x = torch.randint(0, 255, (len(y), 3, 8, 8), generator=g, dtype=torch.uint8)
    return Batch(x, y, unlabeled=Batch(u, truth, index=index))


def _ep(index=0, epochs=1):
    return Epoch("train", index, epochs, 0.1, torch.Generator().manual_seed(index), False)


# ------------------------------------------------------------------------------------------------------------ DARP


def test_secant_matches_scipy_newton_without_derivative():
    fs = [lambda x: x**3 - 2, lambda x: math.exp(-x) - 0.3, lambda x: (x - 1) ** 2 - 4]
    for tol in (0.1, 1e-6):
        x0 = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
        ours = secant(lambda v: torch.tensor([f(float(t)) for f, t in zip(fs, v)], dtype=torch.float64), x0, tol, 30)
        ref = [optimize.newton(f, float(s), tol=tol, maxiter=30) for f, s in zip(fs, x0)]
        assert ours.tolist() == pytest.approx(ref, abs=1e-12)


def test_darp_refinement_equals_usb_and_an_empty_class_is_left_out():
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(200, K, generator=g) * 2).softmax(1)
    target = torch.tensor([80.0, 50, 35, 20, 15])
    hook = RefDARPHook(0, 2.0, 10, 1, 200, K, target.numpy())
    hook.pseudo_orig = q.clone()
    ref = hook.refine_pseudo_labels(torch.arange(200), q, 0, 1)
    ours = darp_refine(q, target, 2.0, 10, 0.1, 30)
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(ours.sum(1), torch.ones(200))
    empty = torch.tensor([80.0, 50, 0, 20, 15])  # a class the labeled set lacks: no unlabeled image expected
    with pytest.raises(RuntimeError, match="Failed to converge"):  # the reference cannot solve it
        RefDARPHook(0, 2.0, 10, 1, 200, K, empty.numpy()).opt_solver(q, empty, 10)
    ours = darp_refine(q, empty, 2.0, 10, 0.1, 30)
    keep = [0, 1, 3, 4]
    labels, w = hook.estimate_pseudo(empty, q)  # the reference up to the solver, which runs without class 2
    scaled = q * labels * w + 1e-6
    scaled = (scaled / scaled.sum(1, keepdim=True))[:, keep]
    ref = hook.opt_solver(scaled / scaled.sum(1, keepdim=True), empty[keep], 10)
    assert torch.all(ours[:, 2] == 0) and torch.allclose(ours[:, keep], ref, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.3, 1.0])  # 1.0: no confident pseudo-label in any batch
def test_darp_steps_equal_usb_through_warmup_and_refinements(threshold):
    """Five steps (two of the warm-up, then refinements every second step), values and gradients."""
    g = torch.Generator().manual_seed(1)
    counts, n_u = [8, 5, 3, 2, 1], 12  # class 4 absent from every labeled batch
    cfg = DARPConfig(threshold=threshold, warmup=0.4, refine_every=2)
    darp = DARP(cfg, _ctx(counts, n_u), _Tiny(), _Base())
    c = torch.tensor(counts, dtype=torch.float32)
    hook = RefDARPHook(0, 2.0, 10, 2, n_u, K, (c / c.sum() * n_u).numpy())
    for t, epoch in enumerate([0, 0, 1, 1, 1]):
        index = torch.randperm(n_u, generator=g)[:6]
        y = torch.randint(0, 4, (4,), generator=g)
        logits = torch.randn(4 + 12, K, generator=g) * 3
        net = _Fixed(logits)
        loss, _ = darp.step(net, _batch(y, index, g), _ep(epoch, 2))  # epoch 1 > 0.4 * 2: refinement
        loss.backward()
        lg = logits.clone().requires_grad_(True)
        ref = ref_fixmatch_darp_loss(hook, lg[:4], y, lg[4:10], lg[10:], index, t, epoch, threshold)
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
        assert torch.allclose(net.out[0].grad, lg.grad, atol=1e-6)
    assert torch.allclose(darp.pseudo_refine, hook.pseudo_refine, atol=1e-5) and int(darp.steps) == 5
    assert torch.equal(darp.pseudo_orig, hook.pseudo_orig)


# ------------------------------------------------------------------------------------------------------------- ACR


def _acr_args(counts, cfg):
    py = torch.tensor(counts, dtype=torch.float32)
    py = py / py.sum()
    return SimpleNamespace(
        py_con=py, py_uni=torch.ones(K) / K, py_rev=torch.flip(py, dims=[0]), T=1.0, threshold=cfg.threshold,
        adjustment_l1=ref_compute_adjustment_by_py(py, cfg.tau1), adjustment_l12=ref_compute_adjustment_by_py(py, 2),
        adjustment_l2=ref_compute_adjustment_by_py(py, 2), taumin=0, taumax=cfg.tau1, u_py=torch.ones(K) / K,
        ema_u=cfg.ema_u, est_epoch=cfg.est_epoch, eval_step=cfg.period, num_classes=K,
    )  # fmt: skip


@pytest.mark.parametrize("threshold", [0.5, 1.01])  # 1.01: nothing is ever confident
def test_acr_steps_equal_the_reference_with_its_tau_updates(threshold):
    """Three ACR 'epochs' of two steps (estimation after the first): losses, gradients of both heads, u_py, the KL
    sums and tau. ``estimate=presence`` with the reference's duplicate-index write (all duplicates confident)."""
    g = torch.Generator().manual_seed(2)
    counts = [8, 5, 3, 2, 1]
    cfg = ACRConfig(threshold=threshold, period=2, est_epoch=0, ema_u=0.5, estimate="presence", mu=1.0)
    acr = ACR(cfg, _ctx(counts, 10), _Tiny(), _Base())
    args, count_KL = _acr_args(counts, cfg), torch.zeros(3)
    for epoch in range(3):
        if epoch > args.est_epoch:
            ref_acr_tau(args, count_KL)
        count_KL = torch.zeros(3)
        for _ in range(2):
            y = torch.tensor([0, 0, 1, 3])  # classes 2 and 4 absent from the labeled batch
            logits, logits_b = torch.randn(4 + 12, K, generator=g) * 3, torch.randn(4 + 12, K, generator=g) * 3
            logits_b[4:8] = logits_b[4:8] * 0 + torch.tensor([9.0, 0, 0, 0, 0])  # duplicates: all confident
            net = _Fixed(logits, logits_b)
            loss, _ = acr.step(net, _batch(y, torch.arange(4), g), _ep())
            loss.backward()
            lg, lb = logits.clone().requires_grad_(True), logits_b.clone().requires_grad_(True)
            ref = ref_acr_step(args, lg, lb, y, 4, epoch, count_KL)
            ref.backward()
            assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
            assert torch.allclose(net.out[0].grad, lg.grad, atol=1e-6)
            assert torch.allclose(net.out[1].grad, lb.grad, atol=1e-6)
            assert torch.allclose(acr.u_py, args.u_py, atol=1e-6) and torch.allclose(acr.count_kl, count_KL, atol=1e-5)
        assert torch.allclose(ref_compute_adjustment_by_py(acr.py_con, acr.tau), args.adjustment_l1, atol=1e-5)
    if threshold > 1:
        assert torch.equal(acr.u_py, torch.ones(K) / K) and float(acr.tau) == pytest.approx(cfg.tau1 / 3)


def test_acr_counts_estimate_is_the_histogram_of_confident_pseudo_labels():
    cfg = ACRConfig(ema_u=0.0)
    acr = ACR(cfg, _ctx([4, 3, 2, 1, 1], 10), _Tiny(), _Base())
    acr.estimate(torch.tensor([0, 0, 0, 1, 4]), torch.tensor([True, True, True, True, False]))
    assert acr.u_py.tolist() == pytest.approx([0.75, 0.25, 0, 0, 0])


# ---------------------------------------------------------------------------------------------------------- SimPro


@pytest.mark.parametrize("threshold", [0.4, 1.01])
def test_simpro_steps_and_m_steps_equal_the_reference(threshold):
    g = torch.Generator().manual_seed(3)
    counts, n_u = [8, 5, 3, 2, 2], 60
    cfg = SimProConfig(threshold=threshold, period=2, mu=2.0, ema_u=0.5)
    sp = SimPro(cfg, _ctx(counts, n_u), _Tiny(), _Base())
    py = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    args = SimpleNamespace(threshold=threshold, num_classes=K, scale_ratio=(60 // 8) / (20 // 4), ema_u=0.5,
                           estimated_dis=torch.ones(K) / K, adapt_dis=py)  # fmt: skip
    assert sp.scale_ratio == args.scale_ratio
    for _epoch in range(3):
        args.adjustment_u = ref_compute_adjustment_by_py(args.estimated_dis, cfg.tau)
        args.adjustment = ref_compute_adjustment_by_py(args.adapt_dis, cfg.tau)
        dis_unlabeled, count_labeled = torch.zeros(K), torch.zeros(K)
        for _ in range(2):
            y = torch.tensor([0, 1, 1, 3])
            logits = torch.randn(8 + 24, K, generator=g) * 3
            net = _Fixed(logits)
            loss, _ = sp.step(net, _batch(y, torch.arange(8), g), _ep())
            loss.backward()
            lg = logits.clone().requires_grad_(True)
            ref = ref_simpro_step(args, lg, 4, y, dis_unlabeled, count_labeled)
            ref.backward()
            assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
            assert torch.allclose(net.out[0].grad, lg.grad, atol=1e-6)
        ref_simpro_epoch_end(args, dis_unlabeled, count_labeled)
    sp.m_step()  # the reference updates at the epoch's end, ltbench at the next period's first step
    assert torch.allclose(sp.estimated_dis, args.estimated_dis, atol=1e-6)
    assert torch.allclose(sp.adapt_dis, args.adapt_dis, atol=1e-6)


def test_simpro_unlabeled_protocols_are_the_references():
    for order, flag in [("same", 0), ("reversed", 1), ("middle", 3), ("head_tail", 4)]:
        for k in (10, 100, 7):
            cfg = CifarSSLConfig(num_classes=k, max_unlabeled=4000, unlabeled_ratio=100, unlabeled_order=order)
            assert cfg.counts()[1] == ref_make_imb_data(4000, k, 100, 0, flag), (order, k)
    assert CifarSSLConfig(num_classes=10, unlabeled_order="head_tail").unlabeled_text().endswith("head-tail")


# ----------------------------------------------------------------------------------------------- config and runs


def test_bad_settings_are_one_line_config_errors(compose_cfg):
    from ltbench.config import to_schema
    from ltbench.errors import ConfigError

    for args, match in [(["semi=simpro", "loss=focal"], "loss=ce"), (["semi=acr", "semi.estimate=all"], "estimate"),
                        (["semi=darp", "semi.warmup=2"], "warmup")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            to_schema(compose_cfg("dataset=cifar10lt_ssl", *args))


@pytest.fixture(scope="module")
def ssl_root(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("ssl_imb"), 10, train_per_class=40, test_per_class=4)


@pytest.mark.parametrize(
    "semi",
    [
        ["semi=darp", "semi.warmup=0.3", "semi.refine_every=3"],
        ["semi=acr", "semi.period=3", "semi.est_epoch=0", "semi.ema_u=0.5"],
        ["semi=simpro", "semi.period=3", "semi.mu=1", "dataset.unlabeled_order=middle"],
    ],
    ids=["darp", "acr", "simpro"],
)
def test_each_method_runs_and_resumes_inside_its_stage_to_the_same_numbers(
    compose_cfg, ssl_root, tmp_path, monkeypatch, semi
):
    args = ["dataset=cifar10lt_ssl", f"dataset.root={ssl_root}", "dataset.download=false", "dataset.max_labeled=16",
            "dataset.max_unlabeled=20", "dataset.imbalance_ratio=4", "dataset.unlabeled_ratio=4",
            "dataset.val_per_class=2", "schedule.epochs=3", "schedule.batch_size=16", "semi.threshold=0.1",
            *semi]  # fmt: skip
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    assert full["status"] == "completed" and "pseudo_labels" in full
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"),
                 at=2, stage="train")  # fmt: skip
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["method"]
    assert int(state["steps"]) > 0
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    assert resumed["pseudo_labels"] == full["pseudo_labels"]
    name = semi[0].split("=")[1]
    assert name not in ("acr", "simpro") or resumed[name] == full[name]  # the priors, tau
