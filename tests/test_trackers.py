"""Experiment trackers for real: W&B in offline mode and MLflow on a local store, read back with their own code
(wandb's protobuf Record of the offline run file, MlflowClient) and compared with the run's metrics.json."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest
from conftest import SMOKE
from hydra import compose, initialize_config_module

from ltbench.runner import run


@pytest.fixture(scope="module")
def compose_cfg():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=[*SMOKE, *o])


def _train(compose_cfg, cifar10_root, out: Path, *overrides: str) -> dict:
    cfg = compose_cfg(f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10",
                      f"results_dir={out.parent}", *overrides)  # fmt: skip
    return run(cfg, out)


def read_wandb_offline(run_dir: Path) -> dict:
    """The records of an offline W&B run, parsed with wandb's own protobuf schema (wandb_internal_pb2.Record) from
    the run file's LevelDB-style log (7-byte header ':W&B' + magic + version; 32 KiB blocks; chunk header
    crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4), as wandb's former sdk/internal/datastore.py reads it."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, buf, out = Path(path).read_bytes(), 7, b"", {"history": [], "summary": {}, "run": None, "artifacts": []}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            which = rec.WhichOneof("record_type")
            if which == "history":
                out["history"].append({_key(i): json.loads(i.value_json) for i in rec.history.item})
            elif which == "summary":
                out["summary"].update({_key(u): json.loads(u.value_json) for u in rec.summary.update})
            elif which == "run":
                out["run"] = rec.run
            elif which == "artifact":
                out["artifacts"].append(rec.artifact)
    return out


def _key(item) -> str:
    return "/".join(item.nested_key) or item.key


def test_wandb_offline_run_holds_epochs_config_summary_and_plots(compose_cfg, cifar10_root, tmp_path):
    pytest.importorskip("wandb")
    m = _train(compose_cfg, cifar10_root, tmp_path / "run", "logger=wandb")
    epochs = [json.loads(json.dumps(r)) for r in _csv(tmp_path / "run" / "epochs.csv")]
    wb = read_wandb_offline(tmp_path / "run")
    assert wb["run"].display_name == "cifar10lt_ir10/ce/seed0" and wb["run"].run_group == "cifar10lt_ir10/ce"
    config = {u.key: json.loads(u.value_json) for u in wb["run"].config.update}
    assert config["seed"] == 0 and config["schedule"]["epochs"] == 2 and config["dataset"]["imbalance_ratio"] == 10
    rows = [h for h in wb["history"] if "train/train_loss" in h]
    assert [r["train/epoch"] for r in rows] == [1, 2]
    assert [r["train/train_loss"] for r in rows] == pytest.approx([float(e["train_loss"]) for e in epochs])
    for k in ("top1", "many", "medium", "few"):
        assert wb["summary"][k] == pytest.approx(m[k])
    (art,) = wb["artifacts"]
    files = {c.path for c in art.manifest.contents}
    assert {"per_class_cifar10lt_ir10.png", "groups_cifar10lt_ir10.png"} <= files
    assert (tmp_path / "run" / "wandb_run_id.txt").read_text() == wb["run"].run_id


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_mlflow_sqlite_store_holds_params_metrics_and_plots(compose_cfg, cifar10_root, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    m = _train(compose_cfg, cifar10_root, tmp_path / "run", "logger=mlflow", "strategy=balanced_softmax")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default store: <results_dir>/mlflow.db
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ltbench")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED" and r.info.run_name == "cifar10lt_ir10/balanced_softmax/seed0"
    assert r.data.tags["group"] == "cifar10lt_ir10/balanced_softmax"
    assert r.data.params["loss.name"] == "balanced_softmax" and r.data.params["schedule.epochs"] == "2"
    for k in ("top1", "many", "medium", "few"):
        assert r.data.metrics[k] == pytest.approx(m[k])
    hist = client.get_metric_history(r.info.run_id, "train/train_loss")
    epochs = _csv(tmp_path / "run" / "epochs.csv")
    assert [h.step for h in hist] == [1, 2]
    assert [h.value for h in hist] == pytest.approx([float(e["train_loss"]) for e in epochs])
    plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    assert {"plots/per_class_cifar10lt_ir10.png", "plots/groups_cifar10lt_ir10.png"} <= plots
    assert "metrics.json" in {a.path for a in client.list_artifacts(r.info.run_id)}


def test_a_tracker_that_cannot_start_warns_once_and_the_run_completes(compose_cfg, cifar10_root, tmp_path):
    pytest.importorskip("mlflow")
    bad = tmp_path / "not_a_dir"
    bad.write_text("a file where the store's directory should be")
    uri = f"sqlite:///{bad / 'mlflow.db'}"
    with pytest.warns(RuntimeWarning, match="logger=mlflow: start failed") as caught:
        m = _train(compose_cfg, cifar10_root, tmp_path / "run", "logger=mlflow", f"logger.tracking_uri={uri}")
    assert m["status"] == "completed" and m["top1"] is not None
    assert sum("logger=mlflow" in str(w.message) for w in caught) == 1
