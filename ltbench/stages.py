"""A run is an ordered list of stages: ``pretrain`` (optional), ``train``, ``classifier`` (optional).

Each stage changes the network and hands it to the next; every stage that trains does so through the one loop
(:func:`ltbench.fit.fit`), with the progress bar, the epoch log, a checkpoint every epoch and the loggers as hooks.

Stages are content-addressed (:func:`ltbench.identity.stage_key`: the settings a stage reads, the seed, the data
split and the key of the stage before it). A finished stage that another stage follows is cached under that key, so
a sweep over classifier methods trains one backbone, and a sweep over training methods with a shared pre-training
stage pre-trains once. A run resumes inside whichever stage its last checkpoint belongs to.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from ltbench.classifier import CLASSIFIERS, FrozenBackbone
from ltbench.config import AugmentConfig, SamplerConfig, ScheduleConfig, TrainConfig
from ltbench.data import LTData
from ltbench.dist import DistInfo, eval_shard, gather_cat
from ltbench.feed import DataFeed
from ltbench.fit import Epoch, Hook, Trainer, fit, predict
from ltbench.hooks import CheckpointHook, EpochLogHook, ProgressHook
from ltbench.identity import stage_key
from ltbench.losses import build_loss
from ltbench.losses.classification import CrossEntropy
from ltbench.methods import METHODS, PRETRAIN, SEMI, Method
from ltbench.methods.supervised import Supervised
from ltbench.optim import build_optimizer, model_groups
from ltbench.reweight import Reweighting
from ltbench.rundir import RunDir, atomic_torch_save, atomic_write_json
from ltbench.samplers import Sampler, sampler_config, shard
from ltbench.seeding import derive_seed, generator
from ltbench.synth import Synthesizer
from ltbench.tasks import LabelStats, Task

log = logging.getLogger("ltbench")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunContext:
    """What every stage of one run shares."""

    cfg: TrainConfig
    data: LTData
    task: Task
    stats: LabelStats
    feed: DataFeed
    device: torch.device
    info: DistInfo
    rundir: RunDir
    record: dict[str, Any]
    console: Console
    progress: Progress
    loggers: list[Hook] = field(default_factory=list)

    def predict(self, model: nn.Module, split: str, features: bool = False) -> torch.Tensor:
        """Outputs (or features) of a whole split; each rank predicts its share, every rank gets all of them."""
        n = len(getattr(self.data, f"{split}_y"))
        idx = eval_shard(n, self.info) if self.info.enabled else None
        bs = self.cfg.schedule.eval_batch_size
        task = self.progress.add_task(f"  {'features' if features else 'predict'} {split}", total=n, info="")
        try:
            batches = self.feed.evaluate(split, bs, indices=idx)
            advance = lambda k: self.progress.update(task, advance=k)  # noqa: E731
            out = predict(
                model, batches, amp=self.cfg.amp, features=features, on_batch=advance, compile=self.cfg.compile
            )
        finally:
            self.progress.remove_task(task)
        return gather_cat(out, self.info)

    def evaluate(self, outputs: torch.Tensor, split: str) -> dict[str, Any]:
        target = getattr(self.data, f"{split}_y")
        return self.task.evaluate(outputs, target, self.stats, self.cfg.dataset.groups)


@dataclass
class StageResult:
    model: nn.Module
    record: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    outputs: dict[str, torch.Tensor] | None = None  # val/test outputs the stage already computed


class Stage:
    """One stage of a run. ``sections``: the config sections that define what it trains (its cache key)."""

    name = "stage"
    title = "stage"  # how messages name it
    record_key = "stage"
    sections: tuple[str, ...] = ()
    stream = ""  # prefix of its random streams (the names predate stages: kept so results stay identical)

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        return None

    def run(self, ctx: RunContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- training a stage


@dataclass
class StageSpec:
    """How a stage trains: the module to optimise, its method, schedule, sampler, augmentation, synthesis."""

    net: nn.Module
    method: Method
    schedule: ScheduleConfig
    sampler: SamplerConfig
    augment: AugmentConfig | None
    synth: Synthesizer | None = None
    no_decay: list[str] = field(default_factory=list)  # more parameter-name patterns without weight decay


def train(ctx: RunContext, stage: Stage, spec: StageSpec, ckpt: dict | None) -> list[dict]:
    """Train a stage through :func:`fit`, resuming from its checkpoint; returns its epoch-log rows."""
    cfg, info = ctx.cfg, ctx.info
    sched = spec.schedule
    module = spec.method.wrap(spec.net)
    groups = model_groups(module, [*sched.no_decay, *spec.no_decay])
    in_module = {id(p) for p in module.parameters()}
    for g in spec.method.param_groups():  # the method's own parameters, unless the module it trains holds them
        g.params = [p for p in g.params if id(p) not in in_module]
        groups.append(g)
    optimizer = build_optimizer(sched, groups)
    start, rows = 0, []
    if ckpt is not None:
        spec.net.load_state_dict(ckpt["model"])
        spec.method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start, rows = int(ckpt["epoch"]), list(ckpt["log"])
    sampler = Sampler(spec.sampler, ctx.stats.bin_of(ctx.data.train_y), ctx.stats.num_bins, sched.epochs)
    if sched.batch_size % info.world_size:
        raise ValueError(f"batch size {sched.batch_size} is not divisible by the {info.world_size} processes")
    rank_batch = sched.batch_size // info.world_size  # the global batch is schedule.batch_size
    rank = [info.rank] if info.enabled else []
    raw = getattr(spec.method, "raw_inputs", False)

    def batches(ep: Epoch):
        stream = sampler.epoch_indices(ep.index, generator(cfg.seed, ep.index, f"{stage.stream}sampler"))
        indices = shard(stream, info.rank, info.world_size)
        ep.size = len(indices)
        synth_on = spec.synth is not None and spec.synth.active(ep.index)
        labeled = ctx.feed.train(indices, batch_size=rank_batch, augment=spec.augment, synth=spec.synth,
                                 synth_on=synth_on, gen=ep.gen, raw=raw)  # fmt: skip
        if not getattr(spec.method, "unlabeled", False):
            return labeled
        return _with_unlabeled(ctx, stage, spec.method, labeled, ep, len(indices), rank_batch)

    trainer = Trainer(
        stage.name,
        _ddp(module, ctx, find_unused=module is not spec.net),
        spec.method,
        optimizer,
        sched,
        batches,
        lambda e: generator(cfg.seed, e, f"{stage.stream}batch", *rank),
        ctx.task,
        cfg.amp,
        start,
        rows,
        compile=cfg.compile,
    )
    fit(trainer, _hooks(ctx, stage, trainer, spec))
    return trainer.rows


def _with_unlabeled(ctx: RunContext, stage: Stage, method: Method, labeled, ep: Epoch, n: int, batch_size: int):
    """Labeled batches, each with an unlabeled batch attached: a seeded permutation of the unlabeled set per epoch,
    cycled to cover every step, the same global stream on every rank (each takes its interleaved shard)."""
    info, num_u = ctx.info, len(ctx.data.unlabeled_y)  # type: ignore[arg-type]
    m = method.unlabeled_batch(batch_size, len(ctx.data.train_y), num_u)  # type: ignore[attr-defined]
    steps = -(-n // batch_size)
    gen = generator(ctx.cfg.seed, ep.index, f"{stage.stream}unlabeled")
    need = steps * m * info.world_size
    perm = torch.cat([torch.randperm(num_u, generator=gen) for _ in range(-(-need // num_u))])[:need]
    unl = ctx.feed.unlabeled(shard(perm, info.rank, info.world_size), m)
    for b, u in zip(labeled, unl):
        b.unlabeled = u
        yield b


def _hooks(ctx: RunContext, stage: Stage, tr: Trainer, spec: StageSpec) -> list[Hook]:
    def state(ep: Epoch) -> dict[str, Any]:
        return {
            "stage": stage.name,
            "epoch": ep.index + 1,
            "model": spec.net.state_dict(),
            "method": spec.method.state_dict(),
            "optimizer": tr.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "config_hash": ctx.record["config_hash"],
            "split_hash": ctx.data.split_hash,
            "log": tr.rows,
            "stages": {k: ctx.record[k] for k in ("pretrain", "base", "stage1") if k in ctx.record},
        }

    return [
        ProgressHook(ctx.progress, f"{stage.name}", tr.schedule.epochs, tr.start_epoch),
        EpochLogHook(ctx.rundir, stage.name, tr.rows),
        CheckpointHook(ctx.rundir, stage.name, state),
        *ctx.loggers,
    ]


def _ddp(module: nn.Module, ctx: RunContext, find_unused: bool) -> nn.Module:
    """Under torchrun, gradients are averaged across ranks by DistributedDataParallel. A method that wraps the model
    in its own module (a rotation head on the features) leaves the model's head unused: DDP is told so."""
    if not ctx.info.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


# ------------------------------------------------------------------------------------------------ the stages


class PretrainStage(Stage):
    """Stage 0: self-supervised pre-training of the backbone (``pretrain=rotation``); the head is left as it was."""

    name, title, record_key, stream = "pretrain", "pre-training", "pretrain", "pretrain-"
    sections = ("task", "dataset", "model", "augment", "pretrain")

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        assert cfg.pretrain is not None
        return cfg.pretrain.schedule

    def run(self, ctx: RunContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg = ctx.cfg
        assert cfg.pretrain is not None
        method = PRETRAIN.build(cfg.pretrain, model, ctx).to(ctx.device)
        spec = StageSpec(model, method, cfg.pretrain.schedule, sampler_config("instance"), cfg.augment)
        rows = train(ctx, self, spec, ckpt)
        return StageResult(model, {"method": cfg.pretrain.name, **method.summary()}, rows)


class TrainStage(Stage):
    """Stage 1: the network trained on the labels with the run's loss, sampler, re-weighting and synthesis (and
    the unlabeled data of a semi-supervised method)."""

    name, title, record_key, stream = "train", "stage 1", "stage1", ""
    sections = (
        "task", "dataset", "model", "loss", "sampler", "reweight", "synth", "augment", "schedule", "method", "semi",
    )  # fmt: skip

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        return cfg.schedule

    def run(self, ctx: RunContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg, data = ctx.cfg, ctx.data
        epochs = cfg.schedule.epochs
        loss = build_loss(cfg.loss, ctx.stats).to(ctx.device)
        no_decay = loss.prepare(model)
        reweight = Reweighting(cfg.reweight, ctx.stats.counts, epochs)
        synth = Synthesizer(cfg.synth, data.train_x, data.train_y, ctx.stats.counts, epochs)
        method: Method = Supervised(loss, ctx.task, reweight, synth)
        if cfg.method is not None:
            method = METHODS.build(cfg.method, method, model, ctx)
        if cfg.semi is not None:
            if getattr(SEMI.get(cfg.semi.name).builder, "base_stage", False) and ckpt is None:
                _fresh(ctx, model)  # after the base classifier, a new network learns from the pseudo-labels
            method = SEMI.build(cfg.semi, method, model, ctx)
        spec = StageSpec(model, method.to(ctx.device), cfg.schedule, cfg.sampler, cfg.augment, synth, no_decay)
        rows = train(ctx, self, spec, ckpt)
        return StageResult(method.eval_model(model), method.summary(), rows)


def _fresh(ctx: RunContext, model: nn.Module) -> None:
    """Give ``model`` the weights of a freshly initialised network (the run's seeded initialisation)."""
    from ltbench.models import build_model

    torch.manual_seed(ctx.cfg.seed)
    model.load_state_dict(build_model(ctx.cfg.model, ctx.task.out_dim(ctx.data), ctx.data).state_dict())


class BaseStage(Stage):
    """The base classifier of ``semi=pseudo_label`` (Yang & Xu 2020): trained on the labeled set with the run's
    supervised settings, then it labels the unlabeled set (argmax), once."""

    name, title, record_key, stream = "base", "the base classifier", "base", "base-"
    sections = ("task", "dataset", "model", "loss", "sampler", "reweight", "synth", "augment", "schedule")

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        return cfg.schedule

    def run(self, ctx: RunContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg = ctx.cfg
        loss = build_loss(cfg.loss, ctx.stats).to(ctx.device)
        reweight = Reweighting(cfg.reweight, ctx.stats.counts, cfg.schedule.epochs)
        method = Supervised(loss, ctx.task, reweight).to(ctx.device)
        rows = train(ctx, self, StageSpec(model, method, cfg.schedule, cfg.sampler, cfg.augment, None,
                                          loss.prepare(model)), ckpt)  # fmt: skip
        pseudo = ctx.predict(model, "unlabeled").argmax(1)
        truth = ctx.data.unlabeled_y
        assert truth is not None
        from ltbench.methods.semi import PseudoLabelStats

        quality = PseudoLabelStats(ctx.data.num_classes)
        quality.add(pseudo, torch.ones_like(pseudo, dtype=torch.bool), truth)
        record = {"pseudo_labels": pseudo.tolist(), "pseudo_label_quality": quality.summary()}
        return StageResult(model, record, rows)


class ClassifierStage(Stage):
    """Stage 2 of decoupled training: a new classifier on the stage-1 backbone (``classifier=crt|lws|...``).

    A method that trains gives the head, the backbone's mode (``backbone_mode``: frozen by default; ``shift_bn`` or
    ``finetune``, see :class:`~ltbench.classifier.FrozenBackbone`) and optionally its own training method
    (``method(ctx, net)``: a loss, hooks, parameter names without weight decay in ``no_decay(net)``, and
    ``release()`` to undo what it attached to the network when the stage ends); the default is plain cross-entropy.
    """

    name, title, record_key, stream = "classifier", "stage 2", "stage2", "stage2-"
    sections = ("classifier",)

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        return getattr(cfg.classifier, "schedule", None)

    def run(self, ctx: RunContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg = ctx.cfg
        assert cfg.classifier is not None
        m = CLASSIFIERS.build(cfg.classifier)
        record: dict[str, Any] = {"method": cfg.classifier.name, "chosen": {}, "curve": []}
        if not m.fits:
            feats = {split: ctx.predict(model, split, features=True) for split in m.needs}
            post = m.apply(model, feats, ctx.data, lambda out: ctx.evaluate(out, "test"))
            model.head = post.head.to(ctx.device)
            record.update(chosen=post.chosen, curve=post.curve)
            if post.curve:
                ctx.rundir.write_csv("tau_curve.csv", post.curve)
            return StageResult(model, record, outputs=post.outputs)
        torch.manual_seed(derive_seed(cfg.seed, "stage2-init"))
        head = m.head(model, cfg.model.head, ctx.data.num_classes)
        net = FrozenBackbone(model, head, getattr(m, "backbone_mode", "frozen")).to(ctx.device)
        # a classifier method may train with its own loss / hooks (default: plain cross-entropy)
        method = m.method(ctx, net) if hasattr(m, "method") else Supervised(CrossEntropy(ctx.stats), ctx.task)
        method = method.to(ctx.device)
        augment = cfg.augment if cfg.classifier.augment else None
        no_decay = method.no_decay(net) if hasattr(method, "no_decay") else []
        spec = StageSpec(net, method, cfg.classifier.schedule, sampler_config(cfg.classifier.sampler), augment,
                         no_decay=no_decay)  # fmt: skip
        try:
            rows = train(ctx, self, spec, ckpt)
        finally:
            if hasattr(method, "release"):
                method.release()
        model.head = head
        record["chosen"] = m.chosen(head)
        outputs = None
        if hasattr(m, "outputs"):  # a method whose test outputs are not model(x) (ride_router: routed experts)
            outputs, notes = m.outputs(ctx, model)
            record.update(notes)
        return StageResult(model, record, rows, outputs=outputs)


def plan(cfg: TrainConfig) -> list[Stage]:
    """The stages of a run, in order."""
    stages: list[Stage] = [PretrainStage()] if cfg.pretrain is not None else []
    if cfg.semi is not None and getattr(SEMI.get(cfg.semi.name).builder, "base_stage", False):
        stages.append(BaseStage())
    stages.append(TrainStage())
    if cfg.classifier is not None:
        stages.append(ClassifierStage())
    return stages


def stage_keys(cfg: TrainConfig, stages: list[Stage], split_hash: str) -> list[str]:
    keys: list[str] = []
    for s in stages:
        keys.append(stage_key(cfg, s.sections, keys[-1] if keys else None, split_hash, s.name))
    return keys


# ------------------------------------------------------------------------------------------------ the cache


def cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.stage_cache or Path(cfg.results_dir) / "stage_cache")


def save_cached(path: Path, model: nn.Module, rows: dict[str, list], records: dict[str, Any]) -> None:
    atomic_torch_save(path / "model.pt", {"model": model.state_dict(), "rows": rows})
    atomic_write_json(path / "record.json", records)  # written last: its presence marks a complete entry


def load_cached(path: Path) -> dict | None:
    """A cached stage (model state, epoch-log rows per stage, records), or None (absent or unreadable: the stage
    is trained again)."""
    if not (path / "model.pt").exists() or not (path / "record.json").exists():
        return None
    try:
        import json

        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        return {
            "model": state["model"],
            "rows": state["rows"],
            "records": json.loads((path / "record.json").read_text()),
        }
    except Exception as e:
        log.warning("ignoring unreadable stage cache %s (%s)", path, e)
        return None


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)
