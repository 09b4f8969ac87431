"""Typed configuration schemas.

Every config group has a dataclass schema registered in Hydra's ConfigStore as the group's ``_schema``; the YAML
files in ``conf/`` extend it, so a misspelt key or a wrong type is rejected when the config is composed.
Cross-field checks live in ``__post_init__`` and run on ``OmegaConf.to_object(cfg)`` (see :func:`to_schema`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ltbench.errors import ConfigError

DATASETS = ("cifar10lt", "cifar100lt", "imagenetlt", "placeslt", "folder")
PROFILES = ("exp", "step", "pareto")
GROUP_RULES = ("counts", "classes", "thirds")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class GroupsConfig:
    """How classes are split into many / medium / few-shot groups.

    rule: ``counts`` (many > many_above training images, few < few_below, medium otherwise: the ImageNet-LT
    convention), ``classes`` (explicit class-index lists), or ``thirds`` (by frequency rank, the most frequent
    third is "many").
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
class DatasetConfig:
    name: str = MISSING
    num_classes: int = MISSING
    # None: $LTBENCH_DATA if set, else ./data (resolved in the runner, so it is recorded as used).
    root: str | None = None
    download: bool = True
    # None: the split's own imbalance (published lists, or a folder's natural counts).
    imbalance_ratio: float | None = 100.0
    profile: str = "exp"
    split_seed: int = 0
    # Image-file datasets (imagenetlt, placeslt, folder)
    split: str = "published"  # published lists | generated from the full train folder (imagenetlt, placeslt)
    split_dir: str | None = None  # where the lists are (published; default: root) or go (generated)
    max_count: int = 1280  # generated splits: images of the largest class
    check_files: bool = True  # every listed image must exist
    check_counts: bool = True  # published lists must have the published sizes
    image_size: int = 224
    resize: int = 256  # evaluation: resize the short side, then centre-crop image_size
    num_workers: int = 4
    # Balanced validation split (per class) from training images the long-tailed subset did not use; where a
    # class has fewer left (CIFAR-10-LT's largest class keeps all 5000), it gets what is left and the run says so.
    val_per_class: int = 20
    groups: GroupsConfig = field(default_factory=GroupsConfig)

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}")
        if self.imbalance_ratio is not None and not self.imbalance_ratio >= 1:
            raise ConfigError(f"dataset.imbalance_ratio must be >= 1, got {self.imbalance_ratio}")
        if self.split not in ("published", "generated"):
            raise ConfigError(f"dataset.split must be 'published' or 'generated', got {self.split!r}")
        if self.val_per_class < 0:
            raise ConfigError("dataset.val_per_class must be >= 0")
        if self.profile not in PROFILES:
            raise ConfigError(f"dataset.profile must be one of {PROFILES}, got {self.profile!r}")
        if self.groups.rule == "classes":
            for g in (self.groups.many, self.groups.medium, self.groups.few):
                bad = [c for c in g if not 0 <= c < self.num_classes]
                if bad:
                    raise ConfigError(f"dataset.groups: class indices {bad} outside 0..{self.num_classes - 1}")


@dataclass
class ModelConfig:
    name: str = "resnet32"
    head: str = "linear"  # linear | cosine
    # Width multiplier of the CIFAR ResNet (1 = 16/32/64 channels); tests use tiny models.
    width: int = 16
    depth: int = 32


@dataclass
class LossConfig:
    """One schema for every loss; each loss reads the fields it needs (see ltbench.losses)."""

    name: str = "ce"
    label_smoothing: float = 0.0
    gamma: float = 0.0  # focal
    alpha: float | None = None  # focal / sigmoid focal: weight of the positive term
    max_m: float = 0.5  # LDAM: largest margin (Cao et al. 2019)
    s: float = 30.0  # LDAM: logit scale (Cao et al. 2019)
    tau: float = 1.0  # logit adjustment (Menon et al. 2021)

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("loss.label_smoothing must be in [0, 1)")
        if self.gamma < 0:
            raise ConfigError("loss.gamma must be >= 0")


@dataclass
class SamplerConfig:
    name: str = "instance"
    # drs: epoch (0-indexed) from which class-balanced sampling replaces instance sampling.
    start_epoch: int = 160


@dataclass
class ReweightConfig:
    name: str = "none"  # none | inverse | sqrt_inverse | effective_number
    beta: float = 0.9999  # effective number (Cui et al. 2019, CIFAR-LT setting)
    # Deferred re-weighting (DRW, Cao et al. 2019): weights apply from this epoch (0-indexed) on.
    start_epoch: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError("reweight.beta must be in [0, 1)")


@dataclass
class SynthConfig:
    """Synthetic samples made inside the training batch."""

    name: str = "none"  # none | mixup | remix | smote | noise
    alpha: float = 1.0  # mixup/remix: Beta(alpha, alpha)
    kappa: float = 3.0  # remix: count ratio above which the label goes to the minority class (Chou et al. 2020)
    tau: float = 0.5  # remix: mixing-weight threshold (Chou et al. 2020)
    k: int = 5  # smote: nearest same-class neighbours (Chawla et al. 2002)
    sigma: float = 0.1  # noise: std of the Gaussian noise, on the [0, 1] pixel scale
    # Stop synthesising in the last epochs (mixup-style methods are usually switched off at the end); None = never.
    stop_epoch: int | None = None


@dataclass
class AugmentConfig:
    crop: bool = True  # random crop with `padding` zero-padding
    padding: int = 4
    flip: bool = True
    cutout: int = 0  # side of the Cutout square (DeVries & Taylor 2017: 16 on CIFAR-10); 0 = off
    autoaugment: bool = False  # torchvision's CIFAR-10 AutoAugment policy, per image


STAGE2_METHODS = ("none", "crt", "lws", "tau_norm", "ncm", "posthoc_la")


@dataclass
class Stage2Config:
    """Stage 2 of decoupled training (Kang et al. 2020): only the classifier changes; the backbone is frozen.

    crt: re-initialise and retrain the classifier; lws: learn one scale per class; tau_norm: w_c / ||w_c||^tau;
    ncm: nearest class mean of normalised features; posthoc_la: logits - tau * log(prior) (Menon et al. 2021).
    tau (tau_norm, posthoc_la) is chosen on the validation split, never on the test set.
    """

    method: str = "none"
    epochs: int = 10  # crt / lws (Kang et al. 2020: 10 epochs)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sampler: str = "class_balanced"  # crt / lws retrain with class-balanced sampling
    augment: bool = True  # crt / lws see the training augmentation
    tau_grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(21)])

    def __post_init__(self) -> None:
        if self.method not in STAGE2_METHODS:
            raise ConfigError(f"schedule.stage2.method must be one of {STAGE2_METHODS}, got {self.method!r}")
        if self.method != "none" and self.epochs < 1 and self.method in ("crt", "lws"):
            raise ConfigError("schedule.stage2.epochs must be >= 1 for crt and lws")
        if self.method in ("tau_norm", "posthoc_la") and not self.tau_grid:
            raise ConfigError("schedule.stage2.tau_grid is empty")


@dataclass
class ScheduleConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    warmup_epochs: int = 5
    decay: str = "step"  # step | cosine
    milestones: list[int] = field(default_factory=lambda: [160, 180])
    gamma: float = 0.01  # step decay factor applied at each milestone (x0.01 at 160, x0.0001 at 180)
    eval_batch_size: int = 1000
    # Two-stage decoupled training: stage 1 is everything above (schedule.epochs), stage 2 adjusts the classifier.
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("schedule.epochs must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("schedule.batch_size must be >= 1")
        if self.decay not in ("step", "cosine"):
            raise ConfigError(f"schedule.decay must be 'step' or 'cosine', got {self.decay!r}")
        if sorted(self.milestones) != list(self.milestones):
            raise ConfigError("schedule.milestones must be increasing")
        if self.warmup_epochs < 0 or (self.warmup_epochs >= self.epochs and self.epochs > 1):
            raise ConfigError("schedule.warmup_epochs must be in [0, epochs)")


@dataclass
class TrainConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: str = "ce"  # set by each conf/strategy preset; a label for tables and run directories
    seed: int = 0
    device: str = "auto"
    # bf16 autocast on CUDA; ignored on CPU so CPU runs stay bit-reproducible.
    amp: bool = True
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    resume: str | None = None  # a run directory to continue
    results_dir: str = "results"
    # Where trained stage-1 backbones are cached for two-stage runs (key: everything that affects stage 1).
    stage1_cache: str | None = None  # None: <results_dir>/stage1_cache
    progress: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.loss.name == "ldam" and self.model.head != "cosine":
            raise ConfigError("loss=ldam needs the cosine-normalised head (model.head=cosine)")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in [
        ("dataset", DatasetConfig),
        ("model", ModelConfig),
        ("loss", LossConfig),
        ("sampler", SamplerConfig),
        ("reweight", ReweightConfig),
        ("synth", SynthConfig),
        ("augment", AugmentConfig),
        ("schedule", ScheduleConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


register_configs()


def to_schema(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """Resolve a composed config into the dataclass tree, running every cross-field check."""
    if isinstance(cfg, TrainConfig):
        return cfg
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # omegaconf validation errors: keep the message, drop the traceback
        raise ConfigError(str(e).splitlines()[0]) from e
    if not isinstance(obj, TrainConfig):
        # A plain DictConfig (not composed against the schema): merge it onto the schema.
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        obj = OmegaConf.to_object(merged)
    assert isinstance(obj, TrainConfig)
    return obj


def default_data_root() -> str:
    return os.environ.get("LTBENCH_DATA") or "data"


def as_plain(cfg: Any) -> dict:
    """A JSON/YAML-ready dict of a config (dataclass or DictConfig), interpolations resolved."""
    node = OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _ratio_tag(ratio: Any) -> str:
    """100.0 -> '100', 12.5 -> '12.5', None -> 'natural': imbalance ratios in directory names."""
    return "natural" if ratio in (None, "None", "null") else f"{float(ratio):g}"


def _run_dir(resume: Any, default: str) -> str:
    """hydra.run.dir: a resumed run continues in its own directory (if it is one; else the runner says so)."""
    if resume not in (None, "", "None", "null") and os.path.exists(os.path.join(str(resume), "config.yaml")):
        return str(resume)
    return default


OmegaConf.register_new_resolver("ratio_tag", _ratio_tag, replace=True)
OmegaConf.register_new_resolver("ltbench_run_dir", _run_dir, replace=True)
