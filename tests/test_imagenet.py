"""ImageNet-LT / Places-LT / folder datasets: split lists, checks, generated splits, the image pipeline end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import make_image_tree, shared_lists
from hydra import compose, initialize_config_module

from ltbench.config import GroupsConfig
from ltbench.data import FolderConfig, ImageListConfig, build_dataset
from ltbench.data.imagelist import (
    EXPECTED,
    check_counts,
    generate_split,
    profile_counts,
    read_split_list,
)
from ltbench.errors import DataError
from ltbench.runner import run

# experiment=smoke shrinks the CIFAR ResNet; a torchvision backbone has no depth/width, so the short schedule is
# spelled out here.
TINY = [
    "progress=false",
    "device=cpu",
    "schedule=short",
    "schedule.epochs=2",
    "schedule.warmup=0.5",
    "schedule.milestones=[0.5]",
    "model=resnet10",
    "dataset.image_size=32",
    "dataset.resize=36",
    "dataset.num_workers=0",
    "dataset.check_counts=false",
    "schedule.batch_size=16",
    "schedule.eval_batch_size=32",
]


def ds(root, **kw) -> ImageListConfig:
    base = {
        "name": "imagenetlt",
        "num_classes": 4,
        "root": str(root),
        "imbalance_ratio": None,
        "profile": "pareto",
        "check_counts": False,
        "val_per_class": 2,
        "groups": GroupsConfig(),
    }
    return ImageListConfig(**{**base, **kw})


def test_read_split_list_and_bad_lines(tmp_path):
    (tmp_path / "a.txt").write_text("train/x/1.JPEG 0\ntrain/x y/2.JPEG 3\n\n")
    s = read_split_list(tmp_path / "a.txt")
    assert s.paths == ["train/x/1.JPEG", "train/x y/2.JPEG"] and s.labels.tolist() == [0, 3]
    (tmp_path / "b.txt").write_text("train/x/1.JPEG 0\ntrain/x/2.JPEG\n")
    with pytest.raises(DataError, match=r"b.txt:2"):
        read_split_list(tmp_path / "b.txt")


def test_published_lists_load_and_point_at_existing_images(image_tree):
    d = build_dataset(ds(image_tree))
    assert d.kind == "files" and d.class_counts == [20, 12, 6, 3]
    assert len(d.val_y) == 8 and len(d.test_y) == 16
    assert not set(d.train_files) & set(d.val_files)
    assert all((image_tree / f).exists() for f in d.train_files + d.val_files + d.test_files)


def test_missing_images_are_named(image_tree, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    for split in ("train", "val", "test"):
        text = (image_tree / f"ImageNet_LT_{split}.txt").read_text()
        if split == "train":
            text += "train/n00000000/gone.JPEG 0\ntrain/n00000001/also_gone.JPEG 1\n"
        (lists / f"ImageNet_LT_{split}.txt").write_text(text)
    with pytest.raises(DataError, match=r"2 of 43 images of the train list are missing.*gone.JPEG"):
        build_dataset(ds(image_tree, split_dir=str(lists)))


def test_count_check_against_published_sizes(image_tree):
    with pytest.raises(DataError, match="differ from the published"):
        build_dataset(ds(image_tree, check_counts=True))


def test_pareto_profile_end_points():
    counts = profile_counts(1280, 1000, 256, "pareto")
    assert counts[0] == 1280 and counts[-1] == 5 and counts == sorted(counts, reverse=True)
    assert profile_counts(1280, 1000, 256, "exp")[-1] == 5


def test_generated_split_counts_seeding_and_disjoint_validation():
    paths = [f"train/c{c}/{i}.JPEG" for c in range(10) for i in range(60)]
    labels = np.repeat(np.arange(10), 60)
    tr, va, counts = generate_split(paths, labels, 10, 10.0, "exp", 50, seed=0, val_per_class=5)
    assert sorted(counts, reverse=True) == profile_counts(50, 10, 10.0, "exp")
    assert np.bincount(tr.labels, minlength=10).tolist() == counts
    assert np.bincount(va.labels).tolist() == [5] * 10 and not set(tr.paths) & set(va.paths)
    tr2, va2, _ = generate_split(paths, labels, 10, 10.0, "exp", 50, seed=0, val_per_class=5)
    assert tr2.paths == tr.paths and va2.paths == va.paths
    tr3, _, counts3 = generate_split(paths, labels, 10, 10.0, "exp", 50, seed=1, val_per_class=5)
    assert tr3.paths != tr.paths and sorted(counts3) == sorted(counts)


def test_generated_split_is_written_in_published_format_and_reused(image_tree, tmp_path):
    cfg = ds(image_tree, split="generated", imbalance_ratio=5.0, max_count=20, split_seed=3)
    d = build_dataset(cfg, workdir=tmp_path)
    out = tmp_path / "splits" / "imagenetlt_ir5_pareto_n20_seed3"
    assert sorted(d.class_counts, reverse=True) == profile_counts(20, 4, 5.0, "pareto")
    for split in ("train", "val", "test"):
        assert read_split_list(out / f"ImageNet_LT_{split}.txt")
    assert len(d.test_y) == 16  # the whole val folder is the test set
    again = build_dataset(cfg, workdir=tmp_path)
    assert again.split_hash == d.split_hash
    with pytest.raises(DataError, match="other settings"):
        build_dataset(
            ds(image_tree, split="generated", imbalance_ratio=5.0, max_count=20, split_seed=4, split_dir=str(out)),
            workdir=tmp_path,
        )


def test_folder_dataset_natural_and_induced(tmp_path):
    root = make_image_tree(tmp_path / "f", num_classes=3, train_per_class=20, test_per_class=2)
    (root / "val").rename(root / "test")
    nat = build_dataset(
        FolderConfig(
            name="folder", num_classes=3, root=str(root), imbalance_ratio=None, val_per_class=2, groups=GroupsConfig()
        )
    )
    assert nat.class_counts == [18, 18, 18] and len(nat.val_y) == 6
    ind = build_dataset(
        FolderConfig(
            name="folder", num_classes=3, root=str(root), imbalance_ratio=4.0, val_per_class=2, groups=GroupsConfig()
        )
    )
    assert ind.class_counts == [20, 10, 5] and np.bincount(ind.val_y.numpy()).tolist() == [0, 2, 2]


@pytest.fixture(scope="module")
def compose_cfg():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=[*TINY, *o])


@pytest.mark.parametrize("strategy", ["ce", "class_balanced_sampling", "crt"])
def test_imagenetlt_pipeline_end_to_end(compose_cfg, image_tree, tmp_path, strategy):
    cfg = compose_cfg(
        "dataset=imagenetlt",
        f"dataset.root={image_tree}",
        "dataset.num_classes=4",
        f"strategy={strategy}",
        f"results_dir={tmp_path}",
    )
    m = run(cfg, tmp_path / "run")
    assert m["status"] == "completed" and m["num_train"] == 41 and m["num_test"] == 16
    assert m["imbalance_ratio"] == pytest.approx(20 / 3, abs=0.01)  # measured from the published lists
    assert m["group_sizes"] == {"many": 0, "medium": 1, "few": 3}  # 20 images is medium (few is < 20)
    assert m["many"] is None and m["few"] is not None
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["split_files"]["train"].endswith(
        "ImageNet_LT_train.txt"
    )


def test_smote_is_refused_on_image_files(compose_cfg, image_tree, tmp_path):
    from ltbench.errors import ConfigError

    cfg = compose_cfg(
        "dataset=imagenetlt",
        f"dataset.root={image_tree}",
        "dataset.num_classes=4",
        "strategy=smote",
        f"results_dir={tmp_path}",
    )
    with pytest.raises(ConfigError, match="tensor data only"):
        run(cfg, tmp_path / "run")


def test_image_batches_are_reproducible(image_tree):
    from ltbench.data.images import ImageFiles, loader_batches, train_transform

    d = build_dataset(ds(image_tree))
    dset = ImageFiles(d.root, d.train_files, d.train_y, train_transform(32, d.mean, d.std))
    idx = torch.arange(10)
    a = [x for x, _ in loader_batches(dset, idx, 4, 2, torch.device("cpu"), torch.Generator().manual_seed(5))]
    b = [x for x, _ in loader_batches(dset, idx, 4, 2, torch.device("cpu"), torch.Generator().manual_seed(5))]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and a[0].shape == (4, 3, 32, 32)


needs_lists = pytest.mark.skipif(shared_lists() is None, reason="LTBENCH_DATA does not hold the published lists")


@needs_lists
def test_real_imagenetlt_val_and_test_lists():
    root = shared_lists() / "imagenet_lt"
    val, test = read_split_list(root / "ImageNet_LT_val.txt"), read_split_list(root / "ImageNet_LT_test.txt")
    assert len(val) == 20_000 and len(test) == 50_000
    assert check_counts("imagenetlt", "val", val, EXPECTED["imagenetlt"]) == []
    assert check_counts("imagenetlt", "test", test, EXPECTED["imagenetlt"]) == []
    assert val.paths[0].startswith("train/n01440764/") and test.paths[0].startswith("val/n01440764/")


@needs_lists
def test_real_placeslt_lists():
    root = shared_lists() / "places_lt"
    for which in ("train", "val", "test"):
        s = read_split_list(root / f"Places_LT_{which}.txt")
        assert check_counts("placeslt", which, s, EXPECTED["placeslt"]) == [], which
