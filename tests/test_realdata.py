"""Tests on the original CIFAR-10 files; they run when LTBENCH_DATA points at them (CI sets it)."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import real_data_root, requires_real_cifar10

from ltbench.config import GroupsConfig
from ltbench.data import CifarLTConfig, build_dataset
from ltbench.data.cifar import load_cifar
from ltbench.metrics import class_groups

pytestmark = [requires_real_cifar10, pytest.mark.realdata]

MD5 = {  # the published checksums of the CIFAR-10 python version
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


def test_files_are_the_original_cifar10():
    base = real_data_root() / "cifar-10-batches-py"
    for name, md5 in MD5.items():
        assert hashlib.md5((base / name).read_bytes()).hexdigest() == md5, name


@pytest.fixture(scope="module")
def cifar10lt():
    cfg = CifarLTConfig(
        name="cifar10lt",
        num_classes=10,
        root=str(real_data_root()),
        download=False,
        imbalance_ratio=100,
        groups=GroupsConfig(rule="classes", many=[0, 1, 2], medium=[3, 4, 5, 6], few=[7, 8, 9]),
    )
    return build_dataset(cfg)


def test_cifar10lt_at_100_is_the_published_subset(cifar10lt):
    assert cifar10lt.class_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(cifar10lt.train_y) == 12406 and len(cifar10lt.test_y) == 10000
    # The reference construction, written out with numpy's global RNG exactly as the published code does.
    _, labels, _, _, _ = load_cifar(real_data_root(), 10, download=False)
    np.random.seed(0)
    ref = []
    for c, n in zip(np.unique(labels), cifar10lt.class_counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        ref.append(idx[:n])
    assert np.array_equal(cifar10lt.train_indices, np.concatenate(ref))


def test_cifar10lt_groups(cifar10lt):
    counts = cifar10lt.class_counts
    from ltbench.metrics import GROUPS

    by_counts = class_groups(GroupsConfig(rule="counts"), counts)
    assert [len(by_counts[g]) for g in GROUPS] == [8, 2, 0]  # why CIFAR-10-LT uses explicit class groups
    thirds = class_groups(GroupsConfig(rule="thirds"), counts)
    assert [len(thirds[g]) for g in GROUPS] == [4, 3, 3]


@pytest.mark.slow
def test_real_cifar10lt_end_to_end(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ltbench",
            "train",
            "experiment=smoke",
            "schedule.epochs=1",
            "progress=false",
            "device=cpu",
            f"dataset.root={real_data_root()}",
            "dataset.download=false",
            f"results_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert m["status"] == "completed" and m["num_train"] == 12406 and m["num_test"] == 10000
    assert m["group_sizes"] == {"many": 3, "medium": 4, "few": 3}
    assert m["top1"] > 10.0  # one epoch of even a tiny model beats chance on real images
    idx = (next(tmp_path.rglob("train_indices.txt"))).read_text().split()
    assert len(idx) == 12406
