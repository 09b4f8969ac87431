"""The methods of issue 20 from the command line: one ``--multirun`` sweep over them on tiny data, each job a real
run, then the report over the sweep; and the one-line error for a key of an optional group that is off."""

import json

import pytest
from conftest import SMOKE, make_cifar
from omegaconf import OmegaConf
from test_e2e import ltbench

SEMI = ["darp", "acr", "simpro"]  # CReST+ has a stage of generations: tests/test_crest.py runs it
LABELS = {"darp": "+FixMatch+DARP", "acr": "+FixMatch+ACR", "simpro": "+SimPro"}
EXTRA = {"darp": "pseudo_labels", "acr": "acr", "simpro": "simpro"}


@pytest.mark.slow
def test_a_sweep_over_the_semi_supervised_methods_runs_each_and_reports_them(tmp_path):
    """``semi.threshold=0.1`` exists only under a chosen ``semi``: the sweep's own config (semi swept, so null) would
    refuse it; ltbench routes it to the jobs, each of which has it."""
    root = make_cifar(tmp_path / "data", 10, train_per_class=40, test_per_class=4)
    r = ltbench(
        "train", "--multirun", *SMOKE, "dataset=cifar10lt_ssl", f"dataset.root={root}", "dataset.download=false",
        "dataset.max_labeled=16", "dataset.max_unlabeled=20", "dataset.imbalance_ratio=4", "dataset.unlabeled_ratio=4",
        "dataset.val_per_class=2", "schedule.batch_size=16", "semi.threshold=0.1",
        f"semi={','.join(SEMI)}", f"results_dir={tmp_path / 'res'}", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "res").rglob("metrics.json")]
    assert len(recs) == len(SEMI) and all(m["status"] == "completed" for m in recs)
    by = {next(k for k, v in LABELS.items() if v + " (" in m["label"]): m for m in recs}
    assert sorted(by) == sorted(SEMI)
    for path in (tmp_path / "res").rglob("config.yaml"):
        semi = OmegaConf.load(path).semi
        assert semi.threshold == 0.1 and EXTRA[semi.name] in by[semi.name] and by[semi.name]["num_unlabeled"] > 0
    r = ltbench("report", str(tmp_path / "res"), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "res" / "report.md").read_text()
    assert all(f"ce{label} (U 20 max, ratio 4)" in md for label in LABELS.values())


def test_a_key_of_an_optional_group_that_is_off_is_one_line(tmp_path):
    r = ltbench("train", *SMOKE, "semi.threshold=0.1", f"results_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "semi.threshold=0.1: no semi= is chosen" in r.stderr and "semi=<option>" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-started


@pytest.mark.slow
def test_cossl_from_the_command_line_warms_its_teacher_and_reports_it(tmp_path):
    """``semi=cossl`` on tiny data from the CLI: co-learning from epoch 1 of 2 (``semi.warmup=0.5``), so the run's
    second epoch trains the teacher after the TFE warm-up and the EMA network's teacher head is the one tested."""
    root = make_cifar(tmp_path / "data", 10, train_per_class=40, test_per_class=4)
    r = ltbench(
        "train", *SMOKE, "dataset=cifar10lt_ssl", f"dataset.root={root}", "dataset.download=false",
        "dataset.max_labeled=16", "dataset.max_unlabeled=20", "dataset.imbalance_ratio=4", "dataset.unlabeled_ratio=4",
        "dataset.val_per_class=2", "schedule.batch_size=16", "semi=cossl", "semi.warmup=0.5",
        "semi.tfe_warm_epochs=1", "semi.tfe_warm_iters=4", "semi.tfe_warm_bs=8", f"results_dir={tmp_path / 'res'}",
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (tmp_path / "res").rglob("metrics.json")
    m = json.loads(path.read_text())
    assert m["status"] == "completed" and m["cossl_boundary_epoch"] == 1 and m["cossl_teacher"] is True
    assert m["cossl_tfe_set"] == [max(m["train_class_counts"])] * 10 and m["num_unlabeled"] > 0
    r = ltbench("report", str(tmp_path / "res"), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ce+FixMatch+CoSSL (U 20 max, ratio 4)" in (tmp_path / "res" / "report.md").read_text()


SCRATCH = ["paco", "gpaco", "sade", "balpoe", "glmc"]  # issue 20's from-scratch methods, as strategies


@pytest.mark.slow
def test_a_sweep_over_the_from_scratch_methods_runs_each_and_reports_them(tmp_path):
    """PaCo, GPaCo, SADE, BalPoE and GLMC in one ``--multirun`` on tiny CIFAR-10-LT, then the report: each job a
    completed run with its own group metrics, each a row of the report."""
    root = make_cifar(tmp_path / "data", 10, train_per_class=40, test_per_class=4)
    r = ltbench(
        "train", "--multirun", *SMOKE, f"dataset.root={root}", "dataset.download=false", "dataset.imbalance_ratio=10",
        "schedule.batch_size=32", f"strategy={','.join(SCRATCH)}", f"results_dir={tmp_path / 'res'}", cwd=tmp_path,
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {m["strategy"]: m for m in (json.loads(p.read_text()) for p in (tmp_path / "res").rglob("metrics.json"))}
    assert sorted(recs) == sorted(SCRATCH) and all(m["status"] == "completed" for m in recs.values())
    assert all(m["group_sizes"] == {"many": 3, "medium": 4, "few": 3} for m in recs.values())
    r = ltbench("report", str(tmp_path / "res"), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "res" / "report.md").read_text()
    assert all(f"| {m['label']} " in md for m in recs.values()), md


REGULARISERS = ["ranksim", "ranksim_fds", "conr", "conr_fds"]


@pytest.mark.slow
def test_a_sweep_over_ranksim_and_conr_with_and_without_fds_on_a_reweighting(tmp_path):
    """RankSim and ConR, each with and without FDS, on SQINV + LDS from the CLI (``experiment=synthetic_dir``): each
    job completes with its regulariser's term logged and FDS's calibration on from ``start_smooth`` where chosen."""
    r = ltbench(
        "train", "--multirun", "experiment=synthetic_dir", "progress=false", "device=cpu", "schedule.epochs=2",
        "dataset.num_train=256", "dataset.num_eval=64", "model.hidden=[16]", "reweight=sqinv", "reweight.lds=true",
        f"method={','.join(REGULARISERS)}", f"results_dir={tmp_path / 'res'}", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    cfgs = {p.parent: OmegaConf.load(p.parent / "config.yaml").method for p in (tmp_path / "res").rglob("metrics.json")}
    runs = {m.name + ("_fds" if m.fds else ""): d for d, m in cfgs.items()}
    assert sorted(runs) == sorted(REGULARISERS)
    for name, d in runs.items():
        assert json.loads((d / "metrics.json").read_text())["status"] == "completed"
        header, *rows = (d / "epochs.csv").read_text().splitlines()
        cols = header.split(",")
        term = name.split("_")[0]  # the regulariser's column: ranksim | conr
        assert term in cols and all(float(r.split(",")[cols.index(term)]) >= 0 for r in rows)
        if name.endswith("_fds"):
            assert [r.split(",")[cols.index("fds_smooth")] for r in rows] == ["False", "True"]
        else:
            assert "fds_smooth" not in cols
    r = ltbench("report", str(tmp_path / "res"), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
