"""Long-tail subset construction: pure functions of (labels, counts, seed), no global RNG."""

from __future__ import annotations

import hashlib

import numpy as np


def lt_counts(n_max: int, num_classes: int, ratio: float, profile: str = "exp") -> list[int]:
    """Per-class image counts of a long-tailed subset, class 0 the largest.

    ``exp``: n_i = int(n_max * ratio^(-i/(C-1))); ``step``: the first C//2 classes keep n_max, the rest
    int(n_max / ratio). The arithmetic is the one of the published CIFAR-LT construction (Cao et al. 2019,
    ``IMBALANCECIFAR10.get_img_num_per_cls``, written with imb_factor = 1/ratio), so the counts match to the image.
    """
    if ratio < 1:
        raise ValueError(f"imbalance ratio must be >= 1, got {ratio}")
    imb_factor = 1.0 / ratio
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * imb_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [int(n_max)] * half + [int(n_max * imb_factor)] * (num_classes - half)
    raise ValueError(f"unknown imbalance profile {profile!r} (exp or step)")


def lt_subset(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices of the long-tailed subset (see :func:`lt_split`)."""
    return lt_split(labels, counts, seed, 0)[0]


def lt_split(labels: np.ndarray, counts: list[int], seed: int, val_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into ``labels``) of the long-tailed subset with ``counts[c]`` images of class c.

    Exactly the images of the published construction (Cao et al. 2019, ``IMBALANCECIFAR10``): an RNG seeded with
    ``seed``; for each class in label order, shuffle that class's indices and keep the first n_c. A private
    ``RandomState`` draws the same stream as ``np.random.seed`` + ``np.random.shuffle`` without touching numpy's
    global state. The result is grouped by class, in the order the construction keeps the images.

    The validation split takes, per class, the next ``val_per_class`` images of the same shuffled order: images the
    long-tailed subset did not use, so it is disjoint from training and leaves the subset unchanged. A class with
    fewer unused images gets what is left (possibly none); callers record that.
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    if len(classes) != len(counts):
        raise ValueError(f"{len(counts)} counts for {len(classes)} classes")
    rs = np.random.RandomState(seed)
    kept, val = [], []
    for c, n in zip(classes, counts):
        idx = np.where(labels == c)[0]
        if n > len(idx):
            raise ValueError(f"class {c} has {len(idx)} images, the subset asks for {n}")
        rs.shuffle(idx)
        kept.append(idx[:n])
        val.append(idx[n : n + val_per_class])
    return np.concatenate(kept), np.concatenate(val).astype(np.int64)


def hold_out(
    kept: np.ndarray, val: np.ndarray, labels: np.ndarray, val_per_class: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Complete a validation split from the training subset, for classes with too few unused images.

    For a class with fewer than ``val_per_class`` validation images (CIFAR-10-LT's largest class keeps all 5000 of
    its images), the last images of its kept run (the same seeded shuffle, so the rest of the subset is the published
    one) move to validation; a class always keeps at least one training image. Returns the new kept and validation
    indices and how many images of each class moved (in class order).
    """
    labels = np.asarray(labels, dtype=np.int64)
    new_kept, new_val, moved = [], [], []
    for c in np.unique(labels[kept]):
        k, v = kept[labels[kept] == c], val[labels[val] == c]
        n = max(0, min(val_per_class - len(v), len(k) - 1))
        new_kept.append(k[: len(k) - n])
        new_val.append(np.concatenate([k[len(k) - n :], v]))
        moved.append(int(n))
    return np.concatenate(new_kept), np.concatenate(new_val).astype(np.int64), moved


def split_hash(indices: np.ndarray, labels: np.ndarray) -> str:
    """A short fingerprint of a split: the kept indices and their labels, in order."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def array_fingerprint(*arrays: np.ndarray) -> str:
    """sha256 (first 16 hex digits) over the raw bytes of arrays: the content the run actually trained on."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
