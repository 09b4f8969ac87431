"""The report's figures say only what the runs show (issue 23, item 8): no error bar without a spread over seeds,
whole class indices on the confusion matrices."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from ltbench.plots import confusion_figure, group_bars_figure
from ltbench.records import CLASSIFICATION_COLUMNS


def _agg(stds: dict[str, float]) -> pd.DataFrame:
    rows = []
    for label, std in stds.items():
        row = {"label": label, "columns": CLASSIFICATION_COLUMNS}
        for c in CLASSIFICATION_COLUMNS:
            row[f"{c['key']}_mean"], row[f"{c['key']}_std"] = 60.0, std
        rows.append(row)
    return pd.DataFrame(rows)


def _error_bars(fig) -> list[float]:
    """The heights of every error bar drawn (upper minus lower end)."""
    out = []
    for c in fig.axes[0].containers:
        if isinstance(c, ErrorbarContainer):
            for seg in c.lines[2][0].get_segments():
                out.append(float(seg[1][1] - seg[0][1]))
    return out


def test_one_seed_draws_no_error_bars():
    assert _error_bars(group_bars_figure(_agg({"ce": math.nan, "focal": math.nan}), "t")) == []


def test_seeds_draw_their_spread_and_only_theirs():
    heights = _error_bars(group_bars_figure(_agg({"ce": 1.5, "focal": math.nan}), "t"))
    assert len(heights) == len(CLASSIFICATION_COLUMNS)  # one per column of the method with seeds
    assert heights == pytest.approx([3.0] * len(heights))  # mean ± std


@pytest.mark.parametrize("n", [10, 100])
def test_confusion_matrices_are_labelled_with_whole_class_indices(n):
    fig = confusion_figure([("ce (seed 0)", np.eye(n))], "t")
    fig.canvas.draw()
    ax = fig.axes[0]
    for ticks, labels in ((ax.get_xticks(), ax.get_xticklabels()), (ax.get_yticks(), ax.get_yticklabels())):
        shown = [t for t in ticks if -0.5 <= t <= n - 0.5]
        assert shown and all(float(t).is_integer() for t in shown)
        assert all("." not in lab.get_text() for lab in labels)
    if n == 10:
        assert list(ax.get_xticks()) == list(range(10))
