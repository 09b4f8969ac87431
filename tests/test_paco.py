"""method=paco|gpaco (ltbench.methods.paco) against transcriptions of the reference.

References (dvlab-research/Parametric-Contrastive-Learning at fe56535): ``PaCo/LT/losses.py::PaCoLoss.forward`` and
``GPaCo/LT/losses.py::PaCoLoss.forward`` (transcribed below, the CUDA device replaced by the inputs' device, the
class weight passed in instead of ``cal_weight_for_classes``), ``PaCo/LT/moco/builder.py::MoCo._train`` (queue read
before the keys are enqueued, momentum update before the keys are computed). CPU only; float64 for the losses.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import interrupt_at

from ltbench.config import AugmentConfig, to_schema
from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.losses.classification import CrossEntropy
from ltbench.methods.paco import GPaCoConfig, KeyQueue, PaCo, PaCoConfig, paco_loss
from ltbench.methods.supervised import Supervised
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.runner import run
from ltbench.tasks import build_task
from ltbench.tasks.classification import ClassificationConfig


# ------------------------------------------------------------------------------------------ transcriptions
def ref_paco(features, labels, sup_logits, weight, alpha, beta, gamma, temperature, K, num_classes, supt=1.0):
    """PaCo/LT/losses.py::PaCoLoss.forward (base_temperature = temperature)."""
    device = features.device
    batch_size = (features.shape[0] - K) // 2
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels[:batch_size], labels.T).to(features.dtype)
    anchor_dot_contrast = torch.div(torch.matmul(features[:batch_size], features.T), temperature)
    anchor_dot_contrast = torch.cat(((sup_logits + torch.log(weight + 1e-9)) / supt, anchor_dot_contrast), dim=1)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size).view(-1, 1).to(device), 0)
    mask = mask * logits_mask
    one_hot_label = torch.nn.functional.one_hot(labels[:batch_size].view(-1), num_classes=num_classes)
    one_hot_label = one_hot_label.to(features.dtype)
    mask = torch.cat((one_hot_label * beta, mask * alpha), dim=1)
    logits_mask = torch.cat((torch.ones(batch_size, num_classes, dtype=features.dtype), gamma * logits_mask), dim=1)
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True) + 1e-12)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(temperature / temperature) * mean_log_prob_pos
    return loss.mean()


def ref_gpaco(features, labels, sup_logits, weight, alpha, temperature, K, num_classes, smooth=0.0, beta=1.0,
              gamma=1.0, supt=1.0):  # fmt: skip
    """GPaCo/LT/losses.py::PaCoLoss.forward (``weight`` None: cal_weight_for_classes not called)."""
    device = features.device
    batch_size = features.shape[0] - K
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels[:batch_size], labels.T).to(features.dtype)
    anchor_dot_contrast = torch.div(torch.matmul(features[:batch_size], features.T), temperature)
    if weight is not None:
        anchor_dot_contrast = torch.cat(((sup_logits + torch.log(weight + 1e-9)) / supt, anchor_dot_contrast), dim=1)
    else:
        anchor_dot_contrast = torch.cat(((sup_logits) / supt, anchor_dot_contrast), dim=1)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size).view(-1, 1).to(device), 0)
    mask = mask * logits_mask
    one_hot_label = torch.nn.functional.one_hot(labels[:batch_size].view(-1), num_classes=num_classes)
    one_hot_label = one_hot_label.to(features.dtype)
    one_hot_label = smooth / (num_classes - 1) * (1 - one_hot_label) + (1 - smooth) * one_hot_label
    mask = torch.cat((one_hot_label * beta, mask * alpha), dim=1)
    logits_mask = torch.cat((torch.ones(batch_size, num_classes, dtype=features.dtype), gamma * logits_mask), dim=1)
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True) + 1e-12)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / temperature) * mean_log_prob_pos).mean()


# ---------------------------------------------------------------------------------------------------- inputs
C = 6  # class 5 is in no batch and no queue; class 4 has one sample in the batch and none in the queue
Y = torch.tensor([0, 1, 0, 2, 4, 1])
QUEUE_Y = torch.tensor([0, 2, 3, 1, 0])
COUNTS = torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0, 1.0])


def _inputs(n_logits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, k = len(Y), len(QUEUE_Y)
    z = torch.nn.functional.normalize(torch.randn(2 * n + k, 8, generator=g, dtype=torch.float64), dim=1)
    logits = 3 * torch.randn(n_logits, C, generator=g, dtype=torch.float64)
    return z.requires_grad_(), torch.cat([Y, Y, QUEUE_Y]), logits.requires_grad_()


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(("alpha", "beta", "gamma", "supt"), [(0.01, 1.0, 1.0, 1.0), (0.5, 0.7, 0.3, 2.0)])
def test_paco_loss_equals_the_reference_in_value_and_gradient(alpha, beta, gamma, supt):
    """Anchors = the 6 queries; sample 4 (class 4) has no same-label projection but its own view's key (PaCo's key
    is a positive: the same image), class 5 is absent everywhere (its centre is a negative only)."""
    z, labels, logits = _inputs(len(Y))
    prior = (COUNTS / COUNTS.sum()).double()
    ours = paco_loss(z, labels, logits, len(Y), (prior + 1e-9).log(), alpha, beta, gamma, 0.05, supt)
    ref = ref_paco(z, labels, logits, prior[None], alpha, beta, gamma, 0.05, len(QUEUE_Y), C, supt)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(_grads(ours, z, logits), _grads(ref, z, logits)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_an_anchor_without_any_positive_projection_keeps_its_centre():
    """Only the centre is positive (the key left out: a contrast set of queries and queue): the loss is finite and
    that anchor's term is its centre's -log p (with alpha = 0 every anchor's is)."""
    z, labels, logits = _inputs(len(Y))
    z, labels = torch.cat([z[: len(Y)], z[2 * len(Y) :]]), torch.cat([Y, QUEUE_Y])
    per = paco_loss(z, labels, logits, len(Y), None, 0.0, reduction="none")
    sup = logits
    full = torch.cat([sup, z[: len(Y)] @ z.T / 0.05], dim=1)
    full[:, C : C + len(Y)] = full[:, C : C + len(Y)].masked_fill(torch.eye(len(Y), dtype=torch.bool), float("-inf"))
    expected = -(sup.gather(1, Y[:, None]).squeeze(1) - torch.logsumexp(full, dim=1))
    assert torch.isfinite(per).all() and torch.allclose(per, expected, rtol=1e-6)  # (the reference's 1e-12)


@pytest.mark.parametrize(("smooth", "adjust"), [(0.0, True), (0.1, False)])
def test_gpaco_loss_equals_the_reference_in_value_and_gradient(smooth, adjust):
    """GPaCo: every projection of both views is an anchor (batch_size = N - K), the centre logits are both views'."""
    z, labels, logits = _inputs(2 * len(Y), seed=1)
    prior = (COUNTS / COUNTS.sum()).double()
    ours = paco_loss(z, labels, logits, 2 * len(Y), (prior + 1e-9).log() if adjust else None, 0.01, 1.0, 1.0, 0.07,
                     1.0, smooth)  # fmt: skip
    ref = ref_gpaco(z, labels, logits, prior[None] if adjust else None, 0.01, 0.07, len(QUEUE_Y), C, smooth)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(_grads(ours, z, logits), _grads(ref, z, logits)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------------------------------- queue
def test_the_queue_is_a_ring_written_at_its_pointer():
    q = KeyQueue(5, 2, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(q.keys.norm(dim=0), torch.ones(2))  # the reference normalises along the queue axis
    q.push(torch.ones(3, 2), torch.tensor([0, 1, 2]))
    assert int(q.ptr) == 3 and q.labels[:3].tolist() == [0, 1, 2]
    q.push(torch.full((3, 2), 2.0), torch.tensor([2, 2, 1]))  # wraps: rows 3, 4, 0
    assert int(q.ptr) == 1 and q.labels.tolist() == [1, 1, 2, 2, 2] and torch.equal(q.keys[0], torch.full((2,), 2.0))
    q.push(torch.arange(14.0).view(7, 2), torch.arange(7) % 3)  # more than K: the last K, from the pointer on
    assert int(q.ptr) == 1 and torch.equal(q.keys[1], torch.tensor([4.0, 5.0]))


def _method(cfg, num_classes: int = 6):
    ctx = SimpleNamespace(
        data=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), kind="tensor", num_classes=num_classes),
        cfg=SimpleNamespace(augment=AugmentConfig(), dataset=SimpleNamespace(), seed=0),
        stats=SimpleNamespace(counts=COUNTS.int().tolist()[:num_classes]),
        feed=SimpleNamespace(train_x=None),
    )
    torch.manual_seed(0)
    model = CifarResNet(depth=8, width=4, num_classes=num_classes)
    base = Supervised(CrossEntropy(COUNTS.int().tolist()), build_task(ClassificationConfig()))
    return PaCo(cfg, ctx, model, base), model


def _batch() -> Batch:
    x = torch.randint(0, 256, (len(Y), 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return Batch(x, Y.clone(), torch.arange(len(Y)))


def _epoch(seed: int = 3) -> Epoch:
    return Epoch("train", 0, 1, 0.1, torch.Generator().manual_seed(seed), amp=False)


def test_paco_step_reads_the_queue_before_enqueueing_its_keys_and_moves_the_key_encoder_first():
    method, model = _method(PaCoConfig(queue=8, dim=4, momentum=0.9))
    net = method.wrap(model).train()
    with torch.no_grad():  # make the key encoder differ from the network, so the momentum update shows
        for p in method.key_encoder.parameters():
            p.add_(0.1)
    key_before = [p.clone() for p in method.key_encoder.parameters()]
    old_keys, old_labels = method.queue.keys.clone(), method.queue.labels.clone()
    loss, sums = method.step(net, _batch(), _epoch())
    for k0, k1, q in zip(key_before, method.key_encoder.parameters(), net.parameters()):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q)
    # replay: the same views, keys from the updated key encoder, the loss over the queue as it was
    v0, v1 = method.views(_batch().x, _epoch().gen)
    logits, q = net([v0])
    with torch.no_grad():
        _, k = method.key_encoder([v1])
    assert torch.allclose(method.queue.keys[: len(Y)], k, atol=1e-6) and int(method.queue.ptr) == len(Y)
    assert method.queue.labels[: len(Y)].tolist() == Y.tolist()
    assert torch.equal(method.queue.keys[len(Y) :], old_keys[len(Y) :])
    expected = paco_loss(torch.cat([q, k, old_keys]), torch.cat([Y, Y, old_labels]), logits, len(Y),
                         method.log_prior, 0.01, temperature=0.05)  # fmt: skip
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert float(sums["mean_loss_paco"]) == pytest.approx(len(Y) * loss.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in method.key_encoder.parameters())  # moved by momentum only
    assert model.head.weight.grad is not None and method.projector[0].weight.grad is not None


def test_gpaco_step_has_no_key_encoder_and_queues_the_second_views_projections():
    method, model = _method(GPaCoConfig(queue=20, dim=4))
    assert method.key_encoder is None and not any(isinstance(m, torch.nn.BatchNorm1d) for m in method.projector)
    net = method.wrap(model).train()
    old_keys, old_labels = method.queue.keys.clone(), method.queue.labels.clone()
    loss, _ = method.step(net, _batch(), _epoch())
    v0, v1 = method.views(_batch().x, _epoch().gen)
    logits, z = net([v0, v1])
    expected = paco_loss(torch.cat([z, old_keys]), torch.cat([Y, Y, old_labels]), logits, 2 * len(Y),
                         method.log_prior, 0.01, temperature=0.07)  # fmt: skip
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(method.queue.keys[: len(Y)], z[len(Y) :].detach(), atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in method.projector.parameters()) and model.head.weight.grad is not None


# --------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=paco", "loss=focal"], "is its own loss"),
        (["strategy=gpaco", "reweight=inverse"], "is its own loss"),
        (["strategy=paco", "synth=mixup"], "two views"),
        (["method=paco", "method.beta=0"], "beta, temperature, supt > 0"),
        (["method=gpaco", "method.momentum=1.0"], "momentum in"),
    ],
)
def test_combinations_that_make_no_sense_are_refused_in_one_line(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        to_schema(compose_cfg(*overrides))
    assert "\n" not in str(e.value)


def test_the_cifar100_experiments_are_the_reference_recipes(compose_cfg):
    from hydra import compose

    from ltbench.optim import lr_at

    paco = to_schema(compose("train", overrides=["experiment=paco_cifar100"]))  # (no smoke settings)
    gpaco = to_schema(compose("train", overrides=["experiment=gpaco_cifar100"]))
    for s in (paco, gpaco):
        sch = s.schedule
        assert (s.dataset.name, s.model.name, s.model.depth) == ("cifar100lt", "resnet32", 32)
        assert (sch.epochs, sch.batch_size, sch.lr, sch.weight_decay, sch.momentum) == (400, 128, 0.05, 5e-4, 0.9)
        assert lr_at(5, sch) == pytest.approx(0.05 * 6 / 10) and lr_at(100, sch) == pytest.approx(0.05)
        assert lr_at(330, sch) == pytest.approx(0.005) and lr_at(370, sch) == pytest.approx(0.0005)
        assert (s.augment.autoaugment, s.augment.cutout, s.loss.name, s.reweight.name) == (True, 16, "ce", "none")
    m = paco.method
    assert (m.name, m.alpha, m.temperature, m.queue, m.dim, m.momentum, m.momentum_encoder) == (
        "paco", 0.01, 0.05, 1024, 32, 0.999, True)  # fmt: skip
    m = gpaco.method
    assert (m.name, m.alpha, m.temperature, m.queue, m.dim, m.momentum_encoder, m.blur) == (
        "gpaco", 0.01, 0.07, 1024, 128, False, 0.2)  # fmt: skip


# ------------------------------------------------------------------------------------------------ end to end
def test_paco_resumed_inside_training_equals_an_uninterrupted_run(compose_cfg, cifar10_root, tmp_path, monkeypatch):
    """The queue, its pointer and the momentum encoder travel in the checkpoint: the resumed run is identical."""
    args = ["strategy=paco", "schedule.epochs=2", "method.queue=100", "method.dim=8", f"dataset.root={cifar10_root}",
            "dataset.download=false", "dataset.imbalance_ratio=10"]  # fmt: skip
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    assert full["status"] == "completed" and full["strategy"] == "paco"
    rows = (tmp_path / "full" / "epochs.csv").read_text().splitlines()
    assert "loss_paco" in rows[0] and len(rows) == 3
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"), at=2)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["method"]
    assert {"queue.keys", "queue.labels", "queue.ptr"} <= set(state) and int(state["queue.ptr"]) != 0
    assert any(k.startswith("key_encoder.") for k in state)
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["train"] and resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
