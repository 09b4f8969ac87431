"""``ltbench reproduce``: the published tables (sources, values), the plan (stage-1 sharing, fixed run directories),
and a tiny reproduction through the CLI: report beside the published numbers, refusal to overwrite, --resume that
retrains nothing finished, a failed job that does not stop the others, and a broken record that does not stop the
report."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from conftest import make_cifar
from test_e2e import ltbench

from ltbench.errors import ConfigError
from ltbench.presets import list_strategies
from ltbench.reproduce import _published, _show_plan, compare, list_tables, load_table, plan, to_markdown

REGRESSION_TABLES = {"agedb_dir", "imdbwiki_dir", "stsb_dir", "bmse_synthetic"}


def test_every_table_loads_and_every_number_has_a_source():
    strategies = {p.name for p in list_strategies()}
    experiments = {f.name[: -len(".yaml")] for f in resources.files("ltbench.conf").joinpath("experiment").iterdir()}
    assert {"cifar10lt_ldam", "cifar100lt_ldam"} | REGRESSION_TABLES <= set(list_tables())
    for name in list_tables():
        t = load_table(name)
        assert t.seeds == (0, 1, 2) and t.rows
        for row in t.rows:
            assert row.strategy is None or row.strategy in strategies, f"{name}: no preset {row.strategy}"
            assert row.experiment is None or row.experiment in experiments, f"{name}: no preset {row.experiment}"
            for key, p in row.published.items():
                assert p.source and p.confidence in ("checked", "secondary", "unchecked", "measured")
                assert p.protocol in ("best_test", "val", "last", "unknown")
                if t.metric == "top1":
                    assert (key in dict(t.settings) if t.settings else key >= 1) and 0 < p.top1 < 100
                else:  # a regression error, its groups no smaller than zero, keyed by a setting of the table
                    assert key in dict(t.settings) and p.value > 0 and all(v > 0 for _, v in p.groups)


def test_regression_tables_compare_the_error_and_the_dir_numbers_of_the_readmes():
    agedb = load_table("agedb_dir")
    assert (agedb.metric, agedb.higher_is_better, agedb.ratios) == ("mae", False, ["dir"])
    lds = next(r for r in agedb.rows if r.strategy == "lds").published["dir"]
    # YyzHarry/imbalanced-regression agedb-dir/README.md, reproduced results (base SQINV): LDS 7.67 6.98 8.86 10.89
    assert (lds.value, dict(lds.groups)) == (7.67, {"many": 6.98, "medium": 8.86, "few": 10.89})
    assert lds.confidence == "checked" and lds.as_published == "mae 7.67"
    stsb = load_table("stsb_dir")
    assert stsb.metric == "mse" and next(r for r in stsb.rows if r.strategy == "fds").published["dir"].value == 0.916
    imdb = load_table("imdbwiki_dir")
    assert imdb.ratios == ["dir", "bmse"]
    assert {r.strategy for r in imdb.rows if "bmse" in r.published} == {"bmse_gai", "bmse_bmc", "bmse_bni"}
    with pytest.raises(ConfigError, match="needs its mae"):
        _published({"setting": "dir", "error": 3, "source": "x", "confidence": "checked"}, "t.yaml", "mae", ("dir",))
    with pytest.raises(ConfigError, match="needs a setting"):
        _published({"ratio": 10, "mae": 3, "source": "x", "confidence": "checked"}, "t.yaml", "mae", ("dir",))


def test_regression_plan_uses_the_settings_and_the_report_marks_lower_is_better(tmp_path, monkeypatch):
    t = load_table("bmse_synthetic")
    jobs = plan(t, tmp_path, [], seeds=[0], rows=["vanilla", "bmse_gai", "bmse_gai_learnt"])  # GAI: sigma fixed, learnt
    assert len(jobs) == 3 and len({j.run_dir for j in jobs}) == len(jobs)
    assert all("dataset.y_sigma=0.5" in j.overrides for j in jobs)
    lines = compare(t, jobs)  # nothing has run: every line is there, without numbers
    md = to_markdown(t, lines, {"epochs": "—", "device": "—", "runs": "0/3", "wall_s": 0, "version": "x", "git": "y"})
    assert "test MSE (lower is better)" in md and "| setting | method | ltbench MSE (seeds) |" in md
    assert md.count("| normal_0.5 |") == 3 and "| — (0/1) |" in md
    # a finished run: the groups of an MSE table are the groups' MSE (group_errors), not the record's group MAE
    rec = {"status": "completed", "config_hash": jobs[0].config_hash, "mse": 5.0, "many": 0.4,
           "group_errors": {g: {"mae": 9.0, "mse": m} for g, m in (("many", 0.2), ("medium", 0.9), ("few", 6.5))}}
    jobs[0].run_dir.mkdir(parents=True)
    (jobs[0].run_dir / "metrics.json").write_text(json.dumps(rec))
    monkeypatch.setattr("ltbench.records.problem", lambda d: None)  # a hand-written record, not a full one
    first = compare(t, jobs)[0]
    assert (first["mse_mean"], first["many_mean"], first["few_mean"]) == (5.0, 0.2, 6.5)


def test_the_cao_et_al_numbers_of_the_issue_are_the_table_converted_to_accuracy():
    # Cao et al. 2019, Table 2, CIFAR-10-LT ratio 100, top-1 error: CE 29.64, focal 29.62, CB-focal 25.43,
    # LDAM-DRW 22.97 (as ltbench issue 13 quotes them)
    t = load_table("cifar10lt_ldam")
    pub = {r.name: r.published[100.0] for r in t.rows if 100.0 in r.published}
    assert {k: pub[k].top1 for k in ("ce", "focal", "cb_sigmoid_focal", "ldam_drw")} == pytest.approx(
        {"ce": 70.36, "focal": 70.38, "cb_sigmoid_focal": 74.57, "ldam_drw": 77.03}
    )
    assert pub["ldam_drw"].as_published == "error 22.97" and "Cao et al. 2019, Table 2" in pub["ldam_drw"].source
    assert t.ratios == [100.0, 50.0, 10.0]  # ratio 10 where the paper has it; 50 for GLMC's README
    assert {r.name for r in t.rows if 10.0 in r.published} == {"ce", "focal", "cb_sigmoid_focal", "ldam",
                                                                 "ldam_drw", "glmc_r10"}  # fmt: skip


@pytest.mark.parametrize(
    "entry",
    [
        {"ratio": 100, "source": "x", "confidence": "checked"},  # no value
        {"ratio": 100, "error": 20, "accuracy": 80, "source": "x", "confidence": "checked"},  # both
        {"ratio": 100, "error": 20, "confidence": "checked"},  # no source
        {"ratio": 100, "error": 20, "source": "x", "confidence": "sure"},  # unknown confidence
        {"ratio": 100, "error": 120, "source": "x", "confidence": "checked"},  # not a percentage
    ],
)
def test_a_bad_published_entry_is_one_clear_error(entry):
    with pytest.raises(ConfigError, match=r"published entry|percentage"):
        _published(entry, "t.yaml")


def test_unknown_table_or_row_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no published table"):
        load_table("cifar10lt_nope")
    with pytest.raises(ConfigError, match="has no row"):
        plan(load_table("cifar10lt_ldam"), tmp_path, [], rows=["ce", "nope"])


def test_every_row_of_every_table_composes_with_its_overrides(tmp_path):
    """A misspelt override of a row (classifier.lr_factr) would fail only when its run starts: the plan composes
    every row now (cifar10lt_ldam's rows are composed by the next test)."""
    for name in list_tables():
        if name != "cifar10lt_ldam":
            t = load_table(name)
            assert len(plan(t, tmp_path / name, [], seeds=[0], ratios=t.ratios[:1])) == len(
                [r for r in t.rows if t.ratios[0] in r.published]
            )


def test_the_plan_shares_stage_1_among_decoupled_rows_and_fixes_run_directories(tmp_path):
    jobs = plan(load_table("cifar10lt_ldam"), tmp_path, ["experiment=smoke"], seeds=[0, 1], ratios=[100])
    assert len(jobs) == 15 * 2 and len({j.run_dir for j in jobs}) == len(jobs)
    by = {(j.row.strategy, j.seed): j for j in jobs}
    assert by["crt", 0].group == by["lws", 0].group and by["crt", 0].group != by["crt", 1].group
    # tau_norm / posthoc_la select on validation: their training subset gives validation images, another stage 1
    assert by["tau_norm", 0].group == by["posthoc_la", 0].group != by["crt", 0].group
    assert by["ce", 0].group is None and by["ldam_drw", 0].group is None
    assert by["mislas", 0].group != by["crt", 0].group  # its stage 1 is mixup: nothing to share
    assert by["ce", 0].config_hash == by["ce", 1].config_hash != by["focal", 0].config_hash  # the seed is not in it
    assert by["ce", 0].run_dir == tmp_path / "runs" / "cifar10lt_ir100" / "ce" / f"{by['ce', 0].config_hash[:8]}_seed0"
    assert by["lws", 0].cost(stage1_cached=True) == 10 and by["posthoc_la", 0].cost(stage1_cached=True) == 1


def test_dry_run_shows_every_run_directory_whole_at_80_columns(tmp_path):
    """Issue 23 item 8: at COLUMNS=80 the run-directory column was cut to nothing."""
    import io

    from rich.console import Console

    out = tmp_path / "repro"
    jobs = plan(load_table("cifar10lt_ldam"), out, [], seeds=[0], ratios=[100], rows=["ce", "cb_sigmoid_focal"])
    buf = io.StringIO()
    _show_plan(jobs, Console(file=buf, width=80), out)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines() if "│" in line or "┃" in line) <= 80
    first = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") > 2)
    for j in jobs:  # whole, in the first column (a folded path continues on the next line of the cell)
        assert str(j.run_dir.relative_to(out)) in first
    assert "seed 0" in first and str(out) in text


@pytest.fixture(scope="module")
def cifar200(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("cifar200"), 10, train_per_class=200, test_per_class=10)


@pytest.mark.slow
def test_cli_reproduction_report_resume_and_refusal(cifar200, tmp_path):
    out = tmp_path / "repro"
    extras = ["experiment=smoke", "device=cpu", f"dataset.root={cifar200}", "dataset.download=false"]
    args = ["reproduce", "cifar10lt_ldam", "--seeds", "0", "--ratios", "100", "--out", str(out)]
    r = ltbench(*args, "--rows", "ce,crt", "--jobs", "2", *extras, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ETA" in r.stderr and "done" in r.stderr
    md = (out / "reproduce.md").read_text()
    assert "| 100 | CE (ERM) |" in md and "70.36 (error 29.64)" in md and "(1/1)" in md and "Bag of Tricks" in md
    assert (out / "reproduce.csv").read_text().startswith("ratio,strategy,label,seeds")
    # a second start is refused: nothing a user had is overwritten
    r = ltbench(*args, "--rows", "ce", *extras, cwd=tmp_path)
    assert r.returncode == 2 and "--resume" in r.stderr and r.stderr.count("\n") <= 2
    # --resume with one more row: the finished runs are not retrained, the new row reuses the cached stage 1
    before = {p: p.stat().st_mtime for p in out.rglob("metrics.json")}
    r = ltbench(*args, "--resume", "--rows", "ce,crt,lws", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(p.stat().st_mtime == t for p, t in before.items())
    lws = json.loads(next((out / "runs" / "cifar10lt_ir100" / "lws").rglob("metrics.json")).read_text())
    assert lws["stage1"]["reused"] is True and lws["status"] == "completed"
    assert "| 100 | LWS |" in (out / "reproduce.md").read_text()


@pytest.mark.slow
def test_cli_a_failed_job_does_not_stop_the_others_nor_a_broken_record_the_report(cifar200, tmp_path):
    out = tmp_path / "repro"
    extras = ["experiment=smoke", "device=cpu", f"dataset.root={cifar200}", "dataset.download=false"]
    jobs = plan(load_table("cifar10lt_ldam"), out.resolve(), extras, seeds=[0], ratios=[100], rows=["ce", "focal"])
    focal = next(j for j in jobs if j.row.strategy == "focal")
    focal.run_dir.mkdir(parents=True)  # a directory that holds another run: ltbench train refuses to write there
    (focal.run_dir / "metrics.json").write_text(json.dumps({"status": "completed", "config_hash": "another"}))
    args = ["reproduce", "cifar10lt_ldam", "--seeds", "0", "--ratios", "100", "--rows", "ce,focal", "--jobs", "2",
            "--out", str(out)]  # fmt: skip
    r = ltbench(*args, *extras, cwd=tmp_path, timeout=600)
    assert r.returncode == 1 and "failed" in r.stderr and "1 run(s) failed" in r.stderr
    ce = next(j for j in jobs if j.row.strategy == "ce")
    assert json.loads((ce.run_dir / "metrics.json").read_text())["status"] == "completed"
    md = (out / "reproduce.md").read_text()
    assert "Runs missing from the table" in md and "| 100 | Focal (gamma 1) | — (0/1)" in md
    (ce.run_dir / "metrics.json").write_text("{not json")
    r = ltbench(*args, "--report-only", cwd=tmp_path)
    assert r.returncode == 0 and "unreadable record" in (out / "reproduce.md").read_text()  # listed, not fatal


def test_each_row_runs_with_its_sources_protocol_and_shows_the_last_epoch_beside_it(tmp_path, monkeypatch):
    """Issue 17: like with like. A best-test-epoch number is compared with ltbench's best test epoch
    (select=test_oracle), and the same runs' last epoch stands beside it; a last stage computed from features has no
    epoch to choose; the cost of every row and of the table is summed."""
    t = load_table("cifar10lt_ldam")
    protocols = {r.name: {p.protocol for p in r.published.values()} for r in t.rows}
    assert protocols.pop("balpoe") == {"last"}  # BalPoE evaluates its last checkpoint (its README)
    assert set().union(*protocols.values()) == {"best_test"}  # the table's default: the LDAM-DRW code's
    jobs = plan(t, tmp_path, ["experiment=smoke"], seeds=[0, 1], ratios=[100], rows=["ce", "tau_norm"])
    by = {(j.row.name, j.seed): j for j in jobs}
    assert by["ce", 0].select == "test_oracle" and "select=test_oracle" in by["ce", 0].overrides
    assert by["tau_norm", 0].select == "last" and not any(o.startswith("select=") for o in by["tau_norm", 0].overrides)
    assert plan(t, tmp_path, ["experiment=smoke", "select=last"], seeds=[0], ratios=[100], rows=["ce"])[0].select == \
        "last"  # fmt: skip  (a user's select= wins)
    assert load_table("agedb_dir").rows[0].published["dir"].select == "val"
    monkeypatch.setattr("ltbench.records.problem", lambda d: None)  # hand-written records, not full ones
    for seed, (best, last) in enumerate(((71.0, 70.0), (73.0, 72.0))):
        j = by["ce", seed]
        j.run_dir.mkdir(parents=True)
        cost = {"image_steps_total": 1000 * (seed + 1), "trainable_parameters": {"train": 464154},
                "train_seconds": 60.0, "gpu_hours": 0.5}  # fmt: skip
        rec = {"status": "completed", "config_hash": j.config_hash, "top1": best, "cost": cost,
               "selection": {"protocol": "test_oracle", "split": "test", "epoch": 3, "value": best,
                             "last": {"epoch": 4, "top1": last}}}  # fmt: skip
        (j.run_dir / "metrics.json").write_text(json.dumps(rec))
    ce = next(x for x in compare(t, jobs) if x["strategy"] == "ce")
    assert (ce["top1_mean"], ce["last_mean"], ce["protocol"], ce["select"]) == (72.0, 71.0, "best_test", "test_oracle")
    assert ce["delta"] == pytest.approx(72.0 - 70.36)  # against the like-with-like column
    assert (ce["image_steps"], ce["gpu_hours"], ce["trainable_parameters"]) == (1500.0, 1.0, 464154)
    from ltbench.reproduce import _meta

    md = to_markdown(t, compare(t, jobs), _meta(jobs))
    assert "| 100 | CE (ERM) | 72.00 ± 1.41 (2/2) | best test epoch (TEST-SELECTED) | 71.00 ± 1.41 |" in md
    assert "| best_test |" in md and "| 1.5k | 464k |" in md
    assert "Compute of the table: 3k image-steps, 2m00s of training, 1.00 GPU-hours" in md
    with pytest.raises(ConfigError, match="protocol must be one of best_test, val, last, unknown"):
        _published({"ratio": 100, "error": 20, "source": "x", "confidence": "checked", "protocol": "best"}, "t.yaml")
