"""Tasks: what is predicted, and everything that depends on it.

A :class:`Task` owns the target type, the label statistics methods use (:class:`LabelStats`: counts per label bin,
classes for classification, value bins for regression), the size of the model's output, the running sums a training
step keeps on the device, the evaluation (metrics, groups) and the report's columns. Re-weighting, re-sampling and
smoothing only ever ask the task's :class:`LabelStats`, so they never need to know which task they are in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ltbench.config import GroupsConfig, TaskConfig
from ltbench.registry import Registry

TASKS: Registry[type[Task]] = Registry("task", TaskConfig)


@dataclass
class LabelStats:
    """Training-set counts per label bin and the map from targets to bins.

    Classification: bin = class. Regression: bins of the dataset's width (values outside are clamped into the first
    or last bin), ``centers`` the bin centres, and the model predicts ``(y - center) / scale``.
    """

    counts: list[int]
    bin_of: Callable[[torch.Tensor], torch.Tensor]
    centers: list[float] | None = None
    center: float = 0.0
    scale: float = 1.0
    targets: torch.Tensor | None = None  # regression: the training targets (what a density model is fitted to)

    @property
    def num_bins(self) -> int:
        return len(self.counts)


@dataclass(frozen=True)
class Column:
    """A metric column of the report: the record key, its header, and which direction is better."""

    key: str
    header: str
    higher_is_better: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "header": self.header, "higher_is_better": self.higher_is_better}


class Task:
    """Base class; see :mod:`ltbench.tasks.classification` for the reference implementation."""

    name = "task"
    train_metric = "train_metric"  # the epoch-log column of the training metric

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    def label_stats(self, data: Any) -> LabelStats:
        raise NotImplementedError

    def out_dim(self, data: Any) -> int:
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor, stats: LabelStats) -> torch.Tensor:
        """Predictions (class indices, or values on the original scale) from model outputs."""
        raise NotImplementedError

    def step_sums(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch sums kept on the device during training (no host sync per step)."""
        raise NotImplementedError

    def epoch_metric(self, sums: dict[str, float], seen: int) -> float:
        """The training metric of an epoch from its summed step values."""
        raise NotImplementedError

    def evaluate(
        self, outputs: torch.Tensor, target: torch.Tensor, stats: LabelStats, groups: GroupsConfig
    ) -> dict[str, Any]:
        """Metrics of one evaluation (outputs on the CPU): the headline metrics, groups with their sizes, per bin."""
        raise NotImplementedError

    def columns(self) -> list[Column]:
        raise NotImplementedError

    def artifacts(self, outputs: torch.Tensor, target: torch.Tensor, stats: LabelStats) -> dict[str, list[dict]]:
        """Files (name -> CSV rows) written beside the record after the final test evaluation."""
        return {}

    def brief(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The part of an evaluation kept in a stage's record."""
        keep = {c.key for c in self.columns()} | {"group_sizes"}
        return {k: v for k, v in summary.items() if k in keep}


def build_task(cfg: TaskConfig) -> Task:
    return TASKS.get(cfg.name).builder(cfg)


def counts_of(bins: torch.Tensor, num_bins: int) -> list[int]:
    return [int(c) for c in torch.bincount(bins.long().cpu(), minlength=num_bins)]


def as_stats(stats: LabelStats | Sequence[int]) -> LabelStats:
    """Accept plain class counts where label statistics are expected (classification, tests)."""
    if isinstance(stats, LabelStats):
        return stats
    return LabelStats([int(c) for c in stats], lambda y: y)
