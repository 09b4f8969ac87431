import numpy as np
import pytest
import torch
from conftest import make_cifar

from ltbench.config import GroupsConfig
from ltbench.data import CifarLTConfig, build_dataset
from ltbench.data.cifar import load_cifar
from ltbench.data.lt import hold_out, lt_counts, lt_split, lt_subset, split_hash
from ltbench.errors import DataError


def test_cifar10lt_counts_at_100():
    counts = lt_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


def test_cifar100lt_counts_at_100():
    counts = lt_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5
    assert sum(counts) == 10847
    assert counts == sorted(counts, reverse=True)


def test_ratio_one_is_balanced_and_step_profile():
    assert lt_counts(5000, 10, 1) == [5000] * 10
    assert lt_counts(5000, 10, 10, "step") == [5000] * 5 + [500] * 5


def test_ratio_below_one_rejected():
    with pytest.raises(ValueError):
        lt_counts(5000, 10, 0.5)


def _reference_subset(labels, counts, seed):
    """The published construction, verbatim in behaviour: global numpy seeded, per-class shuffle, keep first n."""
    np.random.seed(seed)
    kept = []
    for c, n in zip(np.unique(labels), counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept)


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_subset_matches_reference_construction_without_touching_global_rng(seed):
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(10), 300)
    rng.shuffle(labels)
    counts = lt_counts(300, 10, 50)
    np.random.seed(999)
    before = np.random.get_state()[1].copy()
    ours = lt_subset(labels, counts, seed)
    assert np.array_equal(np.random.get_state()[1], before), "global numpy RNG was touched"
    assert np.array_equal(ours, _reference_subset(labels, counts, seed))
    assert np.bincount(labels[ours]).tolist() == counts


def test_different_split_seed_gives_different_subset_same_counts():
    labels = np.repeat(np.arange(5), 100)
    a, b = lt_subset(labels, [100, 50, 20, 10, 5], 0), lt_subset(labels, [100, 50, 20, 10, 5], 1)
    assert split_hash(a, labels[a]) != split_hash(b, labels[b])
    assert np.bincount(labels[a]).tolist() == np.bincount(labels[b]).tolist()


def test_fixture_roundtrip_and_dataset_build(cifar10_root):
    tx, ty, vx, _, names = load_cifar(cifar10_root, 10, download=False)
    assert tx.shape == (400, 3, 32, 32) and tx.dtype == np.uint8 and vx.shape == (100, 3, 32, 32)
    assert names[0] == "class0"
    cfg = CifarLTConfig(
        name="cifar10lt", num_classes=10, root=str(cifar10_root), imbalance_ratio=10, groups=GroupsConfig()
    )
    d = build_dataset(cfg)
    assert d.class_counts == lt_counts(40, 10, 10)
    assert len(d.train_indices) == sum(d.class_counts) == len(d.train_y)
    # the kept images are exactly the indexed originals
    assert torch.equal(d.train_x, torch.from_numpy(tx[d.train_indices]))
    assert torch.equal(d.train_y, torch.from_numpy(ty[d.train_indices]))
    assert len(d.test_y) == 100  # the full balanced test set
    assert build_dataset(cfg).split_hash == d.split_hash  # deterministic


def test_cifar100_format(cifar100_root):
    cfg = CifarLTConfig(
        name="cifar100lt", num_classes=100, root=str(cifar100_root), imbalance_ratio=10, groups=GroupsConfig()
    )
    d = build_dataset(cfg)
    assert d.num_classes == 100 and d.class_counts[0] == 30 and d.class_counts[-1] == 3


def test_missing_files_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="download=false"):
        load_cifar(tmp_path, 10, download=False)


def test_corrupt_file_is_a_clear_error(tmp_path):
    root = make_cifar(tmp_path, 10, train_per_class=5, test_per_class=1)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        load_cifar(root, 10, download=False)


def test_validation_holdout_completes_classes_from_the_end_of_their_subset():
    labels = np.repeat(np.arange(4), 50)
    kept, val = lt_split(labels, [50, 40, 10, 5], seed=0, val_per_class=20)
    assert np.bincount(labels[val], minlength=4).tolist() == [0, 10, 20, 20]
    k2, v2, moved = hold_out(kept, val, labels, 20)
    assert moved == [20, 10, 0, 0]
    assert np.bincount(labels[v2], minlength=4).tolist() == [20, 20, 20, 20]
    assert np.bincount(labels[k2], minlength=4).tolist() == [30, 30, 10, 5]
    assert not set(k2) & set(v2) and set(k2) | set(v2) == set(kept) | set(val)
    # the rest of the subset is the published one: each class keeps a prefix of its original run
    for c in range(4):
        orig, new = kept[labels[kept] == c], k2[labels[k2] == c]
        assert np.array_equal(orig[: len(new)], new)
    # a class never loses its last training image
    _, _, moved = hold_out(*lt_split(labels, [5, 5, 5, 5], 0, 0), labels, 20)
    assert moved == [4, 4, 4, 4]
