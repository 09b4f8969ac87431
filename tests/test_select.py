"""Model selection as a recorded field (``select=last|val|test_oracle``): the chosen epoch, its numbers, a resume
inside the stage that chooses, and protocols never mixed."""

from __future__ import annotations

import csv

import pytest
from conftest import interrupt_at, tiny_cifar

from ltbench.config import to_schema
from ltbench.errors import ConfigError
from ltbench.identity import config_hash
from ltbench.runner import run


def _epochs(run_dir):
    with open(run_dir / "epochs.csv") as f:
        return list(csv.DictReader(f))


def test_test_oracle_reports_the_best_test_epoch_and_says_so(compose_cfg, cifar10_root, tmp_path):
    args = [*tiny_cifar(cifar10_root), "schedule.epochs=4", f"results_dir={tmp_path}"]
    last = run(compose_cfg(*args), tmp_path / "last")
    oracle = run(compose_cfg(*args, "select=test_oracle"), tmp_path / "oracle")
    rows = _epochs(tmp_path / "oracle")
    per_epoch = [float(r["select_test_top1"]) for r in rows]
    best = max(per_epoch)
    sel = dict(oracle["selection"])
    final = sel.pop("last")
    assert sel == {"protocol": "test_oracle", "stage": "train", "split": "test", "metric": "top1",
                   "epoch": per_epoch.index(best) + 1, "value": best}  # fmt: skip
    # the last epoch's scores, recorded beside the choice: what select=last reports, overall and per shot group
    assert final["epoch"] == 4
    for key in ("top1", "many", "medium", "few"):
        assert final[key] == pytest.approx(last[key]), key
    assert oracle["top1"] == pytest.approx(best) and oracle["top1"] >= last["top1"]
    assert per_epoch[-1] == pytest.approx(last["top1"])  # training is the same: the last epoch is the plain run's
    assert last["selection"]["protocol"] == "last" and last["selection"]["epoch"] == 4
    assert oracle["config_hash"] != last["config_hash"]  # never averaged with the last-epoch runs
    assert "select=test_oracle" in oracle["label"]


def test_select_val_chooses_on_validation_and_resumes_to_the_same_choice(
    compose_cfg, cifar10_root, tmp_path, monkeypatch
):
    args = [*tiny_cifar(cifar10_root), "schedule.epochs=4", "select=val"]
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    vals = [float(r["select_val_top1"]) for r in _epochs(tmp_path / "full")]
    assert full["selection"]["epoch"] == vals.index(max(vals)) + 1 and full["selection"]["split"] == "val"
    assert full["val"]["top1"] == pytest.approx(max(vals))  # the reported validation numbers are the chosen epoch's
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"),
                 at=3, stage="train")  # fmt: skip
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["selection"] == full["selection"] and resumed["per_class_acc"] == full["per_class_acc"]


def test_select_is_checked_and_left_out_of_the_identity_at_its_default(compose_cfg):
    assert config_hash(to_schema(compose_cfg())) == config_hash(to_schema(compose_cfg("select=last")))
    with pytest.raises(ConfigError, match="select must be one of last, val, test_oracle"):
        to_schema(compose_cfg("select=best"))
    with pytest.raises(ConfigError, match="classifier=tau_norm is computed from features"):
        to_schema(compose_cfg("strategy=tau_norm", "select=val"))
