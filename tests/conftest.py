"""Shared fixtures: tiny datasets written in the real CIFAR on-disk format, so the real loaders are tested."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ltbench.data.cifar import write_cifar

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["experiment=smoke", "progress=false", "device=cpu"]


def tiny_cifar(root: Path, ratio: float = 10) -> list[str]:
    """The overrides that point a run at a tiny CIFAR fixture (``make_cifar``) at imbalance ``ratio``."""
    return [f"dataset.root={root}", "dataset.download=false", f"dataset.imbalance_ratio={ratio:g}"]


@pytest.fixture(scope="module")
def compose_cfg():
    """``compose_cfg(*overrides)``: the train config with ``SMOKE`` and the overrides, in a module-wide Hydra
    context (a test module that needs other base overrides defines its own fixture of this name)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=[*SMOKE, *o])


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


def make_image_tree(
    root: Path,
    num_classes: int = 4,
    train_per_class: int = 30,
    test_per_class: int = 4,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """A tiny ImageNet-layout tree of JPEGs: root/train/<wnid>/*.JPEG (a balanced pool) and root/val/<wnid>/*.JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(20, 235, size=(num_classes, 3))
    for split, n in (("train", train_per_class), ("val", test_per_class)):
        for c in range(num_classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(colours[c] + rng.normal(0, 25, size=(*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{split}_{c}_{i}.JPEG", quality=90)
    return root


def write_published_lists(root: Path, counts: list[int], val_per_class: int = 2, prefix: str = "ImageNet_LT") -> None:
    """Split lists in the published format over a make_image_tree tree (train counts per class, val, test)."""
    classes = sorted(d.name for d in (root / "train").iterdir())
    train, val, test = [], [], []
    for c, name in enumerate(classes):
        files = sorted((root / "train" / name).iterdir())
        train += [f"train/{name}/{f.name} {c}" for f in files[: counts[c]]]
        val += [f"train/{name}/{f.name} {c}" for f in files[counts[c] : counts[c] + val_per_class]]
        test += [f"val/{name}/{f.name} {c}" for f in sorted((root / "val" / name).iterdir())]
    for split, lines in (("train", train), ("val", val), ("test", test)):
        (root / f"{prefix}_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    root = make_image_tree(tmp_path_factory.mktemp("imagenet_tiny"))
    write_published_lists(root, [20, 12, 6, 3])
    return root


def shared_lists() -> Path | None:
    """The published ImageNet-LT / Places-LT lists, when LTBENCH_DATA holds them."""
    root = os.environ.get("LTBENCH_DATA")
    if root and (Path(root) / "imagenet_lt" / "ImageNet_LT_test.txt").exists():
        return Path(root)
    return None


def interrupt_at(monkeypatch, start, *, at: int, stage: str | None = None) -> None:
    """Call ``start()`` with the ``at``-th training epoch of ``stage`` (of any stage: None) raising KeyboardInterrupt,
    as Ctrl-C there would; checks that the run was interrupted and restores the loop afterwards."""
    import ltbench.fit as fit_mod

    real, calls = fit_mod.train_epoch, {"n": 0}

    def interrupt(tr, *a, **k):
        if stage is None or tr.stage == stage:
            calls["n"] += 1
            if calls["n"] == at:
                raise KeyboardInterrupt
        return real(tr, *a, **k)

    monkeypatch.setattr(fit_mod, "train_epoch", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            start()
    finally:
        monkeypatch.setattr(fit_mod, "train_epoch", real)


@pytest.fixture(scope="session", autouse=True)
def _no_results_left_in_the_checkout():
    """Tests write under their tmp_path: a run that forgot results_dir= would leave a stage cache in the checkout."""
    cache = REPO / "results" / "stage_cache"
    before = cache.exists()
    yield
    if not before and cache.exists():
        raise AssertionError(f"a test left {cache} in the checkout: give its runs results_dir=<tmp_path>")


# A tiny open_clip CLIP (random weights) for the foundation-model tests: ``model.arch=<path>.json`` registers it under
# the file's stem.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_arch(tmp_path_factory):
    """The path of the tiny open_clip model config (``model.arch=<path>.json``, registered as ltbench_tiny_clip)."""
    path = tmp_path_factory.mktemp("clip") / "ltbench_tiny_clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)
