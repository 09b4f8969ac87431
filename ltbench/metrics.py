"""Per-class accuracy and many / medium / few-shot groups.

Group accuracy is the mean of the per-class accuracies of the group's classes (the ImageNet-LT convention); an
empty group has no accuracy (None, shown as "–"), never 0. Accuracies are percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ltbench.config import GROUPS, GroupsConfig

__all__ = [
    "GROUPS",
    "class_groups",
    "confusion_matrix",
    "expected_calibration_error",
    "group_accuracy",
    "per_class_accuracy",
    "summarize",
]


def per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy (%) of each class on the evaluation set; None for a class with no evaluation image."""
    pred, target = pred.cpu().long(), target.cpu().long()
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[pred == target], minlength=num_classes)
    return [None if t == 0 else 100.0 * float(c) / float(t) for c, t in zip(correct, total)]


def class_groups(cfg: GroupsConfig, class_counts: Sequence[int]) -> dict[str, list[int]]:
    """Class indices of the many / medium / few groups under the configured rule."""
    counts = np.asarray(class_counts)
    c = len(counts)
    if cfg.rule == "counts":
        many = [i for i in range(c) if counts[i] > cfg.many_above]
        few = [i for i in range(c) if counts[i] < cfg.few_below]
        medium = [i for i in range(c) if i not in many and i not in few]
        return {"many": many, "medium": medium, "few": few}
    if cfg.rule == "classes":
        groups = {"many": list(cfg.many), "medium": list(cfg.medium), "few": list(cfg.few)}
        return {k: sorted(v) for k, v in groups.items()}
    if cfg.rule == "thirds":
        order = sorted(range(c), key=lambda i: (-counts[i], i))  # most frequent first, ties by index
        parts = np.array_split(np.asarray(order, dtype=int), 3)
        return {g: sorted(int(i) for i in p) for g, p in zip(GROUPS, parts)}
    raise ValueError(f"unknown group rule {cfg.rule!r}")


def group_accuracy(per_class: Sequence[float | None], groups: dict[str, list[int]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for g in GROUPS:
        vals = [float(v) for i in groups.get(g, []) if (v := per_class[i]) is not None]
        out[g] = float(np.mean(vals)) if vals else None
    return out


def summarize(pred: torch.Tensor, target: torch.Tensor, class_counts: Sequence[int], groups_cfg: GroupsConfig) -> dict:
    """top-1, per-class and group accuracies of one evaluation, with the group sizes."""
    num_classes = len(class_counts)
    per_class = per_class_accuracy(pred, target, num_classes)
    groups = class_groups(groups_cfg, class_counts)
    acc = group_accuracy(per_class, groups)
    top1 = 100.0 * float((pred.cpu() == target.cpu()).float().mean())
    return {
        "top1": top1,
        **acc,
        "group_sizes": {g: len(groups[g]) for g in GROUPS},
        "groups": groups,
        "per_class_acc": per_class,
    }


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C counts: row = true class, column = predicted class."""
    idx = target.cpu().long() * num_classes + pred.cpu().long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> float | None:
    """ECE (%) of the top-1 confidence (Guo et al. 2017): sum over equal-width confidence bins of
    |accuracy - mean confidence| weighted by the bin's share of the samples; None for no samples."""
    if len(target) == 0:
        return None
    conf, pred = probs.max(1)
    correct = (pred == target).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to the first bin
    which = (conf.double() * bins).ceil().long().clamp(1, bins) - 1
    acc = torch.bincount(which, weights=correct, minlength=bins)
    cf = torch.bincount(which, weights=conf.double(), minlength=bins)
    gap = (acc - cf).abs()  # |sum correct - sum confidence| of a bin = n_b |acc_b - conf_b|
    return float(gap.sum() / len(target) * 100.0)
