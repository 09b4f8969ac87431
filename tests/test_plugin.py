"""Adding a method is one Python file plus one YAML: a loss, a sampler and a dataset defined in this module (as a
plugin would define them) train end to end from the compose path, and the same file works from the CLI as a plugin.

The code of the three components is kept in one string, so the CLI test can write it out as a plugin module.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from conftest import SMOKE
from hydra import compose, initialize_config_module
from test_e2e import ltbench

from ltbench.runner import CHECKPOINT, run

PLUGIN = textwrap.dedent(
    '''
    """A plugin: a loss with a learnable scale, a sampler and a dataset, each registered where it is defined."""
    from dataclasses import dataclass

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ltbench.config import LossConfig, SamplerConfig
    from ltbench.data import DATASETS, ClassDatasetConfig, LTData
    from ltbench.data.lt import array_fingerprint, lt_counts, lt_split, split_hash
    from ltbench.losses import LOSSES, LTLoss
    from ltbench.samplers import SAMPLERS


    @dataclass
    class SquaredHingeConfig(LossConfig):
        name: str = "squared_hinge_test"
        margin: float = 1.0


    @LOSSES.register("squared_hinge_test", SquaredHingeConfig)
    class SquaredHinge(LTLoss):
        """Multi-class squared hinge on scaled logits; the scale is learnt with the network."""

        def __init__(self, counts, margin: float) -> None:
            super().__init__(counts)
            self.margin = margin
            self.scale = nn.Parameter(torch.ones(()))

        @classmethod
        def from_config(cls, cfg, stats):
            return cls(stats, cfg.margin)

        def per_sample(self, logits, target):
            z = logits * self.scale
            gap = F.relu(self.margin - z.gather(1, target[:, None]) + z).pow(2)
            return gap.scatter(1, target[:, None], 0.0).sum(1)


    @SAMPLERS.register("inverse_test", SamplerConfig)
    def inverse_frequency(ci, epoch, epochs, cfg, gen):
        """Inverse-frequency sampling: class probability proportional to 1 / count."""
        return ci.draw(1.0 / ci.counts.double().clamp(min=1), ci.n, gen)


    @dataclass
    class BlobsConfig(ClassDatasetConfig):
        name: str = "blobs_test"
        num_classes: int = 4
        per_class: int = 40
        imbalance_ratio: float | None = 8.0


    @DATASETS.register("blobs_test", BlobsConfig)
    def blobs(cfg, workdir, holdout=False):
        """Coloured noise images, one colour per class, long-tailed with the CIFAR-LT construction."""
        rng = np.random.default_rng(123)
        colours = rng.integers(20, 235, size=(cfg.num_classes, 3, 1, 1))

        def images(n):
            y = np.repeat(np.arange(cfg.num_classes), n)
            x = np.clip(colours[y] + rng.normal(0, 30, (len(y), 3, 16, 16)), 0, 255).astype(np.uint8)
            return x, y

        (px, py), (tx, ty) = images(cfg.per_class), images(10)
        counts = lt_counts(cfg.per_class, cfg.num_classes, cfg.imbalance_ratio)
        idx, val = lt_split(py, counts, cfg.split_seed, cfg.val_per_class)
        t = torch.from_numpy
        return LTData(
            name=cfg.name, train_y=t(py[idx]), test_y=t(ty), val_y=t(py[val]), val_indices=val, train_indices=idx,
            class_counts=counts, class_names=[str(c) for c in range(cfg.num_classes)], mean=(0.5,) * 3,
            std=(0.25,) * 3, split_hash=split_hash(idx, py[idx]), data_fingerprint=array_fingerprint(px, tx),
            root="(generated)", train_x=t(px[idx]), test_x=t(tx), val_x=t(px[val]),
        )
    '''
)

YAMLS = {
    "loss/squared_hinge_test.yaml": "defaults:\n  - /schema/loss/squared_hinge_test@_here_\n  - _self_\n"
    "name: squared_hinge_test\nmargin: 1.0\n",
    "sampler/inverse_test.yaml": "defaults:\n  - /schema/sampler/inverse_test@_here_\n  - _self_\nname: inverse_test\n",
    "dataset/blobs_test.yaml": "defaults:\n  - /schema/dataset/blobs_test@_here_\n  - _self_\nname: blobs_test\n"
    "num_classes: 4\nval_per_class: 5\n",
}

exec(compile(PLUGIN, "plugin_in_test", "exec"))  # registers the three components, as importing a plugin would


def write_conf(root):
    for rel, text in YAMLS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_new_loss_sampler_and_dataset_train_from_the_compose_path(tmp_path):
    conf = write_conf(tmp_path / "conf")
    overrides = [*SMOKE, f"hydra.searchpath=[file://{conf}]", "loss=squared_hinge_test", "sampler=inverse_test",
                 "dataset=blobs_test", f"results_dir={tmp_path}", "schedule.epochs=3"]  # fmt: skip
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.loss.margin == 1.0 and cfg.dataset.per_class == 40
    m = run(cfg, tmp_path / "run")
    assert m["status"] == "completed" and m["dataset"] == "blobs_test"
    assert m["train_class_counts"] == [40, 20, 10, 5] and len(m["per_class_acc"]) == 4
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert state["method"]["loss_fn.scale"].item() != 1.0  # the loss's own parameter was trained
    rows = (tmp_path / "run" / "epochs.csv").read_text().splitlines()
    assert len(rows) == 4


def test_a_misspelt_key_of_a_new_loss_is_rejected_at_compose(tmp_path):
    from hydra.errors import ConfigCompositionException

    conf = write_conf(tmp_path / "conf")
    with (
        initialize_config_module("ltbench.conf", version_base="1.3"),
        pytest.raises(ConfigCompositionException, match="margn"),
    ):
        compose("train", overrides=[f"hydra.searchpath=[file://{conf}]", "loss=squared_hinge_test", "loss.margn=2"])


@pytest.mark.slow
def test_a_plugin_module_trains_from_the_cli(tmp_path):
    (tmp_path / "mylab_methods.py").write_text(PLUGIN)
    conf = write_conf(tmp_path / "conf")
    env = {
        "LTBENCH_PLUGINS": "mylab_methods",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    r = ltbench("train", "--config-dir", str(conf), *SMOKE, "loss=squared_hinge_test", "sampler=inverse_test",
                "dataset=blobs_test", f"results_dir={tmp_path / 'results'}", cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(next((tmp_path / "results").rglob("metrics.json")).read_text())
    assert m["status"] == "completed" and m["dataset"] == "blobs_test"
    r = ltbench("train", "--help", cwd=tmp_path, env={"LTBENCH_PLUGINS": "no_such_module_xyz"})
    assert r.returncode == 2 and "no_such_module_xyz" in r.stderr and "Traceback" not in r.stderr
