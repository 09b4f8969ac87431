"""Any ImageFolder tree as a long-tailed dataset: natural counts, or a long tail induced by the CIFAR-LT recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltbench.config import default_data_root
from ltbench.data import DATASETS, LTData
from ltbench.data.imagelist import SplitList, scan_folder
from ltbench.data.lists import ImageFilesConfig, files_data
from ltbench.data.lt import hold_out, lt_counts, lt_split
from ltbench.errors import DataError


@dataclass
class FolderConfig(ImageFilesConfig):
    name: str = "folder"
    imbalance_ratio: float | None = None


def _folder(cfg: FolderConfig, workdir: Path, holdout: bool = False) -> LTData:
    """Any ImageFolder tree: root/train/<class>/* for training, root/test/<class>/* for the test set.

    Natural imbalance (dataset.imbalance_ratio=null): all training images, minus a validation split of up to
    val_per_class per class (never more than a fifth of a class). An induced ratio: the CIFAR-LT construction on the
    training images (counts from the smallest class's size down by the ratio), validation from the unused images.
    """
    root = Path(cfg.root or default_data_root()).expanduser()
    classes, paths, labels = scan_folder(root / "train")
    test_classes, test_paths, test_labels = scan_folder(root / "test")
    if test_classes != classes:
        raise DataError(f"{root / 'test'} must have the same class folders as {root / 'train'}")
    if len(classes) != cfg.num_classes:
        raise DataError(f"{root / 'train'} has {len(classes)} classes, dataset.num_classes is {cfg.num_classes}")
    per_class = np.bincount(labels, minlength=cfg.num_classes)
    if cfg.imbalance_ratio is None:
        rs = np.random.RandomState(cfg.split_seed)
        tr, va = [], []
        for c in range(cfg.num_classes):
            m = np.nonzero(labels == c)[0]
            rs.shuffle(m)
            v = min(cfg.val_per_class, len(m) // 5)
            va.append(m[:v])
            tr.append(np.sort(m[v:]))
        idx, val_idx = np.concatenate(tr), np.concatenate(va)
    else:
        counts = lt_counts(int(per_class.min()), cfg.num_classes, cfg.imbalance_ratio, cfg.profile)
        idx, val_idx = lt_split(labels, counts, cfg.split_seed, cfg.val_per_class)
        if holdout:
            idx, val_idx, _ = hold_out(idx, val_idx, labels, cfg.val_per_class)
    p = np.asarray(paths)
    train = SplitList(list(p[idx]), labels[idx])
    val = SplitList(list(p[val_idx]), labels[val_idx])
    return files_data(cfg, root, train, val, SplitList(test_paths, test_labels), idx, val_idx, classes, {})


DATASETS.register("folder", FolderConfig)(_folder)
