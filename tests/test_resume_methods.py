"""Runs that lose nothing (issue: lost results and broken resumes): every method with state resumes to the numbers
of an uninterrupted run, a run directory never swallows another seed, and a run that cannot start leaves nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import SMOKE, interrupt_at, make_cifar

from ltbench.errors import ConfigError
from ltbench.runner import run


@pytest.fixture(scope="module")
def ssl_root(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("ssl_cifar"), 10, train_per_class=60, test_per_class=10)


def ssl_data(root) -> list[str]:
    return ["dataset=cifar10lt_ssl", f"dataset.root={root}", "dataset.download=false", "dataset.max_labeled=20",
            "dataset.max_unlabeled=30", "dataset.imbalance_ratio=4", "dataset.unlabeled_ratio=4",
            "dataset.val_per_class=5", "schedule.epochs=3"]  # fmt: skip


@pytest.mark.parametrize("semi", ["fixmatch", "abc", "pseudo_label"])
def test_every_semi_method_resumed_inside_its_stage_equals_an_uninterrupted_run(
    compose_cfg, ssl_root, tmp_path, monkeypatch, semi
):
    """FixMatch kept the trained network as a submodule, so its state carried `_net.*` keys that a fresh method
    refused on resume; now the method's state is its own (EMA, statistics) and every semi= option resumes."""
    args = [*ssl_data(ssl_root), f"semi={semi}"]
    full = run(compose_cfg(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"),
                 at=2, stage="train")  # fmt: skip
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["method"]
    assert not any(k.startswith("_net.") for k in state)
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["train"] and resumed["resumed_at_epoch"] == [1]
    assert resumed["top1"] == full["top1"] and resumed["per_class_acc"] == full["per_class_acc"]


def test_a_checkpoint_written_before_the_fix_still_resumes(compose_cfg, ssl_root, tmp_path, monkeypatch):
    args = [*ssl_data(ssl_root), "semi=fixmatch", f"results_dir={tmp_path}"]
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*args), tmp_path / "cut"), at=2, stage="train")
    path = tmp_path / "cut" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["method"].update({f"_net.{k}": v for k, v in ckpt["model"].items()})  # what the old code saved
    torch.save(ckpt, path)
    assert run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)["status"] == "completed"


def test_a_directory_that_holds_one_seed_refuses_another(compose_cfg, cifar10_root, tmp_path):
    args = [f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10",
            f"results_dir={tmp_path}"]  # fmt: skip
    first = run(compose_cfg(*args), tmp_path / "run")
    assert first["status"] == "completed" and first["replicate_key"]
    with pytest.raises(ConfigError, match=r"holds seed 0 of this config, not seed 1"):
        run(compose_cfg(*args, "seed=1"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["seed"] == 0  # untouched
    again = run(compose_cfg(*args), tmp_path / "run")  # the same seed: "already completed" as before
    assert again["finished_at"] == first["finished_at"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_leaves_no_directory(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run(compose_cfg("device=cuda", f"results_dir={tmp_path}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fixmatch_killed_inside_its_stage_resumes_from_the_command_line(ssl_root, tmp_path):
    """The reported failure, as a user meets it: SIGTERM a FixMatch run after its first checkpoint, then
    `ltbench train resume=<dir>` completes it (it exited 1 with `Unexpected key(s) in state_dict: "_net..."`)."""
    run_dir = tmp_path / "run"
    args = [*SMOKE, *ssl_data(ssl_root), "semi=fixmatch", "schedule.epochs=40", f"results_dir={tmp_path}",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    cmd = [sys.executable, "-m", "ltbench", "train"]
    proc = subprocess.Popen([*cmd, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    t0 = time.time()
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 180, "no checkpoint in time"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    r = subprocess.run([*cmd, f"resume={run_dir}", "schedule.eval_batch_size=500"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


def test_the_sigmoid_prior_bias_survives_the_fresh_network_of_pseudo_label(
    compose_cfg, ssl_root, tmp_path, monkeypatch
):
    """semi=pseudo_label trains a fresh network after its base stage; the loss's prior bias (-log(C-1), the
    class-balanced-loss code's initialisation) was set before that re-initialisation and lost. It is set after now."""
    import math

    import ltbench.stages as stages_mod

    real, seen = stages_mod.train, {}

    def spy(ctx, sctx, stage, spec, ckpt):
        seen[stage.name] = spec.net.head.bias.detach().clone()
        return real(ctx, sctx, stage, spec, ckpt)

    monkeypatch.setattr(stages_mod, "train", spy)
    m = run(compose_cfg(*ssl_data(ssl_root), "semi=pseudo_label", "loss=sigmoid_focal", "schedule.epochs=1",
                        f"results_dir={tmp_path}"), tmp_path / "run")  # fmt: skip
    assert m["status"] == "completed"
    for name in ("base", "train"):
        assert torch.allclose(seen[name], torch.full((10,), -math.log(9))), name


def test_every_run_records_what_its_numbers_cost(compose_cfg, cifar10_root, tmp_path):
    """metrics.json's `cost`: epochs, image-steps and trainable parameters of every stage (a stage reused from the
    cache with what it cost when it was trained), the model's size, training seconds, device and GPU-hours."""
    args = [f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10",
            "strategy=crt", "classifier.schedule.epochs=1", f"results_dir={tmp_path}"]  # fmt: skip
    first = run(compose_cfg(*args), tmp_path / "a")
    cost = first["cost"]
    assert cost["epochs"] == {"train": first["epochs_completed"], "classifier": 1}
    assert cost["image_steps"]["train"] == first["epochs_completed"] * first["num_train"]
    assert cost["image_steps_total"] == sum(cost["image_steps"].values())
    assert cost["trainable_parameters"]["classifier"] < cost["trainable_parameters"]["train"] <= first["num_parameters"]
    assert cost["total_parameters"] == first["num_parameters"] and cost["device"] == "cpu" and cost["gpu_hours"] == 0
    assert cost["train_seconds"] > 0
    again = run(compose_cfg(*args, "classifier.schedule.epochs=2"), tmp_path / "b")
    assert again["stage1"]["reused"] is True
    assert again["cost"]["trainable_parameters"]["train"] == cost["trainable_parameters"]["train"]
    assert again["cost"]["image_steps"]["train"] == cost["image_steps"]["train"]  # counted, though reused
    from ltbench.report import report

    report(tmp_path / "a", tmp_path / "rep", plots=False)
    md, csv = (tmp_path / "rep" / "report.md").read_text(), (tmp_path / "rep" / "report.csv").read_text()
    steps = cost["image_steps_total"] / 1e6
    assert f"Compute (all seeds, every stage): crt: {steps:.3g} M image-steps" in md
    assert "image_steps_total" in csv.splitlines()[0] and str(cost["image_steps_total"]) in csv
