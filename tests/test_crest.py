"""CReST / CReST+ (``semi=crest``, ``semi=crest_plus``) against transcriptions of the USB reference, and a tiny run
over generations that resumes inside a later generation to the numbers of an uninterrupted run.

Transcribed (``np.math.pow`` written ``math.pow``, the prints and ``.cuda()`` dropped), from
microsoft/Semi-supervised-learning:
- ``semilearn/imb_algorithms/crest/crest.py``: ``CReST.get_split`` (the picks) and the end of a generation in
  ``CReST.train`` (the per-class pseudo-label lists, by descending confidence), and the temperature of a generation
  (the start of ``CReST.train``'s generation loop);
- ``semilearn/imb_algorithms/crest/utils.py``: ``ProgressiveDistAlignEMAHook.dist_align``, with ``update_p`` of
  ``semilearn/algorithms/hooks/dist_align.py`` (``DistAlignEMAHook``, not distributed, p_target of type 'gt');
- ``semilearn/algorithms/fixmatch/fixmatch.py``: the loss of ``FixMatch.train_step`` (with the DistAlignHook, the
  fixed-threshold mask, hard pseudo-labels), on the labeled set grown by the picks.
"""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at, make_cifar
from torch import nn

from ltbench.core import Batch, Epoch
from ltbench.methods.crest import CReST, CrestPlusConfig, ProgressiveAlign, align_temperature, pick_rates, select_picks
from ltbench.runner import run

K = 5
COUNTS = [20, 12, 7, 4, 2]  # head first, distinct: USB's class index is the rank

# ------------------------------------------------------------------------------------------ reference transcriptions


def ref_pseudo_label_list(ulb_logits, num_classes):
    """USB ``CReST.train``, after a generation: per class, the images predicted as it, by descending confidence."""
    ulb_score, ulb_pred = torch.max(torch.softmax(ulb_logits, dim=1), dim=1)
    pseudo_label_list = []
    for c in range(num_classes):
        idx_gather = torch.where(ulb_pred == c)[0]
        if len(idx_gather) == 0:
            pseudo_label_list.append([])
            continue
        score_gather = ulb_score[idx_gather]
        score_sorted_idx = torch.argsort(score_gather, descending=True)
        idx_gather = idx_gather[score_sorted_idx]
        pseudo_label_list.append(idx_gather.numpy())
    return pseudo_label_list


def ref_get_split(lb_class_dist, num_classes, sampling_alpha, lb_data, lb_targets, eval_ulb_data, eval_ulb_targets,
                  pseudo_label_list):  # fmt: skip
    """USB ``CReST.get_split``."""
    data_picked = []
    targets_picked = []
    sorted_class = np.argsort(lb_class_dist)[::-1]
    class_imb_ratio = lb_class_dist[sorted_class][0] / lb_class_dist[sorted_class[-1]]
    class_imb_ratio = 1.0 / class_imb_ratio
    mu = math.pow(class_imb_ratio, 1 / (num_classes - 1))
    for c in sorted_class:
        num_picked = int(len(pseudo_label_list[c]) * math.pow(math.pow(mu, (num_classes - 1) - c), 1 / sampling_alpha))
        idx_picked = pseudo_label_list[c][:num_picked]
        try:
            if len(idx_picked) > 0:
                data_picked.append(eval_ulb_data[idx_picked])
                targets_picked.append(np.ones_like(eval_ulb_targets[idx_picked]) * c)
        except Exception:
            continue
    data_picked.append(lb_data)
    targets_picked.append(lb_targets)
    return np.concatenate(data_picked, axis=0), np.concatenate(targets_picked, axis=0)


class RefProgressiveAlign:
    """USB ``DistAlignEMAHook`` (``update_p``) with ``ProgressiveDistAlignEMAHook.dist_align``."""

    def __init__(self, num_classes, momentum=0.999, p_target=None):
        self.num_classes, self.m = num_classes, momentum
        self.update_p_target, self.p_target = False, torch.from_numpy(p_target)
        self.p_model = None

    @torch.no_grad()
    def dist_align(self, algorithm, probs_x_ulb, probs_x_lb=None):
        self.update_p(algorithm, probs_x_ulb, probs_x_lb)
        p_target = self.p_target
        if algorithm.cur_dist_align_t != 1:
            p_target = p_target**algorithm.cur_dist_align_t
            p_target = p_target / p_target.sum()
        probs_x_ulb_aligned = probs_x_ulb * (p_target + 1e-6) / (self.p_model + 1e-6)
        probs_x_ulb_aligned = probs_x_ulb_aligned / probs_x_ulb_aligned.sum(dim=-1, keepdim=True)
        return probs_x_ulb_aligned

    @torch.no_grad()
    def update_p(self, algorithm, probs_x_ulb, probs_x_lb):
        probs_x_ulb = probs_x_ulb.detach()
        if self.p_model is None:
            self.p_model = torch.mean(probs_x_ulb, dim=0)
        else:
            self.p_model = self.p_model * self.m + torch.mean(probs_x_ulb, dim=0) * (1 - self.m)


def ref_cur_dist_align_t(gen, num_gens, dist_align_t):
    """USB ``CReST.train``: the temperature before generation ``gen``."""
    cur = gen / (num_gens - 1)
    return (1.0 - cur) * 1.0 + cur * dist_align_t


def ref_fixmatch_loss(logits_x_lb, y_lb, logits_x_ulb_w, logits_x_ulb_s, hook, algorithm, p_cutoff, lambda_u):
    """USB ``FixMatch.train_step``'s loss with the DistAlignHook (hard labels, fixed threshold, 'ce')."""
    sup_loss = F.cross_entropy(logits_x_lb, y_lb, reduction="mean")
    probs_x_ulb_w = torch.softmax(logits_x_ulb_w.detach(), dim=-1)
    probs_x_ulb_w = hook.dist_align(algorithm, probs_x_ulb=probs_x_ulb_w.detach())
    max_probs, _ = torch.max(probs_x_ulb_w, dim=-1)
    mask = max_probs.ge(p_cutoff).to(max_probs.dtype)
    pseudo_label = torch.argmax(probs_x_ulb_w, dim=-1)
    unsup_loss = (F.cross_entropy(logits_x_ulb_s, pseudo_label, reduction="none") * mask).mean()
    return sup_loss + lambda_u * unsup_loss


# ----------------------------------------------------------------------------------------------- the parts


def _logits(n, g, absent=3):
    logits = torch.randn(n, K, generator=g) * 2
    logits[:, absent] -= 100  # class `absent` is never predicted
    return logits


def test_picks_equal_usb_get_split_with_a_class_never_predicted():
    g = torch.Generator().manual_seed(0)
    logits = _logits(60, g)
    truth = torch.randint(0, K, (60,), generator=g).numpy()
    dist = np.array(COUNTS) / sum(COUNTS)
    for alpha in (3.0, 1.0, 0.5):
        ref = ref_pseudo_label_list(logits, K)
        lb = np.full(sum(COUNTS), -1)
        data, targets = ref_get_split(dist, K, alpha, lb, np.zeros_like(lb), np.arange(60), truth, ref)
        ours = select_picks(logits.softmax(1), COUNTS, alpha)
        n = len(ours["indices"])
        assert ours["indices"] == data[:n].tolist() and ours["labels"] == targets[:n].tolist()
        assert (data[n:] == -1).all()  # the rest is the labeled set
        assert ours["per_class"][3] == 0 and ours["predicted"][3] == 0
        assert ours["per_class"] == [int((targets[:n] == c).sum()) for c in range(K)]
        assert ours["predicted"] == [len(r) for r in ref]
    assert select_picks(logits.softmax(1), COUNTS, 3.0)["per_class"][-1] == ours["predicted"][-1]  # the tail: all


def test_pick_rates_follow_the_rank_and_ignore_empty_classes():
    rates = pick_rates(COUNTS, 3.0)
    perm = [3, 0, 4, 1, 2]
    assert torch.allclose(pick_rates([COUNTS[i] for i in perm], 3.0), rates[perm])
    assert float(rates[-1]) == 1.0 and float(rates[0]) == pytest.approx((2 / 20) ** (1 / 3))
    with_empty = pick_rates([*COUNTS[:-1], 0], 3.0)
    assert torch.isfinite(with_empty).all() and float(with_empty[-1]) == 1.0


def test_progressive_alignment_equals_usb_over_generations():
    g = torch.Generator().manual_seed(1)
    num_gens, t_last = 6, 0.5
    dist = np.array(COUNTS, dtype=np.float32) / sum(COUNTS)
    ref, algorithm = RefProgressiveAlign(K, 0.9, dist), SimpleNamespace(cur_dist_align_t=1.0, distributed=False)
    p_model = None
    for gen in range(num_gens):
        algorithm.cur_dist_align_t = ref_cur_dist_align_t(gen, num_gens, t_last)
        assert align_temperature(gen, num_gens, t_last) == algorithm.cur_dist_align_t
        ours = ProgressiveAlign(torch.tensor(COUNTS), 0.9, p_model)  # a new generation, p_model carried on
        for _ in range(3):
            probs = torch.randn(8, K, generator=g).softmax(1)
            expect = ref.dist_align(algorithm, probs)
            assert torch.allclose(ours(probs, algorithm.cur_dist_align_t), expect, atol=1e-6)
            assert torch.allclose(ours.p_model, ref.p_model, atol=1e-7)
        p_model = ours.p_model.tolist()
    assert algorithm.cur_dist_align_t == t_last


class _Fixed(nn.Module):
    """A 'network' whose outputs are given logits (a parameter, so their gradients can be read)."""

    def __init__(self, logits):
        super().__init__()
        self.out = nn.Parameter(logits.clone())

    def forward(self, x):
        assert len(x) == len(self.out)
        return self.out


class _Base(nn.Module):
    weight = None
    task = SimpleNamespace(step_sums=lambda out, y: {})

    def loss_fn(self, out, y, w):
        return F.cross_entropy(out, y)

    def on_epoch_start(self, ep):
        pass


def test_crest_plus_step_equals_usb_fixmatch_on_the_grown_labeled_set():
    """Two steps of generation 2 of 6 (t = 0.8): loss and logit gradients, the picks' share of a batch, p_model."""
    g = torch.Generator().manual_seed(2)
    n_u = 30
    images, truth = torch.randint(0, 255, (n_u, 3, 8, 8), generator=g, dtype=torch.uint8), torch.zeros(n_u).long()
    feed = SimpleNamespace(unlabeled=lambda idx, k: iter([Batch(images[idx], truth[idx], idx)]))
    data = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=K, train_y=torch.zeros(sum(COUNTS)).long())
    ctx = SimpleNamespace(data=data, stats=SimpleNamespace(counts=COUNTS), feed=feed)
    cfg = CrestPlusConfig(threshold=0.3, align_momentum=0.9)
    picks = {"indices": list(range(0, 20, 2)), "labels": [i % K for i in range(10)]}
    model = nn.Linear(3, K)
    m = CReST(cfg, ctx, model, _Base(), gen=2, picks=picks, p_model=[0.2] * K)  # type: ignore[arg-type]
    ref = RefProgressiveAlign(K, 0.9, np.array(COUNTS, dtype=np.float32) / sum(COUNTS))
    ref.p_model = torch.full((K,), 0.2)
    algorithm = SimpleNamespace(cur_dist_align_t=ref_cur_dist_align_t(2, 6, 0.5), distributed=False)
    ep = Epoch("crest", 0, 1, 0.1, torch.Generator().manual_seed(0), False)
    m.on_epoch_start(ep)
    drawn: list = []
    real = m.pick_batch
    m.pick_batch = lambda n, e: drawn.append(real(n, e)) or drawn[-1]  # type: ignore[method-assign]
    for _ in range(2):
        y = torch.tensor([0, 1, 1, 4])
        u = Batch(images[:8], truth[:8], index=torch.arange(8))
        batch = Batch(torch.zeros(4, 3, 8, 8), y, unlabeled=u)
        k = math.ceil(4 * 10 / sum(COUNTS))
        net = _Fixed(torch.randn(4 + k + 16, K, generator=g) * 3)
        loss, _ = m.step(net, batch, ep)
        loss.backward()
        px, py = drawn[-1]
        assert len(px) == k == 1 and int(py[0]) in picks["labels"]
        logits = net.out.detach().clone().requires_grad_(True)
        expect = ref_fixmatch_loss(logits[: 4 + k], torch.cat([y, py]), logits[4 + k : 12 + k], logits[12 + k :],
                                   ref, algorithm, 0.3, 1.0)  # fmt: skip
        expect.backward()
        assert torch.allclose(loss, expect, atol=1e-6)
        assert net.out.grad is not None and torch.allclose(net.out.grad, logits.grad, atol=1e-7)
        assert torch.allclose(m.align.p_model, ref.p_model, atol=1e-7)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------- config and run


def test_bad_settings_are_one_line_config_errors(compose_cfg):
    from ltbench.config import to_schema
    from ltbench.errors import ConfigError

    for args, match in [(["semi=crest", "semi.num_gens=1"], "num_gens"),
                        (["semi=crest_plus", "semi.dist_align_t=0"], "dist_align_t")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            to_schema(compose_cfg("dataset=cifar10lt_ssl", *args))


def test_generations_run_record_their_picks_and_resume_inside_a_generation(compose_cfg, tmp_path, monkeypatch):
    root = make_cifar(tmp_path / "data", 10, train_per_class=40, test_per_class=4)
    args = ["dataset=cifar10lt_ssl", f"dataset.root={root}", "dataset.download=false", "dataset.max_labeled=16",
            "dataset.max_unlabeled=20", "dataset.imbalance_ratio=4", "dataset.unlabeled_ratio=4",
            "dataset.val_per_class=2", "schedule.epochs=2", "schedule.batch_size=16", "semi.threshold=0.1",
            "semi=crest_plus", "semi.num_gens=3"]  # fmt: skip
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    assert full["status"] == "completed" and full["stages"] == ["crest", "train"]
    crest = full["crest"]
    assert [g["generation"] for g in crest["generations"]] == [0, 1]
    num_u = full["num_unlabeled"]
    for g in crest["generations"]:
        assert sum(g["per_class"]) == g["total"] == len(g["indices"]) == len(set(g["indices"]))
        assert all(0 <= i < num_u for i in g["indices"]) and len(g["precision"]) == 10
        assert all(p <= q for p, q in zip(g["per_class"], g["predicted"]))
        assert all((p is None) == (n == 0) for p, n in zip(g["precision"], g["per_class"]))
    assert full["crest_picks"] == crest["generations"][1]["total"] and full["crest_align_t"] == 0.5
    assert full["cost"]["epochs"] == {"crest": 4, "train": 2}
    with open(tmp_path / "full" / "crest_epochs.csv") as f:
        assert [r["generation"] for r in csv.DictReader(f)] == ["0", "0", "1", "1"]
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"),
                 at=4, stage="crest")  # fmt: skip
    state = torch.load(tmp_path / "cut" / "crest_checkpoint.pt", weights_only=False)
    assert state["crest"]["generation"] == 1 and state["epoch"] == 1  # inside the second generation
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["crest"]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    assert resumed["crest"]["generations"] == crest["generations"]
    assert resumed["cost"]["epochs"] == full["cost"]["epochs"]
