"""BalPoE (Sanchez Aimar et al. 2023) and SADE (Zhang et al. 2022) on the multi-expert model, each against a
transcription of the reference function it reproduces (values and gradients on identical inputs).

References, transcribed below (test code only):
- emasa/BalPoE-CalibratedLT ``model/loss.py::BSExpertLoss`` (forward, get_default_bias, get_bias_from_index),
  ``utils/util.py::limits_sequence`` and ``utils/combiner.py::Combiner.mixup`` (the mixed loss);
- Vanint/SADE-AgnosticLT ``model/loss.py::DiverseExpertLoss`` (inverse_prior, forward) and
  ``test_training_cifar.py::test_training`` (one step of the test-time aggregation) with its optimiser from ``main``
  and ``configs/test_time_cifar100_ir100_sade.json`` (SGD lr 0.1, momentum 0.9, nesterov, wd 5e-4).
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at

from ltbench.classifier import FrozenBackbone
from ltbench.config import to_schema
from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.methods.balpoe import expert_losses, limits_sequence, log_prior, mixed_expert_losses
from ltbench.methods.sade import (
    AggregatedHead,
    AggregationMethod,
    SadeTTAConfig,
    inverse_prior,
    sade_biases,
    should_stop,
    stability_loss,
    tta_view,
)
from ltbench.models.ride import RideResNet
from ltbench.optim import ParamGroup, build_optimizer, lr_at, set_lr
from ltbench.runner import run

COUNTS = [50, 20, 8, 3, 1]  # class 4 never appears in the batches below
E, N, C = 3, 12, len(COUNTS)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (10 * torch.randn(E, N, C, generator=g)).requires_grad_(True)
    y = torch.randint(0, C - 1, (N,), generator=g)  # the last class is absent from the batch
    assert (y != C - 1).all()
    return logits, y


# ------------------------------------------------------------------------------------------------ transcriptions


class RefBSExpertLoss(torch.nn.Module):
    """emasa/BalPoE-CalibratedLT model/loss.py::BSExpertLoss (forward with extra_info; no return_expert_losses)."""

    def __init__(self, cls_num_list=None, tau_list=(0, 1, 2), eps=1e-9, **kwargs):
        super().__init__()
        self.base_loss = F.cross_entropy
        self.register_buffer("bsce_weight", torch.tensor(cls_num_list).float())
        self.register_buffer("tau_list", torch.tensor(tau_list).float())
        self.num_experts = len(tau_list)
        self.eps = eps

    def forward(self, output_logits, targets, extra_info=None):
        logits = extra_info["logits"]
        loss = 0.0
        for idx in range(self.num_experts):
            adjusted_expert_logits = logits[idx] + self.get_bias_from_index(idx)
            loss = loss + self.base_loss(adjusted_expert_logits, targets)
        return loss / self.num_experts

    def get_default_bias(self, tau=1):
        prior = self.bsce_weight
        prior = prior / prior.sum()
        log_prior = torch.log(prior + self.eps)
        return tau * log_prior

    def get_bias_from_index(self, e_idx):
        return self.get_default_bias(self.tau_list[e_idx])


def ref_limits_sequence(num_experts_, tau_min, tau_max):
    """emasa/BalPoE-CalibratedLT utils/util.py::limits_sequence."""
    if num_experts_ == 1:
        return [(tau_min + tau_max) / 2.0]
    return [tau_min + (tau_max - tau_min) * i / max(num_experts_ - 1, 1) for i in range(num_experts_)]


class RefDiverseExpertLoss(torch.nn.Module):
    """Vanint/SADE-AgnosticLT model/loss.py::DiverseExpertLoss (the prior kept on the CPU: no .cuda())."""

    def __init__(self, cls_num_list=None, max_m=0.5, s=30, tau=2):
        super().__init__()
        self.base_loss = F.cross_entropy
        prior = np.array(cls_num_list) / np.sum(cls_num_list)
        self.prior = torch.tensor(prior).float()
        self.tau = tau

    def inverse_prior(self, prior):
        value, idx0 = torch.sort(prior)
        _, idx1 = torch.sort(idx0)
        idx2 = prior.shape[0] - 1 - idx1
        return value.index_select(0, idx2)

    def forward(self, output_logits, target, extra_info=None):
        loss = 0
        expert1_logits = extra_info["logits"][0]
        expert2_logits = extra_info["logits"][1]
        expert3_logits = extra_info["logits"][2]
        loss += self.base_loss(expert1_logits, target)
        expert2_logits = expert2_logits + torch.log(self.prior + 1e-9)
        loss += self.base_loss(expert2_logits, target)
        inverse_prior = self.inverse_prior(self.prior)
        expert3_logits = expert3_logits + torch.log(self.prior + 1e-9) - self.tau * torch.log(inverse_prior + 1e-9)
        loss += self.base_loss(expert3_logits, target)
        return loss


def ref_test_training_step(out0_logits, out1_logits, aggregation_weight, optimizer):
    """Vanint/SADE-AgnosticLT test_training_cifar.py::test_training, the body of its batch loop, on the model's
    outputs of the two views (``output['logits']``: N x E x C), without the .cuda() calls."""
    e1_0, e2_0, e3_0 = out0_logits[:, 0, :], out0_logits[:, 1, :], out0_logits[:, 2, :]
    e1_1, e2_1, e3_1 = out1_logits[:, 0, :], out1_logits[:, 1, :], out1_logits[:, 2, :]
    aggregation_softmax = torch.nn.functional.softmax(aggregation_weight, dim=0)
    aggregation_output0 = aggregation_softmax[0] * e1_0 + aggregation_softmax[1] * e2_0 + aggregation_softmax[2] * e3_0
    aggregation_output1 = aggregation_softmax[0] * e1_1 + aggregation_softmax[1] * e2_1 + aggregation_softmax[2] * e3_1
    softmax_aggregation_output0 = F.softmax(aggregation_output0, dim=1)
    softmax_aggregation_output1 = F.softmax(aggregation_output1, dim=1)
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    loss = -cos(softmax_aggregation_output0, softmax_aggregation_output1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


# ------------------------------------------------------------------------------------------------ BalPoE


def test_balpoe_loss_and_gradient_equal_the_reference_with_a_class_absent_from_the_batch():
    taus = limits_sequence(E, 0.0, 2.0)
    assert taus == ref_limits_sequence(E, 0.0, 2.0) == [0.0, 1.0, 2.0]
    assert limits_sequence(7, 0.0, 2.0) == ref_limits_sequence(7, 0.0, 2.0) and limits_sequence(1, 0, 2) == [1.0]
    logits, y = _batch()
    bias = torch.tensor(taus)[:, None] * log_prior(torch.tensor(COUNTS))[None, :]
    ours = expert_losses(logits, bias, y).mean(1).mean()
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = RefBSExpertLoss(COUNTS, taus)(None, y, {"logits": logits})
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    assert g_ours[:, :, C - 1].abs().sum() > 0  # the absent class still gets pushed down through the softmax


def test_balpoe_mixed_loss_equals_the_combiners_mix_of_two_reference_losses():
    logits, y = _batch(1)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    lam = 0.3
    bias = torch.tensor([0.0, 1.0, 2.0])[:, None] * log_prior(torch.tensor(COUNTS))[None, :]
    ours = mixed_expert_losses(logits, bias, y, y[perm], torch.full((N,), lam)).mean()
    crit = RefBSExpertLoss(COUNTS)
    ref = lam * crit(None, y, {"logits": logits}) + (1 - lam) * crit(None, y[perm], {"logits": logits})
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


# ------------------------------------------------------------------------------------------------ SADE


def test_inverse_prior_reverses_the_ranks_and_breaks_ties_stably():
    prior = torch.tensor([0.1, 0.5, 0.3, 0.05, 0.05])
    ours = inverse_prior(prior)
    # ranks (stable sort): 3, 4, 0, 2, 1 in increasing order; class c gets the value of rank 4 - rank(c), so the
    # tied classes 3 and 4 get the two largest values, the first of them (in class order) the larger
    assert torch.equal(ours, torch.tensor([0.1, 0.05, 0.05, 0.5, 0.3]))
    distinct = torch.tensor([0.4, 0.1, 0.3, 0.15, 0.05])
    assert torch.equal(inverse_prior(distinct), RefDiverseExpertLoss([1, 1]).inverse_prior(distinct))


def test_sade_loss_and_gradient_equal_the_reference_with_a_class_absent_from_the_batch():
    logits, y = _batch(2)
    ours = expert_losses(logits, sade_biases(torch.tensor(COUNTS), 2.0), y).mean(1).sum()
    ref = RefDiverseExpertLoss(COUNTS, tau=2)(None, y, {"logits": logits})
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])
    b = sade_biases(torch.tensor(COUNTS), 2.0)
    assert torch.equal(b[0], torch.zeros(C)) and (b[1].diff() < 0).all()  # forward: none; uniform: log prior
    # the backward expert's training bias falls faster than log prior: its raw logits favour the tail
    assert (b[2].diff() < b[1].diff()).all()


def _one_step_weights(z0, z1):
    """ltbench: stability_loss on the experts' logits, one step of the optimiser sade_tta's schedule builds."""
    sched = SadeTTAConfig().schedule
    assert lr_at(0, sched) == lr_at(sched.epochs - 1, sched) == 0.1  # a constant lr, as the reference's
    head_w = torch.nn.Parameter(torch.full((E,), 1.0 / E))
    opt = build_optimizer(sched, [ParamGroup("aggregation", [head_w])])
    set_lr(opt, lr_at(0, sched))
    loss = stability_loss(head_w, z0, z1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, head_w.detach()


def test_aggregation_weights_after_one_step_equal_the_reference_update():
    g = torch.Generator().manual_seed(4)
    z0, z1 = 30 * torch.randn(E, N, C, generator=g).tanh(), 30 * torch.randn(E, N, C, generator=g).tanh()
    loss, ours = _one_step_weights(z0, z1)
    w = torch.nn.Parameter(torch.FloatTensor(3))
    w.data.fill_(1 / 3)
    opt = torch.optim.SGD([w], lr=0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)
    ref_loss = ref_test_training_step(z0.transpose(0, 1), z1.transpose(0, 1), w, opt)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(ours, w.detach())
    assert not torch.allclose(ours, torch.full((E,), 1 / 3))  # the step moved the weights


def test_the_stage_step_is_the_stability_loss_of_the_scaled_expert_logits_of_two_views():
    torch.manual_seed(0)
    model = RideResNet(8, 4, C, 3, (4, 6)).eval()
    head = AggregatedHead(copy.deepcopy(model.head))
    with torch.no_grad():
        head.weight.copy_(torch.tensor([0.2, -0.1, 0.4]))
    net = FrozenBackbone(model, head)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    data = type("D", (), {"test_x": x, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "name": "toy"})()
    ctx = type("Ctx", (), {"data": data, "info": type("I", (), {"world_size": 1, "rank": 0})()})()
    m = AggregationMethod(SadeTTAConfig(), ctx, head, 30.0)
    ep = Epoch("classifier", 0, 5, 0.1, torch.Generator().manual_seed(7), False, size=6)
    m.on_epoch_start(ep)
    assert sorted(m.chunks[0].tolist()) == list(range(6))  # one pass over the test set in the epoch's one step
    loss, sums = m.step(net, Batch(torch.zeros(6, 3, 32, 32), torch.zeros(6, dtype=torch.long)), ep)
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(6, generator=gen)
    v1, v2 = tta_view(x[perm], gen, data.mean, data.std), tta_view(x[perm], gen, data.mean, data.std)
    with torch.no_grad():
        z1, z2 = (30 * head.expert_logits(model.features(v)) for v in (v1, v2))
    torch.testing.assert_close(loss, stability_loss(head.weight, z1, z2))
    assert float(sums["mean_stability"]) == pytest.approx(-6 * float(loss.detach()))


def test_stopping_keeps_the_weights_and_the_rounding_follows_the_reference():
    assert should_stop(torch.log(torch.tensor([0.044, 0.478, 0.478])), 0.05)  # rounds to 0.04
    assert not should_stop(torch.log(torch.tensor([0.046, 0.477, 0.477])), 0.05)  # rounds to 0.05
    head = AggregatedHead(RideResNet(8, 4, C, 3, (4, 6)).head)
    with torch.no_grad():
        head.kept.copy_(torch.tensor([3.0, 0.0, 0.0]))
        head.stopped_at.fill_(2)
    f = torch.randn(4, 18)
    out = head(f)
    torch.testing.assert_close(out, torch.einsum("e,enc->nc", head.kept.softmax(0), head.expert_logits(f)))
    (g,) = torch.autograd.grad(out.sum(), head.weight)
    assert torch.equal(g, torch.zeros(3))  # once stopped, the weights get no gradient


def test_tta_views_are_reproducible_and_change_the_images():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = tta_view(x, torch.Generator().manual_seed(1), (0.5,) * 3, (0.25,) * 3)
    b = tta_view(x, torch.Generator().manual_seed(1), (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(a, b) and a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    plain = (x.float() / 255 - 0.5) / 0.25
    assert not torch.allclose(a, plain)


# ------------------------------------------------------------------------------------------------ configs and runs


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["method=balpoe"], "multi-expert model"),
        (["strategy=sade", "model.num_experts=2"], "exactly 3 experts"),
        (["strategy=balpoe", "loss=ldam"], "use loss=ce"),
        (["strategy=balpoe", "method.taus=[0,1]"], "2 values for model.num_experts=3"),
        (["strategy=sade", "reweight=drw"], "reweight=none"),
        (["classifier=sade_tta"], "multi-expert model"),
        (["strategy=sade", "classifier=sade_tta", "classifier.stop_below=1.5"], "stop_below"),
    ],
)
def test_bad_settings_are_refused_at_compose_time(compose_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        to_schema(compose_cfg(*overrides))


def test_presets_carry_the_recipes(compose_cfg):
    c = to_schema(compose_cfg("experiment=balpoe_cifar10", "strategy=balpoe"))
    assert c.model.expert_widths == (32, 64) and c.synth.alpha == 0.8 and c.schedule.gamma == 0.1
    assert c.schedule.nesterov and c.schedule.weight_decay == 5e-4 and c.augment.rotate == 15
    c = to_schema(compose_cfg("experiment=sade_cifar100", "strategy=sade", "classifier=sade_tta"))
    assert c.dataset.num_classes == 100 and c.model.reduce_dimension and c.method.tau == 2.0
    s = c.classifier.schedule
    assert (s.epochs, s.batch_size, s.lr, s.nesterov, s.weight_decay, s.milestones) == (5, 128, 0.1, True, 5e-4, [])
    assert c.classifier.label_suffix == "+TTA(test)"


@pytest.mark.parametrize("name", ["balpoe", "sade"])
def test_tiny_runs_and_the_test_time_stage_resumes_exactly(compose_cfg, cifar10_root, tmp_path, monkeypatch, name):
    fx = [f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10"]
    over = [f"strategy={name}", "model.layer2_width=4", "model.layer3_width=6", *fx]
    if name == "balpoe":
        m = run(compose_cfg(*over, f"results_dir={tmp_path}"), tmp_path / "run")
        assert m["status"] == "completed" and m["balpoe"]["lambdas"] == [0.0, 1.0, 2.0]
        assert "expert2_loss" in (tmp_path / "run" / "epochs.csv").read_text().splitlines()[0]
        return
    over += ["classifier=sade_tta", "classifier.schedule.epochs=2", "classifier.stop_below=0.34"]
    full = run(compose_cfg(*over, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    chosen = full["stage2"]["chosen"]
    assert chosen["test_time_adapted"] and chosen["stopped_after_epoch"] == 1  # a share under 0.34 after epoch 1
    rows = (tmp_path / "full" / "classifier_epochs.csv").read_text().splitlines()
    first = dict(zip(rows[0].split(","), rows[1].split(",")))
    assert [float(first[f"expert{j}_share"]) for j in range(3)] == chosen["expert_shares"]  # kept from epoch 1
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*over, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"),
                 at=2, stage="classifier")  # fmt: skip
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["status"] == "interrupted"
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["classifier"] and resumed["stage2"]["chosen"] == chosen
    assert resumed["per_class_acc"] == full["per_class_acc"]


def test_a_test_time_adapted_run_says_so_in_its_label_however_it_was_configured(compose_cfg):
    from ltbench.config import to_schema
    from ltbench.identity import method_label

    cfg = to_schema(compose_cfg("experiment=sade_cifar100", "strategy=sade", "classifier=sade_tta"))
    assert method_label(cfg, None) == "sade+TTA(test)"  # a composed run, no command line
    assert method_label(cfg, ["strategy=sade", "classifier=sade_tta"]) == "sade+TTA(test)"
    assert "TTA" not in method_label(to_schema(compose_cfg("experiment=sade_cifar100", "strategy=sade")), None)
