"""Numbers as people read them: one formatting rule for every table ltbench prints or writes."""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape
from rich.table import Table

EMPTY = "–"  # an empty group, a metric that does not exist: never 0


def fmt(mean: Any, std: Any = None, digits: int = 2) -> str:
    """``71.00``, ``71.00 ± 1.41`` (std over seeds), or ``–`` for a missing value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return EMPTY
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(record: dict[str, Any], title: str) -> Table:
    """One run's headline metrics with its group sizes (the columns the task declares)."""
    cols = record.get("columns") or [{"key": k, "header": k} for k in ("top1", "many", "medium", "few")]
    t = Table(title=escape(title))
    for c in cols:
        t.add_column(escape(c["header"]), justify="right")
    t.add_row(*(fmt(record.get(c["key"])) for c in cols))
    sizes = record.get("group_sizes") or {}
    if sizes:
        t.add_row(*(str(sizes.get(c["key"], "")) for c in cols), style="dim")
    return t
