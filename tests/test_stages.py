"""Two-stage decoupled training: stage-2 methods against their definitions, the stage-1 cache, a CLI sweep."""

import json

import numpy as np
import pytest
import torch
from conftest import SMOKE
from test_e2e import ltbench
from torch import nn

from ltbench.classifier import (
    FrozenBackbone,
    ScaledHead,
    class_means,
    ncm_logits,
    posthoc_adjust,
    tau_normalized,
)
from ltbench.config import TrainConfig, to_schema
from ltbench.data.lt import lt_split
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.runner import run
from ltbench.stages import plan, stage_keys
from ltbench.tasks.classification import balanced_accuracy


def stage1_key(cfg, split_hash):
    """The cache key of the training stage (stage 1) of a run."""
    stages = plan(cfg)
    return stage_keys(cfg, stages, split_hash)[[s.name for s in stages].index("train")]


FIVE = ["crt", "lws", "tau_norm", "ncm", "posthoc_la"]


@pytest.fixture
def head():
    torch.manual_seed(0)
    h = nn.Linear(8, 5)
    with torch.no_grad():
        h.weight.mul_(torch.arange(1, 6, dtype=torch.float32)[:, None])  # very different norms
    return h


def test_tau_zero_leaves_the_classifier_unchanged(head):
    h0 = tau_normalized(head, 0.0)
    assert torch.equal(h0.weight, head.weight) and torch.equal(h0.bias, head.bias)


def test_tau_one_gives_unit_norm_class_vectors(head):
    h1 = tau_normalized(head, 1.0)
    assert torch.allclose(h1.weight.norm(dim=1), torch.ones(5), atol=1e-6)
    h_half = tau_normalized(head, 0.5)
    assert torch.allclose(h_half.weight, head.weight / head.weight.norm(dim=1, keepdim=True).sqrt())


def test_lws_with_unit_scales_equals_stage1_classifier(head):
    f = torch.randn(16, 8)
    assert torch.allclose(ScaledHead(head, 5)(f), head(f))
    lws = ScaledHead(head, 5)
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ["scales"]


def test_posthoc_la_tau_one_subtracts_log_prior():
    logits = torch.randn(4, 3)
    counts = [100, 10, 1]
    prior = torch.tensor(counts, dtype=torch.float32) / 111
    assert torch.allclose(posthoc_adjust(logits, counts, 1.0), logits - prior.log())
    assert torch.equal(posthoc_adjust(logits, counts, 0.0), logits)


def test_ncm_on_separable_features_is_exact():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6)[:4] * 10
    y = torch.randint(0, 4, (200,), generator=g)
    x = centres[y] + 0.5 * torch.randn(200, 6, generator=g)
    means = class_means(x, y, 4)
    y_test = torch.randint(0, 4, (100,), generator=g)
    x_test = centres[y_test] + 0.5 * torch.randn(100, 6, generator=g)
    assert torch.equal(ncm_logits(x_test, means).argmax(1), y_test)


def test_balanced_accuracy_ignores_absent_classes():
    y = torch.tensor([1, 1, 2])
    p = torch.tensor([1, 0, 2])
    assert balanced_accuracy(p, y, 4) == pytest.approx(75.0)
    assert balanced_accuracy(p[:0], y[:0], 4) is None


def test_frozen_backbone_keeps_stage1_batchnorm_and_weights():
    model = CifarResNet(8, 4, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = FrozenBackbone(model, nn.Linear(model.feature_dim, 5))
    net.train()
    assert not model.training and net.head.training
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = net(torch.randn(8, 3, 32, 32)).sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats included


def test_validation_split_is_disjoint_seeded_and_says_what_is_missing():
    labels = np.repeat(np.arange(4), 50)
    train, val = lt_split(labels, [50, 30, 10, 5], seed=0, val_per_class=20)
    assert not set(train) & set(val)
    assert np.bincount(labels[val], minlength=4).tolist() == [0, 20, 20, 20]  # class 0 kept everything
    again_train, again_val = lt_split(labels, [50, 30, 10, 5], seed=0, val_per_class=20)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    train0, _ = lt_split(labels, [50, 30, 10, 5], seed=0, val_per_class=0)
    assert np.array_equal(train0, train)  # holding out validation never changes the training subset


def test_stage1_key_shared_by_stage2_methods_and_sensitive_to_stage1(compose_cfg):
    def key(*o):
        c = to_schema(compose_cfg(*o))
        assert isinstance(c, TrainConfig)
        return stage1_key(c, "split")

    base = key("strategy=crt")
    assert all(key(f"strategy={s}") == base for s in FIVE)
    assert key("strategy=crt", "dataset.val_per_class=5") == base  # validation does not touch stage 1
    assert key("strategy=crt", "classifier.schedule.epochs=3") == base
    assert key("strategy=crt", "loss=focal") != base
    assert key("strategy=crt", "seed=1") != base
    assert key("strategy=crt", "schedule.lr=0.05") != base
    assert stage1_key(to_schema(compose_cfg("strategy=crt")), "other-split") != base


def _fixture(root, tmp):
    return [f"dataset.root={root}", "dataset.download=false", "dataset.imbalance_ratio=10", f"results_dir={tmp}"]


def test_cache_hit_on_second_run_and_miss_when_stage1_changes(compose_cfg, cifar10_root, tmp_path):
    a = run(compose_cfg("strategy=crt", *_fixture(cifar10_root, tmp_path)), tmp_path / "a")
    assert a["stage1"]["reused"] is False and a["stage2"]["method"] == "crt"
    b = run(compose_cfg("strategy=lws", *_fixture(cifar10_root, tmp_path)), tmp_path / "b")
    assert b["stage1"]["reused"] is True and b["stage1"]["cache_key"] == a["stage1"]["cache_key"]
    assert b["stage1"]["test"]["top1"] == a["stage1"]["test"]["top1"]
    assert not (tmp_path / "b" / "checkpoint.pt").exists()  # no stage-1 training happened here
    c = run(compose_cfg("strategy=crt", "schedule.lr=0.05", *_fixture(cifar10_root, tmp_path)), tmp_path / "c")
    assert c["stage1"]["reused"] is False and c["stage1"]["cache_key"] != a["stage1"]["cache_key"]
    assert len(list((tmp_path / "stage_cache").iterdir())) == 2


def test_tau_is_chosen_on_validation_and_the_curve_is_recorded(compose_cfg, cifar10_root, tmp_path):
    m = run(compose_cfg("strategy=tau_norm", *_fixture(cifar10_root, tmp_path)), tmp_path / "t")
    curve = m["stage2"]["curve"]
    assert [p["tau"] for p in curve] == [round(0.1 * i, 1) for i in range(21)]
    best = max(p["val_balanced_acc"] for p in curve)
    first_best = next(p for p in curve if p["val_balanced_acc"] == best)
    assert m["stage2"]["chosen"]["tau"] == first_best["tau"]
    assert m["top1"] == pytest.approx(first_best["top1"])  # the reported test number is the chosen tau's
    assert (tmp_path / "t" / "tau_curve.csv").read_text().startswith("tau,val_balanced_acc,top1")
    # the largest class keeps all its images in the subset: tau_norm selects on validation, so 20 of them moved
    assert m["val_class_counts"] == [20] * 10 and m["val_moved"][:3] == [20, 10, 3] and "val_note" in m
    assert m["train_class_counts"] == [20, 20, 20, 18, 14, 11, 8, 6, 5, 4]


@pytest.mark.slow
def test_cli_sweep_over_the_five_trains_stage1_once(cifar10_root, tmp_path):
    r = ltbench("train", "-m", *SMOKE, *_fixture(cifar10_root, tmp_path), f"strategy={','.join(FIVE)}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "sweeps").rglob("metrics.json")]
    assert sorted(x["strategy"] for x in recs) == sorted(FIVE)
    # one backbone per training subset: crt, lws and ncm share the published one; tau_norm and posthoc_la select on
    # validation, so their subset gives the largest classes' validation images to it, and they share another
    trained = {x["strategy"] for x in recs if not x["stage1"]["reused"]}
    assert len(trained) == 2 and len(trained & {"crt", "lws", "ncm"}) == 1
    assert len({x["stage1"]["cache_key"] for x in recs}) == 2
    assert len(list((tmp_path / "stage_cache").iterdir())) == 2
    # a second sweep with the same stage 1 trains none
    r = ltbench("train", "-m", *SMOKE, *_fixture(cifar10_root, tmp_path), "strategy=crt,ncm", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.count("stage 1 reused") + r.stdout.count("stage 1 reused") >= 2
    r = ltbench("report", str(tmp_path), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0 and "stage-1 top-1" in (tmp_path / "report.md").read_text()
