"""The report's figures: per-class (or per-bin) results against training counts, and head/medium/tail bars."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ltbench.config import GROUPS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tag(ds: str, ratio: float) -> str:
    return f"{ds}_ir{'natural' if math.isnan(ratio) else f'{ratio:g}'}"


def per_class_plot(g: pd.DataFrame, path: Path, title: str, key: str = "per_class_acc") -> bool:
    """Per-class accuracy (or, for regression, the MAE of each label bin) against the class's training count, mean
    over seeds, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for label, gl in g.groupby("label", sort=False):
        lists = [v for v in gl[key] if len(v)]
        counts = np.asarray(gl["train_class_counts"].iloc[0])
        if not lists or len(counts) != len(lists[0]):
            continue
        acc = np.nanmean(np.array(lists, dtype=float), axis=0)
        order = np.argsort(-counts, kind="stable")
        ax.plot(np.maximum(counts[order], 1), acc[order], marker="o", ms=3, lw=1.2, label=f"{label} (n={len(lists)})")
        drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("training samples of the " + ("class" if key == "per_class_acc" else "label bin") + " (log)")
        ax.set_ylabel("test accuracy of the class (%)" if key == "per_class_acc" else "test MAE of the bin")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def group_bars_figure(a: pd.DataFrame, title: str):
    """The headline metric and the many / medium / few groups side by side, std over seeds as error bars. A bar
    without a std (one seed) has no error bar at all: never a zero-height one that reads as "no spread"."""
    plt = _plt()
    cols = [c for c in a["columns"].iloc[0] if c["key"] in (a["columns"].iloc[0][0]["key"], *GROUPS)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(a) + 2), 4.5))
    width = 0.8 / len(cols)
    x = np.arange(len(a))
    for j, c in enumerate(cols):
        means = a[f"{c['key']}_mean"].to_numpy(dtype=float)
        stds = a[f"{c['key']}_std"].to_numpy(dtype=float)
        offset = (j - (len(cols) - 1) / 2) * width
        ax.bar(x + offset, np.nan_to_num(means), width, label=c["header"])
        has = np.isfinite(stds) & np.isfinite(means)
        if has.any():
            ax.errorbar((x + offset)[has], means[has], yerr=stds[has], fmt="none", ecolor="black", capsize=2, lw=1)
    ax.set_xticks(x, a["label"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(cols[0]["header"])
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def group_bars(a: pd.DataFrame, path: Path, title: str) -> None:
    fig = group_bars_figure(a, title)
    fig.savefig(path, dpi=120)
    _plt().close(fig)


def _integer_ticks(ax, n: int, *axes: str) -> None:
    """Class indices as tick labels: every class up to 20, else whole numbers only (never 2.5)."""
    from matplotlib.ticker import MaxNLocator

    for name in axes:
        axis = getattr(ax, f"{name}axis")
        if n <= 20:
            axis.set_ticks(range(n))
        else:
            axis.set_major_locator(MaxNLocator(integer=True))


def read_confusion(run_dir: str) -> np.ndarray | None:
    path = Path(run_dir) / "confusion.csv"
    if not path.exists():
        return None
    try:
        return pd.read_csv(path).drop(columns="true").to_numpy(dtype=float)
    except (OSError, ValueError, KeyError):
        return None


def confusion_plot(g: pd.DataFrame, path: Path, title: str) -> bool:
    """The row-normalised test confusion matrix of one run per method (its lowest seed)."""
    runs = []
    for label, gl in g.groupby("label", sort=False):
        first = gl.sort_values("seed").iloc[0]
        cm = read_confusion(first["run_dir"])
        if cm is not None and cm.size:
            runs.append((f"{label} (seed {first['seed']})", cm / np.maximum(cm.sum(1, keepdims=True), 1)))
    if not runs:
        return False
    fig = confusion_figure(runs, title)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return True


def confusion_figure(runs: list[tuple[str, np.ndarray]], title: str):
    """One panel per (label, row-normalised matrix); the axes are labelled with class indices."""
    plt = _plt()
    cols = min(len(runs), 4)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows + 0.5), squeeze=False)
    for ax, (label, cm) in zip(axes.flat, runs):
        im = ax.imshow(cm, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("predicted class (frequent -> rare)", fontsize=7)
        ax.set_ylabel("true class", fontsize=7)
        _integer_ticks(ax, len(cm), "x", "y")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="share of the true class")
    fig.suptitle(title)
    return fig


def pseudo_label_plot(g: pd.DataFrame, path: Path, title: str) -> bool:
    """Precision and recall of the pseudo-labels per class, one run per semi-supervised method (its lowest seed)."""
    runs = []
    for label, gl in g.groupby("label", sort=False):
        first = gl.sort_values("seed").iloc[0]
        if isinstance(first.get("pseudo_labels"), dict):
            runs.append((label, first["pseudo_labels"]))
    if not runs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key in zip(axes, ("precision", "recall")):
        width = 0.8 / len(runs)
        for j, (label, q) in enumerate(runs):
            x = np.arange(len(q[key]))
            ax.bar(x + (j - (len(runs) - 1) / 2) * width, np.nan_to_num(q[key]), width, label=label)
        _integer_ticks(ax, max(len(q[key]) for _, q in runs), "x")
        ax.set_title(f"pseudo-label {key} per class (%)")
        ax.set_xlabel("class (frequent -> rare)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(df: pd.DataFrame, agg: pd.DataFrame, out: Path) -> list[Path]:
    written = []
    for (task, ds, ratio), g in df.groupby(["task", "dataset", "imbalance_ratio"], sort=False, dropna=False):
        tag = _tag(ds, ratio)
        ratio_text = "natural" if math.isnan(ratio) else f"ratio {ratio:g}"
        p = out / f"per_class_{tag}.png"
        if task == "classification" and per_class_plot(g, p, f"Per-class accuracy, {ds} {ratio_text}"):
            written.append(p)
        p = out / f"per_bin_{tag}.png"
        if task == "regression" and per_class_plot(g, p, f"MAE per label bin, {ds}", key="per_bin_mae"):
            written.append(p)
        p = out / f"confusion_{tag}.png"
        if task == "classification" and confusion_plot(g, p, f"Test confusion matrices, {ds} {ratio_text}"):
            written.append(p)
        p = out / f"pseudo_labels_{tag}.png"
        if "pseudo_labels" in g and pseudo_label_plot(g, p, f"Quality of the pseudo-labels, {ds} {ratio_text}"):
            written.append(p)
        a = agg[(agg["task"] == task) & (agg["dataset"] == ds)]
        a = a[a["imbalance_ratio"].isna()] if math.isnan(ratio) else a[a["imbalance_ratio"] == ratio]
        p = out / f"groups_{tag}.png"
        group_bars(a, p, f"Head / medium / tail, {ds} {ratio_text} (groups {a['group_sizes'].iloc[0]})")
        written.append(p)
    return written
