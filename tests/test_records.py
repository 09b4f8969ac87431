"""Every field of a run record that the report reads is checked (issue 23, item 3): a record with a field of the
wrong type is listed as invalid with the field named, and the report of the other runs is still written."""

from __future__ import annotations

import pytest
from rich.console import Console
from test_report import good as report_record
from test_report import write

from ltbench.records import problem
from ltbench.report import report


def good(**kw) -> dict:
    """test_report's valid record, with the fields this module checks as well."""
    return report_record(**{"task": "classification", "group_unit": "classes",
                            "finished_at": "2026-12-03T10:00:00", **kw})  # fmt: skip


# field -> a record where only that field has the wrong type
WRONG = {
    "finished_at": good(finished_at=1764756000),
    "task": good(task=3),
    "split_hash": good(split_hash=7),
    "data_fingerprint": good(data_fingerprint=["f"]),
    "group_unit": good(group_unit=1),
    "strategy": good(strategy=5, label="ce"),
    "label": good(label=5),
    "per_bin_mae": good(per_bin_mae=["x"]),
    "columns": good(columns=[{"key": "top1", "header": 1}]),
    "stage1": good(stage1={"test": [1]}),
    "pseudo_labels": good(pseudo_labels=[1, 2]),
    "group_sizes": good(group_sizes={"many": "3"}),
    "base": good(base=["pseudo_label_quality"]),
}


@pytest.mark.parametrize("field", sorted(WRONG))
def test_a_field_of_the_wrong_type_is_named_and_the_report_is_written(tmp_path, field):
    assert field in (problem(WRONG[field]) or "")
    write(tmp_path, "ok0", good(seed=0, finished_at="2026-12-03T10:00:00"))
    write(tmp_path, "ok1", good(seed=1, top1=72.0, finished_at="2026-12-03T11:00:00"))
    write(tmp_path, "bad", WRONG[field])
    agg = report(tmp_path, plots=False, console=Console(width=200, record=True))
    assert len(agg) == 1 and agg.iloc[0]["n_seeds"] == 2 and agg.iloc[0]["top1_mean"] == pytest.approx(71.0)
    md = (tmp_path / "report.md").read_text()
    assert "invalid record" in md and field in md


def test_a_record_with_every_field_right_is_used():
    assert problem(good()) is None
    assert problem(good(stage1={"test": {"top1": 60.0}}, pseudo_labels={"precision": [1.0], "recall": [2.0]})) is None
    assert problem(good(per_class_acc=None, task="regression", per_bin_mae=[1.0, None])) is None


def test_numeric_finished_at_no_longer_breaks_the_duplicate_check(tmp_path):
    """The crash of the issue: one record's ``finished_at`` a number, the others strings, and the same seed twice
    (the sort that keeps the newest run compared int with str)."""
    write(tmp_path, "a", good(seed=0, finished_at="2026-12-03T10:00:00"))
    write(tmp_path, "b", good(seed=0, top1=10.0, finished_at=5))
    agg = report(tmp_path, plots=False, console=Console(width=200, record=True))
    assert agg.iloc[0]["top1_mean"] == pytest.approx(70.0)
    assert "'finished_at'" in (tmp_path / "report.md").read_text()
