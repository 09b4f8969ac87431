"""ImageNet-LT / Places-LT from their published split lists (or a split generated from the full train folder), and
what every image-file dataset shares: the config schema (decoding, resolution, the decoded cache) and
:func:`files_data`, which checks the lists and builds the ``files`` kind of :class:`~ltbench.data.LTData`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltbench.config import default_data_root, runtime
from ltbench.data import DATASETS, IMAGENET_MEAN, IMAGENET_STD, ClassDatasetConfig, LTData
from ltbench.data.cache import ImageCacheOptions
from ltbench.data.imagelist import (
    EXPECTED,
    LIST_NAMES,
    SplitList,
    check_counts,
    check_files,
    generate_split,
    load_generated,
    read_split_list,
    scan_folder,
    write_generated,
)
from ltbench.data.lt import array_fingerprint, split_hash
from ltbench.errors import ConfigError, DataError


@dataclass
class ImageFilesConfig(ClassDatasetConfig, ImageCacheOptions):
    """Image files: decoded by DataLoader workers every epoch (``cache: none``), or once into the decoded cache and
    augmented on the device (``cache: disk | device``; see :class:`ltbench.data.cache.ImageCacheOptions`)."""

    image_size: int = 224
    resize: int = 256  # evaluation: resize the short side, then centre-crop image_size
    num_workers: int = runtime(4)  # augmentation draws do not depend on it (seeded per image)
    check_files: bool = runtime(True)  # every listed image must exist

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 1 or self.resize < self.image_size:
            raise ConfigError("dataset.image_size must be >= 1 and dataset.resize >= image_size")
        if self.num_workers < 0:
            raise ConfigError("dataset.num_workers must be >= 0")
        self.check_cache()


@dataclass
class ImageListConfig(ImageFilesConfig):
    """ImageNet-LT / Places-LT: published split lists, or a split generated from the full train folder."""

    split: str = "published"  # published lists | generated from the full train folder
    split_dir: str | None = runtime(None)  # where the lists are (published; default: root) or go (generated)
    max_count: int = 1280  # generated splits: images of the largest class
    check_counts: bool = runtime(True)  # published lists must have the published sizes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in ("published", "generated"):
            raise ConfigError(f"dataset.split must be 'published' or 'generated', got {self.split!r}")


def files_data(
    cfg: ImageFilesConfig,
    root: Path,
    train: SplitList,
    val: SplitList,
    test: SplitList,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    names: list[str],
    split_files: dict[str, str],
) -> LTData:
    num_classes = cfg.num_classes
    for which, split in (("train", train), ("val", val), ("test", test)):
        if len(split) and split.labels.max() >= num_classes:
            raise DataError(f"{which} list has label {split.labels.max()}, dataset.num_classes is {num_classes}")
    if cfg.check_files:
        for which, split in (("train", train), ("val", val), ("test", test)):
            check_files(root, split, which)
    lists = [np.asarray(s.paths).astype(bytes) for s in (train, val, test)]
    return LTData(
        name=cfg.name,
        kind="files",
        train_y=torch.from_numpy(train.labels),
        test_y=torch.from_numpy(test.labels),
        val_y=torch.from_numpy(val.labels),
        val_indices=val_idx,
        train_indices=train_idx,
        class_counts=[int(c) for c in np.bincount(train.labels, minlength=num_classes)],
        class_names=names or [str(i) for i in range(num_classes)],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        split_hash=split_hash(train_idx, train.labels),
        # The lists (paths and labels) the run used; image bytes are not hashed (too slow at this scale).
        data_fingerprint=array_fingerprint(*lists, train.labels, val.labels, test.labels),
        root=str(root.resolve()),
        train_files=train.paths,
        val_files=val.paths,
        test_files=test.paths,
        split_files=split_files,
    )


def _published_or_generated(cfg: ImageListConfig, workdir: Path, holdout: bool = False) -> LTData:
    """ImageNet-LT / Places-LT: the published split lists, or a split generated from the full train folder (the
    validation split is complete either way: 20 images of every class)."""
    root = Path(cfg.root or default_data_root()).expanduser()
    return _published(cfg, root) if cfg.split == "published" else _generated(cfg, root, workdir)


def _published(cfg: ImageListConfig, root: Path) -> LTData:
    names = LIST_NAMES[cfg.name]
    split_dir = Path(cfg.split_dir).expanduser() if cfg.split_dir else root
    train, val, test = (read_split_list(split_dir / n) for n in names)
    problems = [
        p
        for w, s in zip(("train", "val", "test"), (train, val, test))
        for p in check_counts(cfg.name, w, s, EXPECTED[cfg.name])
    ]
    if problems and cfg.check_counts:
        raise DataError(
            f"{cfg.name} split lists in {split_dir} differ from the published ones: "
            + "; ".join(problems)
            + " (dataset.check_counts=false accepts them)"
        )
    files = {w: str(split_dir / n) for w, n in zip(("train", "val", "test"), names)}
    return files_data(cfg, root, train, val, test, np.arange(len(train)), np.arange(len(val)), [], files)


def _generated(cfg: ImageListConfig, root: Path, workdir: Path) -> LTData:
    """A seeded split from root/train/<class>/* (a balanced pool); root/val/<class>/* is the test set. The lists
    are written in the published format (with split.json) and reused by later runs."""
    if cfg.imbalance_ratio is None:
        raise ConfigError("dataset.split=generated needs dataset.imbalance_ratio")
    names = LIST_NAMES[cfg.name]
    params = {
        "dataset": cfg.name,
        "ratio": cfg.imbalance_ratio,
        "profile": cfg.profile,
        "max_count": cfg.max_count,
        "split_seed": cfg.split_seed,
        "val_per_class": cfg.val_per_class,
    }
    tag = f"{cfg.name}_ir{cfg.imbalance_ratio:g}_{cfg.profile}_n{cfg.max_count}_seed{cfg.split_seed}"
    out = Path(cfg.split_dir).expanduser() if cfg.split_dir else workdir / "splits" / tag
    loaded = load_generated(out, names, params)
    classes, pool_paths, pool_labels = scan_folder(root / "train")
    if len(classes) != cfg.num_classes:
        raise DataError(f"{root / 'train'} has {len(classes)} class folders, dataset.num_classes is {cfg.num_classes}")
    if loaded is None:
        train, val, _ = generate_split(
            pool_paths, pool_labels, cfg.num_classes, cfg.imbalance_ratio, cfg.profile, cfg.max_count,
            cfg.split_seed, cfg.val_per_class,
        )  # fmt: skip
        test_classes, test_paths, test_labels = scan_folder(root / "val")
        if test_classes != classes:
            raise DataError(f"{root / 'val'} must have the same class folders as {root / 'train'}")
        test = SplitList(test_paths, test_labels)
        write_generated(out, names, train, val, test, params)
    else:
        train, val, test = loaded
    index = {p: i for i, p in enumerate(pool_paths)}
    train_idx = np.asarray([index[p] for p in train.paths], dtype=np.int64)
    val_idx = np.asarray([index[p] for p in val.paths], dtype=np.int64)
    files = {w: str(out / n) for w, n in zip(("train", "val", "test"), names)}
    return files_data(cfg, root, train, val, test, train_idx, val_idx, classes, files)


for _name in ("imagenetlt", "placeslt"):
    DATASETS.register(_name, ImageListConfig)(_published_or_generated)
