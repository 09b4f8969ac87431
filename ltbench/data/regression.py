"""Imbalanced regression datasets: the shared schema (label bins), the balanced evaluation splits of the DIR
benchmarks, and the synthetic benchmark of Balanced MSE.

A regression dataset's "classes" are label bins (``bin_start``, ``bin_width``, ``num_bins``: values outside are
clamped into the first or last bin). Its validation and test sets are balanced over the bins where the benchmark
makes them (DIR: ``min(n // 3, cap)`` samples of every bin for each), so the test metrics weigh every part of the
label range; the training set keeps the natural skew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from omegaconf import MISSING

from ltbench.config import DatasetConfig
from ltbench.data import DATASETS, LTData
from ltbench.data.lt import array_fingerprint, split_hash
from ltbench.errors import ConfigError
from ltbench.tasks.regression import bin_edges, binner


@dataclass
class RegressionDatasetConfig(DatasetConfig):
    """A regression dataset: float targets in label bins of ``bin_width`` from ``bin_start``."""

    task = "regression"  # (a class attribute, not a setting): which task the dataset is for
    inputs = "features"
    bin_start: float = 0.0
    bin_width: float = 1.0
    num_bins: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.bin_width > 0 and math.isfinite(self.bin_width)) or self.num_bins < 1:
            raise ConfigError("dataset.bin_width must be > 0 and dataset.num_bins >= 1")


def bins_of(cfg: RegressionDatasetConfig, y: np.ndarray) -> np.ndarray:
    edges = bin_edges(cfg.bin_start, cfg.bin_width, cfg.num_bins)
    return binner(edges)(torch.as_tensor(np.asarray(y, dtype=np.float64))).numpy()


def bin_names(cfg: RegressionDatasetConfig) -> list[str]:
    edges = bin_edges(cfg.bin_start, cfg.bin_width, cfg.num_bins).tolist()
    return [f"[{a:g}, {b:g})" for a, b in pairwise(edges)]


def balanced_split(bins: np.ndarray, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices: every bin gives ``min(n // 3, cap)`` of its samples to validation and as many
    to test (a seeded shuffle per bin, as DIR's ``make_balanced_testset``), the rest to training."""
    rs = np.random.RandomState(seed)
    train, val, test = [], [], []
    for b in np.unique(bins):
        idx = np.nonzero(bins == b)[0]
        rs.shuffle(idx)
        k = min(len(idx) // 3, cap)
        val.append(idx[:k])
        test.append(idx[k : 2 * k])
        train.append(idx[2 * k :])
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in (train, val, test))  # type: ignore[return-value]


def regression_data(
    cfg: RegressionDatasetConfig,
    x: dict[str, torch.Tensor],
    y: dict[str, np.ndarray],
    train_indices: np.ndarray,
    root: str,
    kind: str = "features",
) -> LTData:
    """LTData of a regression dataset held as tensors: ``x`` and ``y`` per split ("train", "val", "test")."""
    counts = np.bincount(bins_of(cfg, y["train"]), minlength=cfg.num_bins)
    t = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in y.items()}
    return LTData(
        name=cfg.name,
        kind=kind,
        train_x=x["train"],
        val_x=x["val"],
        test_x=x["test"],
        train_y=t["train"],
        val_y=t["val"],
        test_y=t["test"],
        train_indices=train_indices,
        val_indices=np.arange(len(y["val"])),
        class_counts=[int(c) for c in counts],
        class_names=bin_names(cfg),
        mean=(0.0,),
        std=(1.0,),
        split_hash=split_hash(train_indices, np.round(np.asarray(y["train"], dtype=np.float64) * 1e4).astype(np.int64)),
        data_fingerprint=array_fingerprint(*(x[k].numpy() for k in ("train", "val", "test")), *y.values()),
        root=root,
        bin_start=cfg.bin_start,
        bin_width=cfg.bin_width,
    )


# ------------------------------------------------------------------------------------------------ synthetic


@dataclass
class SyntheticDIRConfig(RegressionDatasetConfig):
    """The 1-D benchmark of Balanced MSE (Ren et al. 2022, jiawei-ren/BalancedMSE synthetic_benchmark/main_1d.py):
    y = x + N(0, noise_sigma^2); training targets from N(5, y_sigma) (``dist=normal``) or Exp(exp_rate)
    (``dist=exp``) kept inside [0, 10]; validation and test targets uniform on [0, 10] and noise-free (x = y).
    ``prior_targets``: 10,000 draws of the (untrimmed) training law, what the reference's ``get_gmm`` (utils.py)
    fits GAI's Gaussian mixture to; drawn after the splits, so the splits do not depend on them."""

    name: str = "synthetic_dir"
    dist: str = "normal"  # normal | exp
    y_sigma: float = 0.5  # 0.5 / 0.75 / 1.0: high / medium / low imbalance
    exp_rate: float = 2.0  # 2 / 1.5 / 1
    noise_sigma: float = 1.0
    num_train: int = 1024
    num_eval: int = 1024
    num_bins: int = 20
    bin_width: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dist not in ("normal", "exp"):
            raise ConfigError(f"dataset.dist must be normal or exp, got {self.dist!r}")


@DATASETS.register("synthetic_dir", SyntheticDIRConfig)
def synthetic_dir(cfg: SyntheticDIRConfig, workdir, holdout: bool = False) -> LTData:
    """Balanced MSE's synthetic 1-D benchmark, generated from dataset.split_seed."""
    rng = np.random.default_rng(cfg.split_seed)

    def train_targets() -> np.ndarray:
        out = np.zeros(0)
        while len(out) < cfg.num_train:  # the reference draws 2N and keeps those inside [0, 10]
            draw = rng.normal(5.0, cfg.y_sigma, 2 * cfg.num_train) if cfg.dist == "normal" else (
                rng.exponential(1.0 / cfg.exp_rate, 2 * cfg.num_train))  # fmt: skip
            out = np.concatenate([out, draw[(draw >= 0) & (draw <= 10)]])
        return out[: cfg.num_train]

    y_train = train_targets()
    x_train = y_train - rng.normal(0.0, cfg.noise_sigma, cfg.num_train)  # y = x + noise
    y_val, y_test = rng.uniform(0, 10, cfg.num_eval), rng.uniform(0, 10, cfg.num_eval)
    x = {k: torch.as_tensor(v, dtype=torch.float32)[:, None] for k, v in (("train", x_train), ("val", y_val),
                                                                          ("test", y_test))}  # fmt: skip
    y = {"train": y_train, "val": y_val, "test": y_test}
    data = regression_data(cfg, x, y, np.arange(cfg.num_train), root="(generated)")
    law = rng.normal(5.0, cfg.y_sigma, 10_000) if cfg.dist == "normal" else rng.exponential(1.0 / cfg.exp_rate, 10_000)
    data.prior_targets = torch.as_tensor(law, dtype=torch.float32)  # type: ignore[attr-defined]
    return data
