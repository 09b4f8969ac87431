"""What identifies a run, derived from one marking of the schema fields (see :mod:`ltbench.config`).

- :func:`config_hash`: everything but the seed and execution settings; runs sharing it are seeds of one experiment.
- :func:`stage_key`: a content address for a trained stage: the settings that stage reads, the seed, the data split
  and the key of the stage before it, so a change anywhere upstream gives a new key.
- :func:`method_overrides` / :func:`method_label`: the command-line overrides that change the method.
- :func:`run_dir_name` / :func:`sweep_subdir`: run directories unique for their identity (a short config hash and
  the seed in the name), registered as Hydra resolvers for ``hydra.run.dir`` / ``hydra.sweep.subdir``.
- :func:`changes_result`: whether overriding a key can change the result (``resume`` accepts only those that cannot).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ltbench.config import MARK, OMIT_AT_DEFAULT, REGISTERED_SECTIONS, TrainConfig, to_schema

_STRENGTH = {"none": 0, "run": 1, "replicate": 2, "stage": 3}
_FIXED_SECTIONS = ("augment", "schedule")  # sections without a registry; plugins may add registered ones
# Sections shown elsewhere in tables and directory names, or not a method setting.
_NOT_IN_LABEL = ("strategy", "experiment", "dataset", "hydra")


def _weaker(a: str, b: str) -> str:
    return a if _STRENGTH[a] <= _STRENGTH[b] else b


def identity_tree(obj: Any, keep: set[str], mark: str = "stage") -> Any:
    """The plain value of a schema object, with only the fields whose effective mark is in ``keep``.

    A field's effective mark is the weakest along its path: ``dataset.root`` is ``none`` because ``root`` is marked
    so; everything inside ``dataset.groups`` is ``run`` because ``groups`` is.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"_schema": type(obj).__name__}
        for f in dataclasses.fields(obj):
            if f.metadata.get(OMIT_AT_DEFAULT) and getattr(obj, f.name) == f.default:
                continue  # added later, at the behaviour from before it existed: the old identities stand
            m = _weaker(mark, f.metadata.get(MARK, "stage"))
            if m in keep:
                out[f.name] = identity_tree(getattr(obj, f.name), keep, m)
        return out
    if isinstance(obj, (list, tuple)):
        return [identity_tree(v, keep, mark) for v in obj]
    if isinstance(obj, dict):
        return {str(k): identity_tree(v, keep, mark) for k, v in obj.items()}
    return obj


def _digest(obj: Any, n: int) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def config_hash(cfg: TrainConfig) -> str:
    """Fingerprint of everything that defines the method, data and evaluation, not the seed: runs that differ
    only in their seed share it, and the report averages exactly those."""
    return _digest(identity_tree(cfg, {"stage", "run"}), 12)


def replicate_key(cfg: TrainConfig) -> str:
    """Fingerprint of the fields that vary between replicates of one experiment (the seed): with the config hash,
    what tells two runs of one directory apart."""
    return _digest(identity_tree(cfg, {"replicate"}), 12)


def stage_key(cfg: TrainConfig, sections: tuple[str, ...], prev_key: str | None, split_hash: str, name: str) -> str:
    """Content address of a trained stage: the ``sections`` of the config it reads (training-relevant fields only),
    the top-level settings (seed, amp), the data split and the previous stage's key."""
    import ltbench

    tree = identity_tree(cfg, {"stage", "replicate"})
    sections_ = {*REGISTERED_SECTIONS, *_FIXED_SECTIONS}
    top = {k: v for k, v in tree.items() if k not in sections_}  # seed, amp: never whether other sections exist
    parts = {
        "stage": name,
        "sections": {s: tree.get(s) for s in sections},
        "top": top,
        "prev": prev_key,
        "split": split_hash,
        "ltbench": ltbench.__version__,
    }
    return _digest(parts, 16)


def mark_of(cfg: TrainConfig, dotted: str) -> str:
    """The effective mark of a config path (``loss.gamma``, ``dataset.root``, ``loss``); unknown paths count as
    changing the result."""
    obj: Any = cfg
    mark = "stage"
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
            break
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            break
        mark = _weaker(mark, fields[part].metadata.get(MARK, "stage"))
        obj = getattr(obj, part)
    return mark


def _override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def changes_result(cfg: TrainConfig, override: str) -> bool:
    key = _override_key(override)
    return not key.startswith("hydra") and mark_of(cfg, key) != "none"


def method_overrides(cfg: TrainConfig, overrides: list[str] | None) -> list[str]:
    """The command-line overrides that change the method: not the seed, the data, the strategy or execution."""
    out = []
    for o in overrides or []:
        key = _override_key(o)
        if key.split(".")[0] in _NOT_IN_LABEL or key.split("/")[0] in _NOT_IN_LABEL:
            continue
        if mark_of(cfg, key) in ("stage", "run"):
            out.append(o)
    return out


def method_label(cfg: TrainConfig, overrides: list[str] | None) -> str:
    """The strategy name, the pre-training (``ce+SSP``) and the semi-supervised method with its unlabeled data
    (``ce+FixMatch (U 3000 max, ratio 100)``), a classifier stage that declares a label suffix (``sade+TTA(test)``),
    plus the other command-line overrides that change the method."""
    name = cfg.strategy
    if cfg.pretrain is not None:
        name += cfg.pretrain.label_suffix or f"+{cfg.pretrain.name}"
    if cfg.semi is not None:
        name += cfg.semi.label_suffix or f"+{cfg.semi.name}"
        unlabeled = cfg.dataset.unlabeled_text()
        name += f" ({unlabeled})" if unlabeled is not None else ""
    named = ["pretrain", "semi"]
    suffix = cfg.classifier.label_suffix if cfg.classifier is not None else None
    if suffix:  # a classifier stage that must be named whatever set it (SADE's test-time adaptation: +TTA(test))
        name += suffix
        named.append("classifier")
    extra = [o for o in method_overrides(cfg, overrides) if _override_key(o) not in named]
    if cfg.select != "last" and not any(_override_key(o) == "select" for o in extra):
        extra.append(f"select={cfg.select}")  # the selection protocol is always in the label (test_oracle above all)
    return f"{name} [{', '.join(extra)}]" if extra else name


def ratio_tag(ratio: Any) -> str:
    """100.0 -> '100', 12.5 -> '12.5', None -> 'natural': imbalance ratios in directory names."""
    return "natural" if ratio in (None, "None", "null") else f"{float(ratio):g}"


def data_tag(cfg: TrainConfig) -> str:
    """``cifar10lt_ir100``; datasets without an imbalance-ratio setting are named alone."""
    ds = cfg.dataset
    has_ratio, ratio = ds.imbalance_setting()
    return f"{ds.name}_ir{ratio_tag(ratio)}" if has_ratio else ds.name


def _safe(text: str, limit: int = 120) -> str:
    """A directory-name-safe form of ``text``; a long one is cut and keeps a hash of the whole, so it stays unique."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(safe) <= limit:
        return safe
    return safe[: limit - 9] + "~" + hashlib.sha256(text.encode()).hexdigest()[:8]


def run_dir_name(cfg: TrainConfig, stamp: str) -> str:
    """``<results_dir>/runs/<data>/<strategy>/<time>_<hash>_seed<seed>``: two runs never share a directory unless
    they are the same experiment with the same seed started in the same second."""
    leaf = f"{stamp}_{config_hash(cfg)[:8]}_seed{cfg.seed}"
    return os.path.join(cfg.results_dir, "runs", data_tag(cfg), _safe(cfg.strategy), leaf)


# Overrides already in a sweep directory's path (data tag, strategy, the seed in the leaf).
_IN_PATH = ("seed", "strategy", "dataset", "dataset.imbalance_ratio")


def sweep_subdir(cfg: TrainConfig, overrides: list[str], fixed: Collection[str] = ()) -> str:
    """``<data>/<strategy>/<overrides>/<hash>_seed<seed>`` inside a sweep directory. The readable part names the
    job's overrides but an execution setting (mark ``none``) that every job of the sweep shares (``fixed``:
    ``progress=false``, ``results_dir=...``); a swept one (``device=cpu,cuda``) stays, so its jobs keep apart. The
    hash is the identity, so two directories of one experiment never look alike."""

    def shown(o: str) -> bool:
        key = _override_key(o)
        if key in _IN_PATH or key.startswith("hydra"):
            return False
        return not (key in fixed and mark_of(cfg, key) == "none")

    extra = _safe(",".join(o for o in overrides if shown(o))) or "_"
    return os.path.join(data_tag(cfg), _safe(cfg.strategy), extra, f"{config_hash(cfg)[:8]}_seed{cfg.seed}")


# ----------------------------------------------------------------------------------- Hydra resolvers for the paths


def _typed_job_config(root: DictConfig) -> TrainConfig | None:
    try:
        job = OmegaConf.masked_copy(root, [str(k) for k in root if k != "hydra"])
        return to_schema(job)
    except Exception:  # an invalid config: the run refuses it with one clear line and removes the directory
        return None


def _run_dir_resolver(stamp: str, *, _root_: DictConfig) -> str:
    resume = _root_.get("resume")
    if resume not in (None, "", "None", "null") and os.path.exists(os.path.join(str(resume), "config.yaml")):
        return str(resume)  # a resumed run continues in its own directory
    cfg = _typed_job_config(_root_)
    if cfg is None:
        return os.path.join(str(_root_.get("results_dir", "results")), "runs", "_invalid", stamp)
    return run_dir_name(cfg, stamp)


def _sweep_subdir_resolver(*, _root_: DictConfig) -> str:
    cfg = _typed_job_config(_root_)
    if cfg is None:
        return os.path.join("_invalid", str(os.getpid()))
    # the keys every job of the sweep sets alike (`ltbench train` puts them there: ltbench.cli.prepare_sweep)
    fixed = OmegaConf.select(_root_, "hydra.job.config.override_dirname.exclude_keys", default=None) or []
    return sweep_subdir(cfg, list(_root_.hydra.overrides.task), {str(k) for k in fixed})


def _output_subdir_resolver(output_dir: str) -> str | None:
    """Hydra's .hydra/ record of the composed config: written for a new run only, never over an existing run's
    (a resumed one, or one another process writes)."""
    return None if os.path.exists(os.path.join(output_dir, "metrics.json")) else ".hydra"


def _log_file_resolver(output_dir: str, job: str) -> str:
    """Hydra's job log: the run directory's <job>.log, unless a live process writes that directory (this process
    will be refused and must not append to the other's log)."""
    from ltbench.rundir import is_live

    return os.devnull if is_live(Path(output_dir)) else os.path.join(output_dir, f"{job}.log")


OmegaConf.register_new_resolver("ltbench_run_dir", _run_dir_resolver, replace=True)
OmegaConf.register_new_resolver("ltbench_sweep_subdir", _sweep_subdir_resolver, replace=True)
OmegaConf.register_new_resolver("ltbench_output_subdir", _output_subdir_resolver, replace=True)
OmegaConf.register_new_resolver("ltbench_log_file", _log_file_resolver, replace=True)
