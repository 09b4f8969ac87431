"""A damaged CIFAR file is refused with its name (issue 23, item 6): the published files' md5 sums are checked."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import real_data_root, requires_real_cifar10

from ltbench.data import cifar
from ltbench.data.cifar import PUBLISHED, load_cifar, write_cifar
from ltbench.errors import DataError

FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def test_the_published_sums_are_torchvisions():
    """Transcribes pytorch/vision torchvision/datasets/cifar.py: CIFAR10 / CIFAR100 ``train_list`` + ``test_list``."""
    from torchvision.datasets import CIFAR10, CIFAR100

    for n, cls in ((10, CIFAR10), (100, CIFAR100)):
        assert {name: md5 for name, (md5, _) in PUBLISHED[n].items()} == dict(cls.train_list + cls.test_list)


def _original_format(root: Path, per_file: int) -> Path:
    """CIFAR-10 files with the original's keys (``batch_label``, ``filenames``), as the published files have."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(FILES):
        labels = [int(v) for v in rng.integers(0, 10, per_file)]
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        d = {b"batch_label": f"batch {i}".encode(), b"labels": labels, b"data": data, b"filenames": [b"x"] * per_file}
        (base / name).write_bytes(pickle.dumps(d))
    return base


def _flip_a_pixel_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the pixel array: the file still unpickles
    path.write_bytes(bytes(raw))


def _publish(monkeypatch, base: Path, per_file: int) -> None:
    """The table of published sums, made to say that the files under ``base`` are the published ones."""
    table = {n: (hashlib.md5((base / n).read_bytes()).hexdigest(), per_file) for n in FILES}
    monkeypatch.setitem(cifar.PUBLISHED, 10, table)


def test_a_flipped_byte_in_a_published_file_is_named(tmp_path, monkeypatch):
    base = _original_format(tmp_path, per_file=20)
    _publish(monkeypatch, base, per_file=20)
    assert len(load_cifar(tmp_path, 10, download=False)[0]) == 100  # intact: loads
    _flip_a_pixel_byte(base / "data_batch_3")
    with pytest.raises(DataError, match=r"data_batch_3 is damaged: md5 [0-9a-f]{32}, the published file's is"):
        load_cifar(tmp_path, 10, download=False)


def test_files_ltbench_writes_are_not_held_to_the_published_sums(tmp_path, monkeypatch):
    """Fixtures and packed subsets (no ``batch_label``) load, even at the published image count."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 3, 32, 32), dtype=np.uint8)
    write_cifar(tmp_path, 10, x, rng.integers(0, 10, 100), x[:20], rng.integers(0, 10, 20))
    monkeypatch.setitem(cifar.PUBLISHED, 10, {n: ("0" * 32, 20) for n in FILES})
    assert len(load_cifar(tmp_path, 10, download=False)[0]) == 100


@requires_real_cifar10
def test_the_real_files_pass_and_a_damaged_copy_is_named(tmp_path):
    src = real_data_root() / "cifar-10-batches-py"
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for f in src.iterdir():
        (base / f.name).symlink_to(f)
    assert len(load_cifar(src.parent, 10, download=False)[0]) == 50000
    (base / "data_batch_2").unlink()
    shutil.copyfile(src / "data_batch_2", base / "data_batch_2")
    _flip_a_pixel_byte(base / "data_batch_2")
    with pytest.raises(DataError, match="data_batch_2 is damaged"):
        load_cifar(tmp_path, 10, download=False)
