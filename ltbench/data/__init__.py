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

from ltbench.config import PROFILES, DatasetConfig, default_data_root, runtime
from ltbench.data.cifar import load_cifar
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
from ltbench.data.lt import array_fingerprint, hold_out, lt_counts, lt_split, split_hash
from ltbench.errors import ConfigError, DataError
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


@dataclass
class CifarLTConfig(ClassDatasetConfig):
    name: str = "cifar10lt"


@dataclass
class ImageFilesConfig(ClassDatasetConfig):
    """Image files decoded by DataLoader workers."""

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


@dataclass
class FolderConfig(ImageFilesConfig):
    name: str = "folder"
    imbalance_ratio: float | None = None


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

# ImageNet statistics, for every image-file dataset.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _files_data(
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
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
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
    return _files_data(cfg, root, train, val, test, np.arange(len(train)), np.arange(len(val)), [], files)


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
    return _files_data(cfg, root, train, val, test, train_idx, val_idx, classes, files)


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
    return _files_data(cfg, root, train, val, SplitList(test_paths, test_labels), idx, val_idx, classes, {})


for _name in ("imagenetlt", "placeslt"):
    DATASETS.register(_name, ImageListConfig)(_published_or_generated)
DATASETS.register("folder", FolderConfig)(_folder)
