"""Multi-process training (torchrun, gloo on CPU): the same metrics as one process on the same data."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import SMOKE


def _train(args, cwd, nproc=None):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    )
    return subprocess.run(
        [*launcher, "-m", "ltbench", "train", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_two_process_run_equals_one_process_run(cifar10_root, tmp_path):
    # ratio 4 keeps an even number of training images (216), so no rank pads its shard; no augmentation, so
    # every image is seen identically; BatchNorm runs over the global batch in both.
    common = [
        *SMOKE,
        f"dataset.root={cifar10_root}",
        "dataset.download=false",
        "dataset.imbalance_ratio=4",
        "augment=none",
        f"results_dir={tmp_path}",
    ]
    two = _train([*common, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _train([*common, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["top1"] == b["top1"] and a["per_class_acc"] == b["per_class_acc"]
    assert sum(b["test_class_counts"]) == b["num_test"] == 100  # every test image counted once
    wa = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4) for k in wa)  # only summation order differs


@pytest.mark.slow
def test_torchrun_needs_an_explicit_run_dir(cifar10_root, tmp_path):
    r = _train([*SMOKE, f"dataset.root={cifar10_root}", f"results_dir={tmp_path}"], tmp_path, nproc=2)
    # our one-line message from each rank (torchrun then reports the failed children in its own way)
    assert r.returncode != 0 and "error: under torchrun every rank runs ltbench" in r.stderr
