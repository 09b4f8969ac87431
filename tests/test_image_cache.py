"""The decoded-image cache (ltbench.data.cache) and the feed that trains from it (ltbench.data.image_aug.CachedFeed):
build, reuse, invalidation, an interrupted build resumed, two concurrent builders, evaluation equal to the
DataLoader pipeline bit for bit, and runs from the disk and device caches with identical metrics."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_tree

import ltbench.data.cache as C
from ltbench.data.imagelist import scan_folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[str]]:
    root = make_image_tree(tmp_path_factory.mktemp("imgs"), num_classes=3, train_per_class=4, test_per_class=1)
    _, paths, _ = scan_folder(root / "train")
    return root, paths


def digest(cache: C.ImageCache) -> str:
    return hashlib.sha256(cache.gather(np.arange(len(cache))).tobytes()).hexdigest()


def count_decodes(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = C._decode_one

    def spy(args):
        seen.append(args[0])
        return real(args)

    monkeypatch.setattr(C, "_decode_one", spy)
    return seen


def test_build_then_reuse_with_the_reference_decode(tree, tmp_path, monkeypatch):
    root, paths = tree
    seen = count_decodes(monkeypatch)
    a = C.ensure_cache(root, paths, 20, cache_dir=tmp_path)
    assert len(seen) == len(paths) == len(a) and json.loads((a.path / "manifest.json").read_text())["images"] == 12
    for i in (0, 5, 11):  # row i is image i of the list, as the reference Resize(20) + CenterCrop(20) decodes it
        assert np.array_equal(a.gather(np.array([i]))[0], C.decode_pil(root / paths[i], 20, "short_center"))
    b = C.ensure_cache(root, paths, 20, cache_dir=tmp_path)
    assert len(seen) == 12 and b.path == a.path and digest(b) == digest(a)  # reused: nothing decoded again
    rows = np.array([3, 3, 0, 11])
    assert np.array_equal(a.gather(rows), np.stack([a.gather(np.array([r]))[0] for r in rows]))


def test_a_changed_list_resolution_or_mode_is_another_cache(tree, tmp_path):
    root, paths = tree
    base = C.ensure_cache(root, paths, 20, cache_dir=tmp_path).path
    others = {
        C.ensure_cache(root, paths[:-1], 20, cache_dir=tmp_path).path,
        C.ensure_cache(root, paths[::-1], 20, cache_dir=tmp_path).path,
        C.ensure_cache(root, paths, 24, cache_dir=tmp_path).path,
        C.ensure_cache(root, paths, 20, mode="square", cache_dir=tmp_path).path,
    }
    assert base not in others and len(others) == 4
    assert C.cache_key(root, paths, 20, "short_center", "pil", 7) != C.cache_key(root, paths, 20, "short_center",
                                                                                 "cuda", 7)  # fmt: skip


def test_interrupted_build_resumes_after_its_finished_shards(tree, tmp_path, monkeypatch):
    root, paths = tree
    monkeypatch.setattr(C, "SHARD_BYTES", 5 * 20 * 20 * 3)  # 5 images a shard: shards of 5, 5, 2
    real = C._decode_shard
    calls = {"n": 0}

    def dies_on_second_shard(files, *a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(files, *a)

    monkeypatch.setattr(C, "_decode_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        C.ensure_cache(root, paths, 20, cache_dir=tmp_path / "a")
    (d,) = [p for p in (tmp_path / "a").iterdir() if p.is_dir()]
    assert sorted(f.name for f in d.iterdir()) == ["shard_00000.npy"]  # no manifest, no half-written shard
    seen = count_decodes(monkeypatch)
    resumed = C.ensure_cache(root, paths, 20, cache_dir=tmp_path / "a")
    assert len(seen) == 7 and len(resumed.shards) == 3  # only shards 1 and 2 were decoded
    monkeypatch.setattr(C, "_decode_shard", real)
    assert digest(resumed) == digest(C.ensure_cache(root, paths, 20, cache_dir=tmp_path / "b"))


def test_two_concurrent_builders_one_builds_both_read_the_same_bytes(tree, tmp_path, monkeypatch):
    """Two builders in two threads: each opens the lock file itself, and flock locks belong to the open file
    description, so they exclude each other exactly as two processes (two sweep jobs) do."""
    import threading
    import time

    root, paths = tree
    real, built = C._write_shards, []

    def slow(*a):
        built.append(threading.current_thread().name)
        time.sleep(0.5)  # hold the lock long enough for the other builder to arrive and wait
        return real(*a)

    monkeypatch.setattr(C, "_write_shards", slow)
    out: dict[str, str] = {}

    def builder() -> None:
        out[threading.current_thread().name] = digest(C.ensure_cache(root, paths, 20, cache_dir=tmp_path))

    threads = [threading.Thread(target=builder, name=f"job{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(built) == 1 and len(out) == 2  # one built, the other waited on the lock and reused
    assert out["job0"] == out["job1"] == digest(C.ImageCache(next(p for p in tmp_path.iterdir() if p.is_dir())))


# ------------------------------------------------------------------------------------------------ the cached feed
@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    from ltbench.config import GroupsConfig
    from ltbench.data import ImageListConfig, build_dataset

    root = make_image_tree(tmp_path_factory.mktemp("lt"), num_classes=3, train_per_class=6, test_per_class=2)
    for split, folder in (("train", "train"), ("val", "train"), ("test", "val")):
        _, paths, labels = scan_folder(root / folder)
        keep = slice(0, None, 2) if split == "train" else slice(1, None, 3) if split == "val" else slice(None)
        lines = [f"{p} {y}" for p, y in zip(paths[keep], labels[keep])]
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")

    def make(**kw):
        base = dict(name="imagenetlt", num_classes=3, root=str(root), imbalance_ratio=None, check_counts=False,
                    image_size=16, resize=20, num_workers=0, groups=GroupsConfig(),
                    cache_dir=str(root / "cache"))  # fmt: skip
        c = ImageListConfig(**{**base, **kw})
        return build_dataset(c), c

    return make


def test_cache_settings_are_checked_at_compose_time(imagenet_like):
    from ltbench.data import ImageListConfig
    from ltbench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset\.cache must be one of none, disk, device, auto"):
        ImageListConfig(name="imagenetlt", num_classes=3, cache="ram")
    with pytest.raises(ConfigError, match=r"dataset\.decoder"):
        ImageListConfig(name="imagenetlt", num_classes=3, decoder="nvjpeg")


def test_cached_evaluation_equals_the_dataloader_pipeline_bit_for_bit(imagenet_like):
    from ltbench.data.image_aug import CachedFeed
    from ltbench.feed import DataFeed

    data, c = imagenet_like(cache="disk")
    ref = DataFeed(data, imagenet_like(cache="none")[1], torch.device("cpu"))  # Resize(20), CenterCrop(16) per image
    cached = CachedFeed(data, c, torch.device("cpu"))
    for split in ("test", "val", "train"):
        a = [(b.x, b.y) for b in ref.evaluate(split, 4)]
        b = list(cached.evaluate(split, 4))
        assert len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))
    raw = next(iter(cached.train(torch.arange(3), 3, False, torch.Generator(), raw=True)))[0]
    assert raw.dtype == torch.uint8 and raw.shape == (3, 3, 20, 20)


def test_disk_and_device_caches_give_the_same_training_batches(imagenet_like):
    from ltbench.data.image_aug import CachedFeed

    data, disk = imagenet_like(cache="disk")
    _, dev = imagenet_like(cache="device")
    a, b = CachedFeed(data, disk, torch.device("cpu")), CachedFeed(data, dev, torch.device("cpu"))
    assert a.resident is None and b.resident is not None
    idx = torch.tensor([4, 0, 0, 7, 2, 8, 1])
    xa = [x for x, _, _ in a.train(idx, 3, True, torch.Generator().manual_seed(3))]
    xb = [x for x, _, _ in b.train(idx, 3, True, torch.Generator().manual_seed(3))]
    xc = [x for x, _, _ in b.train(idx, 3, True, torch.Generator().manual_seed(4))]
    assert all(torch.equal(u, v) for u, v in zip(xa, xb)) and xa[0].shape == (3, 3, 16, 16)
    assert not torch.equal(xa[0], xc[0])  # the draws come from the batch's generator


def test_runs_from_the_disk_and_the_device_cache_have_identical_metrics(imagenet_like, tmp_path):
    from hydra import compose, initialize_config_module

    from ltbench.runner import run

    data, _ = imagenet_like()
    over = ["progress=false", "device=cpu", "schedule=short", "schedule.epochs=1", "schedule.warmup=0",
            "schedule.milestones=[0.5]", "model=resnet10", "dataset=imagenetlt", f"dataset.root={data.root}",
            "dataset.num_classes=3", "dataset.check_counts=false", "dataset.image_size=16", "dataset.resize=20",
            "dataset.num_workers=0", f"dataset.cache_dir={tmp_path / 'cache'}", "schedule.batch_size=4",
            "schedule.eval_batch_size=8", f"results_dir={tmp_path}"]  # fmt: skip
    metrics = {}
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        for where in ("disk", "device"):
            m = run(compose("train", overrides=[*over, f"dataset.cache={where}"]), tmp_path / where)
            assert m["status"] == "completed"
            metrics[where] = {k: m[k] for k in ("top1", "many", "medium", "few") if k in m}
    assert metrics["disk"] == metrics["device"] and "top1" in metrics["disk"]
