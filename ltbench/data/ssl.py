"""Class-imbalanced semi-supervised CIFAR: a long-tailed labeled set and a disjoint unlabeled set, both from the CIFAR
training set (the protocol of DARP, Kim et al. 2020, reused by CReST, ABC, DASO and the USB benchmark).

Per class k (0-indexed, k = 0 the largest), ``N_k = int(N_1 * gamma_l^(-k/(K-1)))`` labeled and
``M_k = int(M_1 * gamma_u^(-k/(K-1)))`` unlabeled images (``unlabeled_order: reversed`` reverses the unlabeled
counts: the rarest labeled class is the most frequent unlabeled one; ``middle`` and ``head_tail`` are SimPro's
"middle" and "head-tail" protocols, the largest counts given to the middle classes, or to both ends;
``unlabeled_ratio: 1`` is a balanced unlabeled set). With N_1=1500, M_1=3000, gamma_l=gamma_u=100 on CIFAR-10:
3,720 labeled and 7,443 unlabeled images.

The images come from a private seeded shuffle of each class (``dataset.split_seed``), in this order: labeled, then
unlabeled, then the validation split (``val_per_class``): the three are disjoint, and the indices of all three are
recorded (``train_indices.txt``, ``unlabeled_indices.txt``). DARP takes the images in file order instead and USB a
globally seeded shuffle; the counts are theirs. The unlabeled images' true labels are kept, never used for training,
only to measure the quality of pseudo-labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltbench.config import default_data_root
from ltbench.data import _CIFAR_MEAN, _CIFAR_STD, DATASETS, CifarLTConfig, LTData
from ltbench.data.cifar import load_cifar
from ltbench.data.lt import array_fingerprint, lt_counts, split_hash
from ltbench.errors import ConfigError, DataError


@dataclass
class CifarSSLConfig(CifarLTConfig):
    """CIFAR-LT with unlabeled data: ``max_labeled`` (N_1) and ``imbalance_ratio`` (gamma_l) for the labeled set,
    ``max_unlabeled`` (M_1), ``unlabeled_ratio`` (gamma_u) and ``unlabeled_order`` for the unlabeled set."""

    unlabeled = True  # (a class attribute): the dataset has an unlabeled set, for semi=...

    name: str = "cifar10lt_ssl"
    max_labeled: int = 1500
    max_unlabeled: int = 3000
    unlabeled_ratio: float = 100.0
    unlabeled_order: str = "same"  # same | reversed | middle | head_tail (UNLABELED_ORDERS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unlabeled_order not in UNLABELED_ORDERS:
            raise ConfigError(
                f"dataset.unlabeled_order must be one of {', '.join(UNLABELED_ORDERS)}, got {self.unlabeled_order!r}"
            )
        if self.max_labeled < 1 or self.max_unlabeled < 0 or not self.unlabeled_ratio >= 1:
            raise ConfigError("dataset.max_labeled >= 1, max_unlabeled >= 0 and unlabeled_ratio >= 1 are needed")

    def unlabeled_text(self) -> str:
        order = "" if self.unlabeled_order == "same" else f", {self.unlabeled_order.replace('_', '-')}"
        return f"U {self.max_unlabeled} max, ratio {self.unlabeled_ratio:g}{order}"

    def counts(self) -> tuple[list[int], list[int]]:
        """(labeled, unlabeled) images per class."""
        labeled = lt_counts(self.max_labeled, self.num_classes, self.imbalance_ratio or 1.0)
        unlabeled = lt_counts(self.max_unlabeled, self.num_classes, self.unlabeled_ratio) if self.max_unlabeled else (
            [0] * self.num_classes)  # fmt: skip
        return labeled, order_counts(unlabeled, self.unlabeled_order)


UNLABELED_ORDERS = ("same", "reversed", "middle", "head_tail")


def order_counts(counts: list[int], order: str) -> list[int]:
    """The long-tailed counts (largest first) given to the classes in ``order``: ``same`` (class k gets the k-th
    largest), ``reversed``, and SimPro's protocols (LeapLabTHU/SimPro ``dataset/cifar.py`` ``make_imb_data``,
    ``flag_LT`` 3 and 4): ``middle`` gives class k the count of rank ``[K-2, K-4, ..., 0, 1, 3, ...][k]`` (K even:
    the largest counts in the middle classes) and ``head_tail`` the rank ``[1, 3, ..., K-2, ..., 4, 2, 0][k]``
    (the largest at both ends, the smallest in the middle)."""
    k = len(counts)
    ranks = {
        "same": list(range(k)),
        "reversed": list(range(k))[::-1],
        "middle": list(range(0, k, 2))[::-1] + list(range(1, k, 2)),
        "head_tail": list(range(1, k, 2)) + list(range(0, k, 2))[::-1],
    }[order]
    return [counts[r] for r in ranks]


def ssl_split(
    labels: np.ndarray, labeled: list[int], unlabeled: list[int], val_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labeled, unlabeled, validation) indices: per class, a seeded shuffle gives the first N_k to the labeled set,
    the next M_k to the unlabeled set and the next ``val_per_class`` to validation (disjoint by construction)."""
    rs = np.random.RandomState(seed)
    lab, unl, val = [], [], []
    for c, (n, m) in enumerate(zip(labeled, unlabeled)):
        idx = np.where(labels == c)[0]
        if n + m > len(idx):
            raise ConfigError(f"class {c} has {len(idx)} images; {n} labeled + {m} unlabeled are asked for")
        rs.shuffle(idx)
        lab.append(idx[:n])
        unl.append(idx[n : n + m])
        val.append(idx[n + m : n + m + val_per_class])
    return tuple(np.concatenate(p).astype(np.int64) for p in (lab, unl, val))  # type: ignore[return-value]


def _cifar_ssl(cfg: CifarSSLConfig, workdir: Path, holdout: bool = False) -> LTData:
    """CIFAR-LT labeled + unlabeled splits (DARP protocol), seeded and recorded."""
    root = cfg.root or default_data_root()
    train_x, train_y, test_x, test_y, names = load_cifar(root, cfg.num_classes, cfg.download)
    if np.bincount(train_y, minlength=cfg.num_classes).min() == 0:
        raise DataError(f"{cfg.name}: some classes have no training images under {root}")
    labeled, unlabeled = cfg.counts()
    idx, u_idx, val_idx = ssl_split(train_y, labeled, unlabeled, cfg.val_per_class, cfg.split_seed)
    t = torch.from_numpy
    data = LTData(
        name=cfg.name,
        train_x=t(np.ascontiguousarray(train_x[idx])),
        train_y=t(train_y[idx].copy()),
        test_x=t(test_x),
        test_y=t(test_y),
        val_x=t(np.ascontiguousarray(train_x[val_idx])),
        val_y=t(train_y[val_idx].copy()),
        val_indices=val_idx,
        train_indices=idx,
        class_counts=[int(c) for c in np.bincount(train_y[idx], minlength=cfg.num_classes)],
        class_names=names,
        mean=_CIFAR_MEAN,
        std=_CIFAR_STD,
        split_hash=split_hash(np.concatenate([idx, u_idx]), np.concatenate([train_y[idx], train_y[u_idx]])),
        data_fingerprint=array_fingerprint(train_x[idx], train_y[idx], train_x[u_idx], train_x[val_idx], test_x),
        root=str(Path(root).resolve()),
    )
    data.unlabeled_x = t(np.ascontiguousarray(train_x[u_idx]))
    data.unlabeled_y = t(train_y[u_idx].copy())
    data.unlabeled_indices = u_idx
    data.info = {"labeled_counts": labeled, "unlabeled_counts": unlabeled}
    return data


DATASETS.register("cifar10lt_ssl", CifarSSLConfig)(_cifar_ssl)
DATASETS.register("cifar100lt_ssl", CifarSSLConfig)(_cifar_ssl)
