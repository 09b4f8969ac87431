"""The one training loop: hooks, running totals, optimiser parameter groups, loggers, resume inside a later stage."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import interrupt_at
from torch import nn

import ltbench.fit as fit_mod
from ltbench.config import ScheduleConfig
from ltbench.core import Batch, Epoch, Hook, Totals
from ltbench.fit import Trainer, fit
from ltbench.methods import Method
from ltbench.optim import ParamGroup, build_optimizer, lr_at, model_groups
from ltbench.runner import run
from ltbench.tasks.classification import Classification, ClassificationConfig


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def on_epoch_start(self, ep):
        self.events.append(("start", ep.index, ep.size))

    def after_step(self, ep, totals):
        self.events.append(("step", ep.index, totals.steps))

    def on_epoch_end(self, ep):
        self.events.append(("end", ep.index, ep.row["train_loss"]))


class MSEMethod(Method):
    def step(self, model, batch, ep):
        out = model(batch.x)
        loss = ((out - batch.y.float()[:, None]) ** 2).mean()
        return loss, {"correct": torch.zeros((), dtype=torch.long)}


def tiny_trainer(epochs=2, steps=3):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    sched = ScheduleConfig(epochs=epochs, lr=0.1, warmup=0.0, milestones=[])
    method = MSEMethod()

    def batches(ep: Epoch):
        ep.size = 4 * steps
        return (Batch(x[i : i + 4], y[i : i + 4]) for i in range(0, 4 * steps, 4))

    opt = build_optimizer(sched, model_groups(model, []))
    task = Classification(ClassificationConfig())
    return Trainer("t", model, method, opt, sched, batches, lambda e: torch.Generator(), task, amp=False), x, y


def test_hooks_see_every_epoch_and_step_in_order():
    tr, _, _ = tiny_trainer()
    rec = Recorder()
    fit(tr, [rec])
    assert [e[0] for e in rec.events] == ["start", "step", "step", "step", "end"] * 2
    assert rec.events[0] == ("start", 0, 12) and rec.events[3] == ("step", 0, 3)
    assert len(tr.rows) == 2 and tr.rows[1]["epoch"] == 2 and tr.rows[0]["images"] == 12


def test_totals_stay_on_the_device_until_read():
    t = Totals()
    for v in (1.0, 2.0, 3.5):
        t.add(2, {"loss": torch.tensor(v, dtype=torch.float64)})
    assert isinstance(t.sums["loss"], torch.Tensor) and t.seen == 6 and t.steps == 3
    assert t.values() == {"loss": 6.5} and t.mean("loss") == pytest.approx(6.5 / 6)


def test_divergence_is_one_clear_error():
    tr, _, _ = tiny_trainer()
    tr.schedule.lr = 1e30
    with pytest.raises(Exception, match="diverged"):
        fit(tr, [])


def test_parameter_groups_no_decay_and_method_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    sched = ScheduleConfig(lr=0.1, weight_decay=1e-3, no_decay=["*.bias", "1.*"])
    extra = nn.Parameter(torch.ones(2))
    groups = [*model_groups(model, sched.no_decay), ParamGroup("method", [extra], lr_scale=0.1, weight_decay=0.0)]
    opt = build_optimizer(sched, groups)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["params"]["weight_decay"] == 1e-3 and len(by_name["params"]["params"]) == 2  # two weights
    assert by_name["no_decay"]["weight_decay"] == 0.0 and len(by_name["no_decay"]["params"]) == 4
    assert by_name["method"]["lr"] == pytest.approx(0.01)
    fit_mod.set_lr(opt, 0.5)
    assert by_name["params"]["lr"] == 0.5 and by_name["method"]["lr"] == pytest.approx(0.05)
    # a method that wraps the model renames its parameters (model.2.bias): a loss's pattern still finds them
    wrapped = nn.ModuleDict({"model": model, "projector": nn.Linear(2, 2)})
    names = {n for g in model_groups(wrapped, ["2.bias"]) if g.name == "no_decay" for n, p in wrapped.named_parameters()
             if any(p is q for q in g.params)}  # fmt: skip
    assert names == {"model.2.bias"}


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_other_optimisers(name):
    opt = build_optimizer(ScheduleConfig(optimizer=name, lr=1e-3), model_groups(nn.Linear(2, 2), []))
    assert type(opt).__name__.lower() == name


def ldam_drw_lr(epoch: int) -> float:
    """Transcribed from kaidic/LDAM-DRW, cifar_train.py (adjust_learning_rate), base lr 0.1, 0-indexed epoch."""
    e = epoch + 1
    if e <= 5:
        return 0.1 * e / 5
    if e > 180:
        return 0.1 * 0.0001
    if e > 160:
        return 0.1 * 0.01
    return 0.1


def test_reference_recipe_at_200_epochs_is_the_reference_schedule():
    s = ScheduleConfig()
    assert [lr_at(e, s) for e in range(200)] == pytest.approx([ldam_drw_lr(e) for e in range(200)], rel=1e-12)
    # and exactly the numbers ltbench computed when warm-up and milestones were given in epochs (5, 160, 180)
    before = [0.1 * (e + 1) / 5 if e < 5 else 0.1 * 0.01 ** sum(e >= m for m in (160, 180)) for e in range(200)]
    assert [lr_at(e, s) for e in range(200)] == before


def test_lr_schedule_reference_shape():
    s = ScheduleConfig()  # the CIFAR-LT reference: warm-up 5, x0.01 at 160, x0.0001 at 180
    assert [lr_at(e, s) for e in (0, 4)] == pytest.approx([0.02, 0.1])
    assert lr_at(159, s) == pytest.approx(0.1) and lr_at(160, s) == pytest.approx(1e-3)
    assert lr_at(199, s) == pytest.approx(1e-5)
    c = ScheduleConfig(epochs=10, warmup=0.0, decay="cosine", milestones=[])
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(5, c) == pytest.approx(0.05)
    f = ScheduleConfig(epochs=16, lr=0.03, warmup=0.0, decay="fixmatch", milestones=[])  # FixMatch: cos(7 pi t / 16)
    assert lr_at(0, f) == pytest.approx(0.03) and lr_at(8, f) == pytest.approx(0.03 * math.cos(7 * math.pi / 32))
    assert lr_at(15, f) == pytest.approx(0.03 * math.cos(7 * math.pi * 15 / 256))


def _fixture(root, tmp):
    return [f"dataset.root={root}", "dataset.download=false", "dataset.imbalance_ratio=10", f"results_dir={tmp}"]


def test_a_five_epoch_schedule_runs(compose_cfg, cifar10_root, tmp_path):
    # the reference recipe made short: warm-up and milestones shrink with it (before: "warm-up 5 >= epochs")
    reference = ["schedule.warmup=0.025", "schedule.milestones=[0.8,0.9]", "schedule.batch_size=128"]
    m = run(compose_cfg(*reference, "schedule.epochs=5", *_fixture(cifar10_root, tmp_path)), tmp_path / "r")
    lrs = [float(r.split(",")[1]) for r in (tmp_path / "r" / "epochs.csv").read_text().splitlines()[1:]]
    # warm-up 0.025 x 5 rounds to 0 epochs; x0.01 from epoch 0.8 x 5 = 4; 0.9 x 5 = 4.5 rounds to 5 (past the end)
    assert m["status"] == "completed" and lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1 * 0.01])


def test_tensorboard_logger_writes_scalars_per_stage(compose_cfg, cifar10_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = run(compose_cfg("logger=tensorboard", "strategy=crt", *_fixture(cifar10_root, tmp_path)), tmp_path / "r")
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/train_loss", "train/train_acc", "train/lr", "classifier/train_loss", "test/top1"} <= tags
    assert len(acc.Scalars("train/train_loss")) == 2 and len(acc.Scalars("classifier/lr")) == 10
    assert acc.Scalars("test/top1")[0].value == pytest.approx(m["top1"])


def test_resume_inside_the_classifier_stage_equals_an_uninterrupted_run(
    compose_cfg, cifar10_root, tmp_path, monkeypatch
):
    args = ["strategy=crt", "classifier.schedule.epochs=4", *_fixture(cifar10_root, tmp_path)]
    full = run(compose_cfg(*args, f"stage_cache={tmp_path / 'c1'}"), tmp_path / "full")
    interrupt_at(
        monkeypatch,
        lambda: run(compose_cfg(*args, f"stage_cache={tmp_path / 'c2'}"), tmp_path / "cut"),
        at=3,
        stage="classifier",
    )
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["status"] == "interrupted"
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["classifier"] and resumed["resumed_at_epoch"] == [2]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    assert resumed["stage1"]["test"] == full["stage1"]["test"]
    rows = (tmp_path / "cut" / "classifier_epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 5  # header + 4 epochs, none duplicated
