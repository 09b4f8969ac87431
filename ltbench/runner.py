"""``run(cfg, out_dir)``: the one function behind ``ltbench train`` and the tests.

validate the config -> take the run directory (one writer; a completed identical run is returned as it is, an
unfinished one resumes) -> data, task -> the stages -> evaluate once on the test set -> the record.

A run directory holds:

- ``config.yaml``: the resolved config (every interpolation and default filled in);
- ``train_indices.txt``: the kept training samples, one index into the original training set per line;
- ``epochs.csv`` (and ``<stage>_epochs.csv`` for the other stages): one row per epoch;
- ``checkpoint.pt`` (and ``<stage>_checkpoint.pt``): the state after the last finished epoch of that stage;
- ``metrics.json``: status, test metrics at the final epoch, provenance.

Every file is written atomically, so a crash never leaves a half-written record. The test set is evaluated once,
after the last stage: nothing is selected on it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ltbench.cluster import sigterm_interrupts
from ltbench.config import TrainConfig, sections, to_schema
from ltbench.data import LTData, build_dataset
from ltbench.dist import DistInfo, barrier, sync_batchnorm
from ltbench.dist import from_env as dist_from_env
from ltbench.dist import setup as dist_setup
from ltbench.errors import CheckpointError, ConfigError, LtbenchError
from ltbench.feed import DataFeed
from ltbench.fit import TestTimeEnsemble
from ltbench.identity import config_hash, method_label, replicate_key
from ltbench.loggers import LOGGERS
from ltbench.models import build_model
from ltbench.results import git_revision, versions
from ltbench.rundir import RunDir
from ltbench.stages import RunContext, StageResult, cache_root, load_cached, now, plan, save_cached, stage_keys
from ltbench.tables import results_table
from ltbench.tasks import build_task

log = logging.getLogger("ltbench")

CONFIG_FILE, METRICS, INDICES = RunDir.CONFIG, RunDir.METRICS, RunDir.INDICES
CHECKPOINT = RunDir.checkpoint_name("train")


def run(
    cfg: DictConfig | TrainConfig,
    out_dir: str | Path | None,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict:
    """Train and evaluate one configuration; write its record under ``out_dir``; return metrics.json's dict.

    With ``cfg.resume`` set, the run continues in that directory from its last checkpoint, with its saved config.
    A config error is raised before anything is written.
    """
    console = console or Console(stderr=True)
    tcfg = to_schema(cfg)
    if tcfg.resume:
        tcfg, out, overrides = _resume_target(tcfg, overrides)
    else:
        out = Path(str(out_dir))
    resolve_device(tcfg.device)  # before any directory is made: a run that cannot start leaves nothing
    rd = RunDir(out, writer=dist_from_env().main)
    rd.acquire()
    try:
        prev = rd.record() if rd.writer else None
        if prev is not None:
            _check_same_run(prev, tcfg, out)
        if prev is not None and prev.get("status") == "completed":
            console.print(f"[green]{out} already completed[/]; nothing to do.", soft_wrap=True)
            return prev
        removed = rd.clean_temporaries()
        if removed:
            log.info("removed half-written files of an interrupted process: %s", ", ".join(removed))
        with sigterm_interrupts():
            return _recorded(tcfg, rd, overrides, console)
    finally:
        rd.release()


def _check_same_run(prev: dict, tcfg: TrainConfig, out: Path) -> None:
    """A directory holds one run: another config, or another replicate (seed) of the same config, is refused."""
    if prev.get("config_hash") not in (None, config_hash(tcfg)):
        raise ConfigError(f"{out} holds another run (config hash {prev.get('config_hash')}); use a new directory")
    other_seed = prev.get("seed") not in (None, tcfg.seed)
    if other_seed or prev.get("replicate_key") not in (None, replicate_key(tcfg)):
        raise ConfigError(
            f"{out} holds seed {prev.get('seed')} of this config, not seed {tcfg.seed}: give each seed its own "
            "directory (e.g. hydra.run.dir=.../seed${seed}, or leave hydra.run.dir to ltbench)"
        )


def _resume_target(tcfg: TrainConfig, overrides: list[str] | None) -> tuple[TrainConfig, Path, list[str] | None]:
    """The run to continue: its saved config, with the settings that cannot change results taken from now."""
    from ltbench.identity import changes_result

    out = Path(str(tcfg.resume))
    if not out.is_dir():
        raise CheckpointError(f"resume={tcfg.resume}: no such run directory")
    saved = load_run_config(out)
    now_overrides = [o for o in overrides or [] if not o.startswith("resume=")]
    bad = [o for o in now_overrides if changes_result(saved, o)]
    if bad:
        raise ConfigError(
            f"resume continues a run with its saved config; these overrides would change its results: {' '.join(bad)}"
        )
    for o in now_overrides:  # execution settings (device, eval batch size, workers, progress...) apply
        key, value = o.split("=", 1)
        OmegaConf.update(node := OmegaConf.structured(saved), key.lstrip("+~"), OmegaConf.create({"v": value}).v)
        saved = to_schema(node)
    prev = RunDir(out).record() or {}
    return saved, out, prev.get("overrides", overrides)


def load_run_config(run_dir: Path) -> TrainConfig:
    """The saved config of a run directory (:meth:`RunDir.config`)."""
    return RunDir(Path(run_dir)).config()


def _recorded(tcfg: TrainConfig, rd: RunDir, overrides: list[str] | None, console: Console) -> dict:
    """Run, keeping metrics.json's status current: running, then completed, interrupted or failed."""
    record: dict[str, Any] = {
        "status": "running",
        "task": tcfg.task.name,
        "dataset": tcfg.dataset.name,
        "imbalance_ratio": tcfg.dataset.imbalance_setting()[1],
        "strategy": tcfg.strategy,
        "label": method_label(tcfg, overrides),
        "seed": tcfg.seed,
        "split_seed": tcfg.dataset.split_seed,
        "config_hash": config_hash(tcfg),
        "replicate_key": replicate_key(tcfg),
        "overrides": list(overrides or []),
        "started_at": now(),
        "versions": versions(),
        "git": git_revision(),
    }
    t0 = time.perf_counter()
    try:
        return _train_and_evaluate(tcfg, rd, record, console)
    except KeyboardInterrupt:
        record.update(status="interrupted", finished_at=now(), wall_time_s=round(time.perf_counter() - t0, 2))
        rd.write_json(METRICS, record)
        console.print(f"[yellow]interrupted[/]; continue with: ltbench train resume={rd.path}", soft_wrap=True)
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}" if not isinstance(e, LtbenchError) else str(e)
        record.update(status="failed", error=error, finished_at=now(), wall_time_s=round(time.perf_counter() - t0, 2))
        rd.write_json(METRICS, record)
        raise


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available; use device=auto or device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available; use device=auto or device=cpu")
    return torch.device(name)


def _setup(tcfg: TrainConfig) -> tuple[DistInfo, torch.device]:
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    info, device = dist_setup(resolve_device(tcfg.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return info, device


def _train_and_evaluate(tcfg: TrainConfig, rd: RunDir, record: dict, console: Console) -> dict:
    t_start = time.perf_counter()
    info, device = _setup(tcfg)
    data = build_dataset(tcfg.dataset, workdir=tcfg.results_dir, holdout=validation_holdout(tcfg))
    task = build_task(tcfg.task)
    stats = task.label_stats(data)
    _describe(record, tcfg, data, stats, device, info)
    if "val_note" in record and info.main:
        console.print(f"[yellow]note:[/] {record['val_note']}", soft_wrap=True)
    if not (rd / CONFIG_FILE).exists():
        rd.write_text(CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(tcfg)))
        rd.write_text(INDICES, "\n".join(map(str, data.train_indices.tolist())) + "\n")
        if data.unlabeled_indices is not None:
            rd.write_text("unlabeled_indices.txt", "\n".join(map(str, data.unlabeled_indices.tolist())) + "\n")
    rd.write_json(METRICS, record)

    torch.manual_seed(tcfg.seed)  # the model is initialised from the run seed alone
    model = build_model(tcfg.model, task.out_dim(data), data)
    if info.enabled:
        model = sync_batchnorm(model, device)
    model = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    record["num_parameters"] = sum(p.numel() for p in model.parameters())
    if isinstance(getattr(model, "weights", None), dict):  # a pre-trained backbone: which weights, their sha256
        record["model_weights"] = dict(model.weights)  # type: ignore[arg-type]
        record["preprocess"] = model.preprocess()  # type: ignore[operator]
    loggers = [LOGGERS.build(tcfg.logger, rd.path)] if tcfg.logger is not None and rd.writer else []
    ctx = RunContext(tcfg, data, task, stats, DataFeed(data, tcfg.dataset, device), device, info, rd, record,
                     console, _progress(tcfg, info, console), loggers)  # fmt: skip
    with ctx.progress:
        model, last = run_stages(ctx, model)
        outputs = _final_outputs(ctx, model, last)
    _finish(ctx, outputs, time.perf_counter() - t_start)
    for lg in loggers:
        lg.final({k: v for k, v in record.items() if k in {c["key"] for c in record["columns"]}})
    if info.main:
        console.print(results_table(record, _title(tcfg, record)))
        console.print(f"run directory: {rd.path}", soft_wrap=True)
    barrier(info)
    return record


def validation_holdout(tcfg: TrainConfig) -> bool:
    """Whether the validation split takes images out of the training subset where a class has too few left:
    ``dataset.val_holdout``, or (null) when a method of the run selects on the validation split."""
    if tcfg.dataset.val_holdout is not None:
        return tcfg.dataset.val_holdout
    return tcfg.select == "val" or any(obj.selects_on_validation for obj in sections(tcfg).values())


def _progress(tcfg: TrainConfig, info: DistInfo, console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (tcfg.progress and info.main),
        transient=False,
    )


def _describe(record: dict, tcfg: TrainConfig, data: LTData, stats, device: torch.device, info: DistInfo) -> None:
    """What the run trains and evaluates on, and where: recorded before training starts."""
    if record["imbalance_ratio"] is None:  # the split's own imbalance, measured
        nonzero = [c for c in stats.counts if c > 0]
        record["imbalance_ratio"] = round(max(nonzero) / min(nonzero), 2)
    val_counts = [int(c) for c in torch.bincount(stats.bin_of(data.val_y), minlength=data.num_classes)]
    record.update(
        split_files=data.split_files,
        split_hash=data.split_hash,
        data_fingerprint=data.data_fingerprint,
        data_root=data.root,
        num_train=len(data.train_y),
        num_unlabeled=None if data.unlabeled_y is None else len(data.unlabeled_y),
        num_test=len(data.test_y),
        train_class_counts=stats.counts,
        test_class_counts=[int(c) for c in torch.bincount(stats.bin_of(data.test_y), minlength=data.num_classes)],
        val_class_counts=val_counts,
        class_names=data.class_names,
        data_info=data.info,
        columns=[c.as_dict() for c in build_task(tcfg.task).columns()],
        group_unit="classes" if tcfg.task.name == "classification" else "bins",
        device=str(device),
        world_size=info.world_size,
        num_threads=torch.get_num_threads(),
        compile=tcfg.compile,
        stages=[s.name for s in plan(tcfg)],
    )
    short = [c for c, n in enumerate(val_counts) if n < tcfg.dataset.val_per_class]
    if short and tcfg.task.name == "classification":
        record["val_note"] = (
            f"classes {short} have fewer than {tcfg.dataset.val_per_class} training images left "
            "outside the long-tailed subset; the validation split holds what is left of them"
        )
    if data.val_moved and any(data.val_moved):
        record["val_moved"] = data.val_moved
        moved = {c: n for c, n in enumerate(data.val_moved) if n}
        record["val_note"] = (
            "a method of this run selects on the validation split, so every class is in it: "
            + ", ".join(f"{n} images of class {c}" for c, n in moved.items())
            + " were taken out of the training subset (the rest of the subset is the published one)"
        )


# --------------------------------------------------------------------------------------------------- stages


def run_stages(ctx: RunContext, model: torch.nn.Module) -> tuple[torch.nn.Module, StageResult | None]:
    """Run the stages of the plan from where this run stands (a checkpoint, a cached stage, or the start)."""
    stages = plan(ctx.cfg)
    keys = stage_keys(ctx.cfg, stages, ctx.data.split_hash)
    start, ckpt, rows = _starting_point(ctx, stages, keys, model)
    result = None
    for i in range(start, len(stages)):
        stage = stages[i]
        ctx.selecting = stage.name if i == len(stages) - 1 and ctx.cfg.select != "last" else None
        result = stage.run(ctx, ctx.stage_context(stage, stages[:i]), model, ckpt if i == start else None)
        model, rows[stage.name] = result.model, result.rows
        if i == len(stages) - 1:  # the last stage's own record: a classifier's choice, a method's summary
            if stage.main:
                ctx.record.update(result.record)
            else:
                ctx.record[stage.record_key] = result.record
            break
        entry = {"cache_key": keys[i], "cache_dir": str(cache_root(ctx.cfg) / keys[i]), "reused": False,
                 "epochs": len(result.rows), "trainable_parameters": ctx.trainable.get(stage.name), **result.record,
                 "trained_in": str(ctx.rundir.path), "created_at": now(), "git": ctx.record["git"]}  # fmt: skip
        if stage.main:  # the network before the classifier stage, evaluated for the record
            entry.update(_brief_evaluation(ctx, model))
        ctx.record[stage.record_key] = entry
        if ctx.info.main:
            done = {s.record_key: ctx.record[s.record_key] for s in stages[: i + 1]}
            save_cached(cache_root(ctx.cfg) / keys[i], model, dict(rows), done)
        if i == start and ckpt is not None:
            ckpt = None
    main = next(s.name for s in stages if s.main)
    ctx.record["cost"] = _cost(ctx, stages, rows)
    ctx.record["epochs_completed"] = len(rows.get(main, []))
    ctx.record["train_rows"] = rows.get(main, [])
    return model, result


def _cost(ctx: RunContext, stages: list, rows: dict[str, list]) -> dict[str, Any]:
    """What the run's numbers cost, every stage counted (a stage reused from the cache with what it cost when it
    was trained): epochs, image-steps (images through a training step), trainable parameters per stage and the
    model's total; the wall time, device and GPU-hours are added when the run ends."""
    trainable = {}
    for s in stages:
        entry = ctx.record.get(s.record_key)
        known = entry.get("trainable_parameters") if isinstance(entry, dict) else None
        trainable[s.name] = ctx.trainable.get(s.name, known)
    steps = {s.name: int(sum(r.get("images", 0) for r in rows.get(s.name, []))) for s in stages}
    seconds = sum(float(r.get("seconds", 0.0)) for s in stages for r in rows.get(s.name, []))
    return {
        "train_seconds": round(seconds, 2),  # every epoch of every stage, across resumes and the stage cache
        "epochs": {s.name: len(rows.get(s.name, [])) for s in stages},
        "image_steps": steps,
        "image_steps_total": sum(steps.values()),
        "trainable_parameters": trainable,
        "total_parameters": ctx.record.get("num_parameters"),
    }


def _brief_evaluation(ctx: RunContext, model: torch.nn.Module) -> dict[str, Any]:
    out = {"test": ctx.task.brief(ctx.evaluate(ctx.predict(model, "test"), "test"))}
    if len(ctx.data.val_y):
        out["val"] = ctx.task.brief(ctx.evaluate(ctx.predict(model, "val"), "val"))
    return out


def _starting_point(ctx: RunContext, stages, keys, model) -> tuple[int, dict | None, dict[str, list]]:
    """(first stage to run, its checkpoint, epoch-log rows of the stages before it).

    A checkpoint of this run (the furthest stage that has one) comes first; else the furthest cached stage that
    another stage follows; else the start.
    """
    for i in reversed(range(len(stages))):
        ckpt = ctx.rundir.load_checkpoint(stages[i].name)
        if ckpt is None:
            continue
        if ckpt.get("split_hash") != ctx.data.split_hash or ckpt.get("config_hash") != ctx.record["config_hash"]:
            raise CheckpointError(f"{ctx.rundir.path}: the checkpoint does not belong to this run's config and data")
        for note in ctx.rundir.notes:
            ctx.console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
        ctx.record.update(ckpt.get("stages", {}))
        ctx.record.setdefault("resumed_at_epoch", []).append(int(ckpt["epoch"]))
        ctx.record.setdefault("resumed_at_stage", []).append(stages[i].name)
        sched = stages[i].schedule(ctx.cfg)
        total = sched.epochs if sched is not None else "?"
        ctx.console.print(
            f"resuming {ctx.rundir.path}: stage {stages[i].name}, epoch {ckpt['epoch'] + 1}/{total}", soft_wrap=True
        )
        return i, ckpt, {}
    for i in reversed(range(len(stages) - 1)):
        cached = load_cached(cache_root(ctx.cfg) / keys[i])
        if cached is None:
            continue
        model.load_state_dict(cached["model"])
        for key, rec in cached["records"].items():
            ctx.record[key] = {**rec, "reused": True}
        for name, rows in cached["rows"].items():
            ctx.rundir.write_csv(RunDir.epoch_log_name(name), rows)
        ctx.console.print(
            f"[green]{stages[i].title} reused[/] ({stages[i].name}) from {cache_root(ctx.cfg) / keys[i]}",
            soft_wrap=True,
        )
        log.info("stage %s reused from %s", stages[i].name, cache_root(ctx.cfg) / keys[i])
        return i + 1, None, dict(cached["rows"])
    return 0, None, {}


# --------------------------------------------------------------------------------------------------- the end


def _final_outputs(ctx: RunContext, model: torch.nn.Module, last: StageResult | None) -> dict[str, torch.Tensor]:
    """Test (and validation) outputs of the final network: evaluated once, after the last stage."""
    outputs = dict(last.outputs or {}) if last is not None else {}
    if ctx.cfg.tte != "none":  # test-time ensembling: of the network's own outputs, test and validation alike
        tte = TestTimeEnsemble(model, ctx.cfg.tte, ctx.cfg.tte_expand)
        ctx.record["tte"] = {"mode": ctx.cfg.tte, "expand": ctx.cfg.tte_expand, "crops": tte.crops(),
                             "applied": "test" not in outputs}  # fmt: skip
        if "test" in outputs:
            log.warning("tte=%s: the last stage computed its own test outputs; they are not ensembled", ctx.cfg.tte)
        model = tte
    if "test" not in outputs:
        outputs["test"] = ctx.predict(model, "test")
    if "val" not in outputs and len(ctx.data.val_y):
        outputs["val"] = ctx.predict(model, "val")
    return outputs


def _finish(ctx: RunContext, outputs: dict[str, torch.Tensor], wall: float) -> None:
    record = ctx.record
    rows = record.pop("train_rows", [])
    summary = ctx.evaluate(outputs["test"], "test")
    for name, file_rows in ctx.task.artifacts(outputs["test"], ctx.data.test_y, ctx.stats).items():
        ctx.rundir.write_csv(name, file_rows)
    record["val"] = ctx.task.brief(ctx.evaluate(outputs["val"], "val")) if "val" in outputs else None
    train_time = sum(r["seconds"] for r in rows)
    record.update(
        summary,
        status="completed",
        train_images_per_s=round(sum(r["images"] for r in rows) / max(train_time, 1e-9), 1),
        finished_at=now(),
        wall_time_s=round(wall, 2),
    )
    last = record.get("stages", ["train"])[-1]
    record.setdefault("selection", {"protocol": "last", "stage": last,
                                    "epoch": (record.get("cost") or {}).get("epochs", {}).get(last)})  # fmt: skip
    cost = record.setdefault("cost", {})
    gpus = ctx.info.world_size if ctx.device.type == "cuda" else 0
    cost.update(
        wall_time_s=round(wall, 2),  # this process, evaluation included
        device=ctx.device.type,
        device_name=torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else ctx.device.type,
        device_count=ctx.info.world_size,
        gpu_hours=round(float(cost.get("train_seconds", 0.0)) * gpus / 3600, 4),
    )
    ctx.rundir.write_json(METRICS, record)


def _title(tcfg: TrainConfig, record: dict) -> str:
    title = f"{record['label']} on {tcfg.dataset.name} (ratio {record['imbalance_ratio']:g}, seed {tcfg.seed})"
    sel = record.get("selection") or {}
    if sel.get("protocol") == "val":
        title += f" — test, epoch {sel.get('epoch')} (chosen on validation)"
    elif sel.get("protocol") == "test_oracle":
        title += f" — test, best test epoch {sel.get('epoch')} (TEST-SELECTED)"
    else:
        title += " — test, final epoch"
    stage2 = record.get("stage2") or {}
    if stage2:
        title += f", stage 2: {stage2['method']}"
        if "tau" in stage2.get("chosen", {}):
            title += f" (tau {stage2['chosen']['tau']:g}, chosen on validation)"
    return title
