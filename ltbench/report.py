"""Comparison tables across methods and seeds: mean ± std, as markdown, CSV, a rich table and plots.

Runs are grouped by (task, dataset, imbalance ratio, method label, config hash, split hash, data fingerprint): runs
in one group differ only in their seed, so their mean and standard deviation are meaningful. The metric columns
come from the records (each task declares its own, and whether higher is better). Records that are not completed
runs are listed with their status, never averaged in; a record that cannot be read or has the wrong shape is listed
with the reason, and the report goes on with the others.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ltbench.config import GROUPS
from ltbench.errors import LtbenchError
from ltbench.records import Record, load_records
from ltbench.rundir import atomic_write_text
from ltbench.tables import fmt

log = logging.getLogger("ltbench")

KEYS = ["dataset", "imbalance_ratio", "label", "config_hash"]
DATA_KEYS = ["split_hash", "data_fingerprint"]
SECTION = ["task", "dataset", "imbalance_ratio"]


def runs_frame(records: list[Record]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(completed runs, one row each; every other record with its status and reason)."""
    done, other = [], []
    for r in records:
        if r.ok and r.status == "completed":
            done.append(r.row())
        else:
            other.append(r.listing())
    df = pd.DataFrame(done)
    if len(df):
        # The same config and seed run twice: keep the latest run, list the others (never average a seed twice).
        df = df.sort_values("finished_at", kind="stable")
        dup = df.duplicated([*KEYS, *DATA_KEYS, "seed"], keep="last")
        for _, r in df[dup].iterrows():
            status = "superseded (same seed, newer run kept)"
            other.append(
                {"status": status, "label": r["label"], "seed": r["seed"], "error": "", "run_dir": r["run_dir"]}
            )
        df = df[~dup].reset_index(drop=True)
    return df, pd.DataFrame(other, columns=["status", "label", "seed", "error", "run_dir"])


def metric_columns(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The metric columns of a section of the table, from its records (the first record that declares them)."""
    return list(df["columns"].iloc[0])


COST = ("image_steps_total", "train_seconds", "gpu_hours")


def _cost_line(g: pd.DataFrame) -> str:
    """The compute behind a section's rows: image-steps, training hours and GPU-hours over all their runs."""
    cells = []
    for _, r in g.iterrows():
        if not all(m in r and np.isfinite(r[m]) for m in COST):
            continue
        cells.append(f"{r['label']}: {r['image_steps_total'] / 1e6:.3g} M image-steps, "
                     f"{r['train_seconds'] / 3600:.3g} h training, {r['gpu_hours']:.3g} GPU-h")  # fmt: skip
    return ("Compute (all seeds, every stage): " + "; ".join(cells) + ".") if cells else ""


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per group: n_seeds, seeds, and mean/std (ddof=1; NaN for one seed) of each metric."""
    rows = []
    for key, g in df.groupby([*SECTION[:1], *KEYS, *DATA_KEYS], sort=False, dropna=False):
        row = dict(zip(["task", *KEYS, *DATA_KEYS], key))
        row.update(
            strategy=g["strategy"].iloc[0],
            n_seeds=len(g),
            seeds=" ".join(str(s) for s in sorted(g["seed"])),
            group_sizes=g["group_sizes"].iloc[0],
            group_unit=g["group_unit"].iloc[0],
            columns=g["columns"].iloc[0],
        )
        for m in [c["key"] for c in row["columns"]] + ["stage1_top1"]:
            vals = pd.to_numeric(g[m], errors="coerce").dropna() if m in g else pd.Series(dtype=float)
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        for m in COST:  # summed over the group's runs: what the row cost in all
            vals = pd.to_numeric(g[m], errors="coerce") if m in g else pd.Series(dtype=float)
            row[m] = float(vals.sum()) if len(vals) and vals.notna().all() else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    first = out["columns"].map(lambda c: c[0]["key"])
    sign = out["columns"].map(lambda c: -1.0 if c[0].get("higher_is_better", True) else 1.0)
    out["_order"] = [s * r.get(f"{k}_mean", np.nan) for s, k, (_, r) in zip(sign, first, out.iterrows())]
    out = out.sort_values([*SECTION, "_order"], ignore_index=True, na_position="last")
    return out.drop(columns="_order")


def data_warnings(agg: pd.DataFrame) -> list[str]:
    """One line per method whose runs were made on different data (a split or pixel fingerprint differs)."""
    out = []
    for (ds, ratio, label, _), g in agg.groupby(KEYS, sort=False, dropna=False):
        if len(g) > 1:
            prints = ", ".join(f"{s}/{f}" for s, f in zip(g["split_hash"], g["data_fingerprint"]))
            out.append(
                f"{label} on {ds} (ratio {ratio:g}): runs were made on {len(g)} different data splits or images "
                f"(split hash/data fingerprint: {prints}); they are reported as separate rows, never averaged"
            )
    return out


def _has_stage1(agg: pd.DataFrame) -> bool:
    return "stage1_top1_mean" in agg and bool(agg["stage1_top1_mean"].notna().any())


def _header(agg: pd.DataFrame) -> list[str]:
    cols = metric_columns(agg)
    unit = agg["group_unit"].iloc[0]
    head = ["method", "seeds", *(c["header"] for c in cols), f"{unit} (many/medium/few)"]
    return head + (["stage-1 top-1"] if _has_stage1(agg) else [])


def _display_rows(agg: pd.DataFrame) -> list[list[str]]:
    """Table rows; a label that two rows share (different configs or data) gets its config hash and data."""
    dup = agg.duplicated(["dataset", "imbalance_ratio", "label"], keep=False)
    data_dup = agg.duplicated(["dataset", "imbalance_ratio", "label", "config_hash"], keep=False)
    rows = []
    for i, r in agg.iterrows():
        label = str(r["label"])
        if dup[i]:
            label += f" ({r['config_hash'][:8]}" + (f", data {str(r['data_fingerprint'])[:8]})" if data_dup[i] else ")")
        row = [label, str(r["n_seeds"]), *(fmt(r[f"{c['key']}_mean"], r[f"{c['key']}_std"]) for c in r["columns"])]
        row.append(r["group_sizes"])
        if _has_stage1(agg):
            row.append(fmt(r["stage1_top1_mean"], r["stage1_top1_std"]))
        rows.append(row)
    return rows


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _section_title(task: str, ds: str, ratio: float) -> str:
    ratio_text = "natural imbalance" if ratio is None or math.isnan(ratio) else f"imbalance ratio {ratio:g}"
    return f"{ds}, {ratio_text}" + ("" if task == "classification" else f" ({task})")


def _direction_note(cols: list[dict[str, Any]]) -> str:
    lower = [c["header"] for c in cols if not c.get("higher_is_better", True)]
    return f"Lower is better: {', '.join(lower)}." if lower else "Higher is better."


def to_markdown(agg: pd.DataFrame, failed: pd.DataFrame, warnings: list[str]) -> str:
    lines = [
        "# ltbench report",
        "",
        "Test-set metrics at the final epoch, mean ± std over seeds (sample std; none for one seed).",
        "many/medium/few: the mean over the group's classes (or label bins); '–' marks an empty group.",
        "",
    ]
    if len(agg) and _has_stage1(agg):
        lines[-1:-1] = ["stage-1 top-1 (two-stage methods): test accuracy of the stage-1 backbone before stage 2."]
    for w in warnings:
        lines += [f"> warning: {_md_escape(w)}", ""]
    for (task, ds, ratio), g in agg.groupby(SECTION, sort=False, dropna=False) if len(agg) else []:
        header = _header(g)
        lines += [f"## {_section_title(task, ds, ratio)}", "", _direction_note(metric_columns(g)), ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in _display_rows(g)]
        lines.append("")
        if cost := _cost_line(g):
            lines += [_md_escape(cost), ""]
    if len(failed):
        lines += ["## Runs not included", "", "| status | method | seed | run | reason |", "|---|---|---|---|---|"]
        for _, r in failed.iterrows():
            cells = [r["status"], r["label"], r["seed"], r["run_dir"], r["error"]]
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def to_csv(agg: pd.DataFrame) -> str:
    """One row per group; means and stds rounded as the tables show them (2 decimals)."""
    base = [*KEYS, "task", *DATA_KEYS, "strategy", "n_seeds", "seeds", "group_sizes"]
    if not len(agg):
        return ",".join(base) + "\n"
    keys: list[str] = []
    for cols in agg["columns"]:
        keys += [c["key"] for c in cols if c["key"] not in keys]
    if _has_stage1(agg):
        keys.append("stage1_top1")
    metric_cols = [f"{k}_{s}" for k in keys for s in ("mean", "std")]
    out = agg.reindex(columns=base + metric_cols + list(COST))
    out[metric_cols] = out[metric_cols].astype(float).round(2)
    out[list(COST)] = out[list(COST)].astype(float).round(4)
    return out.to_csv(index=False)


def print_tables(agg: pd.DataFrame, failed: pd.DataFrame, warnings: list[str], console: Console) -> None:
    for w in warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    for (task, ds, ratio), g in agg.groupby(SECTION, sort=False, dropna=False) if len(agg) else []:
        cols = metric_columns(g)
        title = f"{_section_title(task, ds, ratio)}: mean ± std over seeds. {_direction_note(cols)}"
        header, rows = _header(g), _display_rows(g)
        # Secondary metrics (after the primary one and the groups) give way, rightmost first, when the table would
        # not fit the terminal: the method label and the group columns are never squeezed out. report.md has all.
        optional = [2 + i for i, c in enumerate(cols) if i > 0 and c["key"] not in GROUPS]
        shown = list(range(len(header)))
        while optional and _table_width(header, rows, shown, console) > console.width:
            shown.remove(optional.pop())
        hidden = ", ".join(h for i, h in enumerate(header) if i not in shown)
        label_width = min(24, console.width // 3)
        if _table_width(header, rows, shown, console) > console.width:  # the std under the mean, headers wrap
            rows = [[c.replace(" ± ", "\n± ") for c in r] for r in rows]
            header = [h.replace(" (", "\n(").replace("/medium/", "/\nmedium/") for h in header]
            label_width = max(8, label_width + console.width - _table_width(header, rows, shown, console))
        console.print(_terminal_table(title, header, rows, shown, label_width))
        if hidden:
            console.print(f"(not shown at this terminal width: {escape(hidden)}; every column is in report.md)")
    if len(failed):
        t = Table(title="runs not included", title_style="yellow")
        for h in ("status", "method", "seed", "run directory", "reason"):
            t.add_column(h, overflow="fold")
        for _, r in failed.iterrows():
            t.add_row(*(escape(str(r[k])) for k in ("status", "label", "seed", "run_dir", "error")))
        console.print(t)


def _table_width(header: list[str], rows: list[list[str]], shown: list[int], console: Console) -> int:
    """Columns the table needs with every number whole and the method column at its minimum, borders included."""
    widths = [min(24, console.width // 3) if i == 0 else max(cell_len(r[i]) for r in [header, *rows]) for i in shown]
    return sum(widths) + 3 * len(shown) + 1  # one space each side of a cell, one border between and at each end


def _terminal_table(title: str, header: list[str], rows: list[list[str]], shown: list[int], label_width: int) -> Table:
    t = Table(title=escape(title))
    for i in shown:  # the method column wraps (never truncated); numbers stay whole
        if i == 0:
            t.add_column(escape(header[i]), justify="left", overflow="fold", min_width=label_width)
        else:
            t.add_column(escape(header[i]), justify="right", no_wrap=True)
    for row in rows:
        t.add_row(*(escape(row[i]) for i in shown))
    return t


def report(root: Path, out: Path | None = None, plots: bool = True, console: Console | None = None) -> pd.DataFrame:
    """Aggregate every run under ``root``; write report.md, report.csv (and plots) into ``out`` (default root)."""
    console = console or Console()
    root = Path(root)
    if not root.is_dir():
        raise LtbenchError(f"no such directory: {root}")
    records = load_records(root)
    if not records:
        raise LtbenchError(f"no runs under {root} (no metrics.json found); train some with `ltbench train`")
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    df, failed = runs_frame(records)
    agg = aggregate(df) if len(df) else pd.DataFrame()
    warnings = data_warnings(agg) if len(agg) else []
    atomic_write_text(out / "report.csv", to_csv(agg))
    atomic_write_text(out / "report.md", to_markdown(agg, failed, warnings))
    print_tables(agg, failed, warnings, console)
    written = [out / "report.md", out / "report.csv"]
    if plots and len(df):
        from ltbench.plots import write_plots

        written += write_plots(df, agg, out)
    console.print("wrote " + ", ".join(str(p) for p in written), soft_wrap=True)
    return agg
