"""RankSim and ConR (``method=ranksim|conr``): values and gradients against transcriptions of the reference code.

References: BorealisAI/ranksim-imbalanced-regression ``agedb-dir/ranksim.py`` (batchwise_ranking_regularizer) and
``agedb-dir/ranking.py`` (rank, rank_normalised, TrueRanker); BorealisAI/ConR ``agedb-dir/loss.py`` (ConR).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch import nn

from ltbench.config import to_schema
from ltbench.core import Batch
from ltbench.errors import ConfigError
from ltbench.methods.conr import conr_loss
from ltbench.methods.ranksim import batch_ranksim, normalized_rank, ranksim_loss, unique_label_subset

# ------------------------------------------------------------------------------------ reference transcriptions


def ref_rank_normalised(seq):
    """ranking.py: rank(seq) = argsort(argsort(seq).flip(1)); rank_normalised = (rank + 1) / seq.size(1)."""
    return (torch.argsort(torch.argsort(seq).flip(1)) + 1).float() / seq.size()[1]


class RefTrueRanker(torch.autograd.Function):
    """ranking.py TrueRanker: blackbox backward -(rank - rank(seq + lambda grad)) / (lambda + 1e-8)."""

    @staticmethod
    def forward(ctx, sequence, lambda_val):
        rank = ref_rank_normalised(sequence)
        ctx.lambda_val = lambda_val
        ctx.save_for_backward(sequence, rank)
        return rank

    @staticmethod
    def backward(ctx, grad_output):
        sequence, rank = ctx.saved_tensors
        rank_prime = ref_rank_normalised(sequence + ctx.lambda_val * grad_output)
        return -(rank - rank_prime) / (ctx.lambda_val + 1e-8), None


def ref_ranksim(features, targets, lambda_val, choice):
    """ranksim.py batchwise_ranking_regularizer; ``targets`` N x 1 as in the reference; ``choice(indices)`` stands
    for its ``random.choice`` (one index among those of a label)."""
    loss = 0
    uniq = torch.unique(targets)
    if len(uniq) < len(targets):
        idx = [int(choice((targets == t).nonzero()[:, 0])) for t in uniq]
        x, y = features[idx], targets[idx]
    else:
        x, y = features, targets
    xn = F.normalize(x.view(x.size(0), -1))
    xxt = torch.matmul(xn, xn.permute(1, 0))
    for i in range(len(y)):
        label_ranks = ref_rank_normalised(-torch.abs(y[i] - y).transpose(0, 1))
        feature_ranks = RefTrueRanker.apply(xxt[i].unsqueeze(dim=0), lambda_val)
        loss += F.mse_loss(feature_ranks, label_ranks)
    return loss


def ref_conr_per_anchor(features, targets, preds, w=1.0, weights=1.0, e=0.01, t=0.07):
    """loss.py ConR up to its final mean (targets, preds, weights: N x 1): weights_i * loss_i * no_neg_flag_i."""
    q = F.normalize(features, dim=1)
    k = F.normalize(features, dim=1)
    l_k, l_q = targets.flatten()[None, :], targets
    p_k, p_q = preds.flatten()[None, :], preds
    l_dist, p_dist = torch.abs(l_q - l_k), torch.abs(p_q - p_k)
    pos_i = l_dist.le(w)
    neg_i = (~(l_dist.le(w))) * (p_dist.le(w))
    for i in range(pos_i.shape[0]):
        pos_i[i][i] = 0
    prod = torch.einsum("nc,kc->nk", [q, k]) / t
    pos, neg = prod * pos_i, prod * neg_i
    pushing_w = weights * torch.exp(l_dist * e)
    neg_exp_dot = (pushing_w * (torch.exp(neg)) * neg_i).sum(1)
    no_neg_flag = (neg_i).sum(1).bool()
    denom = pos_i.sum(1)
    loss = (-torch.log(torch.div(torch.exp(pos), (torch.exp(pos).sum(1) + neg_exp_dot).unsqueeze(-1))) * pos_i).sum(
        1
    ) / denom
    return weights * (loss * no_neg_flag).unsqueeze(-1)


def ref_conr(features, targets, preds, w=1.0, weights=1.0, e=0.01, t=0.07):
    return ref_conr_per_anchor(features, targets, preds, w, weights, e, t).mean()


# ------------------------------------------------------------------------------------------------ RankSim


def test_ranks_equal_the_reference_including_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 9, generator=g)
    assert torch.equal(normalized_rank(s), ref_rank_normalised(s))
    y = torch.tensor([3.0, 5.0, 7.0, 5.0, 1.0, 9.0])  # label distances tie on both sides of 5 (3 and 7, 1 and 9)
    d = -(y[:, None] - y[None, :]).abs()
    assert torch.equal(normalized_rank(d), ref_rank_normalised(d))
    ranks = normalized_rank(torch.tensor([[0.2, 0.9, 0.5]]))[0].tolist()
    assert ranks == pytest.approx([1.0, 1 / 3, 2 / 3])  # the largest first


def _grads(fn, x):
    x = x.clone().requires_grad_(True)
    v = fn(x)
    v.backward()
    return v.detach(), x.grad


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_ranksim_value_and_gradient_equal_the_reference_on_distinct_labels(lam):
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(12, 6, generator=g), torch.randperm(40, generator=g)[:12].float()
    ours, g_ours = _grads(lambda x: ranksim_loss(x, y, lam), f)
    ref, g_ref = _grads(lambda x: ref_ranksim(x, y[:, None], lam, choice=None), f)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6) and ours > 0
    assert torch.allclose(g_ours, g_ref, atol=1e-6) and g_ours.abs().sum() > 0
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(unique_label_subset(y, gen), torch.arange(12))  # nothing dropped, order kept


def test_ranksim_with_duplicate_labels_is_the_reference_on_the_same_subset():
    g = torch.Generator().manual_seed(2)
    f, y = torch.randn(16, 5, generator=g), torch.tensor([4.0, 1, 4, 7, 1, 1, 9, 7, 2, 4, 2, 9, 3, 3, 8, 1])
    keep = unique_label_subset(y, torch.Generator().manual_seed(5))
    assert y[keep].tolist() == sorted(set(y.tolist()))  # one per label, ordered by label like torch.unique
    picks = iter(keep.tolist())

    def choice(candidates):  # the reference's random.choice, made to take our draw (which must be a candidate)
        i = next(picks)
        assert i in candidates.tolist()
        return i

    ours, g_ours = _grads(lambda x: batch_ranksim(x, y, 2.0, torch.Generator().manual_seed(5)), f)
    ref, g_ref = _grads(lambda x: ref_ranksim(x, y[:, None], 2.0, choice), f)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[keep] = False
    assert g_ours[dropped].abs().sum() == 0 and g_ours[keep].abs().sum() > 0


def test_unique_label_subset_draws_uniformly_within_a_label():
    y = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(3000):
        counts[unique_label_subset(y, gen)] += 1
    assert counts.tolist()[:2] == pytest.approx([1500, 1500], abs=120)
    assert counts.tolist()[2:] == pytest.approx([1000, 1000, 1000], abs=110)


def test_ranksim_edge_cases_one_label_and_a_batch_of_two():
    f = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    same = torch.full((6,), 5.0)
    ours, g_ours = _grads(lambda x: batch_ranksim(x, same, 2.0, torch.Generator().manual_seed(0)), f)
    ref, _ = _grads(lambda x: ref_ranksim(x, same[:, None], 2.0, choice=lambda c: int(c[0])), f)
    assert ours.item() == ref.item() == 0.0 and g_ours.abs().sum() == 0
    two, y2 = f[:2], torch.tensor([1.0, 3.0])
    ours, g_ours = _grads(lambda x: ranksim_loss(x, y2, 2.0), two)
    ref, g_ref = _grads(lambda x: ref_ranksim(x, y2[:, None], 2.0, choice=None), two)
    assert ours.item() == pytest.approx(ref.item()) and torch.allclose(g_ours, g_ref, atol=1e-7)


# ------------------------------------------------------------------------------------------------ ConR


def _conr_inputs(seed: int, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 6, (n,), generator=g).float()
    preds = y + torch.randn(n, generator=g) * 1.5  # some far labels predicted close: negatives
    return torch.randn(n, 8, generator=g), y, preds, 0.5 + torch.rand(n, generator=g)


@pytest.mark.parametrize("weighted", [False, True])
def test_conr_value_and_gradient_equal_the_reference_on_two_views(weighted):
    f, y, p, w = _conr_inputs(4)
    y2, p2, w2 = y.repeat(2), p.repeat(2), w.repeat(2)  # the reference's 2B batch: every anchor has a positive
    f2 = torch.cat([f, f + 0.1 * torch.randn(f.shape, generator=torch.Generator().manual_seed(9))])
    ws = w2 if weighted else None
    ours, g_ours = _grads(lambda x: conr_loss(x, y2, p2, ws, 1.0, 0.07, 0.01), f2)
    ref_w = w2[:, None] if weighted else 1.0
    ref, g_ref = _grads(lambda x: ref_conr(x, y2[:, None], p2[:, None], 1.0, ref_w, 0.01, 0.07), f2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5) and ours > 0
    assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-6) and g_ours.abs().sum() > 0


def test_conr_settings_change_the_value_as_the_reference():
    f, y, p, w = _conr_inputs(6, n=16)
    f2, y2, p2, w2 = torch.cat([f, f.flip(0)]), y.repeat(2), p.repeat(2), w.repeat(2)
    for window, e, t in [(0.5, 0.1, 0.2), (2.0, 0.0, 0.07)]:
        ours = conr_loss(f2, y2, p2, w2, window, t, e)
        ref = ref_conr(f2, y2[:, None], p2[:, None], window, w2[:, None], e, t)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_conr_one_view_anchors_without_positives_count_zero():
    f, y, p, w = _conr_inputs(7)
    y = torch.tensor([0.0, 0, 2, 2, 9, 4, 4, 6, 6, 13])  # 9 and 13 have no neighbour within 1
    per = ref_conr_per_anchor(f, y[:, None], p[:, None], 1.0, w[:, None])
    assert torch.isnan(per[4]) and torch.isnan(per[9])  # the reference divides 0 by 0 there
    ours, g_ours = _grads(lambda x: conr_loss(x, y, p, w), f)
    assert ours.item() == pytest.approx(per.nan_to_num(0.0).mean().item(), rel=1e-5)
    assert torch.isfinite(g_ours).all()


def test_conr_edge_cases_one_label_and_a_batch_of_two():
    f, _, p, _ = _conr_inputs(8)
    same = torch.full((10,), 3.0)  # every pair positive, no negative: zero, as the reference
    ours, g_ours = _grads(lambda x: conr_loss(x, same, p), f)
    assert ours.item() == ref_conr(f, same[:, None], p[:, None]).item() == 0.0 and g_ours.abs().sum() == 0
    # a batch of two (far labels, close predictions: each the other's negative) in the reference's two views
    two = f[:2].repeat(2, 1) + 0.5 * torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    y2, p2 = torch.tensor([1.0, 5.0]).repeat(2), torch.tensor([2.0, 2.5]).repeat(2)
    ours, g_ours = _grads(lambda x: conr_loss(x, y2, p2), two)
    ref, g_ref = _grads(lambda x: ref_conr(x, y2[:, None], p2[:, None]), two)
    assert ours > 0 and ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ config and runs


@pytest.fixture(scope="module")
def compose_dir():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=["experiment=synthetic_dir", "progress=false", "device=cpu", *o])


@pytest.mark.parametrize("method", ["ranksim", "conr"])
def test_config_is_typed_and_refuses_what_does_not_combine(compose_dir, method):
    cfg = to_schema(compose_dir(f"method={method}", "reweight=inv", "reweight.lds=true"))
    assert cfg.method.name == method and cfg.reweight.lds
    with pytest.raises(ConfigError, match="does not combine with synth=mixup"):
        to_schema(compose_dir(f"method={method}", "synth=mixup"))
    with pytest.raises(ConfigError):
        to_schema(compose_dir(f"method={method}", "method.temperature=0" if method == "conr" else "method.gamma=-1"))
    if method == "conr":
        with pytest.raises(ConfigError, match="reads images"):  # text has no views
            to_schema(compose_dir("experiment=stsb_dir", "method=conr"))
    with pytest.raises(ConfigError, match=f"method={method} needs task=regression"):  # a classification run
        to_schema(compose_dir("task=classification", f"method={method}"))


def test_dir_view_is_a_zero_padded_16_pixel_crop_and_flip_normalised():
    from ltbench.methods.conr import dir_view

    x = torch.full((64, 3, 40, 40), 255, dtype=torch.uint8)
    x[:, :, :, :20] = 0  # left half black: a flip moves it
    v = dir_view(x, torch.Generator().manual_seed(0), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert v.shape == x.shape and v.min() == -1 and v.max() == 1
    white = (v == 1).float().mean(dim=(1, 2, 3))
    assert white.min() >= (40 - 16) * 4 / (40 * 40) and white.max() <= 0.5 + 1e-6  # padding <= 16 on each side
    left_white = (v[:, 0, 20, :20] == 1).any(1)  # some images flipped: white on the left
    assert 10 < int(left_white.sum()) < 54


@pytest.mark.parametrize("method,column", [("ranksim", "ranksim"), ("conr", "conr")])
def test_tiny_run_trains_with_the_term_logged(compose_dir, tmp_path, method, column):
    from ltbench.runner import run

    args = ["schedule.epochs=2", "model.hidden=[16]", "reweight=inv", "reweight.lds=true", f"method={method}"]
    m = run(compose_dir(*args, f"results_dir={tmp_path}"), tmp_path / "on")
    assert m["status"] == "completed" and m["mae"] > 0
    rows = (tmp_path / "on" / "epochs.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert column in header and float(last[header.index(column)]) > 0
    off = "method.gamma=0" if method == "ranksim" else "method.beta=0"
    m0 = run(compose_dir(*args, off, f"results_dir={tmp_path}"), tmp_path / "off")
    assert m0["mae"] != m["mae"]  # the term trains the features
    assert json.loads(Path(tmp_path / "on" / "metrics.json").read_text())["status"] == "completed"


class _Loss:
    """A stand-in for the supervised method's loss: MSE on the first output, per-sample weights 1 + y / 10."""

    def __call__(self, out, y, weight):
        return ((out[:, 0] - y) ** 2).mean()

    def sample_weights(self, y, weight):
        return 1 + y / 10


@pytest.mark.parametrize("views", [1, 2])
def test_conr_step_puts_views_1_and_2_through_conr_and_view_0_through_the_loss(views):
    from types import SimpleNamespace as NS

    from ltbench.core import Epoch
    from ltbench.methods.conr import ConR, ConRConfig

    base = NS(loss_fn=_Loss(), weight=None, task=NS(step_sums=lambda out, y: {"n": torch.tensor(len(y))}))
    ctx = NS(stats=NS(center=1.0, scale=2.0), data=NS(kind="features", mean=None, std=None, transforms=None),
             cfg=NS(augment=None, dataset=NS()))  # fmt: skip
    cfg = ConRConfig(views=views, window=2.0)
    method = ConR(cfg, ctx, nn.Linear(4, 1), base)
    lin = nn.Linear(4, 1)
    net = method.wrap(NS(features=lambda x: torch.tanh(x), head=lin))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.tensor([0.0, 1, 1, 3, 5, 6, 6, 9])
    ep = Epoch("train", 0, 1, 0.1, torch.Generator().manual_seed(0), amp=False)
    loss, sums = method.step(net, Batch(x, y), ep)
    k = 1 if views == 1 else 2
    f = torch.tanh(x).repeat(k, 1)
    preds = lin(f)[:, 0].detach() * 2.0 + 1.0
    reg = conr_loss(f, y.repeat(k), preds, (1 + y / 10).repeat(k), 2.0, 0.07, 0.01)
    assert sums["mean_conr"].item() == pytest.approx(reg.item() * 8, rel=1e-6) and reg > 0
    assert loss.item() == pytest.approx(_Loss()(lin(torch.tanh(x)), y, None).item() + 4.0 * reg.item(), rel=1e-6)


def test_ranksim_step_adds_gamma_times_the_term_on_the_features():
    from types import SimpleNamespace as NS

    from ltbench.core import Epoch
    from ltbench.methods.ranksim import RankSim, RankSimConfig

    base = NS(loss_fn=_Loss(), weight=None, task=NS(step_sums=lambda out, y: {}))
    method = RankSim(RankSimConfig(gamma=3.0), NS(), nn.Linear(4, 1), base)
    lin = nn.Linear(4, 1)
    net = method.wrap(NS(features=lambda x: torch.tanh(x), head=lin))
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0.0, 1, 1, 3, 5, 6, 6, 9])
    loss, sums = method.step(net, Batch(x, y), Epoch("train", 0, 1, 0.1, torch.Generator().manual_seed(4), amp=False))
    reg = batch_ranksim(torch.tanh(x), y, 2.0, torch.Generator().manual_seed(4))  # the same draws
    assert sums["mean_ranksim"].item() == pytest.approx(reg.item() * 8) and reg > 0
    assert loss.item() == pytest.approx(_Loss()(lin(torch.tanh(x)), y, None).item() + 3.0 * reg.item(), rel=1e-6)


def test_the_agedb_presets_are_the_reference_commands(compose_dir):
    """experiment=ranksim_agedb: ranksim agedb-dir/README.md "SQINV + RankSim" (batch 64, lr 2.5e-4, gamma 100,
    lambda 2, sqrt_inv); experiment=conr_agedb: ConR agedb-dir/README.md + its train.py defaults (120 epochs, lr
    x0.1 at 60 and 80); both test the best validation checkpoint, as the references' train.py."""
    r = to_schema(compose_dir("experiment=ranksim_agedb"))
    m = r.method
    assert (m.name, m.gamma, m.interpolation_lambda, r.reweight.name) == ("ranksim", 100, 2, "sqinv")
    c = to_schema(compose_dir("experiment=conr_agedb"))
    assert (c.method.name, c.method.beta, c.method.window, c.method.e, c.reweight.name) == ("conr", 4, 1, 0.01, "none")
    for cfg, epochs in ((r, 90), (c, 120)):
        s = cfg.schedule
        assert (cfg.dataset.name, cfg.model.name, cfg.loss.name, cfg.select) == ("agedb_dir", "resnet50", "l1", "val")
        assert (s.optimizer, s.batch_size, s.lr, s.epochs, s.milestone_epochs) == ("adam", 64, 2.5e-4, epochs, [60, 80])


def test_the_imdbwiki_and_stsb_presets_are_the_reference_commands(compose_dir):
    """experiment=ranksim_imdbwiki: ranksim imdb-wiki-dir/README.md (batch 256, lr 1e-3, gamma 100, lambda 2, SQINV);
    experiment=ranksim_stsb: sts-b-dir/README.md + train.py defaults (gamma 3e-4, lambda 2, batch 16, lr 2.5e-4,
    MSE); experiment=conr_imdbwiki: ConR imdb-wiki-dir/README.md + train.py (batch 64, lr 2.5e-4, 90 epochs); each
    tests the best validation checkpoint. ``method=<x>_fds`` on a preset keeps its settings and adds FDS."""
    r = to_schema(compose_dir("experiment=ranksim_imdbwiki"))
    s, m = r.schedule, r.method
    assert (r.dataset.name, r.model.name, r.loss.name, r.reweight.name, r.select) == ("imdbwiki_dir", "resnet50", "l1",
                                                                                      "sqinv", "val")  # fmt: skip
    assert (m.name, m.gamma, m.interpolation_lambda, m.fds) == ("ranksim", 100, 2, None)
    assert (s.optimizer, s.batch_size, s.lr, s.epochs, s.milestone_epochs, s.weight_decay) == ("adam", 256, 1e-3, 90,
                                                                                               [60, 80], 0)  # fmt: skip
    t = to_schema(compose_dir("experiment=ranksim_stsb", "method=ranksim_fds"))
    assert (t.dataset.name, t.loss.name, t.reweight.name, t.select) == ("stsb_dir", "mse", "none", "val")
    assert (t.method.gamma, t.schedule.batch_size, t.schedule.lr, t.schedule.weight_decay) == (3e-4, 16, 2.5e-4, 1e-5)
    assert (t.method.fds.ks, t.method.fds.sigma, t.method.fds.clip, t.method.fds.bucket_num) == (5, 2, [0.5, 2.0], 50)
    c = to_schema(compose_dir("experiment=conr_imdbwiki", "method=conr_fds"))
    assert (c.dataset.name, c.reweight.name, c.select, c.method.beta, c.method.window, c.method.e) == (
        "imdbwiki_dir", "none", "val", 4, 1, 0.01)  # fmt: skip
    cs = c.schedule
    assert (cs.batch_size, cs.lr, cs.epochs, cs.milestone_epochs) == (64, 2.5e-4, 90, [60, 80])
    assert (c.method.fds.bucket_start, c.method.fds.bucket_num) == (0, 100)
    a = to_schema(compose_dir("experiment=ranksim_agedb", "method=ranksim_fds"))
    af = a.method.fds
    assert (a.method.gamma, a.schedule.batch_size, af.bucket_start, af.bucket_num) == (100, 64, 3, 100)
