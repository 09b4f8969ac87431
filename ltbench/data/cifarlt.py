"""CIFAR-10/100-LT: the published long-tailed construction (Cao et al. 2019) over the CIFAR python-version files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltbench.config import default_data_root
from ltbench.data import DATASETS, ClassDatasetConfig, LTData
from ltbench.data.cifar import load_cifar
from ltbench.data.lt import array_fingerprint, hold_out, lt_counts, lt_split, split_hash
from ltbench.errors import ConfigError, DataError


@dataclass
class CifarLTConfig(ClassDatasetConfig):
    name: str = "cifar10lt"


# Per-channel statistics of the CIFAR training sets (the constants of the CIFAR-LT reference code).
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _cifar_lt(cfg: CifarLTConfig, workdir: Path, holdout: bool = False) -> LTData:
    """CIFAR-10/100-LT: the published long-tailed construction (Cao et al. 2019), seeded and recorded."""
    root = cfg.root or default_data_root()
    train_x, train_y, test_x, test_y, names = load_cifar(root, cfg.num_classes, cfg.download)
    per_class = np.bincount(train_y, minlength=cfg.num_classes)
    if per_class.min() == 0:
        raise DataError(f"{cfg.name}: some classes have no training images under {root}")
    # The reference uses len(train) / C, which is the per-class count of the balanced CIFAR training set.
    n_max = int(per_class.min())
    counts = lt_counts(n_max, cfg.num_classes, cfg.imbalance_ratio or 1.0, cfg.profile)
    if cfg.imbalance_ratio is None:
        raise ConfigError(f"{cfg.name} needs dataset.imbalance_ratio")
    if min(counts) < 1:
        raise ConfigError(f"dataset.imbalance_ratio={cfg.imbalance_ratio} leaves a class with no image (n_max={n_max})")
    idx, val_idx = lt_split(train_y, counts, cfg.split_seed, cfg.val_per_class)
    moved = None
    if holdout:
        idx, val_idx, moved = hold_out(idx, val_idx, train_y, cfg.val_per_class)
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
        val_moved=moved,
    )


DATASETS.register("cifar10lt", CifarLTConfig)(_cifar_lt)
DATASETS.register("cifar100lt", CifarLTConfig)(_cifar_lt)
