"""ACR-dagger (``semi=acr semi.anchors=false``): SimPro's "ACR without anchor distributions" against a transcription of
its reference, LeapLabTHU/SimPro ``ACR_d/train.py`` (the body of ``train``: the block at an epoch's start that
computes the anchor tau and then sets ``args.adjustment_l1 = compute_adjustment_by_py(args.py_con, args.tau1, args)``,
and one step's losses, ``now_mask``, ``u_py`` and ``count_KL``; ``compute_adjustment_by_py``). The ``.cuda()`` calls
are dropped, ``mask_l`` is all true (CIFAR) and the argument object is explicit. Values and gradients of both heads are
compared through the method's own ``step``, over three 'epochs' (estimation from the second), with and without
confident pseudo-labels.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltbench.core import Batch, Epoch
from ltbench.methods.acr import ACR, ACRConfig

K = 5

# ------------------------------------------------------------------------------------------ reference transcription


def ref_compute_adjustment_by_py(py, tro):
    return torch.log(py**tro + 1e-12)


def ref_acr_d_epoch_start(args, count_KL):
    """ACR_d ``train``: the start of an epoch with ``epoch > args.est_epoch``; returns the (unused) tau."""
    count_KL = count_KL / args.eval_step
    KL_softmax = (torch.exp(count_KL[0])) / (torch.exp(count_KL[0]) + torch.exp(count_KL[1]) + torch.exp(count_KL[2]))
    tau = args.taumin + (args.taumax - args.taumin) * KL_softmax
    if math.isnan(tau) is False:
        # args.adjustment_l1 = compute_adjustment_by_py(args.py_con, tau, args)
        args.adjustment_l1 = ref_compute_adjustment_by_py(args.py_con, args.tau1)
    return tau


def ref_acr_d_step(args, logits, logits_b, targets_x, batch_size, epoch, count_KL):
    """ACR_d ``train``: one step's loss after the forward, and the estimate."""
    KL_div = nn.KLDivLoss(reduction="sum")
    mask_l = torch.ones(len(logits[batch_size:]) // 3, dtype=torch.bool)
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
    mask_ss_b_h2 = (mask_b + mask_h2).float()
    mask_ss_t = (mask + mask_t).float()
    mask_twice_ss_b_h2 = torch.cat([mask_ss_b_h2, mask_ss_b_h2], dim=0)
    mask_twice_ss_t = torch.cat([mask_ss_t, mask_ss_t], dim=0)
    logits_u_s_twice = torch.cat([logits_u_s, logits_u_s1], dim=0)
    logits_u_s_b_twice = torch.cat([logits_u_s_b, logits_u_s1_b], dim=0)
    targets_u_twice = torch.cat([targets_u, targets_u], dim=0)
    targets_u_h2_twice = torch.cat([targets_u_h2, targets_u_h2], dim=0)
    now_mask = torch.zeros(args.num_classes)
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


# ------------------------------------------------------------------------------------------------------- harness


class _Base(nn.Module):
    """The parts of the supervised method ACR uses: its loss (plain CE), weights and task sums."""

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
        return tuple(self.out)


def _acr(cfg, counts):
    data = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=K, unlabeled_y=torch.zeros(10).long(),
                           train_y=torch.zeros(sum(counts)).long())  # fmt: skip
    ctx = SimpleNamespace(data=data, stats=SimpleNamespace(counts=counts),
                          cfg=SimpleNamespace(schedule=SimpleNamespace(batch_size=4)))  # fmt: skip
    return ACR(cfg, ctx, _Tiny(), _Base())


def _batch(y, g):
    u = torch.randint(0, 255, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    x = torch.randint(0, 255, (len(y), 3, 8, 8), generator=g, dtype=torch.uint8)
    return Batch(x, y, unlabeled=Batch(u, torch.zeros(4).long(), index=torch.arange(4)))


def _args(counts, cfg):
    py = torch.tensor(counts, dtype=torch.float32)
    py = py / py.sum()
    return SimpleNamespace(
        py_con=py, py_uni=torch.ones(K) / K, py_rev=torch.flip(py, dims=[0]), T=1.0, threshold=cfg.threshold,
        adjustment_l1=ref_compute_adjustment_by_py(py, cfg.tau1), adjustment_l12=ref_compute_adjustment_by_py(py, 2),
        adjustment_l2=ref_compute_adjustment_by_py(py, 2), taumin=0, taumax=cfg.tau1, tau1=cfg.tau1,
        u_py=torch.ones(K) / K, ema_u=cfg.ema_u, est_epoch=cfg.est_epoch, eval_step=cfg.period, num_classes=K,
    )  # fmt: skip


def _logits(g):
    logits, logits_b = torch.randn(4 + 12, K, generator=g) * 3, torch.randn(4 + 12, K, generator=g) * 3
    logits_b[4:8] = logits_b[4:8] * 0 + torch.tensor([9.0, 0, 0, 0, 0])  # the balanced head is confident: estimation
    return logits, logits_b


# --------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("threshold", [0.5, 1.01])  # 1.01: nothing is ever confident (no estimate, KL sums 0)
def test_acr_dagger_steps_equal_acr_d(threshold):
    """Three 'epochs' of two steps: losses, both heads' gradients, u_py and the KL sums equal ACR_d's, and tau stays
    tau1 although the anchors' tau (which the reference computes and discards) moves away from it."""
    g = torch.Generator().manual_seed(3)
    counts = [8, 5, 3, 2, 1]
    cfg = ACRConfig(threshold=threshold, period=2, est_epoch=0, ema_u=0.5, estimate="presence", anchors=False)
    acr = _acr(cfg, counts)
    args, count_KL, anchor_taus = _args(counts, cfg), torch.zeros(3), []
    for epoch in range(3):
        if epoch > args.est_epoch:
            anchor_taus.append(float(ref_acr_d_epoch_start(args, count_KL)))
        count_KL = torch.zeros(3)
        for _ in range(2):
            y = torch.tensor([0, 0, 1, 3])
            logits, logits_b = _logits(g)
            net = _Fixed(logits, logits_b)
            loss, _ = acr.step(net, _batch(y, g), Epoch("train", 0, 1, 0.1, torch.Generator().manual_seed(0), False))
            loss.backward()
            lg, lb = logits.clone().requires_grad_(True), logits_b.clone().requires_grad_(True)
            ref = ref_acr_d_step(args, lg, lb, y, 4, epoch, count_KL)
            ref.backward()
            assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
            assert torch.allclose(net.out[0].grad, lg.grad, atol=1e-6)
            assert torch.allclose(net.out[1].grad, lb.grad, atol=1e-6)
            assert torch.allclose(acr.u_py, args.u_py, atol=1e-6) and torch.allclose(acr.count_kl, count_KL, atol=1e-5)
        assert float(acr.tau) == cfg.tau1
        assert torch.allclose(ref_compute_adjustment_by_py(acr.py_con, acr.tau), args.adjustment_l1, atol=1e-6)
    assert all(abs(t - cfg.tau1) > 0.1 for t in anchor_taus)  # ACR proper would have changed the adjustment
    if threshold > 1:
        assert torch.equal(acr.u_py, torch.ones(K) / K) and anchor_taus == pytest.approx([cfg.tau1 / 3] * 2)


def test_acr_with_anchors_differs_from_acr_d_once_tau_moves():
    """The same steps with anchors (ACR proper): equal to ACR_d in the first period, different once tau is updated,
    so the comparison above can fail."""
    g = torch.Generator().manual_seed(3)
    counts = [8, 5, 3, 2, 1]
    cfg = ACRConfig(threshold=0.5, period=2, est_epoch=0, ema_u=0.5, estimate="presence")
    acr = _acr(cfg, counts)
    args, count_KL, diffs = _args(counts, cfg), torch.zeros(3), []
    for epoch in range(3):
        if epoch > args.est_epoch:
            ref_acr_d_epoch_start(args, count_KL)
        count_KL = torch.zeros(3)
        for _ in range(2):
            y = torch.tensor([0, 0, 1, 3])
            logits, logits_b = _logits(g)
            loss, _ = acr.step(_Fixed(logits, logits_b), _batch(y, g),
                               Epoch("train", 0, 1, 0.1, torch.Generator().manual_seed(0), False))  # fmt: skip
            diffs.append(abs(loss.item() - ref_acr_d_step(args, logits, logits_b, y, 4, epoch, count_KL).item()))
    assert max(diffs[:2]) < 1e-5 and float(acr.tau) != pytest.approx(cfg.tau1, abs=0.1)
    assert max(diffs[2:]) > 1e-3


def test_anchors_option_composes_and_keeps_acr_hashes(compose_cfg):
    """``semi.anchors`` is an added setting: ACR's runs keep their hash, ACR-dagger gets its own and its label."""
    from ltbench.config import to_schema
    from ltbench.identity import config_hash

    base = ["experiment=ssl_cifar10", "semi=acr"]
    plain, explicit, dagger = (to_schema(compose_cfg(*base, *o)) for o in ([], ["semi.anchors=true"],
                                                                            ["semi.anchors=false"]))  # fmt: skip
    assert config_hash(plain) == config_hash(explicit) != config_hash(dagger)
    assert plain.semi.anchors and not dagger.semi.anchors
    assert dagger.semi.label_suffix.endswith("ACR-dagger") and plain.semi.label_suffix == "+FixMatch+ACR"
