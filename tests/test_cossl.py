"""CoSSL (``semi=cossl``) against transcriptions of the USB reference and of YUE-FAN/CoSSL, and a tiny run that crosses
the co-learning boundary and resumes after it to the numbers of an uninterrupted run.

Transcribed (the ``.cuda()`` calls, prints and progress bars dropped; ``np.random`` / ``random`` draws injected so both
sides use the same numbers), from microsoft/Semi-supervised-learning:
- ``semilearn/imb_algorithms/cossl/utils.py``: ``TFE`` (from "create TFE features for each class", on the extracted
  feature stacks), ``weight_imprint`` (the imprinted weights), ``WeightEMA`` and ``classifier_train`` (the warm-up
  head's training, with the optimiser of ``classifier_warmup``);
- ``semilearn/imb_algorithms/cossl/cossl.py``: the TFE loop of ``CoSSL.train_step`` (integer labels:
  ``mixup_prob[label_x.argmax()]``), the teacher loss, the two optimiser steps of ``CoSSLParamUpdateHook`` and the
  mixup probabilities of its ``before_train_epoch``; with ``semilearn/algorithms/fixmatch/fixmatch.py``
  (``FixMatch.train_step``'s loss: hard labels, fixed threshold);
- YUE-FAN/CoSSL ``train_cifar_fix_cossl.py``: the same TFE loop with one-hot labels (``tfe_prob[label_x.argmax()]``).
"""

from __future__ import annotations

import copy
import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at, make_cifar
from torch import nn

from ltbench.core import Batch, Epoch
from ltbench.methods import cossl
from ltbench.methods.cossl import CoSSL, CoSSLConfig, CoSSLNet, boundary, imprint, mixup_probs, tfe_balanced_set
from ltbench.runner import run

K = 5
COUNTS = [20, 12, 7, 4, 2]  # head first: class 0 has the largest count (mixup probability 0)

# ------------------------------------------------------------------------------------------ reference transcriptions


def ref_mixup_prob(lb_cnt_per_class):
    """USB ``CoSSLParamUpdateHook.before_train_epoch`` (= YUE-FAN/CoSSL ``tfe_prob``)."""
    return [(max(lb_cnt_per_class) - i) / max(lb_cnt_per_class) for i in lb_cnt_per_class]


def ref_step_tfe(tfe_feat_x, tfe_targets_x, tfe_feat_u, mixup_prob, max_lam, rand, uniform):
    """USB ``CoSSL.train_step``'s TFE loop (``rand`` for ``random.random``, ``uniform`` for ``np.random.uniform``)."""
    new_feat_list = []
    new_target_list = []
    for x, label_x, u in zip(tfe_feat_x, tfe_targets_x, tfe_feat_u[: len(tfe_targets_x)]):
        if rand() < mixup_prob[label_x.argmax()]:
            lam = uniform(max_lam, 1.0, size=1)
            lam = torch.FloatTensor(lam)
            new_feat = lam * x + (1 - lam) * u
            new_target = label_x
        else:
            new_feat = x
            new_target = label_x
        new_feat_list.append(new_feat)
        new_target_list.append(new_target)
    return torch.stack(new_feat_list, dim=0), torch.stack(new_target_list, dim=0)


def ref_tfe(labeled_feature_stack, labeled_target_stack, labeled_cls_prob_stack, unlabeled_feature_stack,
            unlabeled_cls_prob_stack, num_classes, num_samples_per_class, rng):  # fmt: skip
    """USB ``TFE`` after the feature extraction (``rng`` for ``np.random``)."""
    labeled_set_idx = torch.tensor(list(range(len(labeled_feature_stack))))
    labeled_set_per_cls_idx = [labeled_set_idx[(labeled_target_stack == i)] for i in range(num_classes)]
    augment_features = []
    augment_targets = []
    for cls_id in range(num_classes):
        if num_samples_per_class[cls_id] < max(num_samples_per_class):
            augment_size = max(num_samples_per_class) - num_samples_per_class[cls_id]
            current_cls_feats = labeled_feature_stack[labeled_target_stack == cls_id]
            other_labeled_data_idx = np.concatenate(
                labeled_set_per_cls_idx[:cls_id] + labeled_set_per_cls_idx[cls_id + 1 :], axis=0
            )
            other_cls_feats = torch.cat([labeled_feature_stack[other_labeled_data_idx], unlabeled_feature_stack], dim=0)
            other_cls_probs = torch.cat([labeled_cls_prob_stack[other_labeled_data_idx], unlabeled_cls_prob_stack], 0)
            probs4current_cls = other_cls_probs[:, cls_id]
            _sorted_probs, order = probs4current_cls.sort(descending=True)
            other_cls_feats = other_cls_feats[order]
            input_a_idx = rng.choice(list(range(len(current_cls_feats))), augment_size, replace=True)
            input_b_idx = np.asarray(list(range(augment_size)))
            lambdas = rng.beta(0.75, 0.75, size=augment_size)
            for lam, a_idx, b_idx in zip(lambdas, input_a_idx, input_b_idx):
                tfe_input = lam * current_cls_feats[a_idx] + (1 - lam) * other_cls_feats[b_idx]
                tfe_target = torch.zeros((1, num_classes))
                tfe_target[0, cls_id] = 1
                augment_features.append(tfe_input.view(1, -1))
                augment_targets.append(tfe_target)
    augment_features = torch.cat(augment_features, dim=0)
    augment_targets = torch.cat(augment_targets, dim=0)
    target_stack = torch.zeros(len(labeled_target_stack), num_classes).scatter_(1, labeled_target_stack.view(-1, 1), 1)
    new_feat_tensor = torch.cat([labeled_feature_stack, augment_features], dim=0)
    new_target_tensor = torch.cat([target_stack, augment_targets], dim=0)
    return new_feat_tensor, new_target_tensor


def ref_imprint(output_stack, target_stack, num_classes):
    """USB ``weight_imprint``: the new classifier weight."""
    new_weight = torch.zeros(num_classes, output_stack.shape[1])
    for i in range(num_classes):
        tmp = output_stack[target_stack == i].mean(0)
        new_weight[i] = tmp / tmp.norm(p=2)
    return new_weight


class RefWeightEMA:
    """USB ``utils.WeightEMA`` (wd=False)."""

    def __init__(self, model, ema_model, alpha=0.999):
        self.alpha = alpha
        self.params = list(model.state_dict().values())
        self.ema_params = list(ema_model.state_dict().values())
        for param, ema_param in zip(self.params, self.ema_params):
            param.data.copy_(ema_param.data)

    def step(self):
        one_minus_alpha = 1.0 - self.alpha
        for param, ema_param in zip(self.params, self.ema_params):
            ema_param = ema_param.float()
            param = param.float()
            ema_param.mul_(self.alpha)
            ema_param.add_(param * one_minus_alpha)


def ref_classifier_train(batches, classifier, optimizer, ema_optimizer):
    """USB ``classifier_train``'s loop over given (features, one-hot targets) batches."""
    for inputs_x, targets_x in batches:
        outputs = classifier(inputs_x)
        loss = (-F.log_softmax(outputs, dim=1) * targets_x).sum(dim=1)
        loss = loss.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_optimizer.step()


def ref_fixmatch_loss(logits_x_lb, y_lb, logits_x_ulb_w, logits_x_ulb_s, p_cutoff, lambda_u):
    """USB ``FixMatch.train_step``'s loss (hard labels, fixed threshold, 'ce')."""
    sup_loss = F.cross_entropy(logits_x_lb, y_lb, reduction="mean")
    probs_x_ulb_w = torch.softmax(logits_x_ulb_w.detach(), dim=-1)
    max_probs, _ = torch.max(probs_x_ulb_w, dim=-1)
    mask = max_probs.ge(p_cutoff).to(max_probs.dtype)
    pseudo_label = torch.argmax(probs_x_ulb_w, dim=-1)
    unsup_loss = (F.cross_entropy(logits_x_ulb_s, pseudo_label, reduction="none") * mask).mean()
    return sup_loss + lambda_u * unsup_loss


# ----------------------------------------------------------------------------------------------- the parts


def test_mixup_probabilities_and_step_tfe_equal_the_references():
    """Per-class probabilities (the largest class: 0); the step's mixing with a class absent from the batch, as
    YUE-FAN/CoSSL (one-hot labels, ``label``) and as USB's port (integer labels: class 0's probability, ``first``)."""
    assert mixup_probs(COUNTS).tolist() == ref_mixup_prob(COUNTS) and float(mixup_probs(COUNTS)[0]) == 0
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 1, 4, 4, 0, 1, 4])  # classes 2 and 3 absent
    fx, fu = torch.randn(8, 6, generator=g), torch.randn(10, 6, generator=g)
    r, u = torch.rand(8, generator=g), torch.rand(8, generator=g)
    for counts in (COUNTS, COUNTS[::-1]):  # head first (USB: never mixes), tail first (USB: always class 0's)
        for index, targets in (("label", F.one_hot(y, K).float()), ("first", y)):
            draws, i = iter(r.tolist()), {"n": -1}

            def rand(draws=draws, i=i):
                i["n"] += 1
                return next(draws)

            def uniform(low, high, size, i=i):
                return np.array([low + (high - low) * float(u[i["n"]])], dtype=np.float32)

            prob = ref_mixup_prob(counts)
            expect, _ = ref_step_tfe(fx, targets, fu, prob, 0.6, rand, uniform)
            ours = cossl.tfe_mix(fx, y, fu, mixup_probs(counts, index).float(), r, u, 0.6)
            assert torch.allclose(ours, expect, atol=1e-6)
    head_first = cossl.tfe_mix(fx, y, fu, mixup_probs(COUNTS, "first").float(), r, u, 0.6)
    assert torch.equal(head_first, fx)  # USB's port on a head-first set: no sample is ever mixed
    ours = cossl.tfe_mix(fx, y, fu, mixup_probs(COUNTS).float(), r, u, 0.6)
    assert torch.equal(ours[y == 0], fx[y == 0])  # the largest class (probability 0) is never mixed
    assert not torch.equal(ours[y == 4], fx[y == 4])  # the smallest (0.9) is, with these draws


def _stacks(g, n_u=15):
    yl = torch.cat([torch.full((c,), k) for k, c in enumerate(COUNTS)])[torch.randperm(sum(COUNTS), generator=g)]
    fl, fu = torch.randn(len(yl), 6, generator=g), torch.randn(n_u, 6, generator=g)
    w = imprint(fl, yl, K)
    return fl, yl, (fl @ w.t()).softmax(1), fu, (fu @ w.t()).softmax(1)


def test_warmup_tfe_set_and_imprinting_equal_usb():
    g = torch.Generator().manual_seed(1)
    fl, yl, pl, fu, pu = _stacks(g)
    assert torch.allclose(imprint(fl, yl, K), ref_imprint(fl, yl, K), atol=1e-6)
    ours_f, ours_y = tfe_balanced_set(fl, yl, pl, fu, pu, COUNTS, np.random.default_rng(3))
    ref_f, ref_y = ref_tfe(fl, yl, pl, fu, pu, K, COUNTS, np.random.default_rng(3))
    assert torch.allclose(ours_f, ref_f.float(), atol=1e-6) and torch.equal(ours_y, ref_y.argmax(1))
    assert torch.bincount(ours_y, minlength=K).tolist() == [max(COUNTS)] * K  # balanced; the largest class: none added
    # a class without labeled images: no enhancement for it (USB fails), a zero imprinted weight, the rest unchanged
    keep = yl != 4
    _, y2 = tfe_balanced_set(fl[keep], yl[keep], pl[keep], fu, pu, [*COUNTS[:4], 0], np.random.default_rng(3))
    assert torch.bincount(y2, minlength=K).tolist() == [max(COUNTS)] * 4 + [0]
    assert float(imprint(fl[keep], yl[keep], K)[4].abs().sum()) == 0
    # more enhancements than other features: they are reused cyclically
    f3, y3 = tfe_balanced_set(fl, yl, pl, fu[:0], pu[:0], [200, *COUNTS[1:]], np.random.default_rng(3))
    assert torch.isfinite(f3).all() and int((y3 == 4).sum()) == 200


def test_warmup_head_training_equals_usb_classifier_train():
    g = torch.Generator().manual_seed(2)
    feats, y = torch.randn(37, 6, generator=g), torch.randint(0, K, (37,), generator=g)
    cfg = CoSSLConfig(tfe_warm_epochs=2, tfe_warm_iters=5, tfe_warm_bs=8, tfe_warm_ema=0.9)
    head, ema = cossl.train_warm_head(feats, y, K, cfg, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # the same draws: the initial head, then one permutation per pass
    bound = 1 / 6**0.5
    w0, b0 = [(torch.rand(s, generator=gen) * 2 - 1) * bound for s in ((K, 6), (K,))]
    batches = []
    for _ in range(2):  # each warm-up epoch a new loader iterator (USB classifier_train); 4 full batches per pass
        for step in range(5):
            if step % 4 == 0:
                order = torch.randperm(37, generator=gen)[:32].view(4, 8)
            idx = order[step % 4]
            batches.append((feats[idx], F.one_hot(y[idx], K).float()))
    model = nn.Linear(6, K)
    model.weight.data.copy_(w0)
    model.bias.data.copy_(b0)
    ema_model = copy.deepcopy(model)
    for p in ema_model.parameters():
        p.detach_()
    ema_opt = RefWeightEMA(model, ema_model, alpha=0.9)
    groups = [{"params": [model.weight], "weight_decay": 5e-4}, {"params": [model.bias], "weight_decay": 0}]
    opt = torch.optim.Adam(groups, lr=1e-3)
    ref_classifier_train(batches, model, opt, ema_opt)
    for a, b in ((head, model), (ema, ema_model)):
        assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)


class _Fixed(nn.Module):
    """A 'network' whose outputs are given logits (a parameter, so their gradients can be read)."""

    def __init__(self, logits):
        super().__init__()
        self.out = nn.Parameter(logits.clone())
        self.feature_dim = 6

    def forward(self, x):
        assert len(x) == len(self.out)
        return self.out

    def features(self, x):
        return x.flatten(1)[:, :6]


class _Base(nn.Module):
    weight = None
    task = SimpleNamespace(step_sums=lambda out, y: {})

    def loss_fn(self, out, y, w):
        return F.cross_entropy(out, y)

    def on_epoch_start(self, ep):
        pass


def _method(threshold):
    data = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=K, train_y=torch.zeros(sum(COUNTS)).long(),
                           unlabeled_y=torch.zeros(16).long())
    sched = SimpleNamespace(momentum=0.9, nesterov=True, epochs=4, eval_batch_size=16)
    ctx = SimpleNamespace(data=data, stats=SimpleNamespace(counts=COUNTS), feed=None, seed=0,
                          cfg=SimpleNamespace(schedule=sched))  # fmt: skip
    cfg = CoSSLConfig(threshold=threshold, warmup=0.5)
    return CoSSL(cfg, ctx, _Fixed(torch.zeros(1, K)), _Base())  # type: ignore[arg-type]


def test_co_learning_step_and_teacher_updates_equal_usb():
    """Two co-learning steps (the second: no confident pseudo-label; a class absent from the TFE batch): the loss and
    the gradients of the logits and the teacher equal USB's, and after the stage's SGD step the teacher's own SGD
    (lr 0.02, Nesterov, weight decay on the weight only) moves it as USB's ``tfe_optimizer`` does."""
    g = torch.Generator().manual_seed(4)
    m = _method(0.3)
    m.warmed.fill_(True)
    with torch.no_grad():
        m.teacher.weight.copy_(torch.randn(K, 6, generator=g))
        m.teacher.bias.copy_(torch.randn(K, generator=g))
    ref_teacher = copy.deepcopy(m.teacher)
    main = torch.optim.SGD(m.teacher.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ref_main = torch.optim.SGD(ref_teacher.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ref_tfe = torch.optim.SGD([{"params": [ref_teacher.weight], "weight_decay": 5e-4},
                               {"params": [ref_teacher.bias], "weight_decay": 0.0}],
                              lr=0.02, momentum=0.9, nesterov=True)  # fmt: skip
    ep = Epoch("train", 2, 4, 0.03, torch.Generator().manual_seed(0), False)
    for threshold in (0.3, 1.01):
        m.cfg.threshold = threshold
        ty = torch.tensor([0, 1, 1, 3, 0, 1])  # classes 2 and 4 absent
        tfe_feats = torch.randn(6, 6, generator=g)
        m.tfe_batch = lambda n, e, f=tfe_feats, t=ty: (f, t)  # type: ignore[method-assign]
        y = torch.tensor([0, 1, 1, 4])
        u = Batch(torch.randint(0, 255, (8, 3, 8, 8), generator=g, dtype=torch.uint8), torch.zeros(8).long())
        batch = Batch(torch.zeros(4, 3, 8, 8), y, unlabeled=u)
        net = CoSSLNet(_Fixed(torch.randn(20, K, generator=g) * 3), m.teacher)
        loss, sums = m.step(net, batch, ep)
        main.zero_grad()
        loss.backward()
        logits = net.model.out.detach().clone().requires_grad_(True)
        ref_main.zero_grad()
        ref_tfe.zero_grad()
        expect = ref_fixmatch_loss(logits[:4], y, logits[4:12], logits[12:], threshold, 1.0)
        expect = expect + F.cross_entropy(ref_teacher(tfe_feats), ty, reduction="mean")
        expect.backward()
        assert torch.allclose(loss, expect, atol=1e-6) and "mean_loss_teacher" in sums
        assert torch.allclose(net.model.out.grad, logits.grad, atol=1e-7)
        assert torch.allclose(m.teacher.weight.grad, ref_teacher.weight.grad, atol=1e-7)
        if threshold > 1:
            assert float(logits.grad[12:].abs().sum()) == 0  # no confident pseudo-label: no unlabeled gradient
        main.step()
        m.sgd.step(m.teacher)  # what after_step does before the EMA update
        ref_main.step()
        ref_tfe.step()
        assert torch.allclose(m.teacher.weight, ref_teacher.weight, atol=1e-7)
        assert torch.allclose(m.teacher.bias, ref_teacher.bias, atol=1e-7)


def ref_original_unlabeled_loss(feature_u, teacher_head, logits_s, tau):
    """YUE-FAN/CoSSL ``train``: pseudo-labels from the teacher head on the EMA network's weak-view features, and
    ``FixMatch_Loss``'s Lu (one strong view here)."""
    with torch.no_grad():
        outputs_u = teacher_head(feature_u.squeeze())
        targets_u = torch.softmax(outputs_u, dim=1)
        max_p, p_hat = torch.max(targets_u, dim=1)
        select_mask = max_p.ge(tau).float()
        p_hat = torch.zeros(len(p_hat), K).scatter_(1, p_hat.view(-1, 1), 1)
    return -torch.mean(torch.sum(F.log_softmax(logits_s, dim=1) * p_hat, dim=1) * select_mask)


def test_teacher_pseudo_labels_equal_the_original():
    """``teacher_pseudo``: the unlabeled loss takes the teacher's pseudo-labels of the EMA features (the weak view)."""
    g = torch.Generator().manual_seed(5)
    m = _method(0.4)
    m.cfg.teacher_pseudo = True
    m.warmed.fill_(True)
    with torch.no_grad():
        m.teacher.weight.copy_(torch.randn(K, 6, generator=g) * 3)
    weak, strong = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    m.views = lambda x, gen: (weak, strong)  # type: ignore[method-assign]
    ty, feats = torch.tensor([1, 2]), torch.randn(2, 6, generator=g)
    m.tfe_batch = lambda n, e: (feats, ty)  # type: ignore[method-assign]
    y = torch.tensor([0, 1, 1, 4])
    batch = Batch(torch.zeros(4, 3, 8, 8), y, unlabeled=Batch(torch.zeros(8, 3, 8, 8), torch.zeros(8).long()))
    net = CoSSLNet(_Fixed(torch.randn(20, K, generator=g) * 3), m.teacher)
    loss, sums = m.step(net, batch, Epoch("train", 2, 4, 0.03, torch.Generator(), False))
    out = net.model.out.detach()
    lu = ref_original_unlabeled_loss(m.ema.module.model.features(weak), m.teacher, out[12:], 0.4)
    assert 0 < float(lu) and torch.allclose(sums["mean_loss_u"].float() / 4, lu, atol=1e-6)
    expect = F.cross_entropy(out[:4], y) + lu + F.cross_entropy(m.teacher(feats), ty)
    assert torch.allclose(loss, expect, atol=1e-6)


def test_boundary_scales_with_the_stage_and_the_teacher_classifies_after_it():
    assert boundary(0.78125, 256) == 200 and boundary(0.78125, 4443) == 3471 and boundary(1.0, 5) == 5
    m = _method(0.95)
    assert m.eval_model(None).__class__.__name__ == "_Fixed"  # before the boundary: the EMA student
    m.warmed.fill_(True)
    head = m.eval_model(None).head  # type: ignore[union-attr]
    assert head is m.ema.module.head and head is not m.teacher  # the EMA network's teacher


# ----------------------------------------------------------------------------------------------- config and run


def test_bad_settings_are_one_line_config_errors(compose_cfg):
    from ltbench.config import to_schema
    from ltbench.errors import ConfigError

    for args, match in [(["semi.max_lam=1.5"], "max_lam"), (["semi.tfe_augment=none"], "tfe_augment"),
                        (["semi.tfe_warm_bs=0"], "tfe_warm_bs"), (["schedule.optimizer=adam"], "sgd")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            to_schema(compose_cfg("dataset=cifar10lt_ssl", "semi=cossl", *args))


def test_run_crosses_the_boundary_and_resumes_after_it_to_the_same_numbers(compose_cfg, tmp_path, monkeypatch):
    root = make_cifar(tmp_path / "data", 10, train_per_class=30, test_per_class=3)
    args = ["dataset=cifar10lt_ssl", f"dataset.root={root}", "dataset.download=false", "dataset.max_labeled=12",
            "dataset.max_unlabeled=12", "dataset.imbalance_ratio=4", "dataset.unlabeled_ratio=4",
            "dataset.val_per_class=2", "schedule.epochs=3", "schedule.batch_size=16", "semi=cossl", "semi.mu=1",
            "semi.threshold=0.1", "semi.warmup=0.34", "semi.tfe_warm_epochs=2", "semi.tfe_warm_iters=3",
            "semi.tfe_warm_bs=8"]  # fmt: skip
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    assert full["status"] == "completed" and full["cossl_boundary_epoch"] == 1 and full["cossl_teacher"]
    counts = full["train_class_counts"]
    assert full["cossl_tfe_set"] == [max(counts)] * len(counts)  # the warm-up's balanced set
    with open(tmp_path / "full" / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["co_learning"] for r in rows] == ["0", "1", "1"]
    assert rows[0]["loss_teacher"] == "" and all(float(r["loss_teacher"]) > 0 for r in rows[1:])
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"),
                 at=3, stage="train")  # fmt: skip
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and bool(state["method"]["warmed"]) and bool(state["method"]["sgd.started"])
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_epoch"] == [2]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    assert resumed["pseudo_labels"] == full["pseudo_labels"] and resumed["cossl_tfe_set"] == full["cossl_tfe_set"]
    with open(tmp_path / "cut" / "epochs.csv") as f:
        assert [r["loss_teacher"] for r in csv.DictReader(f)] == [r["loss_teacher"] for r in rows]
