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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from ltbench.classifier import CLASSIFIERS, ClassifierMethod, FrozenBackbone, RetrainConfig
from ltbench.config import AugmentConfig, SamplerConfig, ScheduleConfig, TrainConfig
from ltbench.contracts import StageContext
from ltbench.core import Batch
from ltbench.data import LTData
from ltbench.dist import DistInfo, eval_shard, gather_cat
from ltbench.errors import LtbenchError
from ltbench.feed import DataFeed
from ltbench.fit import Epoch, Hook, Trainer, fit, predict
from ltbench.hooks import CheckpointHook, EpochLogHook, ProgressHook
from ltbench.identity import stage_key
from ltbench.losses import build_loss
from ltbench.methods import METHODS, PRETRAIN, SEMI, Method
from ltbench.methods.supervised import Supervised
from ltbench.optim import build_optimizer, stage_groups
from ltbench.registry import Registry
from ltbench.reweight import Reweighting
from ltbench.rundir import RunDir, atomic_torch_save, atomic_write_json
from ltbench.samplers import Sampler, sampler_config, shard
from ltbench.seeding import derive_seed, generator
from ltbench.synth import Synthesizer, build_synth
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
    trainable: dict[str, int] = field(default_factory=dict)  # trainable parameters of each stage trained here
    selecting: str | None = None  # the stage whose epochs ``select=`` chooses among (the last, when it is not "last")

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


    def stage_context(self, stage: Stage, earlier: list[Stage]) -> StageContext:
        """The typed view a stage builds its components from: its section, the earlier stages' records."""
        outputs = {s.record_key: MappingProxyType(dict(self.record[s.record_key]))
                   for s in earlier if s.record_key in self.record}  # fmt: skip
        section = getattr(self.cfg, stage.section) if stage.section else None
        return StageContext(self.cfg, section, self.data, self.task, self.stats, self.device, self.info, self.feed,
                            self.predict, MappingProxyType(outputs))  # fmt: skip


@dataclass
class StageResult:
    """What a stage hands on: the network, its record (the stage's declared outputs, kept in metrics.json, the
    checkpoints of later stages and the stage cache), its epoch-log rows, and val/test outputs it already computed."""

    model: nn.Module
    record: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    outputs: dict[str, torch.Tensor] | None = None


class Stage:
    """One stage of a run, registered in :data:`STAGES` with its place in the plan.

    Declared (class attributes): ``name`` (file names: ``<name>_epochs.csv``, checkpoints), ``title`` (messages),
    ``record_key`` (where metrics.json keeps its record), ``order`` (place in the plan, lower first), ``section``
    (the config section that switches it on and that its context hands over, "" for none), ``sections`` (the
    config sections that define what it trains: its stage-cache key), ``stream`` (prefix of its random streams;
    the built-in names predate stages and are kept so results stay identical), ``main`` (the training stage: its
    record joins the run's record when it is last, and it is evaluated for the record when another follows).
    """

    name: ClassVar[str] = "stage"
    title: ClassVar[str] = "stage"
    record_key: ClassVar[str] = "stage"
    order: ClassVar[int] = 50
    section: ClassVar[str] = ""
    sections: ClassVar[tuple[str, ...]] = ()
    stream: ClassVar[str] = ""
    main: ClassVar[bool] = False

    @classmethod
    def enabled(cls, cfg: TrainConfig) -> bool:
        """Whether a run with ``cfg`` has this stage (default: when its section is set)."""
        return bool(cls.section) and getattr(cfg, cls.section) is not None

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        """The schedule it trains with (None: it does not train through the loop)."""
        return None

    def run(self, ctx: RunContext, sctx: StageContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        raise NotImplementedError


STAGES: Registry[type[Stage]] = Registry("stage")


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add a stage to every plan whose config enables it (plugins too: ``LTBENCH_PLUGINS``)."""
    return STAGES.register(cls.name)(cls)


def plan(cfg: TrainConfig) -> list[Stage]:
    """The stages of a run: the registered stages that ``cfg`` enables, by ``order``."""
    classes = [STAGES.get(n).builder for n in STAGES.names()]
    return [c() for c in sorted(classes, key=lambda c: (c.order, c.name)) if c.enabled(cfg)]


def stage_keys(cfg: TrainConfig, stages: list[Stage], split_hash: str) -> list[str]:
    """Each stage's content address: its sections, the seed, the split and the key of the stage before it."""
    keys: list[str] = []
    for s in stages:
        keys.append(stage_key(cfg, s.sections, keys[-1] if keys else None, split_hash, s.name))
    return keys


def shared_key(cfg: TrainConfig, split_tag: str) -> str | None:
    """The key of the stage that a run's last stage follows (what runs differing only in their last stage share,
    e.g. a sweep over classifier methods), with ``split_tag`` standing for the split hash; None for one stage."""
    stages = plan(cfg)
    return stage_keys(cfg, stages[:-1], split_tag)[-1] if len(stages) > 1 else None


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
    state: dict[str, Any] = field(default_factory=dict)  # more checkpoint entries (a multi-round stage's round)


def train(ctx: RunContext, sctx: StageContext, stage: Stage, spec: StageSpec, ckpt: dict | None) -> list[dict]:
    """Train a stage through :func:`fit`, resuming from its checkpoint; returns its epoch-log rows.

    The method's ``release()`` and every hook's ``on_stage_end`` run however the stage ends."""
    method, sched = spec.method, spec.schedule
    module = method.wrap(spec.net)
    groups = stage_groups(module, [*sched.no_decay, *spec.no_decay, *method.no_decay(spec.net)], method.param_groups())
    optimizer = build_optimizer(sched, groups)
    # a zero-epoch stage (zero-shot CLIP) trains nothing
    ctx.trainable[stage.name] = sum(p.numel() for g in groups for p in g.params) if sched.epochs else 0
    start, rows = 0, []
    if ckpt is not None:
        spec.net.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start, rows = int(ckpt["epoch"]), list(ckpt["log"])
    rank = [ctx.info.rank] if ctx.info.enabled else []
    trainer = Trainer(stage.name, _ddp(module, ctx, find_unused=module is not spec.net), method, optimizer, sched,
                      _batches(ctx, stage, spec), lambda e: generator(ctx.cfg.seed, e, f"{stage.stream}batch", *rank),
                      ctx.task, ctx.cfg.amp, start, rows, compile=ctx.cfg.compile)  # fmt: skip
    hooks = _hooks(ctx, sctx, stage, trainer, spec, ckpt)
    ok = False
    try:
        for h in [method, *hooks]:
            h.on_stage_start(stage.name)
        fit(trainer, hooks)
        ok = True
    finally:
        method.release()
        for h in [method, *hooks]:
            h.on_stage_end(stage.name, ok)
    return trainer.rows


def _batches(ctx: RunContext, stage: Stage, spec: StageSpec) -> Callable[[Epoch], Iterable[Batch]]:
    """The epoch's batches: the sampler's seeded stream, this rank's shard, the streams the method declares."""
    cfg, info, method = ctx.cfg, ctx.info, spec.method
    sched = spec.schedule
    sampler = Sampler(spec.sampler, ctx.stats.bin_of(ctx.data.train_y), ctx.stats.num_bins, sched.epochs)
    if sched.batch_size % info.world_size:
        raise ValueError(f"batch size {sched.batch_size} is not divisible by the {info.world_size} processes")
    rank_batch = sched.batch_size // info.world_size  # the global batch is schedule.batch_size

    def batches(ep: Epoch) -> Iterable[Batch]:
        stream = sampler.epoch_indices(ep.index, generator(cfg.seed, ep.index, f"{stage.stream}sampler"))
        indices = shard(stream, info.rank, info.world_size)
        ep.size = len(indices)
        synth_on = spec.synth is not None and spec.synth.active(ep.index)
        labeled = ctx.feed.train(indices, batch_size=rank_batch, augment=spec.augment, synth=spec.synth,
                                 synth_on=synth_on, gen=ep.gen, raw=method.inputs == "raw")  # fmt: skip
        if not method.streams.unlabeled:
            return labeled
        return _with_unlabeled(ctx, stage, method, labeled, ep, len(indices), rank_batch)

    return batches


def _with_unlabeled(ctx: RunContext, stage: Stage, method: Method, labeled, ep: Epoch, n: int, batch_size: int):
    """Labeled batches, each with an unlabeled batch attached: a seeded permutation of the unlabeled set per epoch,
    cycled to cover every step, the same global stream on every rank (each takes its interleaved shard)."""
    info, unlabeled_y = ctx.info, ctx.data.unlabeled_y
    if unlabeled_y is None:
        raise LtbenchError(f"{type(method).__name__} declares an unlabeled stream; {ctx.data.name} has none")
    num_u = len(unlabeled_y)
    m = method.unlabeled_batch(batch_size, len(ctx.data.train_y), num_u)
    steps = -(-n // batch_size)
    gen = generator(ctx.cfg.seed, ep.index, f"{stage.stream}unlabeled")
    need = steps * m * info.world_size
    perm = torch.cat([torch.randperm(num_u, generator=gen) for _ in range(-(-need // num_u))])[:need]
    unl = ctx.feed.unlabeled(shard(perm, info.rank, info.world_size), m)
    for b, u in zip(labeled, unl):
        b.unlabeled = u
        yield b


class SelectionHook(Hook):
    """Model selection (``select=val|test_oracle``): after every epoch of the last stage, the network the stage
    hands on (``method.eval_model``) is evaluated on the validation (or the test) split; the epoch with the best
    headline metric (the task's first column: top-1, or MAE lower-is-better; the first best on ties) is kept, its
    weights held on the CPU and in the checkpoint, and loaded back when the stage ends. Evaluation draws no random
    numbers and runs in eval mode, so training is the same as without it. Its value is the epoch log's
    ``select_<split>_<metric>`` column. The record's ``selection.last`` holds the scores of the stage's last epoch
    on the same split: for ``test_oracle`` exactly what ``select=last`` reports, so one run gives both columns of a
    like-with-like comparison (``ltbench reproduce``)."""

    order = 15  # before the epoch log (20), which writes the row it adds to, and the checkpoint (30)

    def __init__(self, ctx: RunContext, net: Callable[[], nn.Module]) -> None:
        self.ctx, self.net = ctx, net
        self.split = "val" if ctx.cfg.select == "val" else "test"
        first = ctx.task.columns()[0]
        self.metric, self.higher = first.key, first.higher_is_better
        self.best: dict[str, Any] = {}
        self.last: dict[str, Any] = {}  # the latest epoch's scores on the split: the last epoch's, when the stage ends

    def on_epoch_end(self, ep: Epoch) -> None:
        scores = self.ctx.evaluate(self.ctx.predict(self.net(), self.split), self.split)
        value = scores.get(self.metric)
        ep.row[f"select_{self.split}_{self.metric}"] = value
        self.last = {"epoch": ep.index + 1, **{k: v for k, v in scores.items() if isinstance(v, (int, float))}}
        if value is None:
            return
        better = not self.best or (value > self.best["value"] if self.higher else value < self.best["value"])
        if better:
            state = {k: v.detach().cpu().clone() for k, v in self.net().state_dict().items()}
            self.best = {"epoch": ep.index + 1, "value": float(value), "state": state}

    def state(self) -> dict[str, Any]:
        return {**self.best, "last": self.last}

    def restore(self, state: dict[str, Any]) -> None:
        """The best epoch so far and the latest epoch's scores of an interrupted stage (from its checkpoint)."""
        state = dict(state)
        self.last = state.pop("last", {})
        self.best = state

    def on_stage_end(self, stage: str, ok: bool) -> None:
        if ok and self.best:
            self.net().load_state_dict(self.best["state"])
            self.ctx.record["selection"] = {"protocol": self.ctx.cfg.select, "stage": stage, "split": self.split,
                                            "metric": self.metric, "epoch": self.best["epoch"],
                                            "value": self.best["value"], "last": self.last}  # fmt: skip


def _hooks(
    ctx: RunContext, sctx: StageContext, stage: Stage, tr: Trainer, spec: StageSpec, ckpt: dict | None
) -> list[Hook]:
    earlier = list(sctx.outputs)  # the records of the stages before this one: a resume restores them
    select = SelectionHook(ctx, lambda: spec.method.eval_model(spec.net)) if ctx.selecting == stage.name else None
    if select is not None and ckpt is not None and ckpt.get("selection"):
        select.restore(ckpt["selection"])  # the best epoch so far of the interrupted stage

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
            "stages": {k: ctx.record[k] for k in earlier if k in ctx.record},
            **({"selection": select.state()} if select is not None else {}),
            **spec.state,
        }

    hooks: list[Hook] = [
        ProgressHook(ctx.progress, f"{stage.name}", tr.schedule.epochs, tr.start_epoch),
        EpochLogHook(ctx.rundir, stage.name, tr.rows),
        CheckpointHook(ctx.rundir, stage.name, state),
        *ctx.loggers,
        *([select] if select is not None else []),
    ]
    return sorted(hooks, key=lambda h: h.order)  # stable: ties keep the order above


def _ddp(module: nn.Module, ctx: RunContext, find_unused: bool) -> nn.Module:
    """Under torchrun, gradients are averaged across ranks by DistributedDataParallel. A method that wraps the model
    in its own module (a rotation head on the features) leaves the model's head unused: DDP is told so."""
    if not ctx.info.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


# ------------------------------------------------------------------------------------------------ the stages


@register_stage
class PretrainStage(Stage):
    """Stage 0: self-supervised pre-training of the backbone (``pretrain=rotation``); the head is left as it was."""

    name, title, record_key, stream = "pretrain", "pre-training", "pretrain", "pretrain-"
    order, section = 10, "pretrain"
    sections = ("task", "dataset", "model", "augment", "pretrain")

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        assert cfg.pretrain is not None
        return cfg.pretrain.schedule

    def run(self, ctx: RunContext, sctx: StageContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg = ctx.cfg
        assert cfg.pretrain is not None
        method = PRETRAIN.build(cfg.pretrain, sctx, model, None).to(ctx.device)
        spec = StageSpec(model, method, cfg.pretrain.schedule, sampler_config("instance"), cfg.augment)
        rows = train(ctx, sctx, self, spec, ckpt)
        return StageResult(model, {"method": cfg.pretrain.name, **method.summary()}, rows)


@register_stage
class BaseStage(Stage):
    """The base classifier of ``semi=pseudo_label`` (Yang & Xu 2020): trained on the labeled set with the run's
    supervised settings, then it labels the unlabeled set (argmax), once. Declared output: ``pseudo_labels``."""

    name, title, record_key, stream, order, section = "base", "the base classifier", "base", "base-", 20, "semi"
    sections = ("task", "dataset", "model", "loss", "sampler", "reweight", "synth", "augment", "schedule")

    @classmethod
    def enabled(cls, cfg: TrainConfig) -> bool:
        return cfg.semi is not None and cfg.semi.base_stage

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        return cfg.schedule

    def run(self, ctx: RunContext, sctx: StageContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg = ctx.cfg
        loss = build_loss(cfg.loss, ctx.stats).to(ctx.device)
        reweight = Reweighting(cfg.reweight, ctx.stats.counts, cfg.schedule.epochs)
        method = Supervised(loss, ctx.task, reweight).to(ctx.device)
        rows = train(ctx, sctx, self, StageSpec(model, method, cfg.schedule, cfg.sampler, cfg.augment, None,
                                                loss.prepare(model)), ckpt)  # fmt: skip
        pseudo = ctx.predict(model, "unlabeled").argmax(1)
        truth = ctx.data.unlabeled_y
        assert truth is not None
        from ltbench.methods.semi import PseudoLabelStats

        quality = PseudoLabelStats(ctx.data.num_classes)
        quality.add(pseudo, torch.ones_like(pseudo, dtype=torch.bool), truth)
        record = {"pseudo_labels": pseudo.tolist(), "pseudo_label_quality": quality.summary()}
        return StageResult(model, record, rows)


@register_stage
class TrainStage(Stage):
    """Stage 1: the network trained on the labels with the run's loss, sampler, re-weighting and synthesis (and
    the unlabeled data of a semi-supervised method)."""

    name, title, record_key, stream, order, main = "train", "stage 1", "stage1", "", 30, True
    sections = (
        "task", "dataset", "model", "loss", "sampler", "reweight", "synth", "augment", "schedule", "method", "semi",
    )  # fmt: skip

    @classmethod
    def enabled(cls, cfg: TrainConfig) -> bool:
        return True

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        return cfg.schedule

    def run(self, ctx: RunContext, sctx: StageContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg, data = ctx.cfg, ctx.data
        epochs = cfg.schedule.epochs
        loss = build_loss(cfg.loss, ctx.stats).to(ctx.device)
        if cfg.semi is not None and cfg.semi.base_stage and ckpt is None:
            _fresh(ctx, model)  # after the base classifier, a new network learns from the pseudo-labels
        no_decay = loss.prepare(model)  # after the fresh network: the loss's initial bias is part of the model
        reweight = Reweighting(cfg.reweight, ctx.stats.counts, epochs)
        synth = build_synth(cfg.synth, data.train_x, data.train_y, ctx.stats.counts, epochs)
        method: Method = Supervised(loss, ctx.task, reweight, synth)
        if cfg.method is not None:
            method = METHODS.build(cfg.method, sctx, model, method)
        if cfg.semi is not None:
            method = SEMI.build(cfg.semi, sctx, model, method)
        spec = StageSpec(model, method.to(ctx.device), cfg.schedule, cfg.sampler, cfg.augment, synth, no_decay)
        rows = train(ctx, sctx, self, spec, ckpt)
        return StageResult(method.eval_model(model), method.summary(), rows)


def _fresh(ctx: RunContext, model: nn.Module) -> None:
    """Give ``model`` the weights of a freshly initialised network (the run's seeded initialisation)."""
    from ltbench.models import build_model

    torch.manual_seed(ctx.cfg.seed)
    model.load_state_dict(build_model(ctx.cfg.model, ctx.task.out_dim(ctx.data), ctx.data).state_dict())


@register_stage
class ClassifierStage(Stage):
    """Stage 2 of decoupled training: a new classifier on the stage-1 backbone (``classifier=crt|lws|...``), by the
    :class:`~ltbench.classifier.ClassifierMethod` contract: post-hoc (``fits`` False: ``apply`` on the features of
    the splits it ``needs``) or trained (its ``head``, ``backbone_mode`` and training ``method``, then ``chosen``
    and optionally its own final ``outputs``)."""

    name, title, record_key, stream, order, section = "classifier", "stage 2", "stage2", "stage2-", 40, "classifier"
    sections = ("classifier",)

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        assert cfg.classifier is not None
        return cfg.classifier.training_schedule()

    def run(self, ctx: RunContext, sctx: StageContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg = ctx.cfg
        assert cfg.classifier is not None
        m: ClassifierMethod = CLASSIFIERS.build(cfg.classifier, sctx, model, None)
        record: dict[str, Any] = {"method": cfg.classifier.name, "chosen": {}, "curve": []}
        if not m.fits:
            feats = {split: ctx.predict(model, split, features=True) for split in m.needs}
            post = m.apply(model, feats, ctx.data, lambda out: ctx.evaluate(out, "test"))
            model.head = post.head.to(ctx.device)
            record.update(chosen=post.chosen, curve=post.curve)
            if post.curve:
                ctx.rundir.write_csv("tau_curve.csv", post.curve)
            return StageResult(model, record, outputs=post.outputs)
        c = cfg.classifier
        if not isinstance(c, RetrainConfig):
            raise LtbenchError(f"classifier={c.name} trains a head: its schema must extend RetrainConfig")
        torch.manual_seed(derive_seed(cfg.seed, "stage2-init"))
        head = m.head(model, cfg.model.head, ctx.data.num_classes)
        net = FrozenBackbone(model, head, m.backbone_mode).to(ctx.device)
        method = m.method(sctx, net).to(ctx.device)
        augment = cfg.augment if c.augment else None
        spec = StageSpec(net, method, c.schedule, sampler_config(c.sampler), augment)
        rows = train(ctx, sctx, self, spec, ckpt)
        model.head = head
        record["chosen"] = m.chosen(head)
        final = m.outputs(sctx, model)  # a method whose outputs are not model(x) (ride_router: routed experts)
        outputs = None
        if final is not None:
            outputs, notes = final
            record.update(notes)
        return StageResult(model, record, rows, outputs=outputs)


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

