"""method=glmc (ltbench.methods.glmc) against transcriptions of the reference, ynu-yangpeng/GLMC (GLMC-2023/):

- ``utils/util.py::rand_bbox`` and ``utils/util.py::GLMC_mixed`` (its ``np.random`` draws passed in: lam, the box
  centre), transcribed in :func:`ref_rand_bbox` / :func:`ref_glmc_mixed`;
- ``Trainer.py::Trainer.update_weight`` (:func:`ref_update_weight`), the loss lines of ``Trainer.train`` with
  ``Trainer.SimSiamLoss`` (:func:`ref_step_loss`) and its ``alpha = 1 - (epoch / self.epochs) ** 2``;
- ``main.py::main_worker``'s ``cls_weight`` / ``samples_weight`` of the WeightedRandomSampler (:func:`ref_samples`).

CPU only; the end-to-end run uses experiment=smoke on the tiny CIFAR fixture.
"""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at
from hydra import compose

from ltbench.config import AugmentConfig, to_schema
from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.losses.classification import CrossEntropy
from ltbench.methods.glmc import (
    GLMC,
    GLMCConfig,
    box_at,
    cumulative_alpha,
    cutmix_box,
    glmc_loss,
    glmc_mix,
    label_weights,
    mixed_targets,
    sample_weights,
)
from ltbench.methods.supervised import Supervised
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.optim import lr_at
from ltbench.runner import run
from ltbench.synth import beta_sample
from ltbench.tasks import build_task
from ltbench.tasks.classification import ClassificationConfig


# ------------------------------------------------------------------------------------- reference transcriptions
def ref_rand_bbox(size, lam, cx, cy):
    """utils/util.py::rand_bbox with its two ``np.random.randint`` results given (cx over size[2], cy over size[3])."""
    W = size[2]
    H = size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w = np.ceil(W * cut_rat).astype(int)
    cut_h = np.ceil(H * cut_rat).astype(int)
    bbx1 = np.clip(cx - cut_w // 2, 0, W)
    bby1 = np.clip(cy - cut_h // 2, 0, H)
    bbx2 = np.clip(cx + cut_w // 2, 0, W)
    bby2 = np.clip(cy + cut_h // 2, 0, H)
    return bbx1, bby1, bbx2, bby2


def ref_glmc_mixed(org1, org2, invs1, invs2, label_org, label_invs, label_org_w, label_invs_w, lam, cx, cy):
    """utils/util.py::GLMC_mixed with its ``np.random.beta`` draw (lam) and the box centre given."""
    mixup_x = lam * org1 + (1 - lam) * invs1
    mixup_y = lam * label_org + (1 - lam) * label_invs
    mixup_y_w = lam * label_org_w + (1 - lam) * label_invs_w
    bbx1, bby1, bbx2, bby2 = ref_rand_bbox(org2.size(), lam, cx, cy)
    org2[:, :, bbx1:bbx2, bby1:bby2] = invs2[:, :, bbx1:bbx2, bby1:bby2]
    lam_cutmix = lam
    cutmix_y = lam_cutmix * label_org + (1 - lam_cutmix) * label_invs
    cutmix_y_w = lam_cutmix * label_org_w + (1 - lam_cutmix) * label_invs_w
    return mixup_x, org2, mixup_y, cutmix_y, mixup_y_w, cutmix_y_w


def ref_update_weight(cls_num_list, label_weighting):
    """Trainer.py::Trainer.update_weight."""
    per_cls_weights = 1.0 / (np.array(cls_num_list) ** label_weighting)
    per_cls_weights = per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)
    return torch.FloatTensor(per_cls_weights)


def ref_simsiam(p, z):
    """Trainer.py::Trainer.SimSiamLoss, version 'simplified'."""
    z = z.detach()
    return -F.cosine_similarity(p, z, dim=-1).mean()


def ref_step_loss(outs, y_org, y_invs, num_classes, per_cls_weights, lam, epoch, epochs, contrast_weight):
    """The loss lines of Trainer.py::Trainer.train (one-hot labels, GLMC_mixed's targets, the four soft CEs)."""
    (output_1, output_cb_1, z1, p1), (output_2, output_cb_2, z2, p2) = outs
    alpha = 1 - (epoch / epochs) ** 2
    one_hot_org = torch.zeros(y_org.size(0), num_classes).scatter_(1, y_org.view(-1, 1), 1)
    one_hot_org_w = per_cls_weights.cpu() * one_hot_org
    one_hot_invs = torch.zeros(y_invs.size(0), num_classes).scatter_(1, y_invs.view(-1, 1), 1)
    one_hot_invs_w = per_cls_weights.cpu() * one_hot_invs
    mixup_y = lam * one_hot_org + (1 - lam) * one_hot_invs
    mixup_y_w = lam * one_hot_org_w + (1 - lam) * one_hot_invs_w
    mixcut_y, cutmix_y_w = mixup_y, mixup_y_w  # GLMC_mixed: the same lam for both labels
    contrastive_loss = ref_simsiam(p1, z2) + ref_simsiam(p2, z1)
    loss_mix = -torch.mean(torch.sum(F.log_softmax(output_1, dim=1) * mixup_y, dim=1))
    loss_cut = -torch.mean(torch.sum(F.log_softmax(output_2, dim=1) * mixcut_y, dim=1))
    loss_mix_w = -torch.mean(torch.sum(F.log_softmax(output_cb_1, dim=1) * mixup_y_w, dim=1))
    loss_cut_w = -torch.mean(torch.sum(F.log_softmax(output_cb_2, dim=1) * cutmix_y_w, dim=1))
    balance_loss = loss_mix + loss_cut
    rebalance_loss = loss_mix_w + loss_cut_w
    return alpha * balance_loss + (1 - alpha) * rebalance_loss + contrast_weight * contrastive_loss


def ref_samples(targets, cls_num_list, resample_weighting):
    """main.py: the WeightedRandomSampler's per-image weights."""
    cls_weight = 1.0 / (np.array(cls_num_list) ** resample_weighting)
    cls_weight = cls_weight / np.sum(cls_weight) * len(cls_num_list)
    return torch.from_numpy(np.array([cls_weight[t] for t in targets])).double()


# --------------------------------------------------------------------------------------------------- losses
COUNTS = [50, 20, 9, 4, 2, 1]  # class 2 and 5 are absent from the batches below


def _outputs(seed: int, n: int = 7, c: int = 6, d: int = 5):
    """Leaf logits and projections; p = z @ m so the consistency term trains z (and m) as the predictor would."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(n, c, generator=g, requires_grad=True) for _ in range(4)]
    zs = [torch.randn(n, d, generator=g, requires_grad=True) for _ in range(2)]
    m = torch.randn(d, d, generator=g, requires_grad=True)
    outs = ((leaves[0], leaves[1], zs[0], zs[0] @ m), (leaves[2], leaves[3], zs[1], zs[1] @ m))
    return outs, [*leaves, *zs, m]


@pytest.mark.parametrize(("epoch", "lam"), [(0, 0.3), (37, 0.81), (199, 0.0), (120, 1.0)])
def test_loss_matches_the_reference_values_and_gradients_with_absent_classes(epoch, lam):
    y = torch.tensor([0, 0, 1, 3, 0, 4, 1])
    y2 = torch.tensor([4, 3, 3, 1, 0, 0, 4])  # classes 2 and 5 in neither batch
    w = label_weights(torch.tensor(COUNTS), 1.2)
    assert torch.allclose(w, ref_update_weight(COUNTS, 1.2))
    outs, leaves = _outputs(epoch)
    ours, parts = glmc_loss(outs[0], outs[1], y, y2, lam, w, cumulative_alpha(epoch, 200), 4.0)
    g_ours = torch.autograd.grad(ours, leaves)
    outs, leaves = _outputs(epoch)
    ref = ref_step_loss(outs, y, y2, 6, ref_update_weight(COUNTS, 1.2), lam, epoch, 200, 4)
    g_ref = torch.autograd.grad(ref, leaves)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert set(parts) == {"balance", "rebalance", "consistency"}
    t_w = mixed_targets(y, y2, lam, 6, w)
    assert torch.all(t_w[:, [2, 5]] == 0)  # an absent class is no one's target, in the weighted targets too


def test_the_rebalanced_branch_gets_no_gradient_at_the_first_epoch():
    outs, leaves = _outputs(3)
    y, w = torch.tensor([0, 1, 1, 3, 0, 4, 1]), label_weights(torch.tensor(COUNTS), 1.2)
    loss, _ = glmc_loss(outs[0], outs[1], y, y.flip(0), 0.4, w, cumulative_alpha(0, 200), 4.0)
    g = torch.autograd.grad(loss, leaves)
    assert torch.all(g[1] == 0) and torch.all(g[3] == 0)  # alpha_0 = 1: only the balance head learns
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0


def test_the_cumulative_weight_is_the_reference_schedule():
    epochs = 200
    ours = [cumulative_alpha(e, epochs) for e in range(epochs)]
    assert ours == [1 - (epoch / epochs) ** 2 for epoch in range(epochs)]  # Trainer.train, exactly
    assert ours[0] == 1.0 and ours[100] == 0.75 and ours[-1] == pytest.approx(1 - (199 / 200) ** 2)
    assert all(a > b for a, b in itertools.pairwise(ours))


@pytest.mark.parametrize("q", [0.0, 0.2, 1.0])
def test_the_resampled_stream_weights_are_the_references(q):
    targets = [0] * 50 + [1] * 20 + [2] * 9 + [3] * 4 + [4] * 2 + [5]
    ours = sample_weights(torch.tensor(targets), torch.tensor(COUNTS), q)
    ref = ref_samples(targets, COUNTS, q)
    assert torch.allclose(ours / ours.sum(), ref / ref.sum(), rtol=1e-12)
    per_class = torch.zeros(6, dtype=torch.float64).index_add_(0, torch.tensor(targets), ours / ours.sum())
    expected = torch.tensor(COUNTS, dtype=torch.float64) ** (1 - q)
    assert torch.allclose(per_class, expected / expected.sum())  # class probability ~ n^(1-q)


# --------------------------------------------------------------------------------------------------- mixing
@pytest.mark.parametrize(
    ("lam", "h", "w", "seed"), [(0.3, 32, 32, 0), (0.02, 32, 32, 1), (0.97, 8, 8, 2), (0.5, 12, 20, 3), (1.0, 8, 8, 4)]
)
def test_mixing_is_glmc_mixed_given_the_same_draws(lam, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    box = cutmix_box(h, w, lam, gen)
    gen = torch.Generator().manual_seed(seed)  # the centre draws, in the order cutmix_box makes them
    cr, cc = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    g = torch.Generator().manual_seed(100 + seed)
    org1, org2, inv1, inv2 = (torch.randn(4, 3, h, w, generator=g) for _ in range(4))
    keep = org2.clone()
    x_mix, x_cut = glmc_mix(org1, org2, inv1, inv2, lam, box)
    assert torch.equal(org2, keep)  # ours does not paste in place
    y, y2 = torch.tensor([0, 2, 1, 2]), torch.tensor([1, 1, 0, 2])
    one, one2 = F.one_hot(y, 3).float(), F.one_hot(y2, 3).float()
    wts = torch.tensor([0.5, 1.0, 1.5])
    ref = ref_glmc_mixed(org1, org2.clone(), inv1, inv2, one, one2, wts * one, wts * one2, lam, cr, cc)
    b1, b2, b3, b4 = ref_rand_bbox(org2.size(), lam, cr, cc)
    assert box == (b1, b3, b2, b4)
    assert torch.equal(x_mix, ref[0]) and torch.equal(x_cut, ref[1])
    assert torch.equal(mixed_targets(y, y2, lam, 3), ref[2]) and torch.equal(mixed_targets(y, y2, lam, 3), ref[3])
    assert torch.allclose(mixed_targets(y, y2, lam, 3, wts), ref[4]) and torch.allclose(ref[4], ref[5])
    if lam == 1.0:
        assert torch.equal(x_cut, org2)  # an empty box


def test_a_box_at_the_corner_is_clipped_as_the_reference():
    for cr, cc in [(0, 0), (31, 31), (0, 31), (15, 2)]:
        b1, b2, b3, b4 = ref_rand_bbox((1, 3, 32, 32), 0.1, cr, cc)
        side = int(np.ceil(32 * np.sqrt(0.9)))
        assert box_at(32, 32, side, side, cr, cc) == (b1, b3, b2, b4)


# ----------------------------------------------------------------------------------------------------- a step
class _Feed:
    """The feed's raw path over a tensor training set (what DataFeed.train(raw=True) does for tensor images)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def train(self, idx, *, batch_size, augment, synth, synth_on, gen, raw):
        assert raw and augment is None and batch_size == len(idx)
        yield Batch(self.x[idx], self.y[idx], idx)


def _method(cfg: GLMCConfig | None = None):
    g = torch.Generator().manual_seed(0)
    train_y = torch.tensor([0] * 12 + [1] * 6 + [2] * 3 + [3] * 2)
    train_x = torch.randint(0, 256, (len(train_y), 3, 32, 32), generator=g, dtype=torch.uint8)
    counts = [12, 6, 3, 2]
    ctx = SimpleNamespace(
        data=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), kind="tensor", train_y=train_y),
        cfg=SimpleNamespace(augment=AugmentConfig(), dataset=SimpleNamespace(), seed=0),
        stats=SimpleNamespace(counts=counts),
        feed=_Feed(train_x, train_y),
    )
    torch.manual_seed(0)
    model = CifarResNet(depth=8, width=4, num_classes=4)
    base = Supervised(CrossEntropy(counts), build_task(ClassificationConfig()))
    return GLMC(cfg or GLMCConfig(), ctx, model, base), model, ctx


def test_a_step_is_the_loss_of_the_mixtures_of_its_draws_in_order():
    method, model, ctx = _method(GLMCConfig(resample_weighting=1.0, contrast_weight=2.0))
    net = method.wrap(model).train()
    batch = Batch(ctx.feed.x[:6], ctx.feed.y[:6], torch.arange(6))
    ep = Epoch("train", 50, 200, 0.01, torch.Generator().manual_seed(5), amp=False)
    method.on_epoch_start(ep)
    loss, sums = method.step(net, batch, ep)
    gen = torch.Generator().manual_seed(5)  # the documented order of the draws
    idx = torch.multinomial(method.sample_w, 6, replacement=True, generator=gen)
    org1, org2 = method.view(batch.x, gen), method.view(batch.x, gen)
    inv1, inv2 = method.view(ctx.feed.x[idx], gen), method.view(ctx.feed.x[idx], gen)
    lam = beta_sample(1.0, gen)
    x_mix, x_cut = glmc_mix(org1, org2, inv1, inv2, lam, cutmix_box(32, 32, lam, gen))
    mix, cut = net(x_mix, x_cut)
    w = label_weights(torch.tensor([12, 6, 3, 2]), 1.2)
    expected, parts = glmc_loss(mix, cut, batch.y, ctx.feed.y[idx], lam, w, 1 - (50 / 200) ** 2, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert float(sums["mean_loss_consistency"]) == pytest.approx(6 * parts["consistency"].item(), rel=1e-5)
    assert not torch.equal(org1, org2)  # two independent views
    loss.backward()
    for p in (model.head.weight, method.fc.weight, method.projector.weight, method.predictor.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert method.row_extras(ep)["glmc_alpha"] == 0.9375


def test_the_evaluated_network_is_the_model_and_its_rebalanced_head():
    method, model, _ = _method()
    assert method.eval_model(model) is model  # backbone + model.head (fc_cb): no logit adjustment
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    _, cb, _, _ = method.wrap(model).branches(x)
    assert torch.equal(cb, model(x))
    names = {n for n, _ in method.named_parameters()}
    assert {"fc.weight", "projector.weight", "predictor.weight"} <= names  # the method's heads: checkpointed


# ------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=glmc", "loss=focal"], "use loss=ce"),
        (["strategy=glmc", "synth=mixup"], "synth=mixup"),
        (["strategy=glmc", "reweight=drw"], "with reweight=effective_number \\(use none\\)"),
        (["strategy=glmc", "model.head=cosine"], "linear head"),
        (["strategy=glmc", "method.mix_alpha=0"], "mix_alpha > 0"),
        (["experiment=agedb_dir", "method=glmc"], "needs task=classification"),
    ],
)
def test_combinations_that_make_no_sense_are_refused_in_one_line(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        to_schema(compose_cfg(*overrides))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("experiment", "dataset", "contrast"), [("glmc_cifar100", "cifar100lt", 4.0),
                                                                 ("glmc_cifar10", "cifar10lt", 1.0)])  # fmt: skip
def test_the_experiments_are_the_readme_recipe_with_the_4x_wide_resnet32(compose_cfg, experiment, dataset, contrast):
    s = to_schema(compose("train", overrides=[f"experiment={experiment}", "strategy=glmc"]))  # (no smoke settings)
    assert (s.dataset.name, s.dataset.imbalance_ratio, s.strategy) == (dataset, 100, "glmc")
    assert (s.model.name, s.model.depth, s.model.width, s.model.head) == ("resnet32", 32, 64, "linear")
    sch = s.schedule
    assert (sch.epochs, sch.batch_size, sch.lr, sch.momentum, sch.weight_decay, sch.nesterov) == (
        200, 64, 0.01, 0.9, 5e-3, False)  # fmt: skip
    assert sch.no_decay == []  # the reference decays every parameter
    cosine = [0.01 * 0.5 * (1 + np.cos(np.pi * e / 200)) for e in range(200)]  # CosineAnnealingLR(T_max=200)
    assert all(lr_at(e, sch) == pytest.approx(cosine[e], rel=1e-9, abs=1e-15) for e in range(200))
    assert (s.augment.crop, s.augment.flip, s.augment.cutout, s.augment.autoaugment) == (True, True, 0, False)
    m = s.method
    assert (m.name, m.resample_weighting, m.label_weighting, m.contrast_weight, m.mix_alpha, m.proj_dim) == (
        "glmc", 0.0, 1.2, contrast, 1.0, 128)  # fmt: skip
    plain = to_schema(compose("train", overrides=[f"experiment={experiment}"]))
    assert plain.method == m and plain.strategy == "glmc"  # the experiment alone is GLMC at its recipe


# ------------------------------------------------------------------------------------------------ end to end
def test_glmc_trains_and_resumes_inside_training_to_the_same_result(compose_cfg, cifar10_root, tmp_path, monkeypatch):
    args = ["strategy=glmc", "method.proj_dim=8", "method.resample_weighting=0.5", f"dataset.root={cifar10_root}",
            "dataset.download=false", "dataset.imbalance_ratio=10"]  # fmt: skip
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    assert full["status"] == "completed" and full["strategy"] == "glmc"
    rows = (tmp_path / "full" / "epochs.csv").read_text().splitlines()
    for column in ("loss_balance", "loss_rebalance", "loss_consistency", "glmc_alpha"):
        assert column in rows[0]
    assert len(rows) == 3 and ",0.75" in rows[2]  # epoch 2 of 2: alpha = 1 - (1/2)^2
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"), at=2)
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["train"] and resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["status"] == "completed"
