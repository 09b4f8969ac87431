"""Shared fixtures: tiny datasets written in the real CIFAR on-disk format, so the real loaders are tested."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ltbench.data.cifar import write_cifar

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["experiment=smoke", "progress=false", "device=cpu"]


def make_cifar(
    root: Path, num_classes: int = 10, train_per_class: int = 40, test_per_class: int = 10, seed: int = 0
) -> Path:
    """Class-dependent noise images (learnable, not trivially) in CIFAR's pickle format, under ``root``."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(30, 225, size=(num_classes, 3, 1, 1))

    def images(per_class: int):
        y = np.repeat(np.arange(num_classes), per_class)
        rng.shuffle(y)
        x = np.clip(centres[y] + rng.normal(0, 40, size=(len(y), 3, 32, 32)), 0, 255).astype(np.uint8)
        return x, y

    tx, ty = images(train_per_class)
    vx, vy = images(test_per_class)
    write_cifar(root, num_classes, tx, ty, vx, vy)
    return root


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("cifar10"), 10)


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("cifar100"), 100, train_per_class=30, test_per_class=3)


def real_data_root() -> Path | None:
    root = os.environ.get("LTBENCH_DATA")
    if root and (Path(root) / "cifar-10-batches-py" / "data_batch_1").exists():
        return Path(root)
    return None


requires_real_cifar10 = pytest.mark.skipif(
    real_data_root() is None, reason="LTBENCH_DATA does not hold the original CIFAR-10 files"
)
