"""RIDE (Wang et al. 2021): the multi-expert model, the RIDE loss and the expert router, each against a
transcription of the reference it reproduces.

References: frank-xwang/RIDE-LongTailRecognition ``model/ldam_drw_resnets/ride_resnet_cifar.py`` (architecture),
``model/loss.py::RIDELoss`` (loss, temperatures), ``model/ldam_drw_resnets/ea_resnet_cifar.py::ResNet_s.forward``
(router targets, loss and test-time routing), ``configs/config_imbalance_cifar100_ride{,_ea}.json`` (settings).
"""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import ltbench.fit as fit_mod
from ltbench.config import epoch_at, to_schema
from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.losses.classification import LDAM
from ltbench.methods.ride import (
    RideConfig,
    RideMethod,
    RideRouter,
    RoutedHead,
    Router,
    RouterConfig,
    diversity_temperature,
    diversity_terms,
    routed_mean,
    router_loss,
    router_targets,
)
from ltbench.methods.supervised import Supervised
from ltbench.models.ride import RideResNet, RideResNetConfig, expert_widths
from ltbench.reweight import EffectiveNumberConfig, Reweighting
from ltbench.rundir import RunDir
from ltbench.runner import run
from ltbench.tasks import build_task
from ltbench.tasks.classification import ClassificationConfig

COUNTS = [50, 20, 8, 3]


def _fixture(root, tmp_path):
    return [f"dataset.root={root}", "dataset.download=false", "dataset.imbalance_ratio=10", f"results_dir={tmp_path}"]


# ------------------------------------------------------------------------------------------------ the model


def test_expert_widths_follow_reduce_dimension():
    """ride_resnet_cifar.py: layer2/layer3 widths 24/48 with reduce_dimension, 32/64 without; explicit ones win."""
    assert RideResNetConfig().expert_widths == (24, 48)
    assert expert_widths(16, False) == (32, 64)
    assert expert_widths(16, True, 10, None) == (10, 48)
    model = RideResNet(depth=8, width=4, num_classes=5, num_experts=3, widths=(6, 12))
    for expert in model.experts:
        stage2, stage3 = expert
        assert stage2[0].conv1.in_channels == 4 and stage2[0].conv1.out_channels == 6
        assert stage3[-1].conv2.out_channels == 12
    assert model.layer1[0].conv1.out_channels == 4  # shared
    assert model.feature_dim == 3 * 12 and model.num_experts == 3


def test_forward_is_the_mean_of_the_experts_and_features_concatenate_them():
    torch.manual_seed(0)
    model = RideResNet(depth=8, width=4, num_classes=5, num_experts=3, widths=(6, 12)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f, z, out = model.features(x), model.expert_logits(x), model(x)
        assert f.shape == (4, 36) and z.shape == (3, 4, 5)
        torch.testing.assert_close(out, z.mean(0))
        torch.testing.assert_close(model.head(f), out)
        s = model.shared(x)
        for j, expert in enumerate(model.experts):  # expert j: its own branch, its own cosine classifier
            fj = F.adaptive_avg_pool2d(expert(s), 1).flatten(1)
            torch.testing.assert_close(f[:, 12 * j : 12 * (j + 1)], fj)
            w = model.head.heads[j].weight
            torch.testing.assert_close(z[j], F.normalize(fj, dim=1) @ F.normalize(w, dim=0))


# ------------------------------------------------------------------------------------------------ the RIDE loss


def _reference_ride_loss(expert_cos, target, counts, s, factor, weights, temperature):
    """RIDELoss.forward transcribed: the model's logits are s * cos; LDAM on each expert (margin s * m_y), weighted
    mean CE; then factor * Tbar^2 * KL(softmax(mean / T) || softmax(expert / T)), batch mean."""
    m = 1.0 / torch.tensor(counts, dtype=torch.float64).sqrt().sqrt()
    m = (m * (0.5 / m.max())).float()
    logits = [s * c for c in expert_cos]
    output = torch.stack(logits, 1).mean(1)
    loss = 0.0
    for item in logits:
        ride_loss_logits = output if factor == 0 else item  # `additional_diversity_factor == 0`: the mean output
        onehot = F.one_hot(target, item.shape[1]).bool()
        final = torch.where(onehot, ride_loss_logits - (m[target] * s)[:, None], ride_loss_logits)
        loss = loss + F.cross_entropy(final, target, weight=weights)
        t = temperature if temperature is not None else 1.0
        t_mean = temperature.mean().item() if temperature is not None else 1.0
        out_dist = F.log_softmax(item / t, dim=1)
        with torch.no_grad():
            mean_dist = F.softmax(output / t, dim=1)
        loss = loss + factor * t_mean * t_mean * F.kl_div(out_dist, mean_dist, reduction="batchmean")
    return loss


def test_diversity_term_is_the_negative_tempered_kl_scaled_by_mean_temperature_squared():
    torch.manual_seed(1)
    z = torch.randn(2, 3, 4) * 3
    t = torch.tensor([1.0, 0.9, 0.8, 0.5])
    got = diversity_terms(z, t, -0.45)
    p_ens = F.softmax(z.mean(0) / t, dim=1)
    for j in range(2):
        log_p = F.log_softmax(z[j] / t, dim=1)
        kl = (p_ens * (p_ens.log() - log_p)).sum(1).mean()  # KL(ensemble || expert j), averaged over the batch
        torch.testing.assert_close(got[j], -0.45 * t.mean() ** 2 * kl)
    assert (got <= 0).all()  # lambda < 0: maximising the KL lowers the loss
    # the ensemble target has no gradient: only log p_j is differentiated
    zz = z.clone().requires_grad_(True)
    diversity_terms(zz, t, 1.0).sum().backward()
    expected = torch.stack([(F.softmax(z[j] / t, dim=1) - p_ens) / t / 3 * t.mean() ** 2 for j in range(2)])
    torch.testing.assert_close(zz.grad, expected)


def _ride(epochs=10, counts=COUNTS, cfg=None):
    task = build_task(ClassificationConfig())
    drw = Reweighting(EffectiveNumberConfig(name="effective_number", beta=0.9999, start=0.8), counts, epochs)
    base = Supervised(LDAM(counts, max_m=0.5, s=30.0), task, drw)
    ctx = SimpleNamespace(stats=SimpleNamespace(counts=counts))
    return RideMethod(cfg or RideConfig(), ctx, None, base)


def _epoch(index, epochs=10):
    return Epoch("train", index, epochs, 0.1, torch.Generator().manual_seed(0), False)


def test_weights_and_temperatures_switch_at_the_drw_epoch():
    """RIDELoss._hook_before_epoch: base weights and per-class temperatures switch on together after epoch 160
    (1-based), i.e. from 0-based epoch 160 = 0.8 of 200, the first lr decay."""
    method = _ride(epochs=200)
    assert epoch_at(0.8, 200) == 160
    method.on_epoch_start(_epoch(159, 200))
    assert method.base.weight is None and torch.equal(method.temperature(), torch.ones(4))
    method.on_epoch_start(_epoch(160, 200))
    n = torch.tensor(COUNTS, dtype=torch.float64)
    w = (1 - 0.9999) / (1 - 0.9999**n)
    torch.testing.assert_close(method.base.weight, (w / w.sum() * 4).float())
    prior = n / n.sum()
    t = 4 * prior * 0.05 + 0.95
    torch.testing.assert_close(method.temperature(), (t / t.max()).float())
    assert method.temperature()[0] == 1.0 and method.temperature()[-1] < method.temperature()[1]
    torch.testing.assert_close(diversity_temperature(n, 2.0, 0.0), torch.full((4,), 2.0))


@pytest.mark.parametrize("epoch", [7, 8])  # before / after the DRW switch (epoch_at(0.8, 10) = 8)
def test_ride_step_equals_the_reference_loss(epoch):
    torch.manual_seed(2)
    method = _ride()
    cos = torch.rand(3, 6, 4) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    method.on_epoch_start(_epoch(epoch))
    loss, sums = method.step(lambda x: cos, Batch(torch.zeros(6, 1), y), _epoch(epoch))
    on = epoch >= 8
    ref = _reference_ride_loss(
        list(cos), y, COUNTS, 30.0, -0.45, method.base.weight if on else None, method.temperature() if on else None
    )
    torch.testing.assert_close(loss, ref)
    assert int(sums["correct"]) == int((cos.mean(0).argmax(1) == y).sum())


def test_without_the_diversity_term_every_expert_trains_on_the_mean_output():
    """frank-xwang/RIDE model/loss.py: with additional_diversity_factor 0 each expert's LDAM term is taken on the
    ensemble's mean logits (ltbench took each expert's own: 11-12 apart at initialisation)."""
    torch.manual_seed(3)
    method = _ride(cfg=RideConfig(diversity_factor=0.0))
    cos = torch.rand(3, 6, 4) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    method.on_epoch_start(_epoch(2))
    loss, _ = method.step(lambda x: cos, Batch(torch.zeros(6, 1), y), _epoch(2))
    torch.testing.assert_close(loss, _reference_ride_loss(list(cos), y, COUNTS, 30.0, 0.0, None, None))
    own = _reference_ride_loss(list(cos), y, COUNTS, 30.0, -1e-12, None, None)  # each expert's own logits
    assert abs(float(own) - float(loss)) > 1e-3


# ------------------------------------------------------------------------------------------------ the router


def _reference_targets(logits, y):
    """The training branch of ea_resnet_cifar.py: the running sum's correctness after each expert."""
    e = len(logits)
    out = torch.zeros_like(logits[0])
    correct = torch.zeros(len(y), e, dtype=torch.bool)
    for i in range(e):
        out = out + logits[i]
        correct[:, i] = out.argmax(1) == y
    return torch.stack([~correct[:, i] & correct[:, i + 1 :].any(1) for i in range(e - 1)], 1)


def test_router_target_is_prefix_wrong_and_some_longer_prefix_right():
    # three experts, class 0 is right; each expert votes for one class with logit 1 (ties impossible by design)
    right, wrong1, wrong2 = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]
    votes = {  # per sample: the three experts' logits, and the expected targets of routers 1 and 2
        "all right": ([right, right, right], [False, False]),
        "second helps": ([wrong1, [2.0, 0, 0], right], [True, False]),
        "third helps": ([wrong1, [0, 0, 1.5], [2.5, 0, 0]], [True, True]),
        "never right": ([wrong1, wrong1, wrong2], [False, False]),
        "second helps, third spoils": ([wrong1, [2.0, 0, 0], [0, 3.0, 0]], [True, False]),
        "first right, second spoils, third repairs": ([right, [0, 2.0, 0], [2.0, 0, 0]], [False, True]),
    }
    logits = torch.tensor([v[0] for v in votes.values()]).transpose(0, 1)  # E x N x C
    y = torch.zeros(len(votes), dtype=torch.long)
    expected = torch.tensor([v[1] for v in votes.values()])
    assert torch.equal(router_targets(logits, y), expected)
    torch.manual_seed(3)
    z, yy = torch.randn(4, 50, 5), torch.randint(0, 5, (50,))
    assert torch.equal(router_targets(z, yy), _reference_targets(z, yy))


def test_router_loss_is_the_mean_over_routers_of_weighted_bce():
    torch.manual_seed(4)
    r, t = torch.randn(8, 2) * 20, torch.rand(8, 2) < 0.3  # large logits, as s * cos gives them
    ref = sum(
        F.binary_cross_entropy_with_logits(r[:, i], t[:, i].float(), pos_weight=torch.tensor([100.0])) for i in range(2)
    )
    torch.testing.assert_close(router_loss(r, t, 100.0), ref / 2)


def test_routing_consults_an_expert_only_where_its_router_says_so():
    z = torch.tensor([[[1.0, 0]] * 3, [[3.0, 0]] * 3, [[5.0, 6]] * 3])  # E=3 x N=3 x C=2
    r = torch.tensor([[-1.0, 5.0], [2.0, -1.0], [2.0, 3.0]])  # sample 0 stops at 1 (router 2 is not asked)
    out, count = routed_mean(z, r)
    assert count.tolist() == [1, 2, 3]
    torch.testing.assert_close(out, torch.tensor([[1.0, 0], [2.0, 0], [3.0, 2.0]]))


def _reference_route(head: RoutedHead, features):
    """The test branch of ea_resnet_cifar.py forward: sequential, on the samples still routed."""
    e, d = head.num_experts, head.experts.in_features
    chunks = features.split(d, dim=1)
    z = head.expert_logits(features)
    go = torch.ones(len(features), dtype=torch.bool)
    count = torch.ones(len(features), 1)
    output = z[0].clone()
    feat = chunks[0]
    for i in range(1, e):
        pred = head.router(i - 1, feat, output[go] / i)
        go[go.clone()] = torch.sigmoid(pred) > 0.5
        if not go.any():
            break
        output[go] += z[i][go]
        count[go] += 1
        feat = chunks[i][go]
    return output / count, count.squeeze(1)


def test_routed_head_equals_the_reference_sequential_routing():
    torch.manual_seed(5)
    model = RideResNet(depth=8, width=4, num_classes=40, num_experts=4, widths=(4, 8))
    head = RoutedHead(model.head, Router(4, 8, 40, top_k=30, hidden=16))
    head.scale.fill_(30.0)
    with torch.no_grad():
        f = torch.randn(64, 32).relu()
        r = head.router_logits(f, head.expert_logits(f))
        head.router.out.bias -= r[:, 0].median()  # about half the images go on at each router
        out, count = head.route(f)
        ref_out, ref_count = _reference_route(head, f)
    assert len(set(count.tolist())) > 1, "the case must route images to different numbers of experts"
    assert torch.equal(count, ref_count.long())
    torch.testing.assert_close(out * 30.0, ref_out)  # the head's output is on the model's (cosine) scale
    # router 0: top-k of the mean logits, then ReLU(Linear) of the normalised feature, one shared output layer
    f0, m0 = f[:, :8], head.expert_logits(f)[0]
    h = torch.relu(head.router.hidden[0](f0 / f0.norm(dim=1, keepdim=True)))
    manual = head.router.out(torch.cat([m0.topk(30, dim=1).values, h], dim=1)).squeeze(1)
    torch.testing.assert_close(head.router(0, f0, m0), manual)
    assert not any(p.requires_grad for p in head.experts.parameters())
    assert all(p.requires_grad for p in head.router.parameters())


def test_router_outputs_are_the_routed_network_and_count_experts():
    torch.manual_seed(6)
    model = RideResNet(depth=8, width=4, num_classes=5, num_experts=3, widths=(4, 8)).eval()
    router = RideRouter(RouterConfig())
    model.head = router.head(model, "cosine", 5)
    xs = {"test": torch.randn(7, 3, 32, 32), "val": torch.randn(4, 3, 32, 32)}
    ctx = SimpleNamespace(predict=lambda m, split, features=False: m.features(xs[split]).detach(),
                          data=SimpleNamespace(val_y=torch.zeros(4)))  # fmt: skip
    outputs, record = router.outputs(ctx, model)
    with torch.no_grad():
        torch.testing.assert_close(outputs["test"], model(xs["test"]))
        torch.testing.assert_close(outputs["val"], model(xs["val"]))
    stats = record["experts_per_image_test"]
    assert 1 <= stats["mean"] <= 3 and len(stats["fraction"]) == 3 and abs(sum(stats["fraction"]) - 1) < 1e-3


# ------------------------------------------------------------------------------------------------ configs and runs


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["method=ride"], "multi-expert model"),
        (["classifier=ride_router"], "multi-expert model"),
        (["strategy=ride_ea", "model.num_experts=1"], "has 1 expert"),
        (["strategy=ride", "classifier=tau_norm"], "one per expert"),
    ],
)
def test_ride_refuses_models_without_experts(compose_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        to_schema(compose_cfg(*overrides))


def test_ride_refuses_regression(compose_cfg):
    assert RideConfig.tasks == ("classification",)  # declared, and checked once at compose time
    with pytest.raises(ConfigError, match="method=ride needs task=classification"):
        to_schema(compose_cfg("experiment=agedb_dir", "method=ride"))


@pytest.mark.parametrize("name", ["ride", "ride_ea"])
def test_presets_train_end_to_end(compose_cfg, cifar10_root, tmp_path, name):
    tiny = ["model.layer2_width=4", "model.layer3_width=6"] + (
        ["classifier.schedule.epochs=2"] if name != "ride" else []
    )
    m = run(compose_cfg(f"strategy={name}", *_fixture(cifar10_root, tmp_path), *tiny), tmp_path / "run")
    assert m["status"] == "completed" and m["strategy"] == name
    assert m["num_parameters"] == sum(p.numel() for p in RideResNet(8, 4, 10, 3, (4, 6)).parameters())
    rows = (tmp_path / "run" / "epochs.csv").read_text().splitlines()
    assert "ride_diversity" in rows[0] and len(rows) == 3
    if name == "ride_ea":
        chosen = m["stage2"]["chosen"]
        assert chosen["logit_scale"] == 30.0 and chosen["top_k"] == 10  # k capped at the 10 classes
        assert 1 <= chosen["experts_per_image_val"]["mean"] <= 3
        assert 1 <= m["stage2"]["experts_per_image_test"]["mean"] <= 3  # the reported test outputs are routed
        assert "experts" in (tmp_path / "run" / RunDir.epoch_log_name("classifier")).read_text().splitlines()[0]
    else:
        assert m["ride"]["logit_scale"] == 30.0


def test_resume_inside_the_router_stage_equals_an_uninterrupted_run(compose_cfg, cifar10_root, tmp_path, monkeypatch):
    over = ["strategy=ride_ea", "model.layer2_width=4", "model.layer3_width=6", "classifier.schedule.epochs=2"]
    full = run(compose_cfg(*over, *_fixture(cifar10_root, tmp_path / "a")), tmp_path / "full")
    real, calls = fit_mod.train_epoch, {"n": 0}

    def interrupt_in_second_router_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # 2 epochs of stage 1, then the router's first; its second (and last) is cut
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fit_mod, "train_epoch", interrupt_in_second_router_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(*over, *_fixture(cifar10_root, tmp_path / "b")), tmp_path / "cut")
    monkeypatch.setattr(fit_mod, "train_epoch", real)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["status"] == "interrupted"
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["classifier"] and resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    assert resumed["stage2"]["chosen"] == full["stage2"]["chosen"]
    name = RunDir.checkpoint_name("classifier")
    a = torch.load(tmp_path / "full" / name, weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / name, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
