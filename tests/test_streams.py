"""The streams a method declares are served for every data kind (tensor, features, image files)."""

from __future__ import annotations

import pytest
from conftest import make_image_tree
from hydra import compose, initialize_config_module

from ltbench.runner import run


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_mwn_draws_its_meta_batches_from_image_files_through_the_feed(tmp_path, cache):
    """The validation stream a method declares is served for every data kind: Meta-Weight-Net trains on a folder
    of JPEGs (it was refused: its meta batch came from device tensors), through the DataLoader or the decoded cache."""
    tree = make_image_tree(tmp_path / "tree", num_classes=3, train_per_class=12, test_per_class=3)
    (tree / "val").rename(tree / "test")
    overrides = ["progress=false", "device=cpu", "dataset=folder", f"dataset.root={tree}", "dataset.num_classes=3",
                 "dataset.val_per_class=2", "dataset.image_size=32", "dataset.resize=36", "dataset.num_workers=0",
                 "model=resnet10", "strategy=mwn", "method.meta_batch_size=4", "schedule=short", "schedule.epochs=1",
                 "schedule.batch_size=8", f"results_dir={tmp_path}", f"dataset.cache={cache}",
                 f"dataset.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    m = run(cfg, tmp_path / "run")
    assert m["status"] == "completed" and m["num_train"] > 0
    assert m["mwn"]["meta_set"]["per_class"] == [2, 2, 2]
    assert any(v is not None for v in m["mwn"]["class_weight_last_epoch"])
