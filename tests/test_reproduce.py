"""``ltbench reproduce``: the published tables (sources, values), the plan (stage-1 sharing, fixed run directories),
and a tiny reproduction through the CLI: report beside the published numbers, refusal to overwrite, --resume that
retrains nothing finished, a failed job that does not stop the others, and a broken record that does not stop the
report."""

from __future__ import annotations

import json

import pytest
from conftest import make_cifar
from test_e2e import ltbench

from ltbench.errors import ConfigError
from ltbench.presets import list_strategies
from ltbench.reproduce import _published, list_tables, load_table, plan


def test_every_table_loads_and_every_number_has_a_source():
    strategies = {p.name for p in list_strategies()}
    assert {"cifar10lt_ldam", "cifar100lt_ldam"} <= set(list_tables())
    for name in list_tables():
        t = load_table(name)
        assert t.seeds == (0, 1, 2) and t.rows
        for row in t.rows:
            assert row.strategy in strategies, f"{name}: no preset {row.strategy}"
            for ratio, p in row.published.items():
                assert ratio >= 1 and 0 < p.top1 < 100 and p.source and p.confidence in ("checked", "secondary",
                                                                                          "unchecked")  # fmt: skip


def test_the_cao_et_al_numbers_of_the_issue_are_the_table_converted_to_accuracy():
    # Cao et al. 2019, Table 2, CIFAR-10-LT ratio 100, top-1 error: CE 29.64, focal 29.62, CB-focal 25.43,
    # LDAM-DRW 22.97 (as ltbench issue 13 quotes them)
    t = load_table("cifar10lt_ldam")
    pub = {r.strategy: r.published[100.0] for r in t.rows}
    assert {k: pub[k].top1 for k in ("ce", "focal", "cb_sigmoid_focal", "ldam_drw")} == pytest.approx(
        {"ce": 70.36, "focal": 70.38, "cb_sigmoid_focal": 74.57, "ldam_drw": 77.03}
    )
    assert pub["ldam_drw"].as_published == "error 22.97" and "Cao et al. 2019, Table 2" in pub["ldam_drw"].source
    assert t.ratios == [100.0, 10.0]  # ratio 10 where the paper has it
    assert {r.strategy for r in t.rows if 10.0 in r.published} == {"ce", "focal", "cb_sigmoid_focal", "ldam",
                                                                     "ldam_drw"}  # fmt: skip


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
    assert len(jobs) == 13 * 2 and len({j.run_dir for j in jobs}) == len(jobs)
    by = {(j.row.strategy, j.seed): j for j in jobs}
    assert by["crt", 0].group == by["lws", 0].group and by["crt", 0].group != by["crt", 1].group
    # tau_norm / posthoc_la select on validation: their training subset gives validation images, another stage 1
    assert by["tau_norm", 0].group == by["posthoc_la", 0].group != by["crt", 0].group
    assert by["ce", 0].group is None and by["ldam_drw", 0].group is None
    assert by["mislas", 0].group != by["crt", 0].group  # its stage 1 is mixup: nothing to share
    assert by["ce", 0].config_hash == by["ce", 1].config_hash != by["focal", 0].config_hash  # the seed is not in it
    assert by["ce", 0].run_dir == tmp_path / "runs" / "cifar10lt_ir100" / "ce" / f"{by['ce', 0].config_hash[:8]}_seed0"
    assert by["lws", 0].cost(stage1_cached=True) == 10 and by["posthoc_la", 0].cost(stage1_cached=True) == 1


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
