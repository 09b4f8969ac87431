"""Meta-Weight-Net (method=mwn): the VNet, the sum-normalisation, the exact meta-gradient of the one-step look-ahead,
a look-ahead that leaves the network alone, meta batches from the validation split only, the recipe, and a whole run
that resumes exactly.

Reference: xjtushujun/Meta-weight-net_class-imbalance, ``meta-weight-net-class-imbalance.py::train`` (the step),
``resnet.py::VNet`` and ``MetaModule.update_params`` (the look-ahead), ``data_utils.py::build_dataset`` (meta set).
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose
from torch import nn

import ltbench.fit as fit_mod
from ltbench.config import AugmentConfig, GroupsConfig, to_schema
from ltbench.core import Batch, Epoch
from ltbench.data.augment import normalize
from ltbench.errors import ConfigError
from ltbench.losses.classification import CrossEntropy
from ltbench.methods.mwn import MWN, MWNConfig, VNet, look_ahead_loss, normalized
from ltbench.methods.supervised import Supervised
from ltbench.optim import lr_at
from ltbench.runner import CHECKPOINT, run
from ltbench.tasks.classification import Classification, ClassificationConfig

# ------------------------------------------------------------------------------------------------ the pieces


def test_vnet_is_the_reference_1_100_1_sigmoid_mlp():
    """resnet.py::VNet(1, 100, 1): linear1 -> ReLU -> linear2 -> sigmoid."""
    v = VNet(100)
    assert [tuple(p.shape) for p in v.parameters()] == [(100, 1), (100,), (1, 100), (1,)]
    loss = torch.tensor([0.0, 0.3, 2.3, 9.0])
    w1, b1, w2, b2 = (p.detach() for p in v.parameters())
    expected = torch.sigmoid(torch.relu(loss[:, None] @ w1.T + b1) @ w2.T + b2).squeeze(1)
    assert torch.allclose(v(loss), expected) and bool(((v(loss) > 0) & (v(loss) < 1)).all())


def test_sum_normalisation_and_the_zero_sum_case():
    """w / sum(w); w itself when the sum is 0 (the reference's ``if norm_c != 0``), with finite gradients."""
    w = torch.tensor([0.2, 0.5, 0.3, 1.0], dtype=torch.float64, requires_grad=True)
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out = normalized(w)
    assert torch.allclose(out, w.detach() / 2.0) and out.sum().item() == pytest.approx(1.0)
    (g,) = torch.autograd.grad((out * loss).sum(), w)  # d/dw_j sum_i w_i l_i / S = (l_j - sum_i w~_i l_i) / S
    assert torch.allclose(g, (loss - (w.detach() / 2.0 * loss).sum()) / 2.0)
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out = normalized(zero)
    assert torch.equal(out, torch.zeros(3, dtype=torch.float64))
    (g,) = torch.autograd.grad((out * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), zero)
    assert torch.equal(g, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # d(w * l)/dw = l, no nan


def _tiny(seed=0):
    """A tiny double-precision network with BatchNorm (train mode), a training and a meta batch."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double().train()
    vnet = VNet(8).double()  # 25 parameters, each checked
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    meta = Batch(torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,)))
    return net, vnet, x, y, meta


def _meta_loss(net, vnet, x, y, meta, lr):
    return look_ahead_loss(net, vnet, F.cross_entropy(net(x), y, reduction="none"), meta, lr)


def test_meta_gradient_matches_central_finite_differences():
    """dL_meta/dTheta through theta^ = theta - lr grad_theta sum w~ l is exact (float64, every VNet parameter)."""
    net, vnet, x, y, meta = _tiny()
    lr = 0.5
    params = list(vnet.parameters())
    grads = torch.autograd.grad(_meta_loss(net, vnet, x, y, meta, lr), params)
    eps = 1e-6
    for p, g in zip(params, grads):
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            values = []
            for shift in (eps, -2 * eps, eps):  # theta + eps, theta - eps, back
                with torch.no_grad():
                    p.view(-1)[i] += shift
                values.append(_meta_loss(net, vnet, x, y, meta, lr).item())
            fd.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
        assert torch.allclose(g, fd, rtol=1e-5, atol=1e-9), (g, fd)
    assert max(g.abs().max().item() for g in grads) > 1e-4  # a real signal, not zeros matching zeros


def _reference_meta_loss(net, vnet, x, y, meta, lr):
    """A transcription of the reference step with explicit tensors (MetaModule.update_params: theta - lr * grad on a
    fresh copy in train mode, so BatchNorm uses each batch's statistics)."""
    w1, b1, gamma, beta, w2, b2 = net[0].weight, net[0].bias, net[1].weight, net[1].bias, net[3].weight, net[3].bias
    theta = [w1, b1, gamma, beta, w2, b2]

    def f(inp, t):
        h = F.batch_norm(inp @ t[0].T + t[1], None, None, t[2], t[3], training=True, eps=net[1].eps)
        return torch.relu(h) @ t[4].T + t[5]

    cost = F.cross_entropy(f(x, theta), y, reduction="none")
    v = vnet(cost)
    v_norm = v / v.sum() if v.sum().item() != 0 else v
    grads = torch.autograd.grad((cost * v_norm).sum(), theta, create_graph=True)
    return F.cross_entropy(f(meta.x, [t - lr * g for t, g in zip(theta, grads)]), meta.y)


def test_look_ahead_equals_the_reference_transcription():
    net, vnet, x, y, meta = _tiny(1)
    ours = _meta_loss(net, vnet, x, y, meta, 0.1)
    ref = _reference_meta_loss(net, vnet, x, y, meta, 0.1)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b in zip(
        torch.autograd.grad(ours, list(vnet.parameters())), torch.autograd.grad(ref, list(vnet.parameters()))
    ):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).train()  # fmt: skip


def test_look_ahead_leaves_the_network_parameters_and_batchnorm_buffers_untouched():
    net, vnet = _conv_net(), VNet(8)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    meta = Batch(torch.randn(5, 3, 8, 8) * 3 + 1, torch.randint(0, 3, (5,)))
    losses = F.cross_entropy(net(x), y, reduction="none")
    before = copy.deepcopy(net.state_dict())
    loss = look_ahead_loss(net, vnet, losses, meta, 0.1)
    torch.autograd.grad(loss, list(vnet.parameters()))
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert int(after["1.num_batches_tracked"]) == 1  # only the real forward above counted


def _ctx(data, num_classes, seed=0, augment=None):
    return SimpleNamespace(
        info=SimpleNamespace(enabled=False),
        data=data,
        cfg=SimpleNamespace(
            seed=seed, augment=augment or AugmentConfig(), dataset=SimpleNamespace(groups=GroupsConfig())
        ),
        stats=SimpleNamespace(counts=[int(c) for c in torch.bincount(data.train_y, minlength=num_classes)]),
        device=torch.device("cpu"),
        feed=_feed(data),
    )


def _feed(data):
    """The stage's feed over ``data`` (its split_batch serves the meta batches)."""
    from ltbench.feed import DataFeed

    return DataFeed(data, SimpleNamespace(num_workers=0), torch.device("cpu"))


def _mwn(data, num_classes, cfg=None, augment=None):
    base = Supervised(CrossEntropy([1] * num_classes), Classification(ClassificationConfig()))
    return MWN(cfg or MWNConfig(), _ctx(data, num_classes, augment=augment), None, base)


def _fake_data(n_val=20, num_classes=3):
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        name="fake", kind="tensor", num_classes=num_classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        val_x=torch.randint(0, 256, (n_val, 3, 8, 8), generator=g, dtype=torch.uint8),
        val_y=torch.arange(n_val) % num_classes, train_y=torch.tensor([0, 0, 0, 1, 1, 2]),
        train_x=torch.zeros(6, 3, 8, 8, dtype=torch.uint8), unlabeled_x=None, unlabeled_y=None,
    )  # fmt: skip


def test_a_step_updates_the_vnet_only_and_the_network_buffers_once():
    """After step(): the network's parameters are unchanged (the stage's optimiser steps later), its BatchNorm
    buffers are those of one plain forward of the training batch, the VNet moved and its SGD has momentum."""
    net, data = _conv_net(), _fake_data()
    mwn = _mwn(data, 3, MWNConfig(meta_batch_size=8, meta_lr=0.1))
    twin = copy.deepcopy(net)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 0, 1])
    twin(x)
    vnet_before = [p.detach().clone() for p in mwn.vnet.parameters()]
    ep = Epoch("train", 0, 1, 0.1, torch.Generator().manual_seed(0), amp=False)
    mwn.on_epoch_start(ep)
    loss, sums = mwn.step(net, Batch(x, y), ep)
    for (k, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, b) for a, b in zip(vnet_before, mwn.vnet.parameters()))
    assert all("momentum_buffer" in s for s in mwn.vopt.state.values()) and len(mwn.vopt.state) == 4
    with torch.no_grad():
        losses = F.cross_entropy(twin(x), y, reduction="none")  # twin: same parameters and batch statistics
        w = mwn.vnet(losses)
    assert loss.item() == pytest.approx((w / w.sum() * losses).sum().item(), rel=1e-5)
    vnet_grads = [p.grad.clone() for p in mwn.vnet.parameters()]
    loss.backward()  # what the stage's loop does: gradients for the network, none for the VNet
    assert all(p.grad is not None for p in net.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(mwn.vnet.parameters(), vnet_grads))
    assert sums["mean_weight"].item() == pytest.approx(w.sum().item(), rel=1e-5)
    assert mwn.param_groups() == []  # the stage's optimiser never gets the VNet


def test_the_vnet_optimiser_state_is_in_the_method_state_dict():
    data = _fake_data()
    a, b = _mwn(data, 3), _mwn(data, 3)
    net = _conv_net()
    ep = Epoch("train", 0, 1, 0.1, torch.Generator().manual_seed(0), amp=False)
    a.step(net, Batch(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 0, 1])), ep)
    b.load_state_dict(a.state_dict())
    assert [torch.equal(p, q) for p, q in zip(a.vnet.parameters(), b.vnet.parameters())] == [True] * 4
    sa, sb = a.vopt.state_dict(), b.vopt.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["param_groups"][0]["nesterov"] is True
    assert all(torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"]) for i in range(4))
    assert (sa["param_groups"][0]["lr"], sa["param_groups"][0]["weight_decay"]) == (1e-5, 5e-4)


def test_meta_batches_are_validation_images_only(compose_cfg, cifar10_root):
    """Meta batches hold validation images (never a training or a test image), drawn with ep.gen alone."""
    from ltbench.data import build_dataset

    cfg = to_schema(compose_cfg("strategy=mwn", f"dataset.root={cifar10_root}", "dataset.download=false",
                                "dataset.imbalance_ratio=10", "dataset.val_per_class=5"))  # fmt: skip
    data = build_dataset(cfg.dataset, holdout=True)
    mwn = _mwn(data, 10, MWNConfig(meta_batch_size=16, meta_augment=False))
    train, val = set(data.train_indices.tolist()), set(data.val_indices.tolist())
    assert not train & val and len(data.val_y) == 50
    seen = set()
    for epoch in range(6):
        ep = Epoch("train", epoch, 6, 0.1, torch.Generator().manual_seed(epoch), amp=False)
        b = mwn.meta_batch(ep)
        pos = b.index.tolist()
        assert len(pos) == len(set(pos)) == 16
        original = set(data.val_indices[pos].tolist())
        assert original <= val and not original & train
        assert torch.equal(b.y, data.val_y[b.index])
        assert torch.equal(b.x, normalize(data.val_x[b.index], data.mean, data.std))
        again = mwn.meta_batch(Epoch("train", epoch, 6, 0.1, torch.Generator().manual_seed(epoch), amp=False))
        assert torch.equal(again.index, b.index)  # a function of the generator alone
        seen |= original
    imgs = {bytes(x.numpy().tobytes()) for x in data.val_x}
    assert not imgs & {bytes(x.numpy().tobytes()) for x in data.test_x}
    assert not imgs & {bytes(x.numpy().tobytes()) for x in data.train_x}
    assert len(seen) > 16  # different epochs draw different batches


def test_config_refusals_are_one_line(compose_cfg):
    for overrides, needle in (
        (["dataset.val_per_class=0"], "set dataset.val_per_class >= 1"),
        (["reweight=drw"], "does not combine with reweight=effective_number"),
        (["synth=mixup"], "synth=mixup"),
        (["method.meta_batch_size=1"], "meta_batch_size"),
    ):
        with pytest.raises(ConfigError, match=needle) as e:
            to_schema(compose_cfg("strategy=mwn", *overrides))
        assert "\n" not in str(e.value)


def test_the_recipe_is_the_reference_schedule(compose_cfg):
    s = to_schema(compose("train", overrides=["experiment=mwn_cifar10", "strategy=mwn"]))
    sched = s.schedule
    assert (sched.epochs, sched.batch_size, sched.lr, sched.nesterov, sched.weight_decay) == (100, 100, 0.1, True, 5e-4)
    assert s.dataset.val_per_class == 10 and s.method.name == "mwn" and s.model.name == "resnet32"
    # the reference's meta_lr = 0.1 * 0.1^[epoch >= 80] * 0.1^[epoch >= 90] (0-indexed epochs)
    for e in range(100):
        assert lr_at(e, sched) == pytest.approx(0.1 * 0.1 ** (e >= 80) * 0.1 ** (e >= 90))
    assert (s.method.hidden, s.method.meta_lr, s.method.meta_batch_size) == (100, 1e-5, 100)


# ------------------------------------------------------------------------------------------------ end to end


def _run_args(root, *extra):
    return ["strategy=mwn", f"dataset.root={root}", "dataset.download=false", "dataset.imbalance_ratio=10",
            "dataset.val_per_class=5", *extra]  # fmt: skip


def test_a_run_records_what_mwn_learned_and_resumes_exactly(compose_cfg, cifar10_root, tmp_path, monkeypatch):
    full = run(compose_cfg(*_run_args(cifar10_root, f"results_dir={tmp_path / 'a'}")), tmp_path / "full")
    assert full["status"] == "completed" and full["strategy"] == "mwn"
    assert (
        full["train_class_counts"][0] == 35 and full["val_class_counts"] == [5] * 10
    )  # class 0 gave 5 to the meta set
    rec = full["mwn"]
    assert rec["meta_set"]["per_class"] == [5] * 10
    assert [r["loss"] for r in rec["weight_curve"]] == MWNConfig().curve
    assert all(0 < r["weight"] < 1 for r in rec["weight_curve"]) and len(rec["class_weight_last_epoch"]) == 10
    header = (tmp_path / "full" / "epochs.csv").read_text().splitlines()[0].split(",")
    assert {"meta_loss", "weight", "weight_many", "weight_medium", "weight_few"} <= set(header)

    real, calls = fit_mod.train_epoch, {"n": 0}

    def interrupt_on_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fit_mod, "train_epoch", interrupt_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(*_run_args(cifar10_root, f"results_dir={tmp_path / 'b'}")), tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(fit_mod, "train_epoch", real)
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    assert resumed["mwn"] == full["mwn"]
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    va, vb = a["method"]["_extra_state"]["vnet_optimizer"], b["method"]["_extra_state"]["vnet_optimizer"]
    assert all(torch.equal(va["state"][i]["momentum_buffer"], vb["state"][i]["momentum_buffer"]) for i in range(4))
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"] if k != "_extra_state")
    rows = lambda d: [r.split(",")[:5] + r.split(",")[7:] for r in (d / "epochs.csv").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "full") == rows(tmp_path / "cut")  # every column but the timings
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["status"] == "completed"
