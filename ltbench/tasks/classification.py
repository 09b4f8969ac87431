"""Classification: integer class targets, logits out, top-1 and per-class accuracy with head/medium/tail groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ltbench.config import GroupsConfig, TaskConfig
from ltbench.errors import ConfigError
from ltbench.metrics import GROUPS, class_groups, confusion_matrix, expected_calibration_error, summarize
from ltbench.tasks import TASKS, Column, LabelStats, Task, counts_of


@dataclass
class ClassificationConfig(TaskConfig):
    name: str = "classification"

    def check(self, root: Any) -> None:
        if getattr(root.dataset, "task", "classification") != "classification":
            raise ConfigError(
                f"dataset={root.dataset.name} is a regression dataset: add task=regression "
                f"(or use its reference recipe: experiment={root.dataset.name})"
            )


@TASKS.register("classification", ClassificationConfig)
class Classification(Task):
    """Classification: class-index targets, logits out, accuracy metrics."""

    name = "classification"
    train_metric = "train_acc"

    def label_stats(self, data: Any) -> LabelStats:
        return LabelStats(counts_of(data.train_y, data.num_classes), lambda y: y)

    def out_dim(self, data: Any) -> int:
        return data.num_classes

    def predict(self, outputs: torch.Tensor, stats: LabelStats) -> torch.Tensor:
        return outputs.argmax(1)

    def step_sums(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"correct": (outputs.detach().argmax(1) == target).sum()}

    def epoch_metric(self, sums: dict[str, float], seen: int) -> float:
        # training accuracy (%) on the batches as trained (augmented; mixed batches count their first label)
        return 100.0 * sums.get("correct", 0.0) / max(seen, 1)

    def evaluate(
        self, outputs: torch.Tensor, target: torch.Tensor, stats: LabelStats, groups: GroupsConfig
    ) -> dict[str, Any]:
        pred = outputs.argmax(1)
        summary = summarize(pred, target, stats.counts, groups)
        summary["balanced_top1"] = balanced_accuracy(pred, target, len(stats.counts))
        # calibration (long-tail methods trade it: MiSLAS), overall and per group of classes, in %
        probs = outputs.float().softmax(1)
        summary["ece"] = expected_calibration_error(probs, target)
        members = class_groups(groups, stats.counts)
        summary["ece_groups"] = {
            g: expected_calibration_error(probs[mask], target[mask])
            for g in GROUPS
            for mask in [torch.isin(target, torch.as_tensor(members[g], dtype=torch.long))]
        }
        return summary

    def columns(self) -> list[Column]:
        return [Column("top1", "top-1"), *(Column(g, g) for g in GROUPS), Column("ece", "ECE", False)]

    def brief(self, summary: dict[str, Any]) -> dict[str, Any]:
        keys = ("top1", *GROUPS, "balanced_top1", "ece", "group_sizes", "per_class_acc")
        return {k: summary[k] for k in keys if k in summary}

    def artifacts(self, outputs: torch.Tensor, target: torch.Tensor, stats: LabelStats) -> dict[str, list[dict]]:
        """confusion.csv: counts, row = true class, column = predicted class."""
        cm = confusion_matrix(outputs.argmax(1), target, len(stats.counts)).tolist()
        return {"confusion.csv": [{"true": c, **{str(j): v for j, v in enumerate(row)}} for c, row in enumerate(cm)]}


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float | None:
    """Mean per-class accuracy (%) over the classes present in ``target``; None if it is empty."""
    if len(target) == 0:
        return None
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[pred == target], minlength=num_classes)
    present = total > 0
    return float((correct[present].double() / total[present].double()).mean() * 100.0)
