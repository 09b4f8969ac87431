"""``run(cfg, out_dir)``: the one function behind ``ltbench train`` and the tests.

A run directory holds:

- ``config.yaml``: the resolved config (every interpolation and default filled in);
- ``train_indices.txt``: the kept training images, one index into the original training set per line;
- ``epochs.csv``: one row per epoch (lr, loss, accuracy on the training batches, throughput);
- ``checkpoint.pt``: model, optimiser, epoch and RNG state after the last finished epoch;
- ``metrics.json``: status, test metrics at the final epoch, provenance.

Every file is written atomically (temporary file + rename), so a crash never leaves a half-written record.
The test set is evaluated once, after the last epoch: nothing is selected on it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ltbench.config import TrainConfig, as_plain, to_schema
from ltbench.data import build_dataset
from ltbench.dist import barrier, eval_shard, gather_cat, sync_batchnorm
from ltbench.dist import setup as dist_setup
from ltbench.engine import lr_at, predict, train_one_epoch
from ltbench.errors import CheckpointError, ConfigError, LtbenchError
from ltbench.feed import DataFeed
from ltbench.losses import Reweighting, build_loss
from ltbench.metrics import GROUPS, fmt_acc, summarize
from ltbench.models import build_model
from ltbench.results import (
    METRICS,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    git_revision,
    set_writer,
    versions,
)
from ltbench.samplers import Sampler, shard
from ltbench.seeding import generator
from ltbench.stages import balanced_accuracy, run_stage2, stage1_key
from ltbench.synth import Synthesizer

log = logging.getLogger("ltbench")

CONFIG_FILE, CHECKPOINT, EPOCH_LOG, INDICES = (
    "config.yaml",
    "checkpoint.pt",
    "epochs.csv",
    "train_indices.txt",
)

# Keys that do not change what a run computes (or are the seed, which the report averages over).
_NOT_IN_HASH = ("seed", "resume", "device", "amp", "progress", "results_dir", "num_threads", "stage1_cache")
_NOT_IN_HASH_DATASET = ("root", "download", "split_dir", "num_workers", "check_files", "check_counts")


def config_hash(cfg: TrainConfig) -> str:
    """Fingerprint of everything that defines the method and data, not the seed: runs that differ only in seed
    share it, and the report averages exactly those."""
    d = as_plain(cfg)
    for k in _NOT_IN_HASH:
        d.pop(k, None)
    for k in _NOT_IN_HASH_DATASET:
        d["dataset"].pop(k, None)
    d["schedule"].pop("eval_batch_size", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


_LABEL_SKIP = (
    "seed",
    "strategy",
    "dataset",
    "resume",
    "device",
    "amp",
    "progress",
    "results_dir",
    "num_threads",
    "experiment",
    "stage1_cache",
)


def method_label(strategy: str, overrides: list[str] | None) -> str:
    """The strategy name plus the command-line overrides that change the method (not seed, data or device)."""
    extra = []
    for o in overrides or []:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0] in _LABEL_SKIP or key.startswith("hydra"):
            continue
        extra.append(o)
    return f"{strategy} [{', '.join(extra)}]" if extra else strategy


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available; use device=auto or device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available; use device=auto or device=cpu")
    return torch.device(name)


def load_run_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not an ltbench run directory (no {CONFIG_FILE})")
    try:
        saved = OmegaConf.load(path)
        return to_schema(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
    except LtbenchError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise CheckpointError(
            f"nothing to resume in {run_dir}: no {CHECKPOINT} (the run stopped before its first epoch)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("epoch", "model", "optimizer", "config_hash", "log", "rng"):
            if key not in ckpt:
                raise KeyError(key)
    except Exception as e:
        raise CheckpointError(f"unreadable checkpoint {path}: {type(e).__name__}: {e}") from e
    return ckpt


def _write_epoch_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


STAGE1_CKPT, STAGE1_RECORD = "stage1.pt", "stage1.json"


def _brief(summary: dict) -> dict:
    keys = ("top1", "many", "medium", "few", "balanced_top1", "group_sizes", "per_class_acc")
    return {k: summary[k] for k in keys if k in summary}


def _load_stage1(cache_dir: Path) -> dict | None:
    """A cached stage-1 backbone, or None (absent or unreadable: then stage 1 is trained again)."""
    if not (cache_dir / STAGE1_CKPT).exists() or not (cache_dir / STAGE1_RECORD).exists():
        return None
    try:
        ckpt = torch.load(cache_dir / STAGE1_CKPT, map_location="cpu", weights_only=True)
        return {
            "model": ckpt["model"],
            "log": ckpt["log"],
            "record": json.loads((cache_dir / STAGE1_RECORD).read_text()),
        }
    except Exception as e:
        log.warning("ignoring unreadable stage-1 cache %s (%s)", cache_dir, e)
        return None


def _save_stage1(cache_dir: Path, model: torch.nn.Module, rows: list[dict], record: dict) -> None:
    atomic_torch_save(cache_dir / STAGE1_CKPT, {"model": model.state_dict(), "log": rows})
    atomic_write_json(cache_dir / STAGE1_RECORD, record)  # written last: its presence marks a complete entry


def results_table(m: dict, title: str) -> Table:
    t = Table(title=title)
    for col in ("top-1", *GROUPS):
        t.add_column(col, justify="right")
    sizes = m.get("group_sizes", {})
    t.add_row(fmt_acc(m.get("top1")), *(fmt_acc(m.get(g)) for g in GROUPS))
    t.add_row("classes", *(str(sizes.get(g, "–")) for g in GROUPS), style="dim")
    return t


def run(
    cfg: DictConfig | TrainConfig,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict:
    """Train and evaluate one configuration; write its record under ``out_dir``; return metrics.json's dict.

    With ``cfg.resume`` set, the run continues in that directory from its last checkpoint, with its saved config.
    """
    console = console or Console(stderr=True)
    try:
        tcfg = to_schema(cfg)
    except LtbenchError as e:
        if out_dir is not None:  # leave a record, so a sweep's report lists the job that failed
            get = cfg.get if isinstance(cfg, DictConfig) else (lambda k, d=None: getattr(cfg, k, d))
            atomic_write_json(
                Path(out_dir) / METRICS,
                {
                    "status": "failed",
                    "error": str(e),
                    "strategy": get("strategy"),
                    "seed": get("seed"),
                    "label": method_label(str(get("strategy")), overrides),
                    "overrides": list(overrides or []),
                    "finished_at": _now(),
                },
            )
        raise
    resume_ckpt = None
    if tcfg.resume:
        out = Path(tcfg.resume)
        if not out.is_dir():
            raise CheckpointError(f"resume={tcfg.resume}: no such run directory")
        prev = json.loads((out / METRICS).read_text()) if (out / METRICS).exists() else {}
        if prev.get("status") == "completed":
            console.print(f"[green]{out} already completed[/]; nothing to resume.")
            return prev
        device_override = tcfg.device
        tcfg = load_run_config(out)
        tcfg.device = device_override
        resume_ckpt = load_checkpoint(out)
        if resume_ckpt["config_hash"] != config_hash(tcfg):
            raise CheckpointError(f"{out}: the checkpoint does not belong to this run's config.yaml")
        overrides = prev.get("overrides", overrides)
    else:
        out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    record: dict[str, Any] = {
        "status": "running",
        "dataset": tcfg.dataset.name,
        "imbalance_ratio": tcfg.dataset.imbalance_ratio,
        "strategy": tcfg.strategy,
        "label": method_label(tcfg.strategy, overrides),
        "seed": tcfg.seed,
        "split_seed": tcfg.dataset.split_seed,
        "config_hash": config_hash(tcfg),
        "overrides": list(overrides or []),
        "started_at": _now(),
        "versions": versions(),
        "git": git_revision(),
    }
    t_start = time.perf_counter()
    try:
        metrics = _train(tcfg, out, record, resume_ckpt, console)
    except KeyboardInterrupt:
        record.update(status="interrupted", finished_at=_now(), wall_time_s=time.perf_counter() - t_start)
        atomic_write_json(out / METRICS, record)
        console.print(f"[yellow]interrupted[/]; continue with: ltbench train resume={out}")
        raise
    except Exception as e:
        record.update(
            status="failed",
            error=f"{type(e).__name__}: {e}",
            finished_at=_now(),
            wall_time_s=time.perf_counter() - t_start,
        )
        atomic_write_json(out / METRICS, record)
        raise
    return metrics


def _train(tcfg: TrainConfig, out: Path, record: dict, resume_ckpt: dict | None, console: Console) -> dict:
    t_start = time.perf_counter()
    sched = tcfg.schedule
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    info, device = dist_setup(resolve_device(tcfg.device))
    set_writer(info.main)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if sched.batch_size % info.world_size:
        raise ConfigError(f"schedule.batch_size={sched.batch_size} is not divisible by the {info.world_size} processes")
    rank_batch = sched.batch_size // info.world_size  # the global batch is schedule.batch_size
    data = build_dataset(tcfg.dataset, workdir=tcfg.results_dir)
    if tcfg.dataset.imbalance_ratio is None:  # the split's own imbalance, measured
        record["imbalance_ratio"] = round(max(data.class_counts) / max(min(data.class_counts), 1), 2)
    record.update(
        split_files=data.split_files,
        split_hash=data.split_hash,
        data_fingerprint=data.data_fingerprint,
        data_root=data.root,
        num_train=len(data.train_y),
        num_test=len(data.test_y),
        train_class_counts=data.class_counts,
        test_class_counts=[int(c) for c in torch.bincount(data.test_y, minlength=data.num_classes)],
        class_names=data.class_names,
        device=str(device),
    )
    if resume_ckpt is not None:
        if resume_ckpt.get("split_hash") != data.split_hash:
            raise CheckpointError(
                f"{out}: the training split changed since this run started "
                f"(split hash {resume_ckpt.get('split_hash')} then, {data.split_hash} now)"
            )
    else:
        atomic_write_text(out / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(tcfg)))
        atomic_write_text(out / INDICES, "\n".join(map(str, data.train_indices.tolist())) + "\n")
    atomic_write_json(out / METRICS, record)
    for m in sched.milestones or []:
        if m >= sched.epochs:
            log.warning("schedule.milestones: %d is not before epoch %d, so it never applies", m, sched.epochs)

    # Model, loss, optimiser. The model is initialised from the run seed alone.
    torch.manual_seed(tcfg.seed)
    model = build_model(tcfg.model, data.num_classes)
    if info.enabled:
        model = sync_batchnorm(model, device)
    model = model.to(device, memory_format=torch.channels_last)
    loss_fn = build_loss(tcfg.loss, data.class_counts).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=sched.lr,
        momentum=sched.momentum,
        weight_decay=sched.weight_decay,
        nesterov=sched.nesterov,
    )
    reweight = Reweighting(tcfg.reweight, data.class_counts)
    sampler = Sampler(tcfg.sampler, data.train_y, data.num_classes, sched.epochs)
    synth = Synthesizer(tcfg.synth, data.train_x, data.train_y, data.class_counts)
    feed = DataFeed(data, tcfg.dataset, device)
    record["num_parameters"] = sum(p.numel() for p in model.parameters())
    record["world_size"] = info.world_size

    start_epoch, rows = 0, []
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        torch.set_rng_state(resume_ckpt["rng"]["torch"])
        start_epoch, rows = int(resume_ckpt["epoch"]), list(resume_ckpt["log"])
        record["resumed_at_epoch"] = [*resume_ckpt.get("resumed_at_epoch", []), start_epoch]
        console.print(f"resuming {out} at epoch {start_epoch + 1}/{sched.epochs}")

    two_stage = sched.stage2.method != "none"
    reused = False
    if two_stage:
        key = stage1_key(tcfg, data.split_hash)
        cache_dir = Path(tcfg.stage1_cache or Path(tcfg.results_dir) / "stage1_cache") / key
        record["stage1"] = {"cache_key": key, "cache_dir": str(cache_dir)}
        cached = _load_stage1(cache_dir) if resume_ckpt is None else None
        if cached is not None:
            model.load_state_dict(cached["model"])
            start_epoch, rows, reused = sched.epochs, list(cached["log"]), True
            record["stage1"].update(cached["record"], reused=True)
            _write_epoch_log(out / EPOCH_LOG, rows)
            console.print(f"[green]stage 1 reused[/] from {cache_dir}: no stage-1 training")
            log.info("stage 1 reused from %s", cache_dir)

    # Under torchrun, gradients are averaged across ranks by DistributedDataParallel.
    train_model: torch.nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    progress = Progress(
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
    with progress:
        ep_task = progress.add_task("epochs", total=sched.epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch, sched.epochs):
            lr = lr_at(epoch, sched.lr, sched.epochs, sched.warmup_epochs, sched.decay, sched.milestones, sched.gamma)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # Per-epoch generators derived from (seed, epoch): the same draws whether or not the run resumed.
            # Every rank draws the same stream and takes its interleaved shard.
            indices = shard(
                sampler.epoch_indices(epoch, generator(tcfg.seed, epoch, "sampler")), info.rank, info.world_size
            )
            weight = reweight.at(epoch)
            weight = weight.to(device) if weight is not None else None
            synth_on = synth.active(epoch)
            batch_task = progress.add_task(f"epoch {epoch + 1}", total=len(indices), info="")
            t0 = time.perf_counter()

            seen = [0]

            def on_batch(n: int, loss: float, _task=batch_task, _t0=t0, _seen=seen, _lr=lr) -> None:
                _seen[0] += n
                speed = _seen[0] / max(time.perf_counter() - _t0, 1e-9)
                progress.update(_task, advance=n, info=f"loss {loss:.3f} lr {_lr:.4g} {speed:,.0f} img/s")

            gen = generator(tcfg.seed, epoch, "batch", *([info.rank] if info.enabled else []))
            batches = feed.train(
                indices, batch_size=rank_batch, augment=tcfg.augment, synth=synth, synth_on=synth_on, gen=gen
            )
            stats = train_one_epoch(
                train_model,
                optimizer,
                loss_fn,
                batches,
                synth=synth,
                synth_on=synth_on,
                class_weight=weight,
                gen=gen,
                amp=tcfg.amp,
                on_batch=on_batch,
            )
            if not np.isfinite(stats.loss):
                raise LtbenchError(f"training diverged at epoch {epoch + 1} (loss {stats.loss}); lower schedule.lr")
            progress.remove_task(batch_task)
            rows.append(stats.row(epoch + 1, lr, reweight_on=weight is not None, synth_on=synth_on))
            progress.update(
                ep_task,
                advance=1,
                info=f"loss {stats.loss:.3f} acc {stats.acc:.1f}% {stats.images_per_s:,.0f} img/s",
            )
            log.info(
                "epoch %d/%d lr %.4g loss %.4f train-acc %.2f%% %.0f img/s",
                epoch + 1,
                sched.epochs,
                lr,
                stats.loss,
                stats.acc,
                stats.images_per_s,
            )
            _write_epoch_log(out / EPOCH_LOG, rows)
            atomic_torch_save(
                out / CHECKPOINT,
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": {"torch": torch.get_rng_state()},
                    "config_hash": record["config_hash"],
                    "split_hash": data.split_hash,
                    "log": rows,
                    "resumed_at_epoch": record.get("resumed_at_epoch", []),
                },
            )

    # Evaluate once, after the last epoch: the test set is never used to choose anything.
    groups_cfg, counts, ebs = tcfg.dataset.groups, data.class_counts, sched.eval_batch_size

    def evaluate(pred_test: torch.Tensor, pred_val: torch.Tensor) -> tuple[dict, dict]:
        test = summarize(pred_test, data.test_y, counts, groups_cfg)
        val = summarize(pred_val, data.val_y, counts, groups_cfg) if len(data.val_y) else {}
        if val:
            val["balanced_top1"] = balanced_accuracy(pred_val, data.val_y, data.num_classes)
        return test, val

    val_counts = [int(c) for c in torch.bincount(data.val_y, minlength=data.num_classes)]
    record["val_class_counts"] = val_counts
    short = [c for c, n in enumerate(val_counts) if n < tcfg.dataset.val_per_class]
    if short:
        record["val_note"] = (
            f"classes {short} have fewer than {tcfg.dataset.val_per_class} training images left "
            "outside the long-tailed subset; the validation split holds what is left of them"
        )

    def predict_split(split: str) -> torch.Tensor:
        # each rank predicts its contiguous share, rank 0 gathers: every image counted exactly once
        n = len(data.test_y if split == "test" else data.val_y)
        idx = eval_shard(n, info) if info.enabled else None
        return gather_cat(predict(model, feed.evaluate(split, ebs, indices=idx), amp=tcfg.amp)[0], info)

    if not reused:
        p_test, p_val = predict_split("test"), predict_split("val")
        summary, val_summary = evaluate(p_test, p_val)
    if two_stage:
        if short:
            console.print(f"[yellow]note:[/] {record['val_note']}")
        if not reused:
            stage1 = {
                "test": _brief(summary),
                "val": _brief(val_summary),
                "trained_in": str(out),
                "created_at": _now(),
                "git": record["git"],
            }
            _save_stage1(cache_dir, model, rows, stage1)
            record["stage1"].update(stage1, reused=False)
        if not info.main:  # stage 2 is cheap: rank 0 does it alone, the others wait for it
            barrier(info)
            return record
        result = run_stage2(tcfg, model, data, feed, lambda p: summarize(p, data.test_y, counts, groups_cfg))
        summary, val_summary = evaluate(result.test_logits.argmax(1), result.val_logits.argmax(1))
        record["stage2"] = {"method": result.method, "chosen": result.chosen, "curve": result.curve}
        if result.curve:
            _write_epoch_log(out / "tau_curve.csv", result.curve)
        if result.epochs:
            _write_epoch_log(out / "stage2_epochs.csv", result.epochs)
    record["val"] = _brief(val_summary) if val_summary else None
    train_time = sum(r["seconds"] for r in rows)
    record.update(
        summary,
        status="completed",
        epochs_completed=len(rows),
        train_images_per_s=round(sum(r["images"] for r in rows) / max(train_time, 1e-9), 1),
        finished_at=_now(),
        wall_time_s=round(time.perf_counter() - t_start, 2),
    )
    atomic_write_json(out / METRICS, record)
    if info.main:
        console.print(
            results_table(
                record,
                f"{record['label']} on {tcfg.dataset.name} "
                f"(ratio {record['imbalance_ratio']:g}, seed {tcfg.seed}) — test, final epoch"
                + (f", stage 2: {sched.stage2.method}" if two_stage else "")
                + (
                    f" (tau {record['stage2']['chosen']['tau']:g}, chosen on validation)"
                    if "tau" in record.get("stage2", {}).get("chosen", {})
                    else ""
                ),
            )
        )
        console.print(f"run directory: {out}")
    barrier(info)
    return record
