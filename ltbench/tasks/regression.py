"""Regression: continuous targets, one output, errors grouped by how many training samples share a label bin.

Imbalance in regression is measured over label bins (Yang et al. 2021, "Delving into Deep Imbalanced Regression"):
the dataset sets the bin edges (AgeDB: 1 year; STS-B: 0.1); a bin's training count makes it many-shot (> 100
samples), few-shot (< 20, which includes bins without any training sample) or medium-shot, and the metrics of a test
sample go to the group of its bin. Re-weighting, re-sampling and smoothing act on the same bins.

The model predicts ``(y - center) / scale`` (``task.center`` / ``task.scale``; null = the training mean / standard
deviation), so a loss sees targets of a convenient scale; metrics are computed on the original scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ltbench.config import GROUPS, GroupsConfig, TaskConfig
from ltbench.errors import ConfigError
from ltbench.metrics import class_groups
from ltbench.tasks import TASKS, Column, LabelStats, Task, counts_of


@dataclass
class RegressionConfig(TaskConfig):
    name: str = "regression"
    center: float | None = 0.0  # subtracted from targets for the loss; null: the training mean
    scale: float | None = 1.0  # targets are divided by it for the loss; null: the training standard deviation

    def __post_init__(self) -> None:
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"task.scale must be > 0 (or null), got {self.scale}")

    def check(self, root: Any) -> None:
        if getattr(root.dataset, "task", "classification") != "regression":
            raise ConfigError(f"task=regression needs a regression dataset; dataset={root.dataset.name} is not one")


def bin_edges(start: float, width: float, num_bins: int) -> torch.Tensor:
    """The edges of ``num_bins`` bins of ``width`` from ``start`` (float64)."""
    return torch.linspace(start, start + width * num_bins, num_bins + 1, dtype=torch.float64)


def binner(edges: torch.Tensor):
    """y -> its bin: the last edge <= y, values outside clamped into the first or last bin.

    Compared in float32, as ``np.histogram`` does for the float32 targets of the DIR reference (its edges are then
    float32 too): a target on an edge (an STS-B score of 0.3 or 1.4) belongs to the bin it starts. In float64,
    float32(1.4) < 1.4 and a quarter of STS-B's training scores would move to the neighbouring bin.
    """
    inner = edges[1:-1].float()

    def bin_of(y: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(y.float(), inner.to(y.device), right=True)

    return bin_of


@dataclass
class RegressionStats(LabelStats):
    """The label statistics of a regression run; ``prior_targets``: draws of the law that generated the training
    targets, where the dataset knows it (synthetic_dir: what Balanced MSE's synthetic GAI fits its prior to)."""

    prior_targets: torch.Tensor | None = None


@TASKS.register("regression", RegressionConfig)
class Regression(Task):
    """Regression: float targets, one output, MAE/MSE/GM/Pearson overall and per shot group of label bins."""

    name = "regression"
    train_metric = "train_mae"

    def label_stats(self, data: Any) -> LabelStats:
        edges = bin_edges(data.bin_start, data.bin_width, data.num_bins)
        bin_of = binner(edges)
        y = data.train_y.double()
        center = float(y.mean()) if self.cfg.center is None else float(self.cfg.center)
        scale = float(y.std()) if self.cfg.scale is None else float(self.cfg.scale)
        centers = ((edges[:-1] + edges[1:]) / 2).tolist()
        self.stats = RegressionStats(counts_of(bin_of(y), data.num_bins), bin_of, centers, center, scale, data.train_y,
                                     getattr(data, "prior_targets", None))  # fmt: skip
        return self.stats

    def out_dim(self, data: Any) -> int:
        return 1

    def predict(self, outputs: torch.Tensor, stats: LabelStats) -> torch.Tensor:
        return outputs.reshape(len(outputs), -1)[:, 0].double() * stats.scale + stats.center

    def step_sums(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = outputs.detach().reshape(len(outputs), -1)[:, 0].double() * self.stats.scale + self.stats.center
        return {"abs_err": (pred - target.double()).abs().sum()}

    def epoch_metric(self, sums: dict[str, float], seen: int) -> float:
        return sums.get("abs_err", float("nan")) / max(seen, 1)

    def evaluate(
        self, outputs: torch.Tensor, target: torch.Tensor, stats: LabelStats, groups: GroupsConfig
    ) -> dict[str, Any]:
        pred = self.predict(outputs, stats)
        return regression_summary(pred, target.double(), stats, groups)

    def columns(self) -> list[Column]:
        return [
            Column("mae", "MAE", False),
            *(Column(g, g, False) for g in GROUPS),
            Column("mse", "MSE", False),
            Column("gm", "GM", False),
            Column("pearson", "Pearson", True),
        ]

    def brief(self, summary: dict[str, Any]) -> dict[str, Any]:
        keys = ("mae", *GROUPS, "mse", "gm", "pearson", "group_sizes")
        return {k: summary[k] for k in keys if k in summary}


def geometric_mean(abs_err: torch.Tensor) -> float | None:
    """exp(mean(log |e|)) (scipy.stats.gmean, as the DIR reference): one exact-zero error makes it 0."""
    if len(abs_err) == 0:
        return None
    if bool((abs_err == 0).any()):
        return 0.0
    return float(torch.exp(torch.log(abs_err).mean()))


def pearson(pred: torch.Tensor, target: torch.Tensor) -> float | None:
    if len(pred) < 2:
        return None
    p, t = pred - pred.mean(), target - target.mean()
    denom = float(p.norm() * t.norm())
    return float((p * t).sum()) / denom if denom > 0 else None


def errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float | None]:
    e = (pred - target).abs()
    if len(e) == 0:
        return {"mae": None, "mse": None, "gm": None}
    return {"mae": float(e.mean()), "mse": float((e * e).mean()), "gm": geometric_mean(e)}


def regression_summary(
    pred: torch.Tensor, target: torch.Tensor, stats: LabelStats, groups: GroupsConfig
) -> dict[str, Any]:
    """Overall and per-group MAE / MSE / GM (per-sample means within a group, as the DIR reference), Pearson r,
    group sizes in bins and in test samples, and the MAE of every bin (None where the test set has none)."""
    bins = stats.bin_of(target)
    members = class_groups(groups, stats.counts)
    by_group = {}
    for g in GROUPS:
        mask = torch.isin(bins, torch.as_tensor(members[g], dtype=torch.long))
        by_group[g] = {**errors(pred[mask], target[mask]), "test_samples": int(mask.sum())}
    per_bin = []
    for b in range(stats.num_bins):
        mask = bins == b
        per_bin.append(float((pred[mask] - target[mask]).abs().mean()) if bool(mask.any()) else None)
    overall = errors(pred, target)
    return {
        **overall,
        "pearson": pearson(pred, target),
        **{g: by_group[g]["mae"] for g in GROUPS},
        "group_errors": by_group,
        "group_sizes": {g: len(members[g]) for g in GROUPS},
        "group_test_samples": {g: by_group[g]["test_samples"] for g in GROUPS},
        "groups": members,
        "per_bin_mae": per_bin,
        "rmse": math.sqrt(overall["mse"]) if overall["mse"] is not None else None,
    }
