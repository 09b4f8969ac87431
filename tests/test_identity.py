"""What identifies a run comes from one marking of the schema fields: every key derived from it obeys it.

For every leaf field of several composed configs, the field is changed and each derived key is compared: a field
marked ``none`` changes nothing; a ``run`` field changes the config hash but no stage cache key; the seed
(``replicate``) changes the stage keys but not the config hash; every other field changes both.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
from hydra import compose, initialize_config_module

from ltbench.config import MARK, TrainConfig, to_schema
from ltbench.identity import (
    changes_result,
    config_hash,
    mark_of,
    method_label,
    method_overrides,
    run_dir_name,
    sweep_subdir,
)
from ltbench.stages import plan, stage_keys

CONFIGS = [
    [],
    ["strategy=crt"],
    ["strategy=ldam_drw"],
    ["strategy=tau_norm", "logger=tensorboard"],
    ["dataset=imagenetlt", "model=resnet10", "strategy=cb_focal"],
]


@pytest.fixture(scope="module")
def configs() -> list[TrainConfig]:
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        return [to_schema(compose("train", overrides=o)) for o in CONFIGS]


def leaves(obj, prefix=""):
    """(dotted path, value, declared type) of every scalar or list field of a schema object."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{path}.")
        else:
            yield path, value, str(f.type)


def changed(value, declared: str):
    if value is None:  # an optional setting switched on, with a value of its declared type
        for name, v in (("float", 2.5), ("int", 3), ("str", "set"), ("bool", True)):
            if declared.startswith(name):
                return v
        return "set"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, list):
        return [*value, 7]
    raise TypeError(type(value))


def with_value(cfg: TrainConfig, path: str, value) -> TrainConfig:
    out = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    obj = out
    for p in parents:
        obj = getattr(obj, p)
    object.__setattr__(obj, last, value)
    return out


def keys(cfg: TrainConfig) -> dict[str, object]:
    return {
        "config_hash": config_hash(cfg),
        "stage_keys": tuple(stage_keys(cfg, plan(cfg), "split")),
        "run_dir": os.path.relpath(run_dir_name(cfg, "T"), cfg.results_dir),  # its name, under results_dir
    }


def test_every_field_obeys_its_mark(configs):
    checked = {"none": 0, "run": 0, "replicate": 0, "stage": 0}
    for cfg in configs:
        base = keys(cfg)
        for path, value, declared in leaves(cfg):
            if path.endswith(".name") or path in ("strategy",) or "Config" in declared:
                continue  # names and absent sections select options and stages: covered by the plan tests
            mark = mark_of(cfg, path)
            new = keys(with_value(cfg, path, changed(value, declared)))
            checked[mark] += 1
            if mark == "none":
                assert new == base, f"{path} is marked as not changing results but changed a key"
            elif mark == "run":
                assert new["config_hash"] != base["config_hash"], path
                assert new["stage_keys"] == base["stage_keys"], f"{path} (run level) changed a stage key"
            elif mark == "replicate":
                assert new["config_hash"] == base["config_hash"], path
                assert new["stage_keys"] != base["stage_keys"] and new["run_dir"] != base["run_dir"], path
            else:
                assert new["config_hash"] != base["config_hash"], f"{path} changes results but not the hash"
                assert new["stage_keys"][-1] != base["stage_keys"][-1], f"{path} does not reach the last stage key"
    assert min(checked.values()) > 0, checked  # every kind of mark was exercised


def test_the_marks_that_matter(configs):
    cfg = configs[0]
    for path in ("device", "num_threads", "progress", "results_dir", "resume", "dataset.root", "logger"):
        assert mark_of(cfg, path) == "none", path
    for path in ("dataset.groups", "dataset.groups.rule", "dataset.val_per_class", "strategy"):
        assert mark_of(cfg, path) == "run", path
    assert mark_of(cfg, "seed") == "replicate"
    for path in ("amp", "loss", "loss.label_smoothing", "schedule.lr", "dataset.split_seed", "model.width"):
        assert mark_of(cfg, path) == "stage", path
    assert mark_of(cfg, "schedule.eval_batch_size") == "none"
    assert mark_of(configs[4], "dataset.num_workers") == "none"  # augmentation is seeded per image


def test_an_earlier_stage_does_not_depend_on_which_later_stages_follow(configs):
    from ltbench.config import to_schema

    with initialize_config_module("ltbench.conf", version_base="1.3"):
        ce, crt = (to_schema(compose("train", overrides=["pretrain=rotation", *o])) for o in ([], ["strategy=crt"]))
    assert stage_keys(ce, plan(ce), "s")[0] == stage_keys(crt, plan(crt), "s")[0]  # one pre-training for both


def test_stage_keys_chain(configs):
    crt = configs[1]
    names = [s.name for s in plan(crt)]
    assert names == ["train", "classifier"]
    k = stage_keys(crt, plan(crt), "split")
    # a classifier setting changes only the classifier stage's key; a training setting changes both
    k2 = stage_keys(with_value(crt, "classifier.schedule.epochs", 3), plan(crt), "split")
    assert k2[0] == k[0] and k2[1] != k[1]
    k3 = stage_keys(with_value(crt, "schedule.lr", 0.05), plan(crt), "split")
    assert k3[0] != k[0] and k3[1] != k[1]
    assert stage_keys(crt, plan(crt), "other-split") != k


def test_label_and_directories_from_the_marks(configs):
    cfg = configs[0]
    overrides = ["loss=focal", "loss.gamma=2", "device=cpu", "seed=3", "dataset.root=/x", "num_threads=1"]
    assert method_overrides(cfg, overrides) == ["loss=focal", "loss.gamma=2"]
    assert method_label(cfg, overrides) == "ce [loss=focal, loss.gamma=2]"
    assert [o for o in overrides if changes_result(cfg, o)] == ["loss=focal", "loss.gamma=2", "seed=3"]
    # jobs of a sweep that differ only in an execution setting still get their own directories
    a = sweep_subdir(cfg, ["device=cpu"])
    b = sweep_subdir(cfg, ["device=cuda"])
    assert a != b and a.endswith(f"{config_hash(cfg)[:8]}_seed0")
    long = sweep_subdir(cfg, [f"dataset.root=/{'a' * 300}"])
    assert all(len(part) <= 120 for part in long.split("/"))
    assert long != sweep_subdir(cfg, [f"dataset.root=/{'a' * 299}b"])  # cut, but still unique


def test_schema_fields_are_marked_with_known_marks():
    def walk(cls, seen):
        for f in dataclasses.fields(cls):
            assert f.metadata.get(MARK, "stage") in ("stage", "run", "replicate", "none")
            t = f.type if isinstance(f.type, type) else None
            if t is not None and dataclasses.is_dataclass(t) and t not in seen:
                seen.add(t)
                walk(t, seen)

    walk(TrainConfig, set())
