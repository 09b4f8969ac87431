"""A runner that never loses a result: one writer per run directory, SIGTERM and kill -9 resume to identical results,
resume accepts only settings that cannot change them, files keep the user's permissions, and bad input is refused
with one line before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SMOKE
from hydra import compose, initialize_config_module
from test_e2e import ltbench

from ltbench.config import to_schema
from ltbench.errors import ConfigError
from ltbench.rundir import RunDir, atomic_write_json, is_live


def fixture_args(root, tmp, epochs=40):
    return [*SMOKE, f"dataset.root={root}", "dataset.download=false", "dataset.imbalance_ratio=10",
            f"results_dir={tmp}", f"schedule.epochs={epochs}"]  # fmt: skip


def start(args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "ltbench", "train", *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(check, proc, timeout=120.0):
    t0 = time.time()
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.1)


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def same_results(a_dir, b_dir):
    a = json.loads((a_dir / "metrics.json").read_text())
    b = json.loads((b_dir / "metrics.json").read_text())
    wa, wb = weights(a_dir), weights(b_dir)
    assert a["status"] == b["status"] == "completed"
    assert a["top1"] == b["top1"] and a["per_class_acc"] == b["per_class_acc"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_second_writer_refused_then_sigterm_resumes_to_identical_results(cifar10_root, tmp_path):
    args = fixture_args(cifar10_root, tmp_path)
    run_dir = tmp_path / "run"
    a = start([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (run_dir / "checkpoint.pt").exists(), a)
    hydra_before = (run_dir / ".hydra" / "overrides.yaml").read_text()
    # a second process with another config into the same directory: one line, non-zero, nothing touched
    b = ltbench("train", *args, "loss=focal", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert b.returncode == 2 and "being written by a live ltbench run" in b.stderr and "Traceback" not in b.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == hydra_before
    assert is_live(run_dir)
    a.send_signal(signal.SIGTERM)  # a scheduler's time limit
    _, err = a.communicate(timeout=120)
    assert a.returncode == 143 and f"resume={run_dir}" in err.replace("\n", "")
    rec = json.loads((run_dir / "metrics.json").read_text())
    assert rec["status"] == "interrupted" and not is_live(run_dir)
    # resume, with settings that cannot change the result
    r = ltbench("train", f"resume={run_dir}", "schedule.eval_batch_size=7", "progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == hydra_before  # not overwritten by the resume
    full = ltbench("train", *args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    same_results(run_dir, tmp_path / "full")
    # ... and a setting that would change it is refused, with the overrides named
    r = ltbench("train", f"resume={run_dir}", "loss=focal", "device=cpu", cwd=tmp_path)
    assert r.returncode == 2 and "loss=focal" in r.stderr and "device=cpu" not in r.stderr.split("results:")[-1]


@pytest.mark.slow
def test_kill_9_leaves_a_stale_record_the_report_names_and_resume_finishes(cifar10_root, tmp_path):
    args = fixture_args(cifar10_root, tmp_path, epochs=30)
    run_dir = tmp_path / "sweep_like" / "run"
    a = start([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (run_dir / "checkpoint.pt").exists(), a)
    a.kill()  # kill -9: no handler runs
    a.communicate(timeout=60)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"
    (run_dir / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what a kill mid-write leaves
    r = ltbench("report", str(tmp_path / "sweep_like"), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0 and "stale" in (tmp_path / "sweep_like" / "report.md").read_text()
    r = ltbench("train", f"resume={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(run_dir.glob(".*.tmp"))  # the orphan is gone
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------------------------------------ in-process


def test_files_get_the_users_permissions_and_writes_are_atomic(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_falls_back_to_the_previous_good_state(tmp_path):
    rd = RunDir(tmp_path)
    rd.save_checkpoint("train", {"epoch": 1, "model": {"w": torch.ones(2)}})
    rd.save_checkpoint("train", {"epoch": 2, "model": {"w": torch.zeros(2)}})
    assert rd.load_checkpoint("train")["epoch"] == 2
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00truncated")
    assert rd.load_checkpoint("train")["epoch"] == 1 and "previous checkpoint" in rd.notes[0]
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(Exception, match=r"unreadable checkpoint checkpoint.pt.*start the run again"):
        rd.load_checkpoint("train")


def test_lock_refuses_a_second_writer_in_the_same_process(tmp_path):
    a, b = RunDir(tmp_path), RunDir(tmp_path)
    a.acquire()
    with pytest.raises(Exception, match="being written by a live ltbench run"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
    assert not is_live(tmp_path)


@pytest.fixture(scope="module")
def compose_cfg():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=list(o))


@pytest.mark.parametrize(
    "override,needle",
    [
        ("schedule.eval_batch_size=0", "eval_batch_size"),
        ("schedule.lr=-0.1", "schedule.lr"),
        ("schedule.batch_size=0", "batch_size"),
        ("model.width=0", "model.width"),
        ("dataset.imbalance_ratio=inf", "imbalance_ratio"),
        ("schedule.warmup=1.5", "warmup"),
        ("reweight=drw", None),
        ("num_threads=0", "num_threads"),
        ("strategy=tau_norm", None),
        ("strategy=tau_norm dataset.val_per_class=0", "val_per_class"),
        ("strategy=tau_norm model=resnet32_cosine", "linear head"),
    ],
)
def test_every_value_is_checked_when_the_config_is_composed(compose_cfg, override, needle):
    if needle is None:
        to_schema(compose_cfg(*override.split()))
        return
    with pytest.raises(ConfigError, match=needle):
        to_schema(compose_cfg(*override.split()))


@pytest.mark.parametrize("schedule", ["cifar_lt", "medium", "short", "cosine", "imagenet_lt"])
@pytest.mark.parametrize("strategy", ["ce_drw", "drs", "ldam_drw"])
def test_deferred_methods_compose_with_every_schedule(compose_cfg, schedule, strategy):
    from ltbench.reweight import Reweighting

    c = to_schema(compose_cfg(f"strategy={strategy}", f"schedule={schedule}"))
    switch = 0.8  # DRW and DRS switch at 0.8 of the epochs: the first lr decay of the reference recipe
    if strategy != "drs":
        assert Reweighting(c.reweight, [10, 1], c.schedule.epochs).start_epoch == round(switch * c.schedule.epochs)
    else:
        assert c.sampler.start == switch
