"""method=bcl|supcon|kcl (ltbench.methods.contrastive) against loop transcriptions of the reference formulas.

References: BalSCL = FlamieZhu/Balanced-Contrastive-Learning ``loss/contrastive.py::BalSCL.forward`` (the same code in
sumyeongahn/CUDA_LTR ``cifar/losses/bcl.py``), written out as the formula of /work/notes/methods_refs.md 1.5; SupCon
L_out = HobbitLong/SupContrast ``losses.py::SupConLoss`` (``k=0`` branch of LTH14/targeted-supcon
``tsc_cifar_loss.py``); KCL = the ``k>0`` branch of that file; the CIFAR recipe = YuMJie/ConCutMix
``run_files/cifar10_imb100.sh`` and ``main.py::adjust_lr``. CPU only; the end-to-end runs use experiment=smoke.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import interrupt_at
from hydra import compose

from ltbench.config import AugmentConfig, to_schema
from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.feed import tensor_batches
from ltbench.losses.classification import LogitAdjusted
from ltbench.methods.contrastive import (
    BCLConfig,
    Contrastive,
    KCLConfig,
    SupConConfig,
    balscl_loss,
    class_weights,
    contrast_log_prob,
    gaussian_blur,
    kcl_positives,
    supcon_loss,
)
from ltbench.methods.supervised import Supervised
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.optim import lr_at
from ltbench.runner import run
from ltbench.tasks import build_task
from ltbench.tasks.classification import ClassificationConfig

TAU = 0.1


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------------- loop transcriptions
def balscl_loop(z, y, centers, tau):
    """methods_refs.md 1.5, item by item: A = views + prototypes; D_i = sum_k 1/|A_k minus i| sum_{a in A_k, a != i}
    exp(z_i.a/tau); L_i = -1/|P(i)| sum_{p in P(i)} (z_i.p/tau - log D_i). Returns per-anchor losses and |P(i)|."""
    items = list(z) + list(centers)
    labels = [int(v) for v in y] + list(range(len(centers)))
    losses, npos = [], []
    for i in range(len(z)):
        d = 0.0
        for k in set(labels):
            members = [a for a in range(len(items)) if labels[a] == k and a != i]
            d += sum(math.exp(float(z[i] @ items[a]) / tau) for a in members) / len(members)
        pos = [p for p in range(len(items)) if p != i and labels[p] == labels[i]]
        losses.append(-sum(float(z[i] @ items[p]) / tau - math.log(d) for p in pos) / len(pos))
        npos.append(len(pos))
    return torch.tensor(losses, dtype=torch.float64), npos


def l_out_loop(z, y, tau, positives=None):
    """SupCon's L_out: -1/|P(i)| sum_p log(exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)); P(i) = the other
    same-label views (or the rows of ``positives``)."""
    out = []
    for i in range(len(z)):
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(len(z)) if a != i)
        if positives is None:
            pos = [p for p in range(len(z)) if p != i and int(y[p]) == int(y[i])]
        else:
            pos = positives[i].nonzero().flatten().tolist()
        out.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos))
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------- losses
def test_balscl_equals_the_formula_with_an_absent_class_and_counts_positives():
    y = torch.tensor([0, 0, 0, 1, 3, 1, 0])  # B = 7; class 2 is absent: it enters through its prototype only
    z, centers = _unit(14, 5, 0), _unit(4, 5, 1).requires_grad_(True)
    per_anchor = balscl_loss(z, y.repeat(2), centers, TAU, reduction="none")
    expected, npos = balscl_loop(z, y.repeat(2), centers.detach(), TAU)
    assert torch.allclose(per_anchor, expected, rtol=1e-10, atol=1e-12)
    counts = torch.bincount(y, minlength=4)
    assert npos == [2 * int(counts[c]) for c in y.repeat(2)]  # 2 n_y - 1 other views + the prototype
    contrast = torch.cat([z, centers.detach()])
    _, same = contrast_log_prob(z, y.repeat(2), contrast, torch.cat([y.repeat(2), torch.arange(4)]), TAU, True)
    assert same.sum(1).tolist() == npos and not same[:, 14 + 2].any()  # nobody's positive: class 2's prototype
    loss = balscl_loss(z, y.repeat(2), centers, TAU)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-12)
    loss.backward()
    assert centers.grad[2].abs().sum() > 0  # ... but every anchor's denominator holds it


def test_balscl_ablations_and_supcon_are_the_l_out_form():
    y = torch.tensor([2, 0, 2, 1, 2, 0]).repeat(2)
    z = _unit(12, 4, 2)
    expected = l_out_loop(z, y, TAU)
    assert torch.allclose(supcon_loss(z, y, TAU, reduction="none"), expected, rtol=1e-10)
    # BalSCL without prototypes and without class-averaging is SupCon
    assert torch.allclose(balscl_loss(z, y, None, TAU, class_averaging=False, reduction="none"), expected)
    # without class-averaging but with prototypes: SupCon over the extended set (prototypes never anchors)
    centers = _unit(3, 4, 3)
    ext = torch.cat([z, centers])
    ext_y = torch.cat([y, torch.arange(3)])
    full = l_out_loop(ext, ext_y, TAU)[:12]
    assert torch.allclose(balscl_loss(z, y, centers, TAU, class_averaging=False, reduction="none"), full)


def test_kcl_positives_are_the_other_view_and_k_same_class_views_drawn_from_the_generator():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2]).repeat(2)  # B = 7: class 0 has 4 images, class 1 two, class 2 one
    n = len(y)
    for k in (1, 2, 6, 100):
        pos = kcl_positives(y, k, torch.Generator().manual_seed(0))
        for i in range(n):
            other_view = (i + 7) % n
            available = int((y == y[i]).sum()) - 2  # the class's views but the anchor's own two
            assert bool(pos[i, other_view]) and not bool(pos[i, i])
            assert int(pos[i].sum()) == min(k, available) + 1
            assert bool((y[pos[i]] == y[i]).all())
    a = kcl_positives(y, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, kcl_positives(y, 2, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, kcl_positives(y, 2, torch.Generator().manual_seed(6)))
    # uniform without replacement: each of anchor 0's 6 candidates is drawn with probability k / 6 = 1/3
    g = torch.Generator().manual_seed(1)
    freq = sum(kcl_positives(y, 2, g)[0].double() for _ in range(3000)) / 3000
    cands = [1, 2, 3, 8, 9, 10]
    assert freq[7] == 1 and freq[cands].sub(1 / 3).abs().max() < 0.04 and freq.sum() == pytest.approx(3)


def test_kcl_loss_is_l_out_over_the_sampled_positives():
    y = torch.tensor([0, 0, 0, 1, 1, 0]).repeat(2)
    z = _unit(12, 6, 4)
    pos = kcl_positives(y, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(supcon_loss(z, y, TAU, pos, reduction="none"), l_out_loop(z, y, TAU, pos), rtol=1e-10)


# --------------------------------------------------------------------------------------------------- method
def _method(cfg, head: str = "linear", augment: AugmentConfig | None = None, num_classes: int = 4):
    ctx = SimpleNamespace(
        data=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), kind="tensor", num_classes=num_classes),
        cfg=SimpleNamespace(augment=augment or AugmentConfig(), dataset=SimpleNamespace(), seed=0),
        feed=SimpleNamespace(train_x=None),
    )
    torch.manual_seed(0)
    model = CifarResNet(depth=8, width=4, num_classes=num_classes, head=head)
    base = Supervised(LogitAdjusted([8, 4, 2, 1][:num_classes]), build_task(ClassificationConfig()))
    method = Contrastive(cfg, ctx, model, base)
    return method, model


def _batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return Batch(x, torch.tensor([0, 1, 0, 2, 3, 0][:n]), torch.arange(n))


def _step(method, model, batch, seed: int = 0):
    ep = Epoch("train", 0, 1, 0.1, torch.Generator().manual_seed(seed), amp=False)
    method.on_epoch_start(ep)
    loss, sums = method.step(method.wrap(model), batch, ep)
    return loss, sums


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_prototypes_come_from_the_classifier_weights_and_train_them(head):
    method, model = _method(BCLConfig(alpha=0.0), head)  # no view 0: the classifier learns through prototypes only
    w = class_weights(model.head)
    assert w.shape == (4, model.feature_dim)
    assert torch.equal(w, model.head.weight if head == "linear" else model.head.weight.T)
    net = method.wrap(model).train()
    _, _, centers = net(torch.randn(6, 3, 32, 32), 6, 0)
    assert torch.allclose(centers, torch.nn.functional.normalize(method.prototyper(w), dim=1))
    loss, _ = _step(method, model, _batch())
    loss.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.prototyper.parameters())
    method, model = _method(BCLConfig(alpha=0.0, class_complement=False), head)  # no prototypes: no gradient
    _step(method, model, _batch())[0].backward()
    assert model.head.weight.grad is None and method.prototyper is None


def test_step_is_alpha_times_the_run_loss_on_view_0_plus_beta_times_the_contrastive_loss():
    cfg = BCLConfig(alpha=2.0, beta=0.6)
    method, model = _method(cfg, "cosine")
    batch = _batch()
    loss, sums = _step(method, model, batch, seed=3)
    gen = torch.Generator().manual_seed(3)
    views = method.views(batch.x, gen)
    logits, z, centers = method.wrap(model)(torch.cat(views), 6, 6)
    ce = method.base.loss_fn(30.0 * logits, batch.y)  # the cosine logits scaled by the official s = 30
    con = balscl_loss(z, batch.y.repeat(2), centers, 0.1)
    assert loss.item() == pytest.approx(2.0 * ce.item() + 0.6 * con.item(), rel=1e-5)
    assert float(sums["mean_loss_ce"]) == pytest.approx(6 * ce.item(), rel=1e-5)


def test_view_0_is_the_feeds_augmentation_and_views_1_2_differ():
    aug = AugmentConfig(crop=True, padding=4, flip=True, cutout=16, autoaugment=True)
    method, _ = _method(SupConConfig(), augment=aug)
    batch = _batch()
    v0, v1, v2 = method.views(batch.x, torch.Generator().manual_seed(7))
    feed = tensor_batches(batch.x, batch.y, batch.index, batch_size=6, mean=method.mean, std=method.std,
                          augment=aug, synth=None, synth_on=False, gen=torch.Generator().manual_seed(7))  # fmt: skip
    assert torch.equal(v0, next(feed).x)
    assert v1.shape == v0.shape and not torch.equal(v1, v2)


def test_gaussian_blur_matches_torchvision_per_image():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.9, 2.0])
    out = gaussian_blur(x, sigma)  # radius ceil(3 * 2) = 6: kernel 13
    for i in range(3):
        ref = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sigma[i])] * 2)
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_kcl_step_draws_its_positives_from_the_epoch_generator():
    method, model = _method(KCLConfig(k=1))
    a = _step(method, model, _batch(), seed=1)[0].item()
    assert a == _step(method, model, _batch(), seed=1)[0].item()
    assert a != _step(method, model, _batch(), seed=2)[0].item()


# ------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=agedb_dir", "method=bcl"], "needs task=classification"),
        (["experiment=diamonds_dir", "method=supcon"], "gives features"),
        (["dataset=cifar10lt_ssl", "semi=fixmatch", "method=bcl"], "does not combine with semi=fixmatch"),
        (["strategy=bcl", "synth=mixup"], "synth=mixup mixes inputs"),
        (["method=kcl", "method.k=0"], "method.k"),
        (["method=bcl", "method.alpha=0", "method.beta=0"], "not both 0"),
    ],
)
def test_combinations_that_make_no_sense_are_refused_in_one_line(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        to_schema(compose_cfg(*overrides))
    assert "\n" not in str(e.value)


def test_the_bcl_cifar10_experiment_is_the_ports_recipe(compose_cfg):
    s = to_schema(compose("train", overrides=["experiment=bcl_cifar10", "strategy=bcl"]))  # (no smoke settings)
    assert (s.dataset.name, s.model.name, s.model.depth, s.model.head) == ("cifar10lt", "resnet32", 32, "linear")
    sch = s.schedule
    assert (sch.epochs, sch.batch_size, sch.lr, sch.momentum, sch.weight_decay) == (200, 256, 0.15, 0.9, 5e-4)

    def adjust_lr(epoch: int, lr: float = 0.15) -> float:  # ConCutMix main.py::adjust_lr, warmup 5, [160, 180]
        if epoch < 5:
            return lr / 5 * (epoch + 1)
        for milestone in (160, 180):
            lr *= 0.1 if epoch >= milestone else 1.0
        return lr

    assert all(lr_at(e, sch) == pytest.approx(adjust_lr(e), rel=1e-12) for e in range(200))
    assert (s.loss.name, s.loss.tau) == ("logit_adjust", 1.0)
    assert (s.augment.crop, s.augment.flip, s.augment.autoaugment, s.augment.cutout) == (True, True, True, 0)
    m = s.method
    assert (m.name, m.alpha, m.beta, m.temperature, m.hidden_dim, m.feat_dim) == ("bcl", 2.0, 0.6, 0.1, 512, 128)
    assert m.class_averaging and m.class_complement and m.blur == 0.5


# ------------------------------------------------------------------------------------------------ end to end
def test_bcl_resumed_inside_training_equals_an_uninterrupted_run(compose_cfg, cifar10_root, tmp_path, monkeypatch):
    args = ["strategy=bcl", "schedule.epochs=2", "method.hidden_dim=32", "method.feat_dim=16",
            f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10"]  # fmt: skip
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    assert full["status"] == "completed" and full["strategy"] == "bcl"
    rows = (tmp_path / "full" / "epochs.csv").read_text().splitlines()
    assert "loss_ce" in rows[0] and "loss_con" in rows[0] and len(rows) == 3
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"), at=2)
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["train"] and resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    saved = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert saved["status"] == "completed"


def test_bcl_trains_on_image_files(compose_cfg, image_tree, tmp_path):
    """Image-file datasets: the raw batches are the resized, centre-cropped images; view 0 is the feed's
    RandomResizedCrop + flip + jitter made on the batch, views 1 and 2 SimAugment at dataset.image_size."""
    tiny = ["progress=false", "device=cpu", "schedule=short", "schedule.epochs=1", "schedule.warmup=0",
            "schedule.milestones=[]", "model=resnet10", "dataset=imagenetlt", f"dataset.root={image_tree}",
            "dataset.num_classes=4", "dataset.image_size=32", "dataset.resize=36", "dataset.num_workers=0",
            "dataset.check_counts=false", "schedule.batch_size=16", "schedule.eval_batch_size=32",
            "method.hidden_dim=16", "method.feat_dim=8", "strategy=bcl", f"results_dir={tmp_path}"]  # fmt: skip
    m = run(compose("train", overrides=tiny), tmp_path / "run")  # (not the smoke settings of compose_cfg)
    assert m["status"] == "completed" and m["num_train"] == 41
