"""CIFAR-10/100 in their original python-pickle on-disk format, read straight into uint8 arrays."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from ltbench.errors import DataError

# folder, train files, test files, label key, torchvision class used only to download
_LAYOUT = {
    10: (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        "CIFAR10",
    ),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR100"),
}
_META = {10: ("batches.meta", b"label_names"), 100: ("meta", b"fine_label_names")}
# The published files: (md5, images), md5 as torchvision.datasets.CIFAR10 / CIFAR100 list them (train_list,
# test_list), images from the dataset's page (https://www.cs.toronto.edu/~kriz/cifar.html).
PUBLISHED: dict[int, dict[str, tuple[str, int]]] = {
    10: {
        "data_batch_1": ("c99cafc152244af753f735de768cd75f", 10000),
        "data_batch_2": ("d4bba439e000b95fd0a9bffe97cbabec", 10000),
        "data_batch_3": ("54ebc095f3ab1f0389bbae665268c751", 10000),
        "data_batch_4": ("634d18415352ddfa80567beed471001a", 10000),
        "data_batch_5": ("482c414d41f54cd18b22e5b47cb7c3cb", 10000),
        "test_batch": ("40351d587109b95175f43aff81a1287e", 10000),
    },
    100: {
        "train": ("16019d7e3df5f24257cddd939b257f8d", 50000),
        "test": ("f0ef6b0ae62326f3e7ffdfab6717acfc", 10000),
    },
}


def _check_published(path: Path, raw: bytes, d: dict, n_images: int, num_classes: int) -> None:
    """A file that is the published one (its name, the original's ``batch_label`` key and image count) must have the
    published md5: a flipped byte in the pixels still unpickles, so only the sum finds it. Files ltbench writes
    (fixtures, packed subsets) have no ``batch_label`` and are not checked. One md5 pass over bytes already read:
    about 0.3 s for CIFAR-10's 180 MB."""
    published = PUBLISHED.get(num_classes, {}).get(path.name)
    if published is None or b"batch_label" not in d or n_images != published[1]:
        return
    got = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if got != published[0]:
        raise DataError(
            f"CIFAR-{num_classes} file {path} is damaged: md5 {got}, the published file's is {published[0]}; "
            "delete it and download it again (dataset.download=true) or copy it afresh"
        )


def _read_batch(path: Path, label_key: bytes, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
        d = pickle.loads(raw, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
        raise DataError(f"cannot read CIFAR file {path}: {e}") from e
    if len(data) != len(labels):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    _check_published(path, raw, d, len(data), num_classes)
    return data, labels


def _download(root: Path, num_classes: int) -> None:
    import torchvision

    cls = getattr(torchvision.datasets, _LAYOUT[num_classes][4])
    try:
        cls(root=str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(
            f"CIFAR-{num_classes} is not under {root} and could not be downloaded ({type(e).__name__}: {e}). "
            f"Offline? Put the extracted '{_LAYOUT[num_classes][0]}' folder under a directory and pass "
            "dataset.root=<that directory> or set LTBENCH_DATA."
        ) from e


def load_cifar(
    root: str | Path, num_classes: int, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train_x, train_y, test_x, test_y, class_names); images uint8 N x 3 x 32 x 32."""
    if num_classes not in _LAYOUT:
        raise DataError(f"no CIFAR with {num_classes} classes")
    root = Path(root).expanduser()
    folder, train_files, test_files, label_key, _ = _LAYOUT[num_classes]
    base = root / folder
    needed = [base / f for f in train_files + test_files]
    missing = [p for p in needed if not p.exists()]
    if missing:
        if not download:
            raise DataError(
                f"CIFAR-{num_classes} files missing under {base} ({', '.join(p.name for p in missing)}) and "
                "dataset.download=false. Point dataset.root (or LTBENCH_DATA) at the folder that contains "
                f"'{folder}', or allow the download."
            )
        _download(root, num_classes)
    train = [_read_batch(base / f, label_key, num_classes) for f in train_files]
    test = [_read_batch(base / f, label_key, num_classes) for f in test_files]
    train_x = np.concatenate([d for d, _ in train])
    train_y = np.concatenate([y for _, y in train])
    test_x = np.concatenate([d for d, _ in test])
    test_y = np.concatenate([y for _, y in test])
    names = [str(i) for i in range(num_classes)]
    meta_file, meta_key = _META[num_classes]
    if (base / meta_file).exists():
        try:
            with open(base / meta_file, "rb") as f:
                meta = pickle.load(f, encoding="bytes")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[meta_key]]
        except Exception:  # class names are cosmetic; the labels are what matter
            pass
    for y, what in ((train_y, "train"), (test_y, "test")):
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"CIFAR-{num_classes} {what} labels outside 0..{num_classes - 1} under {base}")
    return train_x, train_y, test_x, test_y, names


def write_cifar(root: str | Path, num_classes: int, train_x, train_y, test_x, test_y) -> Path:
    """Write arrays in the original CIFAR pickle format (for fixtures and for packing subsets)."""
    folder, train_files, test_files, label_key, _ = _LAYOUT[num_classes]
    base = Path(root) / folder
    base.mkdir(parents=True, exist_ok=True)

    def dump(path: Path, x: np.ndarray, y: np.ndarray) -> None:
        with open(path, "wb") as f:
            pickle.dump({b"data": np.asarray(x, np.uint8).reshape(len(x), -1), label_key: list(map(int, y))}, f)

    chunks = np.array_split(np.arange(len(train_x)), len(train_files))
    for name, idx in zip(train_files, chunks):
        dump(base / name, train_x[idx], train_y[idx])
    dump(base / test_files[0], test_x, test_y)
    meta_file, meta_key = _META[num_classes]
    with open(base / meta_file, "wb") as f:
        pickle.dump({meta_key: [f"class{i}".encode() for i in range(num_classes)]}, f)
    return base
