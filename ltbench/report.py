"""Comparison tables across methods and seeds: mean ± std, as markdown, CSV, a rich table and plots.

Runs are grouped by (dataset, imbalance ratio, method label, config hash): runs in one group differ only in their
seed (the config hash covers everything else), so their mean and standard deviation are meaningful. Runs that
did not complete are listed, never averaged in.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from ltbench.errors import LtbenchError
from ltbench.metrics import GROUPS
from ltbench.results import atomic_write_text, load_runs

METRIC_COLS = ("top1", *GROUPS)
AGG_COLS = (*METRIC_COLS, "stage1_top1")
KEYS = ["dataset", "imbalance_ratio", "label", "config_hash"]


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def runs_frame(runs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(completed runs, one row each; every other run with its status)."""
    done, other = [], []
    for r in runs:
        if r.get("status") == "completed":
            sizes = r.get("group_sizes", {})
            done.append(
                {
                    "dataset": r.get("dataset"),
                    "imbalance_ratio": float(r.get("imbalance_ratio", float("nan"))),
                    "label": r.get("label", r.get("strategy")),
                    "strategy": r.get("strategy"),
                    "config_hash": r.get("config_hash", ""),
                    "seed": r.get("seed"),
                    **{m: _num(r.get(m)) for m in METRIC_COLS},
                    "group_sizes": "/".join(str(sizes.get(g, "?")) for g in GROUPS),
                    # two-stage runs: the stage-1 backbone's own test accuracy, shown next to stage 2
                    "stage1_top1": _num((r.get("stage1") or {}).get("test", {}).get("top1")),
                    "per_class_acc": [_num(v) for v in r.get("per_class_acc", [])],
                    "train_class_counts": r.get("train_class_counts", []),
                    "run_dir": r["run_dir"],
                    "finished_at": r.get("finished_at") or "",
                }
            )
        else:
            other.append(
                {
                    "status": r.get("status", "?"),
                    "label": r.get("label", r.get("strategy", "?")),
                    "seed": r.get("seed"),
                    "error": r.get("error", ""),
                    "run_dir": r["run_dir"],
                }
            )
    df = pd.DataFrame(done)
    if len(df):
        # The same config and seed run twice: keep the latest run, list the others (never average a seed twice).
        df = df.sort_values("finished_at", kind="stable")
        dup = df.duplicated([*KEYS, "seed"], keep="last")
        for _, r in df[dup].iterrows():
            other.append(
                {
                    "status": "superseded (same seed, newer run kept)",
                    "label": r["label"],
                    "seed": r["seed"],
                    "error": "",
                    "run_dir": r["run_dir"],
                }
            )
        df = df[~dup].reset_index(drop=True)
    return df, pd.DataFrame(other)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per group: n_seeds, seeds, and mean/std (ddof=1; NaN for one seed) of each metric."""
    rows = []
    for key, g in df.groupby(KEYS, sort=False, dropna=False):
        row = dict(zip(KEYS, key))
        row["strategy"] = g["strategy"].iloc[0]
        row["n_seeds"] = len(g)
        row["seeds"] = " ".join(str(s) for s in sorted(g["seed"]))
        row["group_sizes"] = g["group_sizes"].iloc[0]
        for m in AGG_COLS:
            vals = g[m].dropna()
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(
        ["dataset", "imbalance_ratio", "top1_mean"], ascending=[True, True, False], ignore_index=True
    )


def fmt_pm(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _has_stage1(agg: pd.DataFrame) -> bool:
    return "stage1_top1_mean" in agg and bool(agg["stage1_top1_mean"].notna().any())


def _header(agg: pd.DataFrame) -> list[str]:
    return HEADER + (["stage-1 top-1"] if _has_stage1(agg) else [])


def _display_rows(agg: pd.DataFrame) -> list[list[str]]:
    dup = agg.duplicated(["dataset", "imbalance_ratio", "label"], keep=False)
    stage1 = _has_stage1(agg)
    rows = []
    for i, r in agg.iterrows():
        label = f"{r['label']} ({r['config_hash'][:8]})" if dup[i] else r["label"]
        row = [label, str(r["n_seeds"]), *(fmt_pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRIC_COLS)]
        row.append(r["group_sizes"])
        if stage1:
            row.append(fmt_pm(r["stage1_top1_mean"], r["stage1_top1_std"]))
        rows.append(row)
    return rows


HEADER = ["method", "seeds", "top-1", "many", "medium", "few", "classes (many/medium/few)"]


def to_markdown(agg: pd.DataFrame, failed: pd.DataFrame) -> str:
    lines = [
        "# ltbench report",
        "",
        "Test-set accuracy (%) at the final epoch, mean ± std over seeds (sample std; none for one seed).",
        "many/medium/few: mean per-class accuracy of each group; '–' marks an empty group.",
        "",
    ]
    if _has_stage1(agg):
        lines[-1:-1] = ["stage-1 top-1 (two-stage methods): test accuracy of the stage-1 backbone before stage 2."]
    for (ds, ratio), g in agg.groupby(["dataset", "imbalance_ratio"], sort=False):
        lines += [
            f"## {ds}, imbalance ratio {ratio:g}",
            "",
            "| " + " | ".join(_header(g)) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(_header(g)) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in _display_rows(g)]
        lines.append("")
    if len(failed):
        lines += [
            "## Runs not included",
            "",
            "| status | method | seed | run | error |",
            "|---|---|---|---|---|",
        ]
        for _, r in failed.iterrows():
            lines.append(f"| {r['status']} | {r['label']} | {r['seed']} | {r['run_dir']} | {r['error']} |")
        lines.append("")
    return "\n".join(lines)


def _plots(df: pd.DataFrame, agg: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (ds, ratio), g in df.groupby(["dataset", "imbalance_ratio"], sort=False):
        tag = f"{ds}_ir{ratio:g}"
        # Per-class accuracy against the class's training count, mean over seeds, one line per method.
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, gl in g.groupby("label", sort=False):
            acc = np.nanmean(np.array(gl["per_class_acc"].tolist(), dtype=float), axis=0)
            counts = np.asarray(gl["train_class_counts"].iloc[0])
            order = np.argsort(-counts, kind="stable")
            ax.plot(counts[order], acc[order], marker="o", ms=3, lw=1.2, label=f"{label} (n={len(gl)})")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("training images of the class (log scale)")
        ax.set_ylabel("test accuracy of the class (%)")
        ax.set_title(f"Per-class accuracy, {ds} ratio {ratio:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        p = out / f"per_class_{tag}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

        # Many / medium / few bars side by side, with the std over seeds as error bars.
        a = agg[(agg["dataset"] == ds) & (agg["imbalance_ratio"] == ratio)]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(a) + 2), 4.5))
        width = 0.8 / 4
        x = np.arange(len(a))
        for j, m in enumerate(METRIC_COLS):
            means = a[f"{m}_mean"].to_numpy(dtype=float)
            stds = np.nan_to_num(a[f"{m}_std"].to_numpy(dtype=float))
            ax.bar(
                x + (j - 1.5) * width,
                np.nan_to_num(means),
                width,
                yerr=stds,
                capsize=2,
                label="top-1" if m == "top1" else m,
            )
        ax.set_xticks(x, a["label"], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Head / medium / tail, {ds} ratio {ratio:g} (groups {a['group_sizes'].iloc[0]})")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = out / f"groups_{tag}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written


def report(root: Path, out: Path | None = None, plots: bool = True, console: Console | None = None) -> pd.DataFrame:
    """Aggregate every run under ``root``; write report.md, report.csv (and plots) into ``out`` (default root)."""
    console = console or Console()
    root = Path(root)
    if not root.is_dir():
        raise LtbenchError(f"no such directory: {root}")
    runs = load_runs(root)
    if not runs:
        raise LtbenchError(f"no runs under {root} (no metrics.json found); train some with `ltbench train`")
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    df, failed = runs_frame(runs)
    agg = aggregate(df) if len(df) else pd.DataFrame()

    csv_cols = [
        *KEYS,
        "strategy",
        "n_seeds",
        "seeds",
        "group_sizes",
        *(f"{m}_{s}" for m in AGG_COLS for s in ("mean", "std")),
    ]
    atomic_write_text(out / "report.csv", agg[csv_cols].to_csv(index=False) if len(agg) else ",".join(csv_cols) + "\n")
    atomic_write_text(
        out / "report.md",
        to_markdown(agg, failed)
        if len(agg)
        else to_markdown(pd.DataFrame(columns=[*KEYS, "n_seeds", "group_sizes"]), failed),
    )

    for (ds, ratio), g in agg.groupby(["dataset", "imbalance_ratio"], sort=False) if len(agg) else []:
        t = Table(title=f"{ds}, imbalance ratio {ratio:g}: test accuracy (%), mean ± std over seeds")
        for i, h in enumerate(_header(g)):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
        for row in _display_rows(g):
            t.add_row(*row)
        console.print(t)
    if len(failed):
        t = Table(title="runs not included", title_style="yellow")
        for h in ("status", "method", "seed", "run directory"):
            t.add_column(h)
        for _, r in failed.iterrows():
            t.add_row(str(r["status"]), str(r["label"]), str(r["seed"]), str(r["run_dir"]))
        console.print(t)
    written = [out / "report.md", out / "report.csv"]
    if plots and len(df):
        written += _plots(df, agg, out)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return agg
