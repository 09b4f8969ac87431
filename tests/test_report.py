"""The report never crashes on a bad record, never averages runs made on different data, and shows every label."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from ltbench.records import problem
from ltbench.report import report


def good(**kw):
    rec = {
        "status": "completed",
        "dataset": "cifar10lt",
        "imbalance_ratio": 100,
        "strategy": "ce",
        "label": "ce",
        "config_hash": "h1",
        "split_hash": "s1",
        "data_fingerprint": "f1",
        "seed": 0,
        "top1": 70.0,
        "many": 90.0,
        "medium": 70.0,
        "few": 50.0,
        "group_sizes": {"many": 3, "medium": 4, "few": 3},
        "per_class_acc": [50.0] * 10,
        "train_class_counts": list(range(10, 0, -1)),
    }
    rec.update(kw)
    return rec


def write(root, name, rec):
    (root / name).mkdir(parents=True)
    text = rec if isinstance(rec, str) else json.dumps(rec)
    (root / name / "metrics.json").write_text(text)


BAD = {
    "list": [1, 2, 3],
    "string_metric": good(top1="70.0"),
    "short_per_class": good(per_class_acc=[50.0] * 3),
    "status_only": {"status": "completed"},
    "no_json": "{not json",
    "bool_seed": good(seed=True),
    "unknown_status": good(status="weird"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_malformed_record_is_listed_with_its_reason_and_the_rest_is_reported(tmp_path, name):
    write(tmp_path, "ok0", good(seed=0))
    write(tmp_path, "ok1", good(seed=1, top1=72.0))
    write(tmp_path, "bad", BAD[name])
    agg = report(tmp_path, plots=False, console=Console(width=200, record=True))
    assert len(agg) == 1 and agg.iloc[0]["n_seeds"] == 2 and agg.iloc[0]["top1_mean"] == pytest.approx(71.0)
    md = (tmp_path / "report.md").read_text()
    assert "invalid record" in md and str(tmp_path / "bad") in md


def test_problem_names_the_field():
    assert "top1" in problem(good(top1="x"))
    assert "per_class_acc" in problem(good(per_class_acc=[1.0]))
    assert "dataset" in problem({"status": "completed", "seed": 0, "label": "x", "top1": 1.0})
    assert problem(good()) is None
    assert problem({"status": "failed", "error": "boom"}) is None


def test_runs_on_different_data_are_never_averaged(tmp_path):
    write(tmp_path, "a", good(seed=0, top1=70.0))
    write(tmp_path, "b", good(seed=1, top1=72.0))
    write(tmp_path, "c", good(seed=0, top1=40.0, data_fingerprint="other", split_hash="s2"))
    agg = report(tmp_path, plots=False, console=Console(width=200, record=True))
    assert sorted(agg["n_seeds"]) == [1, 2]
    md = (tmp_path / "report.md").read_text()
    assert "warning:" in md and "different data" in md and "ce (h1, data other" in md


def test_terminal_table_shows_whole_labels_with_brackets(tmp_path):
    label = "class_balanced_sampling [schedule.epochs=2, loss=focal, loss.gamma=2]"
    write(tmp_path, "a", good(label=label, strategy="class_balanced_sampling", top1=30.050000548362732))
    console = Console(width=80, record=True)
    report(tmp_path, plots=False, console=console)
    text = console.export_text()
    first_column = "".join(line.split("│")[1] for line in text.splitlines() if line.startswith("│"))
    assert label.replace(" ", "") in first_column.replace(" ", "")  # wrapped, never cut, brackets kept
    assert "…" not in text
    csv = (tmp_path / "report.csv").read_text()
    assert "30.05" in csv and "30.050000548" not in csv  # rounded as the tables show


def test_regression_style_columns_come_from_the_record(tmp_path):
    cols = [
        {"key": "mae", "header": "MAE", "higher_is_better": False},
        {"key": "many", "header": "many", "higher_is_better": False},
    ]
    for i, (label, mae) in enumerate([("a", 9.0), ("b", 7.0)]):
        rec = good(label=label, strategy=label, task="regression", columns=cols, mae=mae, seed=0, group_unit="bins")
        rec.pop("top1")
        write(tmp_path, f"r{i}", rec)
    agg = report(tmp_path, plots=False, console=Console(width=200, record=True))
    assert list(agg["label"]) == ["b", "a"]  # lower is better: the best first
    md = (tmp_path / "report.md").read_text()
    assert "Lower is better: MAE, many" in md and "| MAE |" in md and "bins (many/medium/few)" in md


def test_a_wide_regression_table_fits_an_80_column_terminal_without_losing_labels_or_groups(tmp_path):
    """Eight columns of large numbers (diamond prices) do not fit 80 columns: the secondary metrics give way (and the
    table says which), the std goes under the mean, and the method label and the many/medium/few columns stay whole;
    report.md keeps every column."""
    keys = [("mae", "MAE"), ("many", "many"), ("medium", "medium"), ("few", "few"), ("mse", "MSE"), ("gm", "GM")]
    cols = [{"key": k, "header": h, "higher_is_better": False} for k, h in keys] + [
        {"key": "pearson", "header": "Pearson", "higher_is_better": True}
    ]
    for seed in (0, 1):
        rec = good(label="lds_fds", strategy="lds_fds", task="regression", columns=cols, seed=seed, group_unit="bins")
        rec.pop("top1")
        rec.update(mae=769.08 + seed, many=377.27, medium=812.44, few=1548.06 + seed, mse=1423016.78 + seed, gm=375.9)
        rec.update(pearson=0.98, group_sizes={"many": 19, "medium": 10, "few": 9})
        write(tmp_path, f"r{seed}", rec)
    console = Console(width=80, record=True)
    report(tmp_path, plots=False, console=console)
    text = console.export_text()
    table = [line for line in text.splitlines() if line[:1] in set("┏┃┡│└")]
    assert table and max(len(line) for line in table) <= 80 and "…" not in text
    assert "lds_fds" in text and "1548.56" in text and "19/10/9" in text  # label, few-shot MAE, group sizes
    assert "not shown at this terminal width: MSE, GM, Pearson" in text and "1423017" not in text
    assert "| MSE | GM | Pearson |" in (tmp_path / "report.md").read_text()
    wide = Console(width=250, record=True)
    report(tmp_path, plots=False, console=wide)
    wide_text = wide.export_text()
    assert "not shown" not in wide_text and "1423017.28 ± 0.71" in wide_text
