"""Typed configuration schemas, and the one marking of what identifies a run.

The root schema is :class:`TrainConfig`. Each config group (``loss``, ``sampler``, ``dataset``...) is typed by a base
schema here; every option of a group brings its own subclass, registered next to its code (see
:mod:`ltbench.registry`), so a misspelt key or a wrong type fails when the config is composed. Cross-field checks
live in ``__post_init__`` and run in :func:`to_schema`.

Identity. Every field carries one of four marks (dataclass field metadata), and everything that must know whether a
setting "changes the result" reads that mark (:mod:`ltbench.identity`): the config hash the report groups by, the
content-addressed stage caches, the method label, the run directory names and which overrides ``resume`` accepts.

- ``stage`` (the default): defines what is trained; in every key.
- ``run`` (:func:`run_level`): identifies the run but not the network a stage trains (the strategy's name,
  head/medium/tail groups, the validation split size): in the config hash, not in stage cache keys.
- ``replicate`` (:func:`replicate`): what varies between repetitions of one experiment (the seed): in stage keys and
  run directory names, not in the config hash, so the report averages over it.
- ``none`` (:func:`runtime`): execution settings that cannot change the numbers (paths, device, workers, display).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from ltbench.errors import ConfigError

PROFILES = ("exp", "step", "pareto")
GROUPS = ("many", "medium", "few")
GROUP_RULES = ("counts", "classes", "thirds")
DEVICES = ("auto", "cpu", "cuda", "mps")
MARK = "ltbench_identity"
# Fields added after runs were recorded: left out of every identity while they hold their default (``added``).
OMIT_AT_DEFAULT = "ltbench_omit_at_default"
MARKS = ("stage", "run", "replicate", "none")
TASKS = ("classification", "regression")
INPUT_KINDS = ("images", "features", "text")  # what a dataset gives (DatasetConfig.inputs)
# torch.compile modes (``compile=``); "none": eager. "true"/"false" (a YAML bool) mean "default"/"none".
SELECT = ("last", "val", "test_oracle")  # model-selection protocols (``select=``)
TTE_MODES = ("none", "fivecrop", "tencrop")  # test-time ensembling of the final evaluation (``tte=``)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def epoch_at(fraction: float, epochs: int) -> int:
    """The epoch (0-indexed) a fraction of training points to, rounded half up: 0.8 of 200 is 160, 0.025 of 60 is 2.

    Schedules and deferred switches are fractions of ``schedule.epochs``, so shortening a recipe shortens them with
    it, and the reference recipe's 5 / 160 / 180 of 200 epochs are exactly 0.025 / 0.8 / 0.9.
    """
    return math.floor(fraction * epochs + 0.5)


def _marked(mark: str, default: Any, factory: Any) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={MARK: mark})
    return field(default=default, metadata={MARK: mark})


def runtime(default: Any = None, *, factory: Any = None) -> Any:
    """A field that cannot change the results (paths, device, workers, display)."""
    return _marked("none", default, factory)


def run_level(default: Any = None, *, factory: Any = None) -> Any:
    """A field that identifies the run but does not change what any stage trains (evaluation and naming)."""
    return _marked("run", default, factory)


def replicate(default: Any = None) -> Any:
    """A field that varies between replicates of one experiment (the seed)."""
    return _marked("replicate", default, None)


def added(default: Any, *, mark: str = "stage") -> Any:
    """A setting added after runs were recorded, whose default is the behaviour from before it existed: left out of
    the config hash and the stage keys while it holds that default (so existing runs keep their hash, directory,
    resume and stage caches); any other value counts as ``mark`` says."""
    return field(default=default, metadata={MARK: mark, OMIT_AT_DEFAULT: True})


# ------------------------------------------------------------------------------------------------- shared pieces


@dataclass
class GroupsConfig:
    """How classes (or regression label bins) are split into many / medium / few-shot groups.

    rule: ``counts`` (many > many_above training samples, few < few_below, medium otherwise: the ImageNet-LT and DIR
    convention), ``classes`` (explicit index lists), or ``thirds`` (by frequency rank, the most frequent third is
    "many").
    """

    rule: str = "counts"
    many_above: int = 100
    few_below: int = 20
    many: list[int] = field(default_factory=list)
    medium: list[int] = field(default_factory=list)
    few: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rule not in GROUP_RULES:
            raise ConfigError(f"dataset.groups.rule must be one of {GROUP_RULES}, got {self.rule!r}")
        if self.rule == "classes":
            lists = self.many + self.medium + self.few
            if len(lists) != len(set(lists)):
                raise ConfigError("dataset.groups: a class index appears in more than one group")
        if self.few_below > self.many_above + 1:
            raise ConfigError("dataset.groups: few_below must not exceed many_above + 1")


@dataclass
class ScheduleConfig:
    """How one stage trains: optimiser, batch size, epochs and the learning-rate schedule.

    ``warmup`` and ``milestones`` are fractions of ``epochs`` (see :func:`epoch_at`): the lr warms up linearly over
    the first ``warmup`` of training (epoch e gets lr * (e+1)/W, as in the CIFAR-LT reference), then decays:
    ``step`` multiplies it by ``gamma`` at each milestone, ``cosine`` anneals it to 0, ``fixmatch`` is FixMatch's
    lr * cos(7 pi t / 16) (t the fraction of training done).
    ``optimizer``: sgd (momentum, nesterov), adam or adamw (betas, eps); ``no_decay``: parameter-name patterns
    (fnmatch, e.g. ``*.bias``) trained without weight decay.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    no_decay: list[str] = field(default_factory=list)
    warmup: float = 0.025  # fraction of the epochs: 5 of 200
    decay: str = "step"  # step | cosine | fixmatch
    milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # fractions: epochs 160 and 180 of 200
    gamma: float = 0.01  # step decay factor applied at each milestone (x0.01 at 160, x0.0001 at 180)
    eval_batch_size: int = runtime(1000)
    # Gradient accumulation: each batch of batch_size is split into `accumulate` equal micro-batches, each forward-
    # backward in turn, one optimiser step (the gradient of the whole batch for a model without BatchNorm and a loss
    # that is a per-sample mean; LIFT's micro_batch_size = batch_size / accumulate). 1: off.
    accumulate: int = added(1)

    @property
    def warmup_epochs(self) -> int:
        return epoch_at(self.warmup, self.epochs)

    @property
    def milestone_epochs(self) -> list[int]:
        return [epoch_at(m, self.epochs) for m in self.milestones]

    def __post_init__(self) -> None:
        for key, ok in (
            ("epochs", self.epochs >= 0),  # 0: the stage evaluates the model as built (zero-shot CLIP)
            ("batch_size", self.batch_size >= 1),
            ("eval_batch_size", self.eval_batch_size >= 1),
            ("lr", self.lr > 0 and math.isfinite(self.lr)),
            ("weight_decay", self.weight_decay >= 0),
            ("momentum", 0 <= self.momentum < 1),
            ("gamma", self.gamma > 0),
        ):
            if not ok:
                raise ConfigError(f"schedule.{key}={getattr(self, key)} is out of range")
        if self.decay not in ("step", "cosine", "fixmatch"):
            raise ConfigError(f"schedule.decay must be step, cosine or fixmatch, got {self.decay!r}")
        if sorted(self.milestones) != list(self.milestones) or not all(0 < m <= 1 for m in self.milestones):
            raise ConfigError("schedule.milestones must be increasing fractions of the epochs in (0, 1]")
        if not 0 <= self.warmup < 1:
            raise ConfigError("schedule.warmup is a fraction of the epochs in [0, 1)")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"schedule.optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise ConfigError(f"schedule.accumulate={self.accumulate} must be >= 1 and divide schedule.batch_size")


@dataclass
class AugmentConfig:
    """Training augmentation of CIFAR-scale images (batched on tensors)."""

    crop: bool = True  # random crop with `padding` zero-padding
    padding: int = 4
    flip: bool = True
    cutout: int = 0  # side of the Cutout square (DeVries & Taylor 2017: 16 on CIFAR-10); 0 = off
    autoaugment: bool = False  # torchvision's CIFAR-10 AutoAugment policy, per image
    # Random rotation by an angle uniform in [-rotate, rotate] degrees about the image centre, nearest neighbour,
    # zero fill (torchvision RandomRotation(rotate)); RIDE's CIFAR recipe uses 15. 0 = off.
    rotate: float = added(0.0)

    def __post_init__(self) -> None:
        if not 0 <= self.rotate <= 180:  # also refuses nan; beyond 180 the range [-r, r] covers angles twice
            raise ConfigError(f"augment.rotate is a maximum angle in degrees in [0, 180], got {self.rotate}")


# ---------------------------------------------------------------------------- base schemas of the config groups


@dataclass
class Component:
    """Base of every option's schema. Class attributes (declarations, not settings) say what the option accepts;
    :func:`check_capabilities` compares them with the run once, when the config is composed, so no component tests
    task or input names itself, and a refusal is one line naming the options that would fit.

    - ``tasks``: the tasks it works for; ``reads``: the dataset input kinds it accepts (``INPUT_KINDS``);
    - ``selects_on_validation``: it chooses something on the validation split (every class must be in it);
    - ``label_suffix``: how a pre-training or semi-supervised option is named in labels (None: ``+<name>``);
    - ``hint``: appended to a capability refusal (what to use instead).
    Cross-section rules beyond these go in :meth:`check`.
    """

    tasks: ClassVar[tuple[str, ...]] = TASKS
    reads: ClassVar[tuple[str, ...]] = INPUT_KINDS
    selects_on_validation: ClassVar[bool] = False
    label_suffix: ClassVar[str | None] = None
    hint: ClassVar[str] = ""

    def check(self, root: Any) -> None:
        """Rules on the whole config beyond the declared capabilities; raise ConfigError (one line)."""



@dataclass
class TaskConfig(Component):
    """What is predicted: ``classification`` or ``regression`` (ltbench.tasks)."""

    name: str = MISSING


@dataclass
class DatasetConfig(Component):
    """Base of every dataset schema (ltbench.data). ``root`` None: $LTBENCH_DATA if set, else ./data.

    Class attributes (not settings) say what the dataset gives: ``task`` (classification | regression) and
    ``inputs`` (images | features | text), so a mismatched task or model is refused when the config is composed.
    """

    task = "classification"
    inputs = "images"
    unlabeled = False

    name: str = MISSING
    root: str | None = runtime(None)
    download: bool = runtime(True)
    split_seed: int = 0
    # Balanced validation split (per class): what methods select on (tau for tau-norm / post-hoc LA), never the test.
    val_per_class: int = run_level(20)
    # Where a class has too few images outside the training subset (CIFAR-10-LT's largest keeps all 5000), take the
    # rest of its validation images out of the subset: null = only when a method of the run selects on validation.
    val_holdout: bool | None = None
    groups: GroupsConfig = run_level(factory=GroupsConfig)

    def __post_init__(self) -> None:
        if self.val_per_class < 0:
            raise ConfigError("dataset.val_per_class must be >= 0")

    def imbalance_setting(self) -> tuple[bool, float | None]:
        """(whether the dataset has an ``imbalance_ratio`` setting, its value: None for a split's own imbalance)."""
        return False, None

    def unlabeled_text(self) -> str | None:
        """How labels describe the unlabeled data of a semi-supervised dataset (None: it has none)."""
        return None


@dataclass
class ModelConfig(Component):
    """Base of every model schema (ltbench.models): a backbone with ``features(x)`` and a ``head``."""

    name: str = MISSING
    head: str = "linear"


@dataclass
class LossConfig(Component):
    """Base of every loss schema (ltbench.losses)."""

    name: str = MISSING


@dataclass
class SamplerConfig(Component):
    """Base of every sampler schema (ltbench.samplers)."""

    name: str = MISSING


@dataclass
class ReweightConfig(Component):
    """Base of every re-weighting schema (ltbench.reweight). Weights apply from ``start`` on, a fraction of the
    stage's epochs (deferred re-weighting: 0.8, the first lr decay of the reference recipe)."""

    name: str = MISSING
    start: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.start <= 1:
            raise ConfigError("reweight.start is a fraction of the epochs in [0, 1]")


@dataclass
class SynthConfig(Component):
    """Base of every synthetic-sample schema (ltbench.synth). ``stop``: stop synthesising from that fraction of the
    epochs on (None: never)."""

    name: str = MISSING
    stop: float | None = None

    def __post_init__(self) -> None:
        if self.stop is not None and not 0 <= self.stop <= 1:
            raise ConfigError("synth.stop is a fraction of the epochs in [0, 1]")


@dataclass
class ClassifierConfig(Component):
    """Base of the classifier stage (decoupled training, stage 2; ltbench.classifier)."""

    tasks = ("classification",)  # a new classifier over classes

    def training_schedule(self) -> ScheduleConfig | None:
        """The schedule its head trains with (None: computed from features, no training)."""
        return None

    name: str = MISSING


@dataclass
class PretrainConfig(Component):
    """Base of the pre-training stage (stage 0; ltbench.methods)."""

    name: str = MISSING
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class MethodConfig(Component):
    """Base of the methods that change how the training stage trains (ltbench.methods: fds, ...)."""

    name: str = MISSING


@dataclass
class SemiConfig(Component):
    """Base of the semi-supervised methods that join the training stage (ltbench.methods). ``base_stage``
    (declared): a stage before the training stage trains a base classifier that labels the unlabeled set."""

    base_stage: ClassVar[bool] = False

    name: str = MISSING


@dataclass
class LoggerConfig(Component):
    """Base of the extra loggers (ltbench.loggers); epochs.csv is always written."""

    name: str = runtime(MISSING)


@dataclass
class TrainConfig:
    task: TaskConfig = MISSING
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    loss: LossConfig = MISSING
    sampler: SamplerConfig = MISSING
    reweight: ReweightConfig = MISSING
    synth: SynthConfig = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pretrain: PretrainConfig | None = None  # stage 0 (ltbench train pretrain=...)
    method: MethodConfig | None = None  # a method of the training stage beyond loss/sampler/weights (method=fds)
    semi: SemiConfig | None = None  # semi-supervised learning in the training stage
    classifier: ClassifierConfig | None = None  # stage 2 (decoupled classifier)
    logger: LoggerConfig | None = runtime(None)
    strategy: str = run_level("ce")  # set by each conf/strategy preset: a label for tables and directories
    seed: int = replicate(0)
    device: str = runtime("auto")
    # bf16 autocast on CUDA (it changes the numbers there); ignored on CPU so CPU runs stay bit-reproducible.
    amp: bool = True
    num_threads: int | None = runtime(None)  # torch CPU threads; None: torch's default (recorded either way)
    resume: str | None = runtime(None)  # a run directory to continue
    results_dir: str = runtime("results")
    # Where finished stages are cached, content-addressed (default <results_dir>/stage_cache).
    stage_cache: str | None = runtime(None)
    progress: bool = runtime(True)
    # torch.compile of the training forward and the evaluation forward (ltbench.fit): none (eager, the default, so
    # CPU runs stay bit-reproducible) | default | reduce-overhead (CUDA graphs) | max-autotune |
    # max-autotune-no-cudagraphs. An execution setting: compiled kernels reorder float sums (differences at
    # rounding level, like cudnn.benchmark's choice of algorithm), so it is not part of the run's identity.
    compile: str = runtime("none")
    # Which epoch's network the test metrics are of (model selection, recorded in metrics.json `selection`):
    # last (the final epoch), val (the epoch of the last stage with the best validation metric: the validation split
    # is evaluated every epoch), test_oracle (the best test epoch, what most long-tail papers report; a run with it
    # never shares a mean with another protocol and its label says so). Applies to the last stage, which must train.
    select: str = added("last", mark="run")
    # Test-time ensembling of the final evaluation (LIFT's tte, shijxcs/LIFT trainer.py): none | fivecrop | tencrop;
    # each image resized (short side) to R + tte_expand, logits averaged over the crops of R (R: the model's
    # image_size, else the input's), ten crops: five and their mirror images. Evaluation only: no stage changes.
    tte: str = added("none", mark="run")
    tte_expand: int = added(24, mark="run")

    def __post_init__(self) -> None:
        if self.select not in SELECT:
            raise ConfigError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.tte not in TTE_MODES or self.tte_expand < 0:
            raise ConfigError(f"tte must be one of {', '.join(TTE_MODES)} and tte_expand >= 0, got {self.tte!r}, "
                              f"{self.tte_expand}")  # fmt: skip
        if self.tte != "none" and getattr(self.dataset, "inputs", "images") != "images":
            raise ConfigError(f"tte={self.tte} crops images; dataset={self.dataset.name} gives {self.dataset.inputs}")
        if self.select != "last" and self.classifier is not None and self.classifier.training_schedule() is None:
            raise ConfigError(
                f"select={self.select} picks an epoch of the last stage, and classifier={self.classifier.name} is "
                "computed from features without epochs: use select=last (its own choice is made on validation)"
            )
        self.compile = {"true": "default", "false": "none"}.get(str(self.compile).lower(), str(self.compile))
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("num_threads must be >= 1 (or null for torch's default)")


# Config groups typed by a registry: the section of TrainConfig and the family name of its registry.
REGISTERED_SECTIONS = {
    "task": "task",
    "dataset": "dataset",
    "model": "model",
    "loss": "loss",
    "sampler": "sampler",
    "reweight": "reweight",
    "synth": "synth",
    "pretrain": "pretrain",
    "method": "method",
    "semi": "semi",
    "classifier": "classifier",
    "logger": "logger",
}


_ROOT: dict[str, type[TrainConfig]] = {"schema": TrainConfig}


def root_schema() -> type[TrainConfig]:
    """The root schema: :class:`TrainConfig`, extended by the sections that plugins registered."""
    return _ROOT["schema"]


def register_root() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=root_schema())


def register_section(section: str, base: type[Component]) -> None:
    """Add an optional section to the root config, typed by ``base`` and its registered options (a plugin's new
    stage: ``ltbench train +<section>=<option>``). The section is absent (None) unless set, and left out of every
    identity while it is, so the runs recorded before it existed keep their hash, directories and stage caches.
    Its options register in ``Registry(section, base)``; the stage that reads it declares it (``Stage.section``)."""
    import dataclasses

    if section in REGISTERED_SECTIONS:
        if REGISTERED_SECTIONS[section] == section and _section_base(section) is base:
            return  # registered already (a module imported twice)
        raise ConfigError(f"config section {section!r} exists already")
    current = root_schema()
    extended = dataclasses.make_dataclass(
        current.__name__, [(section, Optional[base], added(None))], bases=(current,)  # noqa: UP045
    )
    extended.__module__, extended.__qualname__ = current.__module__, current.__qualname__
    _ROOT["schema"] = extended
    REGISTERED_SECTIONS[section] = section
    register_root()


def _section_base(section: str) -> type | None:
    """The schema a registered section is typed by (its field's ``Optional[base]``)."""
    import dataclasses

    for f in dataclasses.fields(root_schema()):
        if f.name == section:
            args = [a for a in getattr(f.type, "__args__", ()) if a is not type(None)]
            return args[0] if args else None
    return None


register_root()


def _registered_schema(family: str, name: str) -> type | None:
    """The schema registered as ``schema/<family>/<name>`` in Hydra's ConfigStore (None: not registered)."""
    from hydra.core.config_store import ConfigStore

    try:
        node = ConfigStore.instance().load(f"schema/{family}/{name}.yaml")
    except Exception:
        return None
    return OmegaConf.get_type(node.node)


def sections(cfg: TrainConfig) -> dict[str, Component]:
    """The registered sections that are set, by name."""
    out: dict[str, Component] = {}
    for section in REGISTERED_SECTIONS:
        obj = getattr(cfg, section)
        if obj is not None:
            out[section] = obj
    return out


def _check_registered(cfg: TrainConfig) -> None:
    """Every registered section names a known option typed by its own schema; then the declared capabilities and
    each option's own cross-section checks (``check(root)``, e.g. LDAM needs the cosine head) on the whole config."""
    for section, obj in sections(cfg).items():
        family = REGISTERED_SECTIONS[section]
        schema = _registered_schema(family, obj.name)  # type: ignore[attr-defined]
        if schema is None:
            raise ConfigError(f"unknown {family} {obj.name!r}; choose one of {', '.join(_options(family))}")  # type: ignore[attr-defined]
        if type(obj) is not schema:
            raise ConfigError(
                f"{section} {obj.name!r} is typed {type(obj).__name__}, not its schema {schema.__name__}: "  # type: ignore[attr-defined]
                f"its YAML's defaults list must start with /schema/{family}/{obj.name}@_here_"  # type: ignore[attr-defined]
            )
    check_capabilities(cfg)
    for obj in sections(cfg).values():
        obj.check(cfg)


def _options(family: str) -> list[str]:
    from hydra.core.config_store import ConfigStore

    return sorted(n[: -len(".yaml")] for n in ConfigStore.instance().list(f"schema/{family}"))


# Sections that describe the run's data and task rather than accept them.
_DESCRIBING = ("task", "dataset", "logger")


def check_capabilities(cfg: TrainConfig) -> None:
    """Each option's declared ``tasks`` and ``reads`` against the run's task and the dataset's inputs: the first
    mismatch is refused in one line that names the options of that group which would fit."""
    task, ds = cfg.task.name, cfg.dataset
    for section, obj in sections(cfg).items():
        if section in _DESCRIBING:
            continue
        name = obj.name  # type: ignore[attr-defined]
        hint = f"; {obj.hint}" if obj.hint else ""
        if ds.inputs not in obj.reads:
            raise ConfigError(
                f"{section}={name} reads {'|'.join(obj.reads)}; dataset={ds.name} gives {ds.inputs}"
                f"{hint or _fitting(section, lambda s: ds.inputs in s.reads and task in s.tasks)}"
            )
        if task not in obj.tasks:
            kind = "classes" if obj.tasks == ("classification",) else "continuous targets"
            raise ConfigError(
                f"{section}={name} needs task={'|'.join(obj.tasks)}: it works on {kind}, and this run is "
                f"task={task}{hint or _fitting(section, lambda s: task in s.tasks)}"
            )


def _fitting(section: str, fits: Any) -> str:
    """``; options that fit: a, b`` for the options of ``section``'s group whose schema ``fits``."""
    family = REGISTERED_SECTIONS[section]
    names = [n for n in _options(family) if (s := _registered_schema(family, n)) is not None and fits(s)]
    return f"; {section} options that fit: {', '.join(names)}" if names else ""


def typed(data: dict) -> DictConfig:
    """A plain config (a saved config.yaml, say) typed like a composed one: each registered section by the schema
    of the option its ``name`` names."""
    node = OmegaConf.merge(
        OmegaConf.structured(root_schema()), {k: v for k, v in data.items() if k not in REGISTERED_SECTIONS}
    )
    for section, family in REGISTERED_SECTIONS.items():
        part = data.get(section)
        if part is None:
            continue
        name = part.get("name") if isinstance(part, dict) else None
        schema = _registered_schema(family, str(name))
        if schema is None:
            raise ConfigError(f"unknown {family} {name!r}")
        node[section] = OmegaConf.merge(OmegaConf.structured(schema), part)  # type: ignore[index]
    assert isinstance(node, DictConfig)
    return node


def to_schema(cfg: DictConfig | TrainConfig | dict) -> TrainConfig:
    """Resolve a composed (or saved) config into the dataclass tree, running every cross-field check."""
    if isinstance(cfg, TrainConfig):
        return cfg
    try:
        kind = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else None
        if isinstance(kind, type) and issubclass(kind, TrainConfig):
            obj = OmegaConf.to_object(cfg)
        else:  # not composed against the schema
            plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
            obj = OmegaConf.to_object(typed(plain))  # type: ignore[arg-type]
    except ConfigError:
        raise
    except Exception as e:  # omegaconf validation errors: keep the message, drop the traceback
        raise ConfigError(str(e).splitlines()[0]) from e
    assert isinstance(obj, TrainConfig)
    _check_registered(obj)
    return obj


def default_data_root() -> str:
    return os.environ.get("LTBENCH_DATA") or "data"

