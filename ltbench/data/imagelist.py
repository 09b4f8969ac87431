"""Split lists in the published ImageNet-LT / Places-LT text format (``relative/path label`` per line): reading,
checking against the images on disk and the expected counts, and generating new long-tailed splits."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltbench.data.lt import lt_counts
from ltbench.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class SplitList:
    paths: list[str]  # relative to the image root
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Expected:
    """What a published split must look like: sizes per split and per class."""

    num_classes: int
    train_images: int
    train_max: int
    train_min: int
    val_per_class: int
    test_per_class: int


# Published sizes: ImageNet-LT (Liu et al. 2019) and Places-LT.
EXPECTED = {
    "imagenetlt": Expected(1000, 115_846, 1280, 5, 20, 50),
    "placeslt": Expected(365, 62_500, 4980, 5, 20, 100),
}
LIST_NAMES = {
    "imagenetlt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "placeslt": ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
}


def read_split_list(path: str | Path) -> SplitList:
    path = Path(path)
    if not path.exists():
        raise DataError(f"split list {path} not found")
    paths, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{path}:{n}: expected '<relative path> <integer label>', got {line!r}")
            paths.append(parts[0])
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"split list {path} is empty")
    y = np.asarray(labels, dtype=np.int64)
    if y.min() < 0:
        raise DataError(f"{path}: negative labels")
    return SplitList(paths, y)


def write_split_list(path: str | Path, split: SplitList) -> None:
    from ltbench.rundir import atomic_write_text

    atomic_write_text(Path(path), "".join(f"{p} {int(y)}\n" for p, y in zip(split.paths, split.labels)))


def check_counts(name: str, which: str, split: SplitList, exp: Expected) -> list[str]:
    """Differences between a split and the published sizes (empty when it matches)."""
    problems = []
    counts = np.bincount(split.labels, minlength=exp.num_classes)
    if len(counts) != exp.num_classes:
        problems.append(f"{which}: labels go up to {len(counts) - 1}, {name} has {exp.num_classes} classes")
    if which == "train":
        if len(split) != exp.train_images:
            problems.append(f"train: {len(split):,} images, the published list has {exp.train_images:,}")
        if counts.max() != exp.train_max or counts.min() != exp.train_min:
            problems.append(
                f"train: {counts.min()}-{counts.max()} images per class, expected {exp.train_min}-{exp.train_max}"
            )
    else:
        per = exp.val_per_class if which == "val" else exp.test_per_class
        bad = np.nonzero(counts != per)[0]
        if len(bad):
            problems.append(
                f"{which}: {len(bad)} classes do not have {per} images (e.g. class {bad[0]}: {counts[bad[0]]})"
            )
    return problems


def check_files(root: Path, split: SplitList, which: str, show: int = 5) -> None:
    """Every listed image must exist under root; the error names how many are missing and the first few."""
    missing = [p for p in split.paths if not (root / p).is_file()]
    if missing:
        first = ", ".join(missing[:show])
        raise DataError(
            f"{len(missing):,} of {len(split):,} images of the {which} list are missing under {root} "
            f"(first: {first}). Point dataset.root at the folder the list's paths are relative to."
        )


def scan_folder(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """An ImageFolder tree (``folder/<class>/<image>``): (class names sorted, paths relative to folder's parent,
    labels). Class index = rank of the class name in sorted order, as torchvision's ImageFolder does."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of class subfolders")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class subfolders")
    paths, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f"{folder.name}/{c}/{f.name}")
                labels.append(i)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def profile_counts(n_max: int, num_classes: int, ratio: float, profile: str) -> list[int]:
    """Per-class counts from n_max down to n_max / ratio.

    ``pareto``: a power law in frequency rank, n_i = n_max * (i + 1)^(-log(ratio) / log(C)) (the Zipf/Pareto shape of
    ImageNet-LT's counts); ``exp``: n_max * ratio^(-i/(C-1)) as for CIFAR-LT.
    """
    if profile == "pareto":
        a = math.log(ratio) / math.log(num_classes) if num_classes > 1 else 0.0
        return [max(1, int(n_max * (i + 1) ** (-a))) for i in range(num_classes)]
    return [max(1, c) for c in lt_counts(n_max, num_classes, ratio, profile)]


def generate_split(
    train_paths: list[str],
    train_labels: np.ndarray,
    num_classes: int,
    ratio: float,
    profile: str,
    n_max: int,
    seed: int,
    val_per_class: int,
) -> tuple[SplitList, SplitList, list[int]]:
    """A seeded long-tailed train list and a balanced validation list from a (balanced) pool of training images.

    Which class gets which count is a seeded permutation (class index is not frequency rank, as in ImageNet-LT);
    within a class, a seeded shuffle of its images (sorted by path) gives the first n_c to train and the next
    ``val_per_class`` to validation, so the two are disjoint.
    """
    rs = np.random.RandomState(seed)
    counts_by_rank = profile_counts(n_max, num_classes, ratio, profile)
    order = rs.permutation(num_classes)
    counts = [0] * num_classes
    for rank, c in enumerate(order):
        counts[c] = counts_by_rank[rank]
    paths = np.asarray(train_paths)
    tr_p, tr_y, va_p, va_y = [], [], [], []
    for c in range(num_classes):
        members = np.sort(paths[train_labels == c])
        need = counts[c] + val_per_class
        if len(members) < need:
            raise DataError(f"class {c} has {len(members)} training images; the split needs {need}")
        rs.shuffle(members)
        tr_p += list(members[: counts[c]])
        tr_y += [c] * counts[c]
        va_p += list(members[counts[c] : need])
        va_y += [c] * val_per_class
    return SplitList(tr_p, np.asarray(tr_y)), SplitList(va_p, np.asarray(va_y, dtype=np.int64)), counts


def write_generated(
    out: Path, names: tuple[str, str, str], train: SplitList, val: SplitList, test: SplitList, params: dict
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, split in zip(names, (train, val, test)):
        write_split_list(out / name, split)
    from ltbench.rundir import atomic_write_json

    atomic_write_json(out / "split.json", params)  # last: its presence marks a complete split


def load_generated(out: Path, names: tuple[str, str, str], params: dict) -> tuple[SplitList, ...] | None:
    meta = out / "split.json"
    if not meta.exists():
        return None
    saved = json.loads(meta.read_text())
    if saved != params:
        raise DataError(
            f"{out} holds a split generated with other settings ({saved}); choose another dataset.split_dir"
        )
    return tuple(read_split_list(out / n) for n in names)
