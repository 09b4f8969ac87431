"""Datasets: a long-tailed training subset and a balanced test set, held as uint8 tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltbench.config import DatasetConfig, default_data_root
from ltbench.data.cifar import load_cifar
from ltbench.data.lt import array_fingerprint, lt_counts, lt_split, split_hash
from ltbench.errors import ConfigError, DataError


@dataclass
class LTData:
    """Everything a run needs to know about its data; images stay uint8 until the batch is built."""

    name: str
    train_x: torch.Tensor  # uint8 N x 3 x H x W, the long-tailed training subset
    train_y: torch.Tensor  # int64 N
    test_x: torch.Tensor  # uint8, the full balanced test set
    test_y: torch.Tensor
    val_x: torch.Tensor  # uint8, a balanced validation split from training images the subset did not use
    val_y: torch.Tensor
    val_indices: np.ndarray  # index of each validation image in the original training set
    train_indices: np.ndarray  # index of each kept image in the original training set
    class_counts: list[int]  # training images per class
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    split_hash: str
    data_fingerprint: str
    root: str

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)


_BUILDERS: dict[str, Callable[[DatasetConfig], LTData]] = {}


def register_dataset(name: str):
    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def build_dataset(cfg: DatasetConfig) -> LTData:
    if cfg.name not in _BUILDERS:
        raise ConfigError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[cfg.name](cfg)


# Per-channel statistics of the CIFAR training sets (the constants of the CIFAR-LT reference code).
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _cifar_lt(cfg: DatasetConfig) -> LTData:
    root = cfg.root or default_data_root()
    train_x, train_y, test_x, test_y, names = load_cifar(root, cfg.num_classes, cfg.download)
    per_class = np.bincount(train_y, minlength=cfg.num_classes)
    if per_class.min() == 0:
        raise DataError(f"{cfg.name}: some classes have no training images under {root}")
    # The reference uses len(train) / C, which is the per-class count of the balanced CIFAR training set.
    n_max = int(per_class.min())
    counts = lt_counts(n_max, cfg.num_classes, cfg.imbalance_ratio, cfg.profile)
    if min(counts) < 1:
        raise ConfigError(f"dataset.imbalance_ratio={cfg.imbalance_ratio} leaves a class with no image (n_max={n_max})")
    idx, val_idx = lt_split(train_y, counts, cfg.split_seed, cfg.val_per_class)
    kept_x, kept_y = train_x[idx], train_y[idx]
    return LTData(
        name=cfg.name,
        train_x=torch.from_numpy(np.ascontiguousarray(kept_x)),
        train_y=torch.from_numpy(kept_y.copy()),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        val_x=torch.from_numpy(np.ascontiguousarray(train_x[val_idx])),
        val_y=torch.from_numpy(train_y[val_idx].copy()),
        val_indices=val_idx,
        train_indices=idx,
        class_counts=[int(c) for c in np.bincount(kept_y, minlength=cfg.num_classes)],
        class_names=names,
        mean=_CIFAR_MEAN,
        std=_CIFAR_STD,
        split_hash=split_hash(idx, kept_y),
        data_fingerprint=array_fingerprint(kept_x, kept_y, train_x[val_idx], train_y[val_idx], test_x, test_y),
        root=str(Path(root).resolve()),
    )


register_dataset("cifar10lt")(_cifar_lt)
register_dataset("cifar100lt")(_cifar_lt)
