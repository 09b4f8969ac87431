"""Datasets: a long-tailed training subset, a balanced validation split and a balanced test set.

Each dataset registers a builder ``(cfg, workdir, holdout=False) -> LTData`` with its own config schema in
:data:`DATASETS` (``holdout``: see :func:`build_dataset`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING

from ltbench.config import PROFILES, DatasetConfig
from ltbench.errors import ConfigError
from ltbench.registry import Registry


@dataclass
class ClassDatasetConfig(DatasetConfig):
    """A class-labelled dataset. ``imbalance_ratio``: n_max / n_min of the training subset (None: the split's own
    imbalance, for published lists or a folder's natural counts); ``profile``: exp | step | pareto."""

    num_classes: int = MISSING
    imbalance_ratio: float | None = 100.0
    profile: str = "exp"

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.imbalance_ratio
        if r is not None and not (math.isfinite(r) and r >= 1):
            raise ConfigError(f"dataset.imbalance_ratio must be >= 1 (and finite), got {r}")
        if self.num_classes < 1:
            raise ConfigError(f"dataset.num_classes must be >= 1, got {self.num_classes}")
        if self.profile not in PROFILES:
            raise ConfigError(f"dataset.profile must be one of {PROFILES}, got {self.profile!r}")
        if self.groups.rule == "classes":
            for g in (self.groups.many, self.groups.medium, self.groups.few):
                bad = [c for c in g if not 0 <= c < self.num_classes]
                if bad:
                    raise ConfigError(f"dataset.groups: class indices {bad} outside 0..{self.num_classes - 1}")

    def imbalance_setting(self) -> tuple[bool, float | None]:
        return True, self.imbalance_ratio


@dataclass
class LTData:
    """Everything a run needs to know about its data.

    Three kinds: ``tensor`` (CIFAR scale: images held as uint8 tensors, ``*_x``, augmented on the device),
    ``features`` (any tensor of inputs, e.g. tabular rows or token ids, used as it is) and ``files`` (image files
    decoded by a DataLoader: ``*_files`` are paths relative to ``root``). Labels are int64 class indices, or float
    regression targets whose "classes" are label bins (``bin_start``, ``bin_width``; ``class_counts`` per bin).
    """

    name: str
    train_y: torch.Tensor  # int64 N, the long-tailed training subset
    test_y: torch.Tensor  # the balanced test set
    val_y: torch.Tensor  # a balanced validation split from training images the subset did not use
    val_indices: np.ndarray  # index of each validation image in the original training set / pool
    train_indices: np.ndarray  # index of each kept image in the original training set / pool
    class_counts: list[int]  # training images per class
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    split_hash: str
    data_fingerprint: str
    root: str
    kind: str = "tensor"
    train_x: torch.Tensor | None = None  # uint8 N x 3 x H x W
    test_x: torch.Tensor | None = None
    val_x: torch.Tensor | None = None
    train_files: list[str] | None = None
    test_files: list[str] | None = None
    val_files: list[str] | None = None
    split_files: dict[str, str] | None = None  # where the split lists were read from / written to
    val_moved: list[int] | None = None  # per class: validation images taken out of the training subset
    # Regression: float targets; "classes" are label bins of bin_width from bin_start (class_counts per bin).
    bin_start: float | None = None
    bin_width: float | None = None
    # Image files with their own pipelines (train, eval, raw uint8); None: the ImageNet-LT ones
    transforms: tuple | None = None
    # The recipe of the decoded-cache pipeline (ltbench.data.image_aug.CachedFeed): "imagenet" (None) or "dir"
    image_recipe: str | None = None
    # Facts a model needs about the inputs (e.g. {"vocab_size": 12000}); recorded in metrics.json as data_info
    info: dict = field(default_factory=dict)
    # Semi-supervised datasets: the unlabeled images (uint8 like train_x), their true labels (never trained on: they
    # measure the quality of pseudo-labels) and their indices in the original training set
    unlabeled_x: torch.Tensor | None = None
    unlabeled_y: torch.Tensor | None = None
    unlabeled_indices: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def num_bins(self) -> int:
        return len(self.class_counts)


DATASETS: Registry[Callable[..., LTData]] = Registry("dataset", DatasetConfig)


def build_dataset(cfg: DatasetConfig, workdir: str | Path = ".", holdout: bool = False) -> LTData:
    """The dataset of a config; ``workdir`` is where generated split lists go unless dataset.split_dir says.

    ``holdout``: complete the validation split of classes with too few unused training images from the training
    subset (see :func:`ltbench.data.lt.hold_out`); a dataset whose validation split is always complete ignores it.
    """
    return DATASETS.get(cfg.name).builder(cfg, Path(workdir), holdout=holdout)


# ImageNet statistics, for every image-file dataset.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The builders live in their own modules (imported here so that they register, and so that
# ``from ltbench.data import CifarLTConfig`` etc. keep working); they import the names above.
from ltbench.data.cifarlt import _CIFAR_MEAN, _CIFAR_STD, CifarLTConfig  # noqa: E402  (ltbench.data.ssl imports them)
from ltbench.data.folder import FolderConfig  # noqa: E402
from ltbench.data.lists import ImageFilesConfig, ImageListConfig, files_data  # noqa: E402

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "_CIFAR_MEAN",
    "_CIFAR_STD",
    "CifarLTConfig",
    "ClassDatasetConfig",
    "FolderConfig",
    "ImageFilesConfig",
    "ImageListConfig",
    "LTData",
    "build_dataset",
    "files_data",
]
