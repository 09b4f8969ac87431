"""End-to-end: real training on tiny CIFAR-format fixture files, in-process and through the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SMOKE

import ltbench.fit as fit_mod
from ltbench.presets import list_strategies
from ltbench.report import report
from ltbench.runner import CHECKPOINT, run


def _fixture(root):
    return [f"dataset.root={root}", "dataset.download=false", "dataset.imbalance_ratio=10"]


@pytest.mark.parametrize("name", [p.name for p in list_strategies() if "classification" in p.tasks])
def test_every_preset_trains_end_to_end(compose_cfg, cifar10_root, tmp_path, name):
    cfg = compose_cfg(f"strategy={name}", *_fixture(cifar10_root), f"results_dir={tmp_path}")
    if "schedule" in (cfg.get("classifier") or {}):  # a trained second stage: two epochs, like stage 1
        cfg = compose_cfg(f"strategy={name}", *_fixture(cifar10_root), f"results_dir={tmp_path}",
                          "classifier.schedule.epochs=2")  # fmt: skip
    m = run(cfg, tmp_path)
    assert m["status"] == "completed" and m["strategy"] == name
    assert 0 <= m["top1"] <= 100 and len(m["per_class_acc"]) == 10
    assert m["group_sizes"] == {"many": 3, "medium": 4, "few": 3}
    counts = [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]
    if name in ("tau_norm", "posthoc_la", "mwn"):  # they select on validation: classes with < 20 unused images give
        counts[:3] = [20, 20, 20]  # their missing validation images from the subset (40-20, 30-10, 23-3)
    assert m["train_class_counts"] == counts
    for f in ("config.yaml", "epochs.csv", CHECKPOINT, "train_indices.txt", "metrics.json"):
        assert (tmp_path / f).exists(), f
    assert len((tmp_path / "epochs.csv").read_text().strip().splitlines()) == 1 + 2


def test_run_records_everything(compose_cfg, cifar10_root, tmp_path):
    m = run(compose_cfg(*_fixture(cifar10_root)), tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "status",
        "dataset",
        "imbalance_ratio",
        "strategy",
        "seed",
        "top1",
        "many",
        "medium",
        "few",
        "group_sizes",
        "per_class_acc",
        "train_class_counts",
        "split_hash",
        "wall_time_s",
        "versions",
        "git",
        "config_hash",
        "data_fingerprint",
    ):
        assert key in on_disk, key
    assert on_disk["top1"] == m["top1"]
    idx = [int(v) for v in (tmp_path / "train_indices.txt").read_text().split()]
    assert len(idx) == sum(m["train_class_counts"]) and len(set(idx)) == len(idx) and max(idx) < 400
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["num_threads"] == torch.get_num_threads()  # it changes the last digits of a CPU run


def test_every_stage_shows_progress(compose_cfg, cifar10_root, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=150)
    run(compose_cfg(*_fixture(cifar10_root), "strategy=crt", "progress=true", "classifier.schedule.epochs=2",
            f"results_dir={tmp_path / 'results'}"),
        tmp_path, console=console)  # fmt: skip
    text = console.export_text()
    assert "train" in text and "classifier" in text and "2/2" in text


def test_same_seed_same_numbers_other_seed_same_config_hash(compose_cfg, cifar10_root, tmp_path):
    a = run(compose_cfg(*_fixture(cifar10_root)), tmp_path / "a")
    b = run(compose_cfg(*_fixture(cifar10_root)), tmp_path / "b")
    c = run(compose_cfg(*_fixture(cifar10_root), "seed=1"), tmp_path / "c")
    assert a["per_class_acc"] == b["per_class_acc"] and a["top1"] == b["top1"]
    assert a["config_hash"] == c["config_hash"] and a["split_hash"] == c["split_hash"]
    from ltbench.config import to_schema
    from ltbench.identity import config_hash

    same = [
        to_schema(compose_cfg(*_fixture(cifar10_root), o))
        for o in ("seed=3", "num_threads=1", "schedule.eval_batch_size=7")
    ]
    assert {config_hash(c) for c in same} == {a["config_hash"]}
    d = run(compose_cfg(*_fixture(cifar10_root), "loss=focal"), tmp_path / "d")
    assert d["config_hash"] != a["config_hash"]


def test_resume_after_interruption_equals_uninterrupted_run(compose_cfg, cifar10_root, tmp_path, monkeypatch):
    overrides = [*_fixture(cifar10_root), "schedule.epochs=3", "strategy=mixup"]
    full = run(compose_cfg(*overrides), tmp_path / "full")

    real = fit_mod.train_epoch
    calls = {"n": 0}

    def interrupt_on_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fit_mod, "train_epoch", interrupt_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(*overrides), tmp_path / "cut")
    rec = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert rec["status"] == "interrupted"
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(fit_mod, "train_epoch", real)

    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["status"] == "completed" and resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "cut" / "epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # header + 3 epochs, none duplicated


# ------------------------------------------------------------------------------------------------ CLI tier


def ltbench(*args, cwd, env=None, timeout=300):
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ltbench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )


@pytest.mark.slow
def test_cli_sweep_then_report(cifar10_root, tmp_path):
    r = ltbench(
        "train",
        "--multirun",
        *SMOKE,
        *_fixture(cifar10_root),
        "strategy=ce,balanced_softmax",
        "seed=0,1",
        f"results_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = sorted(tmp_path.rglob("metrics.json"))
    assert len(metrics) == 4 and len({m.parent for m in metrics}) == 4
    dirs = {str(m.parent.relative_to(tmp_path)) for m in metrics}
    assert any("cifar10lt_ir10/ce" in d and d.endswith("seed0") for d in dirs)
    assert any("cifar10lt_ir10/balanced_softmax" in d and d.endswith("seed1") for d in dirs)

    r = ltbench("report", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "report.md").read_text()
    assert "cifar10lt, imbalance ratio 10" in md and "| ce | 2 |" in md and "| balanced_softmax | 2 |" in md
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("dataset,imbalance_ratio,label,config_hash")
    assert (tmp_path / "per_class_cifar10lt_ir10.png").stat().st_size > 1000
    assert (tmp_path / "groups_cifar10lt_ir10.png").stat().st_size > 1000
    assert (tmp_path / "confusion_cifar10lt_ir10.png").stat().st_size > 1000


@pytest.mark.slow
def test_cli_failed_job_does_not_stop_the_sweep(cifar10_root, tmp_path):
    # one job's data is missing (a failure of the run, not of its config): recorded as failed, the other completes
    r = ltbench(
        "train",
        "-m",
        *SMOKE,
        f"dataset.root={cifar10_root},{tmp_path / 'missing'}",
        "dataset.download=false",
        "dataset.imbalance_ratio=10",
        f"results_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert r.returncode != 0
    recs = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert sorted(x["status"] for x in recs) == ["completed", "failed"]
    failed = next(x for x in recs if x["status"] == "failed")
    assert "download=false" in failed["error"]
    r = ltbench("report", str(tmp_path), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0 and "Runs not included" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_cli_config_error_in_a_sweep_leaves_no_run_behind(cifar10_root, tmp_path):
    r = ltbench(
        "train",
        "-m",
        *SMOKE,
        *_fixture(cifar10_root)[:2],
        "dataset.imbalance_ratio=0.5,10",
        f"results_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert r.returncode != 0 and "imbalance_ratio must be >= 1" in r.stderr + r.stdout
    recs = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert [x["status"] for x in recs] == ["completed"]  # the refused job left nothing
    assert not list(tmp_path.rglob("*_ir0.5*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needle",
    [
        (["strategy=nope"], "strategy"),
        (["dataset=nope"], "dataset"),
        (["dataset=dataset_schema"], "unknown dataset 'dataset_schema'"),
        (["dataset.imbalance_ratio=0.5"], "imbalance_ratio must be >= 1"),
        (["dataset.root={tmp}/missing", "dataset.download=false"], "download=false"),
        (["resume={tmp}/missing"], "no such run directory"),
        (["schedule.epoch=3"], "epoch"),
    ],
)
def test_cli_bad_input_gives_one_clear_message(tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = [] if args[0].startswith("resume=") else [*SMOKE, f"results_dir={tmp_path}"]
    r = ltbench("train", *base, *args, cwd=tmp_path)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert needle in out and "Traceback" not in out, out[-2000:]


@pytest.mark.slow
def test_cli_unreadable_checkpoint(cifar10_root, tmp_path):
    r = ltbench("train", *SMOKE, *_fixture(cifar10_root), f"results_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = next(tmp_path.rglob("metrics.json")).parent
    rec = json.loads((run_dir / "metrics.json").read_text())
    rec["status"] = "interrupted"
    (run_dir / "metrics.json").write_text(json.dumps(rec))
    # the last checkpoint is damaged, the previous one (epoch 1) is good: resume from it and finish
    (run_dir / CHECKPOINT).write_bytes(b"garbage")
    r = ltbench("train", f"resume={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "previous checkpoint" in r.stderr and json.loads((run_dir / "metrics.json").read_text())["top1"] == rec["top1"]
    )
    # both damaged: one clear line saying what to do
    rec["status"] = "interrupted"
    (run_dir / "metrics.json").write_text(json.dumps(rec))
    (run_dir / CHECKPOINT).write_bytes(b"garbage")
    (run_dir / "checkpoint.prev.pt").write_bytes(b"")
    r = ltbench("train", f"resume={run_dir}", cwd=tmp_path)
    assert r.returncode == 2 and "unreadable checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert "start the run again" in r.stderr


@pytest.mark.slow
def test_cli_help_and_listing(tmp_path):
    r = ltbench("--help", cwd=tmp_path)
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "report", "strategies", "reproduce"))
    r = ltbench("train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "strategy" in r.stdout
    classifiers = ", ".join(sorted(p.stem for p in (REPO / "conf" / "classifier").glob("*.yaml")))
    assert "schema" not in r.stdout and f"classifier: {classifiers}" in r.stdout  # every option, nothing else
    r = ltbench("train", "--cfg", "job", "strategy=focal", cwd=tmp_path)
    assert r.returncode == 0 and "name: focal" in r.stdout
    line = "ltbench train strategy=ld"  # shell completion sees the subcommand in COMP_LINE
    r = ltbench("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert r.returncode == 0 and "strategy=ldam_drw" in r.stdout.split()


def test_cli_strategies_and_a_missing_report_directory_in_process(tmp_path, capsys, monkeypatch):
    """The commands that need no Hydra app run in this process (a subprocess costs seconds of imports)."""
    from ltbench.cli import main

    monkeypatch.setenv("COLUMNS", "400")  # one line per row: each name beside its paper
    main(["strategies"])
    out = capsys.readouterr().out
    # issue 20's methods, each with its paper: strategies, semi-supervised methods and feature regularisers
    for name, paper in [("ldam_drw", "Cao et al. 2019"), ("paco", "Cui et al. 2021"), ("sade", "Zhang et al."),
                        ("balpoe", "Sanchez Aimar et al. 2023"), ("glmc", "Du et al. 2023"),
                        ("darp", "Kim et al. 2020"),
                        ("crest_plus", "Wei et al. 2021"), ("cossl", "Fan et al. 2022"), ("acr", "Wei & Gan 2023"),
                        ("simpro", "Du et al. 2024"), ("ranksim", "Gong et al. 2022"),
                        ("conr", "Keramati et al. 2024")]:  # fmt: skip
        line = next((ln for ln in out.splitlines() if ln.startswith(f"│ {name} ")), "")
        assert paper in line, (name, line)
    assert "semi=<name>" in out and "method=<name>" in out
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "empty")])
    assert e.value.code == 2 and "no such directory" in capsys.readouterr().err


def test_report_aggregates_mean_std_and_lists_failures(tmp_path):
    def write(d, **kw):
        rec = {
            "status": "completed",
            "dataset": "cifar10lt",
            "imbalance_ratio": 100,
            "strategy": "ce",
            "label": "ce",
            "config_hash": "h1",
            "group_sizes": {"many": 3, "medium": 4, "few": 3},
            "per_class_acc": [50.0] * 10,
            "train_class_counts": list(range(10, 0, -1)),
            **kw,
        }
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "metrics.json").write_text(json.dumps(rec))

    write("a", seed=0, top1=70.0, many=90.0, medium=70.0, few=None)
    write("b", seed=1, top1=72.0, many=92.0, medium=71.0, few=None)
    write(
        "c",
        seed=0,
        top1=60.0,
        many=60.0,
        medium=60.0,
        few=60.0,
        label="focal",
        strategy="focal",
        config_hash="h2",
    )
    write("d", seed=2, status="failed", error="boom")
    agg = report(tmp_path, plots=False)
    ce = agg[agg.label == "ce"].iloc[0]
    assert ce.n_seeds == 2 and ce.top1_mean == pytest.approx(71.0) and ce.top1_std == pytest.approx(2**0.5)
    assert ce.many_mean == pytest.approx(91.0)
    assert str(ce.few_mean) == "nan"  # an empty group stays empty
    md = (tmp_path / "report.md").read_text()
    assert "| ce | 2 | 71.00 ± 1.41 | 91.00 ± 1.41 | 70.50 ± 0.71 | – | 3/4/3 |" in md
    assert "| focal | 1 | 60.00 | 60.00 | 60.00 | 60.00 | 3/4/3 |" in md
    assert "failed" in md and "boom" in md
    assert list(agg.label) == ["ce", "focal"]  # best top-1 first
