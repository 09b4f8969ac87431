"""Feature-space synthesis: manifold mixup (synth=manifold_mixup) and feature SMOTE (synth=feature_smote).

References transcribed here: manifold mixup as vikasverma1077/manifold_mixup supervised/models/preresnet.py
(``PreActResNet.forward``: mix after the input, layer1 or layer2) and zhangyongshun/BagofTricks-LT
lib/core/combiner.py ``Combiner.manifold_mix_up`` with lib/net/network.py ``Network.forward`` (LOCATION "pool": mix
the pooled features, loss ``l * criterion(out, y_a) + (1 - l) * criterion(out, y_b)``); SMOTE as Chawla et al. 2002
(a synthetic point on the segment from a minority sample to one of its k nearest same-class neighbours).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE
from hydra import compose, initialize_config_module

import ltbench.fit as fit_mod
from ltbench.classifier import FrozenBackbone
from ltbench.config import TrainConfig, to_schema
from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.losses.classification import CrossEntropy
from ltbench.methods.supervised import Supervised
from ltbench.models.heads import LinearHead
from ltbench.models.mlp import MLP
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.runner import CHECKPOINT, run
from ltbench.synth import (
    FeatureBank,
    FeatureSmote,
    FeatureSmoteConfig,
    ManifoldMixupConfig,
    beta_sample,
    build_synth,
    manifold_mix,
)
from ltbench.tasks.classification import Classification, ClassificationConfig

COUNTS = [12, 8, 6, 4, 2]  # a tiny 5-class training set


def _train_y() -> torch.Tensor:
    return torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])


def _method(cfg, epochs: int = 4) -> Supervised:
    synth = build_synth(cfg, None, _train_y(), COUNTS, epochs)
    return Supervised(CrossEntropy(COUNTS), Classification(ClassificationConfig()), synth=synth)


def _epoch(seed: int, index: int = 0) -> Epoch:
    return Epoch("train", index, 4, 0.1, torch.Generator().manual_seed(seed), amp=False)


def _batch(n: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(_train_y()), generator=g)[:n]
    return Batch(torch.randn(n, 3, 8, 8, generator=g), _train_y()[index], index)


def _net(seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    return CifarResNet(depth=8, width=4, num_classes=len(COUNTS))


def _mixed_after_stage(net: CifarResNet, x: torch.Tensor, stage: int, lam: float, perm: torch.Tensor):
    """The CIFAR ResNet's forward with the mix after ``stage`` (0: the input), written out as BagofTricks-LT's
    ``ResNet_Cifar.forward`` and the official ``PreActResNet.forward`` do."""
    if stage == 0:
        x = lam * x + (1 - lam) * x[perm]
    out = F.relu(net.bn1(net.conv1(x)))
    n = len(net.layers) // 3
    for i, block in enumerate(net.layers):
        out = block(out)
        if i == stage * n - 1:
            out = lam * out + (1 - lam) * out[perm]
    return net.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ------------------------------------------------------------------------------------------------ manifold mixup


def test_manifold_mixup_at_pool_is_the_head_of_mixed_features_with_the_mixed_loss():
    net, b = _net(), _batch()
    m = _method(ManifoldMixupConfig(layer="pool"))
    m.on_epoch_start(_epoch(5))
    loss, sums = m.step(net, b, _epoch(5))
    g = torch.Generator().manual_seed(5)
    lam = beta_sample(1.0, g)
    perm = torch.randperm(16, generator=g)
    h = net.features(b.x)
    out = net.head(lam * h + (1 - lam) * h[perm])
    want = lam * F.cross_entropy(out, b.y) + (1 - lam) * F.cross_entropy(out, b.y[perm])
    assert torch.allclose(loss, want, atol=1e-6)
    grad = torch.autograd.grad(loss, net.conv1.weight)[0]
    assert torch.allclose(grad, torch.autograd.grad(want, net.conv1.weight)[0], atol=1e-6)
    assert int(sums["correct"]) == int((out.argmax(1) == b.y).sum())  # counted on the first label


@pytest.mark.parametrize("layer,stage", [("input", 0), ("layer1", 1), ("layer2", 2)])
def test_manifold_mixup_at_a_hidden_layer_continues_the_forward_from_the_mix(layer, stage):
    net, b = _net(), _batch()
    m = _method(ManifoldMixupConfig(layer=layer))
    m.on_epoch_start(_epoch(3))
    loss, _ = m.step(net, b, _epoch(3))
    g = torch.Generator().manual_seed(3)
    lam = beta_sample(1.0, g)
    perm = torch.randperm(16, generator=g)
    out = _mixed_after_stage(net, b.x, stage, lam, perm)
    want = lam * F.cross_entropy(out, b.y) + (1 - lam) * F.cross_entropy(out, b.y[perm])
    assert torch.allclose(loss, want, atol=1e-6)


def test_hidden_draws_the_layer_uniformly_from_input_layer1_layer2():
    net, b = _net(), _batch()
    seen = set()
    for seed in range(20):
        mix = manifold_mix(16, 1.0, "hidden", torch.Generator().manual_seed(seed))
        seen.add(mix.layer)
        m = _method(ManifoldMixupConfig(layer="hidden"))
        m.on_epoch_start(_epoch(seed))
        loss, _ = m.step(net, b, _epoch(seed))
        out = _mixed_after_stage(net, b.x, ("input", "layer1", "layer2").index(mix.layer), mix.lam, mix.perm)
        want = mix.lam * F.cross_entropy(out, b.y) + (1 - mix.lam) * F.cross_entropy(out, b.y[mix.perm])
        assert torch.allclose(loss, want, atol=1e-6)
    assert seen == {"input", "layer1", "layer2"}


def test_manifold_mixup_draws_from_the_epoch_generator_only():
    net, b = _net(), _batch()
    m = _method(ManifoldMixupConfig())
    m.on_epoch_start(_epoch(7))
    torch.manual_seed(1)
    a, _ = m.step(net, b, _epoch(7))
    torch.manual_seed(2)  # the global RNG plays no part
    same, _ = m.step(net, b, _epoch(7))
    other, _ = m.step(net, b, _epoch(8))
    assert torch.equal(a, same) and not torch.equal(a, other)


def test_manifold_mixup_reweights_as_input_mixup():
    """With class weights w, the loss is sum_i (lam w_a l_a + (1-lam) w_b l_b) / sum_i (lam w_a + (1-lam) w_b)
    (:func:`ltbench.losses.mixed_loss`, the input-mixup rule)."""
    net, b = _net(), _batch()
    m = _method(ManifoldMixupConfig())
    m.on_epoch_start(_epoch(4))
    m.weight = torch.tensor([0.2, 0.5, 1.0, 1.5, 2.0])
    loss, _ = m.step(net, b, _epoch(4))
    g = torch.Generator().manual_seed(4)
    lam = beta_sample(1.0, g)
    perm = torch.randperm(16, generator=g)
    h = net.features(b.x)
    out = net.head(lam * h + (1 - lam) * h[perm])
    ya, yb, w = b.y, b.y[perm], m.weight
    la, lb = F.cross_entropy(out, ya, reduction="none"), F.cross_entropy(out, yb, reduction="none")
    want = (lam * w[ya] * la + (1 - lam) * w[yb] * lb).sum() / (lam * w[ya] + (1 - lam) * w[yb]).sum()
    assert torch.allclose(loss, want, atol=1e-6)


def test_manifold_mixup_with_mse_is_mse_on_the_mixed_target():
    """lam (f - a)^2 + (1-lam) (f - b)^2 = (f - (lam a + (1-lam) b))^2 + lam (1-lam) (a - b)^2: the same gradients
    as mixup of the targets, which is why regression may use it."""
    from ltbench.losses.regression import MSE
    from ltbench.tasks import LabelStats

    torch.manual_seed(0)
    net = MLP(3, [8], 1, "linear", 0.0, False)
    mse = MSE(LabelStats([1, 1], lambda y: (y > 0).long(), center=0.5, scale=2.0))
    x, y = torch.randn(12, 3), torch.randn(12)
    mix = manifold_mix(12, 1.0, "pool", torch.Generator().manual_seed(0))
    with mix.installed(net):
        loss = mix.loss(mse, net(x), y, None)
    lam, perm = mix.lam, mix.perm
    h = net.features(x)
    target = lam * y + (1 - lam) * y[perm]
    plain = mse(net.head(lam * h + (1 - lam) * h[perm]), target)
    const = lam * (1 - lam) * (((y - y[perm]) / 2.0) ** 2).mean()
    assert torch.allclose(loss, plain + const, atol=1e-6)
    w = net.head.weight
    assert torch.allclose(torch.autograd.grad(loss, w)[0], torch.autograd.grad(plain, w)[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------ feature SMOTE


def _bank_2d():
    """A bank over the tiny training set: every image of classes 1-4 has a hand-made 2-D feature (class c around
    (3c, 0), spread on a small grid), written in one go."""
    y = _train_y()
    bank = FeatureBank(y, [1, 2, 3, 4], len(COUNTS))
    g = torch.Generator().manual_seed(0)
    feats = torch.stack([y.float() * 3, torch.zeros(len(y))], 1) + torch.rand(len(y), 2, generator=g)
    bank.write(torch.arange(len(y)), feats)
    return bank, feats


def test_feature_smote_points_lie_on_segments_to_the_k_nearest_same_class_banked_features():
    bank, feats = _bank_2d()
    y = _train_y()
    # a batch: 6 of class 0 (the largest class: never oversampled), 2 of class 1, 1 of class 2, 3 of class 3
    index = torch.tensor([0, 1, 2, 3, 4, 5, 12, 13, 20, 26, 27, 28])
    h = feats[index] + 0.05  # the current features: near, but not equal to, their banked ones
    cfg = FeatureSmoteConfig(k=2)
    s = FeatureSmote(bank, y[index], index, cfg, torch.Generator().manual_seed(0))
    out = s.synthesize(h)
    n, base = len(index), s.base
    assert torch.equal(out[:n], h)
    # m_max = 6: class 1 gets 4 (2 per sample), class 2 gets 5, class 3 gets 3 (1 per sample), class 0 none
    assert torch.bincount(y[index][base], minlength=5).tolist() == [0, 4, 5, 3, 0]
    assert torch.bincount(base, minlength=n)[6:].tolist() == [2, 2, 5, 1, 1, 1]
    for j, i in enumerate(base.tolist()):
        c, own = int(y[index[i]]), int(index[i])
        members = [r for r in range(len(y)) if int(y[r]) == c and r != own]
        d = ((feats[members] - h[i]) ** 2).sum(1)
        nearest = {members[t] for t in d.topk(min(2, len(members)), largest=False).indices.tolist()}
        nb_index = int(torch.nonzero(bank.row_of == int(s.neighbour_rows[j])).flatten())
        assert nb_index in nearest, "the neighbour is one of the k nearest banked features of its class, not itself"
        p, a, b = out[n + j], h[i], feats[nb_index]
        t = float((p - a) @ (b - a) / ((b - a) @ (b - a)))
        assert 0 <= t <= 1 and torch.allclose(p, a + t * (b - a), atol=1e-6)
    # the labels: the base sample's class, through the run's loss over real and synthetic rows together
    logits = torch.randn(len(out), 5)
    want = F.cross_entropy(logits, torch.cat([y[index], y[index][base]]))
    assert torch.allclose(s.loss(CrossEntropy(COUNTS), logits, y[index], None), want)


def test_feature_smote_amount_and_classes_without_neighbours():
    bank, feats = _bank_2d()
    y = _train_y()
    index = torch.tensor([0, 1, 2, 3, 4, 5, 12, 13, 20])
    s = FeatureSmote(bank, y[index], index, FeatureSmoteConfig(amount=0.5), torch.Generator().manual_seed(0))
    assert torch.bincount(y[index][s.base], minlength=5).tolist() == [0, 2, 3, 0, 0]  # round(0.5*4), round(0.5*5)
    empty = FeatureBank(y, [1, 2, 3, 4], len(COUNTS))  # nothing banked yet (the first steps of a run)
    s = FeatureSmote(empty, y[index], index, FeatureSmoteConfig(), torch.Generator().manual_seed(0))
    assert len(s.base) == 0 and torch.equal(s.synthesize(feats[index]), feats[index])
    assert empty.filled.sum() == 2 + 1  # the batch's class-1 and class-2 images are banked now, not class 0's
    alone = FeatureBank(y, [1, 2, 3, 4], len(COUNTS))
    alone.write(torch.tensor([20]), feats[[20]])  # class 2's only banked feature is the sample's own
    s = FeatureSmote(alone, y[index], index, FeatureSmoteConfig(), torch.Generator().manual_seed(0))
    assert len(s.base) == 0


@pytest.mark.parametrize("detach", [False, True])
def test_feature_smote_gradient_reaches_h_i_with_weight_one_minus_u_unless_detached(detach):
    bank, feats = _bank_2d()
    y = _train_y()
    index = torch.tensor([0, 1, 2, 3, 12, 20])
    h = (feats[index] + 0.05).requires_grad_(True)
    s = FeatureSmote(bank, y[index], index, FeatureSmoteConfig(detach=detach), torch.Generator().manual_seed(1))
    out = s.synthesize(h)
    (grad,) = torch.autograd.grad(out[len(index) :].sum(), h)
    want = torch.zeros(len(index)).index_add_(0, s.base, 1 - s.u)
    assert torch.allclose(grad, (0 * want if detach else want)[:, None].expand(-1, 2), atol=1e-6)
    assert not bank.feats.requires_grad  # h_nn is a banked, detached feature


def test_feature_smote_draws_from_the_epoch_generator_and_counts_synthetic_features():
    net, b = _net(), _batch(24)
    m = _method(FeatureSmoteConfig())
    m.on_epoch_start(_epoch(0))
    m.step(net, b, _epoch(0))  # fills the bank
    state = {k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}
    filled = m.bank.filled.clone()
    first, sums = m.step(net, b, _epoch(1))
    assert float(sums["mean_synthetic"]) > 0
    m.load_state_dict({**m.state_dict(), **state, "bank._extra_state": {"filled": filled}})
    torch.manual_seed(3)
    again, _ = m.step(net, b, _epoch(1))
    assert torch.equal(first, again)


def test_stop_switches_feature_synthesis_off():
    net, b = _net(), _batch()
    for cfg in (ManifoldMixupConfig(stop=0.5), FeatureSmoteConfig(stop=0.5)):
        m = _method(cfg, epochs=4)
        assert m.synth.active(1) and not m.synth.active(2)
        ep = _epoch(0, index=2)
        m.on_epoch_start(ep)
        before = ep.gen.get_state()
        loss, sums = m.step(net, b, ep)
        assert torch.equal(ep.gen.get_state(), before)  # nothing drawn
        assert torch.allclose(loss, F.cross_entropy(net(b.x), b.y))
        assert float(sums.get("mean_synthetic", 0.0)) == 0.0


def test_feature_smote_in_a_decoupled_stage_two_trains_the_head_on_frozen_features():
    """The classifier stage's network (a frozen backbone and a new head) takes the same hook: the bank holds the
    frozen features, only the head gets gradient."""
    backbone = _net()
    net = FrozenBackbone(backbone, LinearHead(backbone.feature_dim, len(COUNTS))).train()
    m = _method(FeatureSmoteConfig())
    m.on_epoch_start(_epoch(0))
    b = _batch(24)
    m.step(net, b, _epoch(0))
    rows = m.bank.row_of[b.index]
    with torch.no_grad():
        frozen = backbone.eval().features(b.x)
    assert torch.allclose(m.bank.feats[rows[rows >= 0]], frozen[rows >= 0], atol=1e-6)
    loss, sums = m.step(net, b, _epoch(1))
    loss.backward()
    assert float(sums["mean_synthetic"]) > 0
    assert net.head.weight.grad is not None and all(p.grad is None for p in backbone.parameters())


# ------------------------------------------------------------------------------------------------ configuration


@pytest.fixture(scope="module")
def compose_cfg():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o, smoke=True: compose("train", overrides=[*(SMOKE if smoke else []), *o])


def test_config_checks(compose_cfg):
    assert to_schema(compose_cfg("synth=manifold_mixup", "synth.layer=hidden")).synth.layer == "hidden"
    assert to_schema(compose_cfg("experiment=synthetic_dir", "synth=manifold_mixup")).synth.name == "manifold_mixup"
    bad = [
        (("synth=manifold_mixup", "synth.layer=layer3"), "synth.layer must be one of"),
        (("synth=manifold_mixup", "synth.layer=layer1", "model=resnet10"), "CIFAR ResNet"),
        (("experiment=synthetic_dir", "synth=manifold_mixup", "synth.layer=input"), "CIFAR ResNet"),
        (("experiment=synthetic_dir", "synth=manifold_mixup", "method=fds"), "replaces"),
        (("experiment=synthetic_dir", "synth=feature_smote"), "works on classes"),
        (("synth=feature_smote", "synth.amount=0"), "synth.amount"),
    ]
    if hasattr(TrainConfig, "compile"):  # torch.compile would recompile the hooked forward at every step
        bad.append((("synth=feature_smote", "compile=default"), "compile=none"))
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            to_schema(compose_cfg(*overrides, smoke=False))


def test_the_bag_of_tricks_mixup_schedule(compose_cfg):
    s = to_schema(compose_cfg("strategy=manifold_mixup", "schedule=mixup400", smoke=False)).schedule
    assert (s.epochs, s.warmup_epochs, s.milestone_epochs, s.gamma, s.nesterov) == (400, 5, [320, 360], 0.01, True)


# ------------------------------------------------------------------------------------------------ resume


def test_feature_smote_run_resumes_to_the_same_numbers(compose_cfg, cifar10_root, tmp_path, monkeypatch):
    """The bank is method state: an interrupted run resumes with it (manifold mixup keeps no state; its draws come
    from the epoch generator, as input mixup's, whose resume tests/test_e2e.py covers)."""
    args = ["strategy=feature_smote", f"dataset.root={cifar10_root}", "dataset.download=false",
            "dataset.imbalance_ratio=10", "schedule.epochs=3"]  # fmt: skip
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    real, calls = fit_mod.train_epoch, {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fit_mod, "train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut")
    monkeypatch.setattr(fit_mod, "train_epoch", real)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["status"] == "interrupted"
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_epoch"] == [1] and resumed["per_class_acc"] == full["per_class_acc"]
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["method"]["bank.feats"], b["method"]["bank.feats"])
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["log"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in b["log"]
    ]
    assert a["method"]["bank._extra_state"]["filled"].any() and all(r["synthetic"] > 0 for r in a["log"])


def _bank_on_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    feats = torch.randn(len(_train_y()), 3, generator=torch.Generator().manual_seed(0))
    bank = FeatureBank(_train_y(), [1, 2, 3, 4], len(COUNTS))
    index = torch.tensor([[12, 13, 0], [14, 13, 27, 1]][rank])  # ranks hold different numbers of rows
    bank.write(index, feats[index] + rank)
    torch.save({"feats": bank.feats, "filled": bank.filled, "expect": feats}, f"{out}{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_banks_every_ranks_features(tmp_path):
    """Under several processes the banks stay identical (so a resumed multi-process run continues as it was):
    every rank writes the features of every rank's batch; of a row written twice, the last rank's wins."""
    import torch.multiprocessing as mp

    mp.spawn(_bank_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["feats"], r1["feats"]) and torch.equal(r0["filled"], r1["filled"])
    bank = FeatureBank(_train_y(), [1, 2, 3, 4], len(COUNTS))
    rows = bank.row_of[torch.tensor([12, 13, 14, 27])]
    assert r0["filled"].sum() == 4 and r0["filled"][rows].all()
    expect = r0["expect"]
    assert torch.equal(r0["feats"][rows[0]], expect[12]) and torch.equal(r0["feats"][rows[1]], expect[13] + 1)
