"""Hyper-parameter search on validation: hydra/sweeper=optuna_val (hydra-optuna-sweeper) from the CLI, the objective
a validation metric (ltbench.cluster), a test objective refused, the best trial and its test result reported once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SMOKE

from ltbench.cluster import check_direction, objective_key, objective_value, record_trial, report_best
from ltbench.errors import ConfigError

COLS = [{"key": "top1", "higher_is_better": True}, {"key": "few", "higher_is_better": True}]
RECORD = {"columns": COLS, "val": {"top1": 40.0, "few": 10.0}, "top1": 35.0, "few": 5.0}
REG = {"columns": [{"key": "mae", "higher_is_better": False}], "val": {"mae": 7.5}, "mae": 8.0}


def test_objective_is_a_validation_metric_and_a_test_one_is_refused():
    assert objective_key(None, RECORD) == "val.top1" and objective_key(None, REG) == "val.mae"
    assert objective_key("few", RECORD) == "val.few" and objective_key("val.few", RECORD) == "val.few"
    assert objective_value(RECORD, "val.few") == 10.0 and objective_value(REG) == 7.5  # never the test's 5.0 / 8.0
    with pytest.raises(ConfigError, match="never a test one") as e:
        objective_key("test.top1", RECORD)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not a validation metric"):
        objective_value(RECORD, "val.mae")
    with pytest.raises(ConfigError, match="validation split"):
        objective_value({**RECORD, "val": None})


def test_direction_must_fit_the_metric():
    check_direction(RECORD, "val.top1", "maximize")
    check_direction(REG, "val.mae", "minimize")
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.direction=minimize"):
        check_direction(REG, "val.mae", "maximize")
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.direction=maximize"):
        check_direction(RECORD, "val.top1", "minimize")


def test_best_trial_is_chosen_on_validation_not_test(tmp_path, capsys):
    # trial 1 has the best test number but the worse validation value: trial 0 is the study's best
    record_trial(tmp_path, 0, ["schedule.lr=0.1"], "val.top1", 50.0, {**RECORD, "top1": 30.0})
    record_trial(tmp_path, 1, ["schedule.lr=0.2"], "val.top1", 45.0, {**RECORD, "top1": 60.0})
    best = report_best(tmp_path, "maximize")
    assert best["trial"] == 0 and best["test"]["top1"] == 30.0 and best["n_trials"] == 2
    assert json.loads((tmp_path / "best.json").read_text())["overrides"] == ["schedule.lr=0.1"]
    out = capsys.readouterr().out
    assert out.count("best of 2 trials") == 1 and "its test result: top1 30.00" in out
    assert report_best(tmp_path, "minimize")["trial"] == 1


@pytest.mark.slow
def test_optuna_study_on_validation_from_the_cli(cifar10_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LTBENCH_OBJECTIVE", None)
    r = subprocess.run(
        [sys.executable, "-m", "ltbench", "train", "--multirun", "hydra/sweeper=optuna_val", "hydra.sweeper.n_trials=2",
         "schedule.lr=interval(0.01,0.3)", *SMOKE, f"dataset.root={cifar10_root}", "dataset.download=false",
         "dataset.imbalance_ratio=10", f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'study'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    study = tmp_path / "study"
    trials = [json.loads(p.read_text()) for p in sorted((study / "trials").glob("*.json"))]
    assert len(trials) == 2 and all(t["objective"] == "val.top1" for t in trials)
    runs = {json.loads(p.read_text())["config_hash"]: json.loads(p.read_text()) for p in study.rglob("metrics.json")}
    for t in trials:  # each trial's value is its run's validation top-1, its test result the run's test numbers
        rec = runs[t["config_hash"]]
        assert t["value"] == rec["val"]["top1"] and t["test"]["top1"] == rec["top1"]
    best = json.loads((study / "best.json").read_text())
    assert best["value"] == max(t["value"] for t in trials)
    optuna_best = (study / "optimization_results.yaml").read_text()
    assert f"best_value: {best['value']}" in optuna_best  # Optuna's study agrees: it optimised validation top-1
    assert r.stdout.count("best of 2 trials (on validation)") == 1
