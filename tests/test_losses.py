import math

import pytest
import torch
import torch.nn.functional as F

from ltbench.config import LossConfig, ReweightConfig
from ltbench.errors import ConfigError
from ltbench.losses import build_loss, mixed_loss
from ltbench.losses.classification import (
    LDAM,
    BalancedSoftmaxConfig,
    CEConfig,
    Focal,
    LDAMConfig,
    LogitAdjusted,
    SigmoidFocal,
)
from ltbench.reweight import EffectiveNumberConfig, Reweighting, class_weights

COUNTS = [500, 200, 80, 30, 10]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g) * 3
    target = torch.randint(0, 5, (64,), generator=g)
    weight = torch.rand(5, generator=g) + 0.2
    return logits, target, weight


def manual_ce(logits, target):
    logp = logits.log_softmax(1)
    return -logp[torch.arange(len(target)), target]


def test_ce_matches_torch_including_weighted_mean(batch):
    logits, target, w = batch
    loss = build_loss(CEConfig(), COUNTS)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target))
    assert torch.allclose(loss(logits, target, w), F.cross_entropy(logits, target, weight=w))
    assert torch.allclose(
        loss(logits, target, w, reduction="sum"), F.cross_entropy(logits, target, weight=w, reduction="sum")
    )
    per = loss(logits, target, w, reduction="none")
    assert torch.allclose(per, w[target] * manual_ce(logits, target))


def test_label_smoothing(batch):
    logits, target, _ = batch
    loss = build_loss(CEConfig(label_smoothing=0.1), COUNTS)
    logp = logits.log_softmax(1)
    expected = (0.9 * -logp[torch.arange(64), target] + 0.1 * -logp.mean(1)).mean()
    assert torch.allclose(loss(logits, target), expected, atol=1e-6)


def test_focal_formula_and_gamma_zero_is_ce(batch):
    logits, target, _ = batch
    p_t = logits.softmax(1)[torch.arange(64), target]
    expected = (1 - p_t) ** 2 * -torch.log(p_t)
    f = Focal(COUNTS, gamma=2.0)
    assert torch.allclose(f(logits, target, reduction="none"), expected, atol=1e-5)
    assert torch.allclose(f(logits, target), expected.mean(), atol=1e-5)
    assert torch.allclose(Focal(COUNTS, gamma=0.0)(logits, target), F.cross_entropy(logits, target), atol=1e-6)


def ldam_drw_focal(logits, target, weight, gamma):
    """Transcribed from kaidic/LDAM-DRW, losses.py (focal_loss and FocalLoss.forward): the per-sample weighted CE
    goes through the focal factor, then a plain mean over the batch."""
    c = F.cross_entropy(logits, target, reduction="none", weight=weight)
    p = torch.exp(-c)
    return ((1 - p) ** gamma * c).mean()


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_weighted_focal_matches_the_ldam_drw_reference_value_and_gradient(batch, gamma):
    logits, target, w = batch
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = Focal(COUNTS, gamma=gamma)(a, target, w)
    ref = ldam_drw_focal(b, target, w, gamma)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(a.grad, b.grad, atol=1e-7)
    # not the weighted mean sum(w l) / sum(w) of the cross-entropy convention
    plain = Focal(COUNTS, gamma=gamma)(logits, target, reduction="none")
    if gamma:
        assert not torch.allclose(ours, (w[target] * plain).sum() / w[target].sum(), atol=1e-3)


def cb_focal_reference(logits, target, weight, gamma):
    """Transcribed from richardaecn/class-balanced-loss, src/cifar_main.py (focal_loss, with alpha = the class weight
    of each sample tiled over the classes): the stable focal modulator, the sum over every (sample, class) term,
    divided by the number of positive labels (= the batch size)."""
    labels = F.one_hot(target, logits.shape[1]).float()
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    modulator = torch.exp(-gamma * labels * logits - gamma * torch.log1p(torch.exp(-logits))) if gamma else 1.0
    alpha = weight[target][:, None].expand_as(labels)
    return (alpha * modulator * bce).sum() / labels.sum()


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_class_balanced_sigmoid_focal_matches_the_reference_value_and_gradient(batch, gamma):
    logits, target, w = batch
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = SigmoidFocal(COUNTS, gamma=gamma)(a, target, w)
    ref = cb_focal_reference(b, target, w, gamma)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-5) and torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-8)


def test_sigmoid_focal_starts_every_class_at_the_prior_and_spares_its_bias_weight_decay():
    from ltbench.models.resnet_cifar import CifarResNet
    from ltbench.optim import build_optimizer, model_groups

    model = CifarResNet(8, 4, 10)
    loss = SigmoidFocal(list(range(10, 0, -1)), prior_bias=True)
    no_decay = loss.prepare(model)
    assert torch.allclose(model.head.bias, torch.full((10,), -math.log(9)))
    assert torch.allclose(torch.sigmoid(model.head.bias), torch.full((10,), 0.1))
    from ltbench.config import ScheduleConfig

    opt = build_optimizer(ScheduleConfig(), model_groups(model, no_decay))
    spared = next(g for g in opt.param_groups if g["name"] == "no_decay")
    assert spared["weight_decay"] == 0.0 and [p.data_ptr() for p in spared["params"]] == [model.head.bias.data_ptr()]
    assert SigmoidFocal(COUNTS, prior_bias=False).prepare(model) == []


def test_sigmoid_focal_formula(batch):
    logits, target, w = batch
    y = F.one_hot(target, 5).float()
    p = torch.sigmoid(logits)
    alpha, gamma = 0.25, 2.0
    pt = torch.where(y == 1, p, 1 - p)
    at = torch.where(y == 1, torch.tensor(alpha), torch.tensor(1 - alpha))
    expected = (at * (1 - pt) ** gamma * -torch.log(pt)).sum(1)
    got = SigmoidFocal(COUNTS, gamma=gamma, alpha=alpha)(logits, target, reduction="none")
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)  # the manual log(p) loses precision
    # gamma 0, no alpha: plain one-vs-all BCE summed over classes
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1)
    assert torch.allclose(SigmoidFocal(COUNTS, 0.0)(logits, target, w, reduction="none"), w[target] * bce, atol=1e-5)


def test_ldam_margins_and_formula(batch):
    logits, target, w = batch
    cos = torch.tanh(logits)  # cosine-like logits in [-1, 1]
    loss = LDAM(COUNTS, max_m=0.5, s=30.0)
    m = torch.tensor([n**-0.25 for n in COUNTS])
    m = m * 0.5 / m.max()
    assert torch.allclose(loss.margins, m)
    assert loss.margins.argmax() == 4 and loss.margins.max() == pytest.approx(0.5)
    adjusted = cos.clone()
    adjusted[torch.arange(64), target] -= m[target]
    expected = F.cross_entropy(30.0 * adjusted, target, weight=w)
    assert torch.allclose(loss(cos, target, w), expected, atol=1e-5)


def test_balanced_softmax_and_logit_adjust(batch):
    logits, target, _ = batch
    n = torch.tensor(COUNTS, dtype=torch.float32)
    bs = build_loss(BalancedSoftmaxConfig(), COUNTS)
    assert torch.allclose(bs(logits, target), F.cross_entropy(logits + n.log(), target), atol=1e-5)
    la = LogitAdjusted(COUNTS, tau=1.0)
    assert torch.allclose(la(logits, target), bs(logits, target), atol=1e-5)
    la2 = LogitAdjusted(COUNTS, tau=2.0)
    assert torch.allclose(la2(logits, target), F.cross_entropy(logits + 2 * (n / n.sum()).log(), target), atol=1e-5)


def test_losses_follow_module_device_via_buffers():
    loss = build_loss(LDAMConfig(), COUNTS)
    assert {name for name, _ in loss.named_buffers()} == {"counts", "margins"}


@pytest.mark.parametrize("name", ["inverse", "sqrt_inverse", "effective_number"])
def test_class_weights_formulas_sum_to_num_classes(name):
    n = torch.tensor(COUNTS, dtype=torch.float64)
    raw = {"inverse": 1 / n, "sqrt_inverse": 1 / n.sqrt(), "effective_number": (1 - 0.999) / (1 - 0.999**n)}[name]
    w = class_weights(name, COUNTS, beta=0.999)
    assert w.sum().item() == pytest.approx(5.0, rel=1e-5)
    assert torch.allclose(w.double(), raw / raw.sum() * 5, rtol=1e-5)
    assert (w[1:] >= w[:-1]).all()  # rarer classes weigh more


def test_effective_number_beta_zero_is_uniform():
    assert torch.allclose(class_weights("effective_number", COUNTS, beta=0.0), torch.ones(5))


def test_drw_switches_on_at_start_epoch():
    rw = Reweighting(EffectiveNumberConfig(start=0.8), COUNTS, epochs=200)
    assert rw.at(0) is None and rw.at(159) is None
    assert torch.allclose(rw.at(160), class_weights("effective_number", COUNTS))
    assert Reweighting(ReweightConfig(name="none"), COUNTS, epochs=200).at(199) is None
    assert Reweighting(EffectiveNumberConfig(start=0.8), COUNTS, epochs=30).start_epoch == 24  # follows the schedule


def test_mixed_loss_reduces_to_plain_loss(batch):
    logits, target, w = batch
    loss = build_loss(CEConfig(), COUNTS)
    other = target.roll(1)
    ones = torch.ones(64)
    assert torch.allclose(mixed_loss(loss, logits, target, other, ones, w), loss(logits, target, w), atol=1e-6)
    half = torch.full((64,), 0.5)
    expected = (
        0.5
        * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits, other, reduction="none")).mean()
    )
    assert torch.allclose(mixed_loss(loss, logits, target, other, half, None), expected, atol=1e-6)


def test_bad_loss_settings_rejected():
    with pytest.raises(ConfigError, match="unknown loss"):
        build_loss(LossConfig(name="nope"), COUNTS)
    # Each loss has its own schema: a setting it does not have is rejected when the config is composed.
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    with (
        initialize_config_module("ltbench.conf", version_base="1.3"),
        pytest.raises(ConfigCompositionException, match="label_smoothing"),
    ):
        compose("train", overrides=["loss=focal", "loss.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="reweight"):
        class_weights("nope", COUNTS)


def test_ldam_largest_margin_is_for_the_rarest_class():
    loss = LDAM([10, 1000], max_m=0.5)
    assert loss.margins.tolist() == pytest.approx([0.5, 0.5 * math.pow(10 / 1000, 0.25)])
