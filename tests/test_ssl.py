"""Self- and semi-supervised learning for imbalance: the labeled/unlabeled construction, rotation pre-training,
FixMatch's mask and loss, the EMA, ABC's masks, pseudo-label quality, and every method end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE, interrupt_at, make_cifar
from hydra import compose
from test_e2e import ltbench
from torch import nn

from ltbench.config import to_schema
from ltbench.core import Batch
from ltbench.data.lt import lt_counts
from ltbench.data.ssl import CifarSSLConfig, ssl_split
from ltbench.methods.semi import EMA, PseudoLabelStats
from ltbench.methods.ssp import rotate, rotation_labels
from ltbench.runner import run


def test_darp_counts():
    labeled, unlabeled = CifarSSLConfig(num_classes=10).counts()
    assert labeled == [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15] and sum(labeled) == 3720
    assert unlabeled == [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30] and sum(unlabeled) == 7443
    assert CifarSSLConfig(num_classes=10, unlabeled_ratio=1).counts()[1] == [3000] * 10
    assert CifarSSLConfig(num_classes=10, unlabeled_order="reversed").counts()[1] == unlabeled[::-1]
    assert labeled == lt_counts(1500, 10, 100)  # the long-tail formula of the labeled set is CIFAR-LT's


def test_labeled_unlabeled_and_validation_are_disjoint_seeded_and_sized():
    labels = np.repeat(np.arange(4), 100)
    lab, unl, val = ssl_split(labels, [40, 20, 10, 5], [50, 30, 20, 10], 5, seed=0)
    assert np.bincount(labels[lab]).tolist() == [40, 20, 10, 5]
    assert np.bincount(labels[unl]).tolist() == [50, 30, 20, 10]
    assert np.bincount(labels[val]).tolist() == [5] * 4
    assert not set(lab) & set(unl) and not set(lab) & set(val) and not set(unl) & set(val)
    again = ssl_split(labels, [40, 20, 10, 5], [50, 30, 20, 10], 5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((lab, unl, val), again))
    other = ssl_split(labels, [40, 20, 10, 5], [50, 30, 20, 10], 5, seed=1)
    assert not np.array_equal(lab, other[0])


def test_rotation_labels_are_balanced_and_images_rotated():
    k = rotation_labels(128, torch.Generator().manual_seed(0))
    assert torch.bincount(k).tolist() == [32] * 4
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    r = rotate(x, torch.tensor([0, 1]))
    assert torch.equal(r[0], x[0]) and torch.equal(r[1], torch.rot90(x[1], 1, dims=(1, 2)))


def test_ema_update_formula():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    ema = EMA(a, decay=0.9)
    before = [p.clone() for p in ema.module.parameters()]
    ema.update(b)
    for e, p0, p in zip(ema.module.parameters(), before, b.parameters()):
        assert torch.allclose(e, 0.9 * p0 + 0.1 * p)
        assert not e.requires_grad


def test_pseudo_label_precision_and_recall_per_class():
    s = PseudoLabelStats(3)
    pseudo, truth = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0])
    mask = torch.tensor([True, True, True, True, False, True])
    s.add(pseudo, mask, truth)
    out = s.summary()
    # kept: (0->0), (0->1), (1->1), (2->2), (2->0): class 0 predicted 2, right 1; class 2 predicted 2, right 1
    assert out["precision"] == pytest.approx([50.0, 100.0, 50.0])
    assert out["recall"] == pytest.approx([50.0, 50.0, 50.0])  # class 2: 2 true, 1 kept right
    assert out["kept"] == pytest.approx(5 / 6 * 100)


class _Base(nn.Module):
    """The parts of the supervised method FixMatch uses: its loss (plain CE), weights and task sums."""

    def __init__(self):
        super().__init__()
        self.weight = None

        class _T:
            @staticmethod
            def step_sums(out, y):
                return {}

        self.task = _T()

    def loss_fn(self, out, y, w):
        return F.cross_entropy(out, y)


def test_fixmatch_mask_threshold_and_loss_against_the_formula():
    from ltbench.methods.semi import FixMatch, FixMatchConfig

    cfg = FixMatchConfig(threshold=0.9, lambda_u=2.0)
    fm = FixMatch.__new__(FixMatch)
    nn.Module.__init__(fm)
    fm.cfg, fm.base, fm.stats = cfg, _Base(), PseudoLabelStats(3)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 + 4 + 4, 3, generator=g) * 4
    y, u_true = torch.tensor([0, 2]), torch.tensor([0, 1, 2, 2])
    batch = Batch(torch.zeros(2, 1), y, unlabeled=Batch(torch.zeros(4, 1), u_true))
    loss, lu = fm.fixmatch_loss(logits, batch, 2, 4)
    p = logits[2:6].softmax(1)
    mask = (p.max(1).values >= 0.9).float()
    expected_u = (F.cross_entropy(logits[6:], p.argmax(1), reduction="none") * mask).mean()
    assert lu.item() == pytest.approx(expected_u.item())
    assert loss.item() == pytest.approx((F.cross_entropy(logits[:2], y) + 2.0 * expected_u).item())
    assert fm.stats.kept.item() == mask.sum().item()


def test_abc_keep_probabilities_follow_the_definitions():
    counts = torch.tensor([100.0, 20.0, 5.0])
    keep_labeled = counts.min() / counts  # N_min / N_k
    assert keep_labeled.tolist() == pytest.approx([0.05, 0.25, 1.0])
    # unlabeled: 1 at the start, N_min / N_k at the end, linear in between
    for progress, expected in ((0.0, [1.0, 1.0, 1.0]), (1.0, [0.05, 0.25, 1.0]), (0.5, [0.525, 0.625, 1.0])):
        assert (1 - progress * (1 - keep_labeled)).tolist() == pytest.approx(expected)


def test_simsiam_encodes_each_view_on_its_own_as_the_reference():
    """facebookresearch/simsiam simsiam/builder.py SimSiam.forward: z1 = encoder(x1), z2 = encoder(x2),
    p = predictor(z); main_simsiam.py: loss = -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) * 0.5.
    In train mode BatchNorm's statistics are those of one view, so one batch of both views gives another loss."""
    import torch.nn.functional as F
    from torch import nn

    from ltbench.methods.ssp import SimSiamNet
    from ltbench.models.resnet_cifar import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(8, 4, 3)
    proj = nn.Sequential(nn.Linear(model.feature_dim, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16, affine=False))  # fmt: skip
    pred = nn.Sequential(nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 16))
    net = SimSiamNet(model, proj, pred).train()
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)

    def encoder(x):
        return proj(model.features(x))

    z1, z2 = encoder(x1), encoder(x2)
    p1, p2 = pred(z1), pred(z2)
    ref = -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) * 0.5
    torch.testing.assert_close(net(x1, x2), ref)
    z = proj(model.features(torch.cat([x1, x2])))  # what ltbench did: one batch of 2N
    p = pred(z)
    joint = -(F.cosine_similarity(p[:6], z[6:]).mean() + F.cosine_similarity(p[6:], z[:6]).mean()) / 2
    assert abs(float(joint) - float(ref)) > 1e-4


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def ssl_root(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("ssl_cifar"), 10, train_per_class=60, test_per_class=10)


def ssl_data(root):
    return ["dataset=cifar10lt_ssl", f"dataset.root={root}", "dataset.download=false", "dataset.max_labeled=20",
            "dataset.max_unlabeled=30", "dataset.imbalance_ratio=4", "dataset.unlabeled_ratio=4",
            "dataset.val_per_class=5"]  # fmt: skip


@pytest.mark.parametrize("semi", ["pseudo_label", "fixmatch", "abc"])
def test_every_semi_method_trains_and_records_its_data(compose_cfg, ssl_root, tmp_path, semi):
    m = run(compose_cfg(*ssl_data(ssl_root), f"semi={semi}", f"results_dir={tmp_path}"), tmp_path / "r")
    assert m["status"] == "completed" and m["num_train"] == sum(lt_counts(20, 10, 4)) and m["num_unlabeled"] > 0
    u = [int(v) for v in (tmp_path / "r" / "unlabeled_indices.txt").read_text().split()]
    t = [int(v) for v in (tmp_path / "r" / "train_indices.txt").read_text().split()]
    assert len(u) == m["num_unlabeled"] and not set(u) & set(t)
    quality = m["pseudo_labels"] if semi != "pseudo_label" else m["base"]["pseudo_label_quality"]
    assert len(quality["precision"]) == 10 and 0 <= quality["kept"] <= 100
    assert m["stages"] == (["base", "train"] if semi == "pseudo_label" else ["train"])


@pytest.mark.parametrize("pretrain", ["rotation", "simsiam"])
def test_pretraining_keeps_the_head_and_trains_the_backbone(compose_cfg, cifar10_root, tmp_path, pretrain):
    args = [f"pretrain={pretrain}", "pretrain.schedule.epochs=1", "pretrain.schedule.batch_size=32",
            f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10",
            f"results_dir={tmp_path}"]  # fmt: skip
    if pretrain == "simsiam":
        args += ["pretrain.proj_dim=32", "pretrain.pred_dim=8"]
    m = run(compose_cfg(*args), tmp_path / "r")
    assert m["status"] == "completed" and m["stages"] == ["pretrain", "train"] and m["label"].startswith("ce+SSP")
    rows = (tmp_path / "r" / "pretrain_epochs.csv").read_text().splitlines()
    assert len(rows) == 2 and ("rotation_acc" in rows[0] or "neg_cosine" in rows[0])
    cached = torch.load(next((tmp_path / "stage_cache").glob("*/model.pt")), weights_only=True)["model"]
    torch.manual_seed(0)
    from ltbench.models.resnet_cifar import CifarResNet

    init = CifarResNet(8, 4, 10).state_dict()
    assert torch.equal(cached["head.weight"], init["head.weight"])  # the model's head was not pre-trained
    assert not torch.equal(cached["conv1.weight"], init["conv1.weight"])  # the backbone was


def test_resume_inside_the_pretraining_stage_equals_an_uninterrupted_run(
    compose_cfg, cifar10_root, tmp_path, monkeypatch
):
    args = ["pretrain=rotation", "pretrain.schedule.epochs=3", "pretrain.schedule.batch_size=32",
            f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10"]  # fmt: skip
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    interrupt_at(
        monkeypatch,
        lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"),
        at=2,
        stage="pretrain",
    )
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["pretrain"] and resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]


def test_semi_needs_unlabeled_data_and_refuses_what_it_cannot_combine(compose_cfg):
    from ltbench.errors import ConfigError

    with pytest.raises(ConfigError, match="unlabeled"):
        to_schema(compose_cfg("semi=fixmatch"))
    with pytest.raises(ConfigError, match="synth"):
        to_schema(compose_cfg("dataset=cifar10lt_ssl", "semi=fixmatch", "synth=mixup"))
    with pytest.raises(ConfigError, match="pretrain"):
        to_schema(compose_cfg("dataset=cifar10lt_ssl", "semi=pseudo_label", "pretrain=rotation"))


@pytest.mark.slow
def test_a_sweep_with_pretraining_pretrains_once(cifar10_root, tmp_path):
    data = [f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10"]
    r = ltbench("train", "-m", *SMOKE, "pretrain=rotation", "pretrain.schedule.epochs=1", *data,
                "strategy=ce,focal,crt", f"results_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "sweeps").rglob("metrics.json")]
    short = " [pretrain.schedule.epochs=1]"  # the shortened pre-training changes the method: the label says so
    assert sorted(x["label"] for x in recs) == [f"{s}+SSP{short}" for s in ("ce", "crt", "focal")]
    assert sum(not x["pretrain"]["reused"] for x in recs) == 1  # one pre-training for the three
    r = ltbench("report", str(tmp_path), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0 and "ce+SSP" in (tmp_path / "report.md").read_text()


def test_the_ssl_experiment_is_the_usb_recipe_on_wrn28_2(compose_cfg, ssl_root, tmp_path):
    full = ["progress=false", "device=cpu", "experiment=ssl_cifar10", "semi=fixmatch"]
    s = to_schema(compose("train", overrides=full))
    assert s.model.name == "wrn" and s.dataset.name == "cifar10lt_ssl" and s.schedule.decay == "fixmatch"
    assert (s.schedule.lr, s.schedule.batch_size, s.schedule.nesterov) == (0.03, 64, True)
    # 262,144 USB iterations of 64 labeled images over the 3,720 labeled images of N_1 = 1500, gamma 100
    assert s.schedule.epochs * math.ceil(3720 / 64) == pytest.approx(262_144, abs=59)  # the last batch is kept
    short = ["schedule.epochs=1", "schedule.batch_size=16", "semi.mu=1", f"results_dir={tmp_path}"]
    m = run(compose("train", overrides=[*full, *short, *ssl_data(ssl_root)]), tmp_path / "r")
    assert m["status"] == "completed" and "+FixMatch" in m["label"]
