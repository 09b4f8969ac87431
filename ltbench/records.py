"""Run records (``metrics.json``) read back and checked, for reports.

Every record is checked against the shape the report needs before it is used: a record that cannot be read, is not
a JSON object, or has a value of the wrong type (a string where a number belongs, a per-class list that does not
match the class counts, a "completed" record without metrics) comes back as a :class:`Record` with ``ok=False`` and
the reason, and the report lists it instead of failing. A "running" record whose run holds no live lock (its process
was killed) is marked stale.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltbench.config import GROUPS
from ltbench.rundir import is_live

METRICS = "metrics.json"
STATUSES = ("completed", "running", "interrupted", "failed")
# Records written before tasks declared their columns are classification records.
CLASSIFICATION_COLUMNS = [
    {"key": "top1", "header": "top-1", "higher_is_better": True},
    *({"key": g, "header": g, "higher_is_better": True} for g in GROUPS),
]


# The scalar fields of a completed record that the report reads, with their types (the lists, the columns and the
# sub-records are checked below): every field the report sorts, groups or prints by is one of these.
FIELDS: dict[str, tuple] = {
    "dataset": (str,),
    "seed": (int,),
    "task": (str,),
    "label": (str,),
    "strategy": (str,),
    "config_hash": (str,),
    "split_hash": (str,),
    "data_fingerprint": (str,),
    "imbalance_ratio": ("number",),
    "group_unit": (str,),
    "finished_at": (str,),
}
REQUIRED = ("dataset", "seed")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isinf(v))


def _check_type(d: dict, key: str, kinds: tuple, optional: bool = True) -> str | None:
    if key not in d or d[key] is None:
        return None if optional else f"'{key}' is missing"
    if kinds == ("number",):
        return None if _is_number(d[key]) else f"'{key}' is not a number ({d[key]!r})"
    return None if isinstance(d[key], kinds) and not isinstance(d[key], bool) else f"'{key}' has the wrong type"


def _check_columns(d: dict) -> str | None:
    cols = d.get("columns", CLASSIFICATION_COLUMNS)
    if not isinstance(cols, list) or not cols or not all(isinstance(c, dict) and "key" in c for c in cols):
        return "'columns' is not a list of metric columns"
    for c in cols:
        bad = _check_type(c, "key", (str,), optional=False) or _check_type(c, "header", (str,))
        if bad or not isinstance(c.get("higher_is_better", True), bool):
            return f"'columns' has a malformed column ({c!r})"
    for c in cols:
        v = d.get(c["key"])
        if v is not None and not _is_number(v):
            return f"metric '{c['key']}' is not a number ({v!r})"
    if all(d.get(c["key"]) is None for c in cols):
        return "a completed record without any metric"
    return None


def _check_lists(d: dict) -> str | None:
    for key in ("per_class_acc", "per_bin_mae"):
        per = d.get(key)
        if per is not None and (not isinstance(per, list) or not all(v is None or _is_number(v) for v in per)):
            return f"'{key}' is not a list of numbers"
    per, counts = d.get("per_class_acc"), d.get("train_class_counts")
    if counts is not None and (not isinstance(counts, list) or not all(_is_int(v) for v in counts)):
        return "'train_class_counts' is not a list of integers"
    if per is not None and counts is not None and len(per) != len(counts):
        return f"'per_class_acc' has {len(per)} entries for {len(counts)} classes"
    sizes = d.get("group_sizes")
    if sizes is not None and (not isinstance(sizes, dict) or not all(_is_int(v) for v in sizes.values())):
        return "'group_sizes' is not a mapping of group to size"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_nested(d: dict) -> str | None:
    """The optional sub-records: stage 1's own test metrics, the pseudo-label quality of a semi-supervised run."""
    stage1 = d.get("stage1") or {}
    if not isinstance(stage1, dict) or not isinstance(stage1.get("test") or {}, dict):
        return "'stage1' has the wrong type"
    if _check_type(stage1.get("test") or {}, "top1", ("number",)):
        return "'stage1' test top1 is not a number"
    if not isinstance(d.get("base") or {}, dict):
        return "'base' has the wrong type"
    q = d.get("pseudo_labels")
    if q is not None and not (
        isinstance(q, dict) and all(isinstance(q.get(k), list) for k in ("precision", "recall"))
    ):
        return "'pseudo_labels' is not a mapping of precision and recall lists"
    return None


def problem(d: Any) -> str | None:
    """Why a record cannot be used (None when it can)."""
    if not isinstance(d, dict):
        return f"not a JSON object ({type(d).__name__})"
    status = d.get("status")
    if status not in STATUSES:
        return f"unknown status {status!r}"
    if status != "completed":
        return None
    checks = [
        *(_check_type(d, key, kinds, optional=key not in REQUIRED) for key, kinds in FIELDS.items()),
        None if d.get("label") or d.get("strategy") else "no method name ('label'/'strategy')",
        _check_columns(d),
        _check_lists(d),
        _check_nested(d),
    ]
    return next((c for c in checks if c), None)


@dataclass
class Record:
    run_dir: str
    data: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why it cannot be used

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def status(self) -> str:
        return str(self.data.get("status", "?"))

    def listing(self) -> dict[str, Any]:
        """A line of the 'runs not included' table."""
        d = self.data
        status = "invalid record" if not self.ok else self.status
        error = self.reason or d.get("error", "")
        if self.ok and self.status == "running" and not is_live(Path(self.run_dir)):
            status = "running (stale: no live process)"
            error = f"the process that wrote it is gone; continue with: ltbench train resume={self.run_dir}"
        return {"status": status, "label": d.get("label", d.get("strategy", "?")), "seed": d.get("seed"),
                "error": error, "run_dir": self.run_dir}  # fmt: skip

    def row(self) -> dict[str, Any]:
        """One completed run as a row of the report's frame."""
        d = self.data
        cols = d.get("columns") or CLASSIFICATION_COLUMNS
        sizes = d.get("group_sizes") or {}
        ratio = d.get("imbalance_ratio")
        return {
            "task": d.get("task", "classification"),
            "dataset": d["dataset"],
            "imbalance_ratio": float("nan") if ratio is None else float(ratio),
            "label": d.get("label") or d.get("strategy"),
            "strategy": d.get("strategy") or d.get("label"),
            "config_hash": d.get("config_hash") or "",
            "split_hash": d.get("split_hash") or "",
            "data_fingerprint": d.get("data_fingerprint") or "",
            "seed": d["seed"],
            "columns": cols,
            **{c["key"]: _num(d.get(c["key"])) for c in cols},
            "group_sizes": "/".join(str(sizes.get(g, "?")) for g in GROUPS),
            "group_unit": d.get("group_unit", "classes"),
            # two-stage runs: the stage-1 network's own test accuracy, shown next to stage 2
            "stage1_top1": _num(((d.get("stage1") or {}).get("test") or {}).get("top1")),
            "per_class_acc": [_num(v) for v in d.get("per_class_acc") or []],
            "per_bin_mae": [_num(v) for v in d.get("per_bin_mae") or []],
            "train_class_counts": d.get("train_class_counts") or [],
            "run_dir": self.run_dir,
            "finished_at": d.get("finished_at") or "",
            "pseudo_labels": _pseudo(d),
            **_cost_row(d),
        }


def _cost_row(d: dict) -> dict[str, float]:
    """A run's compute cost (metrics.json's ``cost``; NaN for records written before it existed)."""
    cost = d.get("cost") if isinstance(d.get("cost"), dict) else {}
    return {k: _num(cost.get(k)) for k in ("image_steps_total", "train_seconds", "gpu_hours")}


def _pseudo(d: dict) -> dict | None:
    """The pseudo-label quality of a semi-supervised run (per-class precision / recall), if it has one."""
    q = d.get("pseudo_labels") or ((d.get("base") or {}).get("pseudo_label_quality"))
    if not isinstance(q, dict) or not isinstance(q.get("precision"), list) or not isinstance(q.get("recall"), list):
        return None
    return {k: [_num(v) for v in q[k]] for k in ("precision", "recall")}


def _num(v: Any) -> float:
    return float(v) if _is_number(v) else float("nan")


def load_records(root: Path) -> list[Record]:
    """Every metrics.json under root (sorted), read and checked."""
    out = []
    for p in sorted(Path(root).rglob(METRICS)):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            out.append(Record(str(p.parent), {}, f"unreadable: {type(e).__name__}: {e}"))
            continue
        out.append(Record(str(p.parent), data if isinstance(data, dict) else {}, problem(data)))
    return out
