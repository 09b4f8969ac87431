"""Classifier-stage methods with their own training rules (ltbench.decoupled): MiSLAS, weight balancing, OLTR.

Formulas are checked against hand computations and transcriptions of the reference code: dvlab-research/MiSLAS
``methods.py`` (LabelAwareSmoothing), ShadeAlsha/LTR-weight-balancing ``utils/class_balanced_loss.py`` (CB_loss) and
``utils/regularizers.py`` (MaxNorm_via_PGD), zhmiao/OpenLongTailRecognition-OLTR
``models/MetaEmbeddingClassifier.py``, ``models/CosNormClassifier.py`` and ``loss/DiscCentroidsLoss.py``.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at
from hydra import compose
from torch import nn

from ltbench.classifier import FrozenBackbone, ScaledHead
from ltbench.config import ScheduleConfig, to_schema
from ltbench.core import Batch, Epoch
from ltbench.decoupled import (
    CBSoftmaxBCE,
    ClassifierTraining,
    CosNorm,
    LabelAwareSmoothing,
    MaxNorm,
    MetaEmbeddingHead,
    _Attract,
    disc_centroid_loss,
    effective_number_weights,
    las_epsilons,
)
from ltbench.errors import ConfigError
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.optim import ParamGroup, build_optimizer, model_groups, stage_groups
from ltbench.runner import run
from ltbench.tasks.classification import Classification, ClassificationConfig

COUNTS = [100, 50, 10]  # n_1 = 100, n_K = 10: t = (n - 10) / 90 = [1, 4/9, 0]

# ------------------------------------------------------------------------------------------------ MiSLAS


@pytest.mark.parametrize(
    "shape, power, middle",
    [
        # eps_head 0.4, eps_tail 0.1; the middle class has t = 4/9, so pi t / 2 = 2 pi / 9 = 40 degrees
        ("concave", None, 0.1 + 0.3 * 0.6427876097),  # sin 40deg
        ("linear", None, 0.1 + 0.3 * 4 / 9),
        ("convex", None, 0.4 + 0.3 * -0.7660444431),  # sin(270deg + 40deg) = sin 310deg
        ("exp", 2.0, 0.1 + 0.3 * 16 / 81),
    ],
)
def test_label_aware_smoothing_factors_by_hand(shape, power, middle):
    """MiSLAS methods.py::LabelAwareSmoothing: every shape gives eps_head to the largest class, eps_tail to the
    smallest, and the middle class the formula of methods_refs 4.2."""
    eps = las_epsilons(COUNTS, 0.4, 0.1, shape, power)
    assert eps.dtype == torch.float32
    assert eps.tolist() == pytest.approx([0.4, middle, 0.1], abs=1e-7)


def test_label_aware_smoothing_loss_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = LabelAwareSmoothing(COUNTS, 0.4, 0.1)
    eps = las_epsilons(COUNTS, 0.4, 0.1)
    expected = 0.0
    for i in range(6):
        z = logits[i].tolist()
        lse = math.log(sum(math.exp(v) for v in z))
        nll = [lse - v for v in z]  # -log p_k
        e = float(eps[y[i]])
        expected += (1 - e) * nll[int(y[i])] + e * sum(nll) / 3
    assert float(loss(logits, y)) == pytest.approx(expected / 6, rel=1e-6)
    # one smoothing for every class is ordinary label smoothing (PyTorch's definition is the same mixture)
    flat = LabelAwareSmoothing(COUNTS, 0.2, 0.2)
    assert torch.allclose(flat(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2), atol=1e-6)


def _tiny_net(mode: str) -> tuple[nn.Module, FrozenBackbone]:
    torch.manual_seed(0)
    model = CifarResNet(8, 4, 3)
    head = ScaledHead(copy.deepcopy(model.head), 3, frozen=False)
    return model, FrozenBackbone(model, head, mode)


def _train_steps(net: nn.Module, method, steps: int = 3) -> None:
    from ltbench.config import ScheduleConfig

    opt = build_optimizer(ScheduleConfig(lr=0.1), model_groups(net, []))
    g = torch.Generator().manual_seed(1)
    ep = Epoch("classifier", 0, 1, 0.1, g, amp=False)
    net.train()
    for _ in range(steps):
        batch = Batch(torch.randn(8, 3, 32, 32, generator=g) * 2 + 1, torch.randint(0, 3, (8,), generator=g))
        loss, _ = method.step(net, batch, ep)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_shift_bn_changes_only_batchnorm_running_statistics():
    """MiSLAS shift learning on BN: the backbone runs in train mode under no_grad; no parameter (BN affine included)
    changes, the running mean/variance follow the stream; eval() goes back to the running statistics."""
    model, net = _tiny_net("shift_bn")
    params = {k: v.clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    net.train()
    assert model.training and all(m.training for m in model.modules())
    task = Classification(ClassificationConfig())
    _train_steps(net, ClassifierTraining(LabelAwareSmoothing(COUNTS, 0.3, 0.0), task))
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    stats = [k for k in buffers if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(buffers[k], dict(model.named_buffers())[k]) for k in stats)
    assert not torch.equal(net.head.scales, torch.ones(3))  # the head did train
    net.eval()
    assert not model.training
    _, frozen = _tiny_net("frozen")
    frozen.train()
    assert not frozen.backbone.training  # the default keeps stage-1 statistics (tests/test_stages.py)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_lr_factor_group_is_the_references_separate_group_for_any_optimiser(optimizer):
    """A method's group of model parameters with its own lr factor and weight decay (``stage_groups``) trains them
    as the references' separate optimiser group at factor x lr does (MiSLAS train_stage2.py, OLTR's per-module
    SGD), exactly, with momentum or Adam; the rest of the module stays in the model's groups."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    b = copy.deepcopy(a)
    sched = ScheduleConfig(lr=0.1, optimizer=optimizer, weight_decay=1e-3)
    groups = stage_groups(b, [], [ParamGroup("classifier", list(b[1].parameters()), lr_scale=0.2, weight_decay=0.05)])
    assert [g.name for g in groups] == ["params", "classifier"] and len(groups[0].params) == 2
    opt_b = build_optimizer(sched, groups)
    ref = [{"params": a[0].parameters(), "lr": 0.1, "weight_decay": 1e-3},
           {"params": a[1].parameters(), "lr": 0.02, "weight_decay": 0.05}]  # fmt: skip
    opt_a = torch.optim.SGD(ref, lr=0.1, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(ref, lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, x2, y = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,))
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(net(x) + net(x2), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def _stub_ctx(model: nn.Module, counts: list[int]):
    """The little of a RunContext that the methods' builders read (label counts, the task, training features)."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % len(counts)

    def predict(net, split, features=False):
        net.eval()
        with torch.no_grad():
            return net.features(x)

    data = SimpleNamespace(train_y=y, num_classes=len(counts))
    return SimpleNamespace(stats=counts, task=Classification(ClassificationConfig()), predict=predict, data=data)


def test_mislas_stage2_update_equals_the_references_two_group_sgd():
    """train_stage2.py: SGD([{classifier, lr_factor * lr}, {LWS scales, lr}], momentum 0.9, wd 2e-4 on both), logits
    = scales * classifier(features of the frozen backbone), label-aware smoothing. ltbench's stage trains the net's
    groups at the lr (the classifier without the optimiser's weight decay) and the LrFactor hooks do the rest."""
    from ltbench.decoupled import MiSLAS, MiSLASConfig

    cfg = MiSLASConfig()  # lr 0.1, lr_factor 0.5, wd 2e-4, eps 0.3 / 0.0
    torch.manual_seed(0)
    model = CifarResNet(8, 4, 3)
    ref_model = copy.deepcopy(model).eval()
    ref_cls, ref_scales = copy.deepcopy(model.head), nn.Parameter(torch.ones(3))
    m = MiSLAS(cfg)
    net = FrozenBackbone(model, m.head(model, "linear", 3), m.backbone_mode)
    method = m.method(_stub_ctx(model, COUNTS), net)
    groups = stage_groups(method.wrap(net), method.no_decay(net), method.param_groups())
    assert [(g.name, g.lr_scale, g.weight_decay, len(g.params)) for g in groups] == [
        ("params", 1.0, None, 1), ("classifier", 0.5, 2e-4, 2)]  # fmt: skip
    opt = build_optimizer(cfg.schedule, groups)
    ref_opt = torch.optim.SGD([{"params": ref_cls.parameters(), "lr": 0.05}, {"params": [ref_scales], "lr": 0.1}],
                              lr=0.1, momentum=0.9, weight_decay=2e-4)  # fmt: skip
    las = LabelAwareSmoothing(COUNTS, 0.3, 0.0)
    g = torch.Generator().manual_seed(1)
    ep = Epoch("classifier", 0, 1, 0.1, g, amp=False)
    for _ in range(4):
        batch = Batch(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g))
        net.train()
        loss, _ = method.step(net, batch, ep)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            feats = ref_model.features(batch.x)
        ref_loss = las(ref_scales * ref_cls(feats), batch.y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert torch.allclose(net.head.head.weight, ref_cls.weight, atol=1e-6)
    assert torch.allclose(net.head.head.bias, ref_cls.bias, atol=1e-6)
    assert torch.allclose(net.head.scales, ref_scales, atol=1e-6)
    method.release()


def test_oltr_builds_its_memory_and_lr_factors():
    """OLTR stage 2: centroids = class means of the stage-1 training features (run_networks.py::centroids_cal); the
    backbone and the centroids carry the 0.1 lr factor (features and centroids at 0.01 vs the classifier at 0.1), so
    the optimiser gives them no weight decay of its own; the hallucinator starts as the stage-1 classifier."""
    from ltbench.decoupled import OLTR, OLTRConfig, feature_means

    torch.manual_seed(0)
    model = CifarResNet(8, 4, 3)
    m = OLTR(OLTRConfig())
    head = m.head(model, "linear", 3)
    assert torch.equal(head.hallucinator.weight, model.head.weight) and torch.equal(
        head.hallucinator.bias, model.head.bias
    )
    net = FrozenBackbone(model, head, m.backbone_mode)
    assert m.backbone_mode == "finetune"
    assert all(p.requires_grad != n.startswith("head.") for n, p in model.named_parameters())  # stage-1 head unused
    ctx = _stub_ctx(model, COUNTS)
    method = m.method(ctx, net)
    expected = feature_means(ctx.predict(model, "train", True), ctx.data.train_y, 3)
    assert torch.allclose(net.head.centroids, expected)
    module = method.wrap(net)
    groups = {g.name: g for g in stage_groups(module, method.no_decay(net), method.param_groups())}
    assert {n: (g.lr_scale, g.weight_decay) for n, g in groups.items() if n != "params"} == {
        "centroids": (0.1, 5e-4), "backbone": (0.1, 5e-4)}  # fmt: skip
    assert groups["centroids"].params == [net.head.centroids]
    assert {id(p) for p in groups["backbone"].params} == {id(p) for p in model.parameters() if p.requires_grad}
    in_model = {id(p) for g in groups.values() for p in g.params}
    assert in_model == {id(p) for p in module.parameters() if p.requires_grad}  # each parameter in one group


# ------------------------------------------------------------------------------------------------ weight balancing


def _cb_softmax_reference(labels, logits, samples_per_cls, num_classes, beta):
    """ShadeAlsha/LTR-weight-balancing utils/class_balanced_loss.py::CB_loss, loss_type "softmax", restated:
    w = (1 - beta) / (1 - beta^n), scaled to sum C (numpy float64, then float32); each row of the B x C weight matrix
    is w of the row's label; F.binary_cross_entropy(softmax(logits), onehot, weight=that matrix), mean reduction."""
    w = (1.0 - beta) / (1.0 - np.power(beta, samples_per_cls))
    w = torch.tensor(w / w.sum() * num_classes).float()
    onehot = F.one_hot(labels, num_classes).float()
    row_w = (w[None, :] * onehot).sum(1, keepdim=True).expand(-1, num_classes)
    return F.binary_cross_entropy(logits.softmax(dim=1), onehot, weight=row_w)


def test_cb_softmax_loss_against_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    counts = [500, 120, 30, 5]
    logits, y = 3 * torch.randn(16, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
    loss = CBSoftmaxBCE(counts, beta=0.9999)
    assert torch.allclose(loss(logits, y), _cb_softmax_reference(y, logits, counts, 4, 0.9999), rtol=1e-6)
    # the same thing written out: binary cross-entropy over all B x C entries, rows weighted by w_y
    w, p = effective_number_weights(counts, 0.9999), logits.softmax(1)
    t = F.one_hot(y, 4).float()
    direct = (w[y][:, None] * -(t * p.log() + (1 - t) * (1 - p).log())).mean()
    assert torch.allclose(loss(logits, y), direct, rtol=1e-5)
    assert float(w.sum()) == pytest.approx(4.0) and w[3] > w[2] > w[1] > w[0]


def test_maxnorm_projects_rows_above_the_stage1_radius_exactly():
    """utils/regularizers.py::MaxNorm_via_PGD: delta = min + thresh (max - min) of the stage-1 row norms, set once;
    rows above delta are rescaled to norm delta, the others (and the bias) are left as they are."""
    stage1 = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))  # row norms 1..5
    mn = MaxNorm(stage1, thresh=0.1)
    assert float(mn.delta) == pytest.approx(1.0 + 0.1 * (5.0 - 1.0))
    w = torch.randn(5, 5)
    w = w / w.norm(dim=1, keepdim=True) * torch.tensor([1.0, 1.3, 2.0, 5.0, 0.5])[:, None]
    before = w.clone()
    mn.project(w)
    norms = w.norm(dim=1)
    assert norms[[2, 3]].tolist() == pytest.approx([1.4, 1.4], abs=1e-6)
    assert torch.allclose(w[[2, 3]] / norms[[2, 3], None], before[[2, 3]] / before[[2, 3]].norm(dim=1)[:, None])
    assert torch.equal(w[[0, 1, 4]], before[[0, 1, 4]])  # at or under the radius: untouched
    w.mul_(10)  # the radius does not follow the weights: it was computed once
    mn.project(w)
    assert float(mn.delta) == pytest.approx(1.4) and torch.allclose(w.norm(dim=1), torch.full((5,), 1.4))
    assert "delta" in mn.state_dict()  # a resumed stage keeps the stage-1 radius


# ------------------------------------------------------------------------------------------------ OLTR


def test_meta_embedding_forward_against_direct_computation():
    """OLTR MetaEmbedding_Classifier.forward + CosNorm_Classifier, element by element on 2 samples, d = 3, C = 2."""
    torch.manual_seed(0)
    hal = nn.Linear(3, 2)
    head = MetaEmbeddingHead(hal, 3, 2, reach_scale=10.0, cos_scale=16.0)
    with torch.no_grad():
        head.centroids.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, -1.0]]))
    v = torch.tensor([[0.5, 1.0, 1.0], [2.0, -1.0, 0.0]])
    c, hw, hb = head.centroids.tolist(), hal.weight.tolist(), hal.bias.tolist()
    sw, sb, cw = head.selector.weight.tolist(), head.selector.bias.tolist(), head.cosnorm.weight.tolist()
    with torch.no_grad():
        out = head(v)
    for i, x in enumerate(v.tolist()):
        r = 10.0 / min(math.dist(x, ck) for ck in c)
        z = [sum(hw[k][j] * x[j] for j in range(3)) + hb[k] for k in range(2)]
        o = [math.exp(zk) / sum(math.exp(q) for q in z) for zk in z]
        mem = [sum(o[k] * c[k][j] for k in range(2)) for j in range(3)]
        e = [math.tanh(sum(sw[a][j] * x[j] for j in range(3)) + sb[a]) for a in range(3)]
        meta = [r * (x[j] + e[j] * mem[j]) for j in range(3)]
        n = math.sqrt(sum(m * m for m in meta))
        squashed = [n / (1 + n) * m / n for m in meta]
        for k in range(2):
            wn = math.sqrt(sum(q * q for q in cw[k]))
            expected = 16.0 * sum(squashed[j] * cw[k][j] / wn for j in range(3))
            assert float(out[i, k]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert isinstance(head.cosnorm, CosNorm) and all(abs(x) <= 1 / math.sqrt(3) for row in cw for x in row)


def test_discriminative_centroid_loss_values_and_gradients():
    """loss/DiscCentroidsLoss.py: attract = sum ||f - c_y||^2 / 2B; repel = max(0, 10 - sum of squared distances to
    the other classes' centroids / (B C)); total = attract + 0.01 repel. Centroid gradient of the attracting term:
    sum (c_k - f_i) / (1 + n_k) / B, not scaled by the upstream gradient (the reference's custom backward)."""
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    c = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # ||f_i - c_{y_i}||^2: (0+1), (0+4), (4+0) -> 9 / 6 = 1.5
    # other classes: ||f_0 - c_1||^2 = 1, ||f_1 - c_0||^2 = 1 + 1 = 2, ||f_2 - c_1||^2 = 9 + 1 = 10 -> 13 / 6
    total, attract, repel = disc_centroid_loss(f, y, c, margin=10.0, repel_weight=0.01)
    assert float(attract) == pytest.approx(1.5)
    assert float(repel) == pytest.approx(10.0 - 13.0 / 6)
    assert float(total) == pytest.approx(1.5 + 0.01 * (10.0 - 13.0 / 6))
    assert float(disc_centroid_loss(f, y, c, margin=1.0)[2]) == 0.0  # clamped at 0

    fg, cg = f.clone().requires_grad_(True), c.clone().requires_grad_(True)
    (0.01 * _Attract.apply(fg, y, cg)).backward()
    # class 0: samples 0 and 2, n_0 = 2: ((c0 - f0) + (c0 - f2)) / 3 / 3; class 1: sample 1: (c1 - f1) / 2 / 3
    expected_c = torch.tensor([[(0.0 - 2.0) / 9, (1.0 + 0.0) / 9], [0.0, -2.0 / 6]])
    assert torch.allclose(cg.grad, expected_c)
    assert torch.allclose(fg.grad, 0.01 * (f - c[y]) / 3)  # features: the ordinary gradient, times the weight


# ------------------------------------------------------------------------------------------------ configs


def test_lr_factors_compose_with_any_optimiser(compose_cfg):
    """The factors are optimiser groups (exact for Adam too), so a non-SGD stage 2 is no longer refused."""
    for name in ("mislas", "oltr"):
        assert to_schema(compose_cfg(f"classifier={name}", "classifier.schedule.optimizer=adam")).classifier


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["classifier=mislas", "classifier.shape=exp"], "needs classifier.power"),
        (["classifier=mislas", "classifier.eps_head=1.5"], "eps_head"),
        (["classifier=wb", "model.head=cosine"], "linear stage-1 head"),
        (["classifier=oltr", "model.head=cosine"], "linear stage-1 head"),
        (["classifier=wb", "classifier.beta=1.0"], "beta"),
    ],
)
def test_bad_settings_fail_at_composition(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_schema(compose_cfg(*overrides))


def test_presets_and_experiments_carry_the_reference_values(compose_cfg):
    m = to_schema(compose_cfg("strategy=mislas"))
    assert m.synth.name == "mixup" and m.synth.alpha == 1.0 and m.schedule.gamma == 0.1
    assert (m.classifier.eps_head, m.classifier.eps_tail, m.classifier.shift_bn, m.classifier.lr_factor) == (
        0.3, 0.0, False, 0.5)  # fmt: skip
    m100 = to_schema(compose_cfg("experiment=mislas_cifar100", "strategy=mislas"))
    assert m100.dataset.name == "cifar100lt"
    assert (m100.classifier.eps_head, m100.classifier.eps_tail, m100.classifier.shift_bn) == (0.4, 0.1, True)
    assert m100.classifier.lr_factor == 0.2
    wb = to_schema(compose("train", overrides=["experiment=wb_cifar100", "strategy=wb"]))
    s = wb.schedule
    assert (s.epochs, s.batch_size, s.lr, s.weight_decay, s.decay, s.warmup) == (200, 64, 0.01, 5e-3, "cosine", 0.0)
    c = wb.classifier.schedule
    assert (c.epochs, c.batch_size, c.lr, c.weight_decay, wb.classifier.thresh) == (10, 64, 0.01, 0.1, 0.1)
    o = to_schema(compose_cfg("strategy=oltr")).classifier
    assert o.schedule.milestone_epochs == [20, 40] and o.schedule.epochs == 60 and o.finetune_backbone


# ------------------------------------------------------------------------------------------------ end to end


def _fixture(root, tmp):
    return [f"dataset.root={root}", "dataset.download=false", "dataset.imbalance_ratio=10", f"results_dir={tmp}"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stage_cache")  # stage 1 shared by the runs of this module that agree on it


def _net_state(run_dir):
    return torch.load(run_dir / "classifier_checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def _stage1_state(metrics):
    from pathlib import Path

    return torch.load(Path(metrics["stage1"]["cache_dir"]) / "model.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("name", ["mislas", "wb", "oltr"])
def test_each_preset_end_to_end(compose_cfg, cifar10_root, tmp_path, cache, name):
    extra = ["classifier.shift_bn=true"] if name == "mislas" else []
    m = run(compose_cfg(f"strategy={name}", "classifier.schedule.epochs=3", f"stage_cache={cache}", *extra,
                        *_fixture(cifar10_root, tmp_path)), tmp_path / "r")  # fmt: skip
    assert m["status"] == "completed" and m["stage2"]["method"] == name and 0 <= m["top1"] <= 100
    rows = (tmp_path / "r" / "classifier_epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    net, stage1 = _net_state(tmp_path / "r"), _stage1_state(m)
    backbone = {k[len("backbone.") :]: v for k, v in net.items() if k.startswith("backbone.")}
    convs = [k for k in stage1 if k.endswith("conv1.weight")]
    if name == "mislas":  # shift_bn: BN statistics re-estimated, every weight of the backbone as in stage 1
        assert all(torch.equal(backbone[k], stage1[k]) for k in convs)
        assert all(torch.equal(backbone[k], stage1[k]) for k in stage1 if k.endswith(("bn1.weight", "bn1.bias")))
        assert any(not torch.equal(backbone[k], stage1[k]) for k in stage1 if k.endswith("running_mean"))
        assert len(m["stage2"]["chosen"]["scales"]) == 10
    if name == "wb":  # the radius from the stage-1 classifier, every final class weight within it
        norms = stage1["head.weight"].norm(dim=1)
        delta = float(norms.min() + 0.1 * (norms.max() - norms.min()))
        assert m["stage2"]["chosen"]["maxnorm_delta"] == pytest.approx(delta, abs=1e-5)
        assert max(net["head.weight"].norm(dim=1).tolist()) <= delta + 1e-5
        assert all(torch.equal(backbone[k], stage1[k]) for k in stage1 if "running" in k)  # frozen, stage-1 BN
    if name == "oltr":  # the backbone fine-tuned, the memory kept in the final network
        assert any(not torch.equal(backbone[k], stage1[k]) for k in convs)
        assert net["head.centroids"].shape == (10, stage1["head.weight"].shape[1])
        assert "dc_loss" in rows[0] and "ce" in rows[0]


@pytest.mark.parametrize(
    "name, extra",
    [("mislas", ["classifier.shift_bn=true"]), ("wb", []), ("oltr", [])],
)
def test_resume_inside_the_classifier_stage_equals_an_uninterrupted_run(
    compose_cfg, cifar10_root, tmp_path, cache, monkeypatch, name, extra
):
    """As tests/test_fit.py for crt: lr-factor hooks, shifted BN statistics, the MaxNorm radius and the OLTR memory
    all come back from the checkpoint (stage 1 comes from the module's shared cache)."""
    args = [f"classifier={name}", "classifier.schedule.epochs=3", f"stage_cache={cache}", *extra,
            *_fixture(cifar10_root, tmp_path)]  # fmt: skip
    full = run(compose_cfg(*args), tmp_path / "full")
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args), tmp_path / "cut"), at=2, stage="classifier")
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["status"] == "interrupted"
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["classifier"] and resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    assert resumed["stage2"]["chosen"] == full["stage2"]["chosen"]
    a, b = _net_state(tmp_path / "full"), _net_state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "cut" / "classifier_epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # header + 3 epochs, none duplicated
