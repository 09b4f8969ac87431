"""Samplers: each epoch, a stream of indices into the training set, registered by name.

A sampler is a pure function of (labels, epoch, generator), so a run resumes exactly at an epoch boundary and
every process of a multi-GPU job draws the same global stream; :func:`shard` then gives each rank an interleaved
slice. Every draw is independent of its position (or the stream is shuffled), so each rank's slice has the same
class distribution as the whole stream: class balance survives sharding. "Class" is the task's label bin (a class,
or a regression target bin), so every sampler works for both tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ltbench.config import SamplerConfig, epoch_at
from ltbench.errors import ConfigError
from ltbench.registry import Registry

SampleFn = Callable[..., torch.Tensor]
SAMPLERS: Registry[SampleFn] = Registry("sampler", SamplerConfig)


@dataclass
class DRSConfig(SamplerConfig):
    name: str = "drs"
    # fraction of the epochs from which class-balanced sampling replaces instance sampling (epoch 160 of 200)
    start: float = 0.8

    def __post_init__(self) -> None:
        if not 0 <= self.start <= 1:
            raise ConfigError("sampler.start is a fraction of the epochs in [0, 1]")


class ClassIndex:
    """Training indices grouped by class, for vectorised per-class draws."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        labels = labels.cpu().long()
        self.n = len(labels)
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.order = torch.argsort(labels, stable=True)  # indices grouped by class
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.num_classes = num_classes

    def members(self, c: int) -> torch.Tensor:
        o = int(self.offsets[c])
        return self.order[o : o + int(self.counts[c])]

    def draw(self, class_probs: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
        """``length`` i.i.d. draws: a class from ``class_probs``, then one of its images uniformly."""
        probs = class_probs.double() * (self.counts > 0)
        classes = torch.multinomial(probs / probs.sum(), length, replacement=True, generator=gen)
        within = (torch.rand(length, generator=gen, dtype=torch.float64) * self.counts[classes]).long()
        return self.order[self.offsets[classes] + within]


def _power(q: float, doc: str) -> SampleFn:
    def sample(ci: ClassIndex, epoch: int, epochs: int, cfg: SamplerConfig, gen) -> torch.Tensor:
        return ci.draw(ci.counts.double().pow(q), ci.n, gen)

    sample.__doc__ = doc
    return sample


@SAMPLERS.register("instance", SamplerConfig)
def instance(ci, epoch, epochs, cfg, gen):
    """Every image once per epoch, in random order."""
    return torch.randperm(ci.n, generator=gen)


@SAMPLERS.register("progressive", SamplerConfig)
def progressive(ci, epoch, epochs, cfg, gen):
    """Progressively balanced (Kang et al. 2020): p_c = (1 - t) n_c / N + t / C, t going 0 -> 1 over training.

    t = epoch / (epochs - 1), so the first epoch samples by instance and the last one exactly class-balanced.
    """
    t = epoch / max(epochs - 1, 1)
    p_instance = ci.counts.double() / ci.n
    p_balanced = (ci.counts > 0).double() / int((ci.counts > 0).sum())
    return ci.draw((1 - t) * p_instance + t * p_balanced, ci.n, gen)


def _shuffle(parts: list[torch.Tensor], gen) -> torch.Tensor:
    stream = torch.cat(parts)
    return stream[torch.randperm(len(stream), generator=gen)]


@SAMPLERS.register("oversample", SamplerConfig)
def oversample(ci, epoch, epochs, cfg, gen):
    """Random over-sampling: each class's images repeated up to the largest count (the remainder drawn without
    replacement), so every class has exactly max_count entries; then shuffled."""
    target = int(ci.counts.max())
    parts = []
    for c in range(ci.num_classes):
        m = ci.members(c)
        if len(m) == 0:
            continue
        reps, rem = divmod(target, len(m))
        parts += [m.repeat(reps), m[torch.randperm(len(m), generator=gen)[:rem]]]
    return _shuffle(parts, gen)


@SAMPLERS.register("undersample", SamplerConfig)
def undersample(ci, epoch, epochs, cfg, gen):
    """Random under-sampling: each class cut to the smallest count, a fresh random subset every epoch."""
    nonzero = ci.counts[ci.counts > 0]
    target = int(nonzero.min())
    parts = [
        ci.members(c)[torch.randperm(int(ci.counts[c]), generator=gen)[:target]]
        for c in range(ci.num_classes)
        if ci.counts[c] > 0
    ]
    return _shuffle(parts, gen)


@SAMPLERS.register("class_reorg", SamplerConfig)
def class_reorg(ci, epoch, epochs, cfg, gen):
    """Class reorganisation: for every class, max_count uniform random draws among its images (with
    replacement), concatenated and shuffled: each class appears exactly max_count times per epoch."""
    target = int(ci.counts.max())
    parts = []
    for c in range(ci.num_classes):
        m = ci.members(c)
        if len(m):
            parts.append(m[torch.randint(0, len(m), (target,), generator=gen)])
    return _shuffle(parts, gen)


@SAMPLERS.register("drs", DRSConfig)
def drs(ci, epoch, epochs, cfg, gen):
    """Deferred re-sampling (Cao et al. 2019): instance sampling before ``start`` of the epochs, class-balanced
    after."""
    if epoch < epoch_at(cfg.start, epochs):
        return instance(ci, epoch, epochs, cfg, gen)
    return class_balanced(ci, epoch, epochs, cfg, gen)


class_balanced = SAMPLERS.register("class_balanced", SamplerConfig)(
    _power(0.0, "Class-balanced: a class uniformly, then one of its images.")
)
SAMPLERS.register("sqrt", SamplerConfig)(
    _power(0.5, "Square-root sampling: class probability proportional to sqrt(count).")
)


def sampler_config(name: str, **settings) -> SamplerConfig:
    """The config of a registered sampler by name (e.g. the classifier stage's ``sampler: class_balanced``)."""
    schema = SAMPLERS.schema(name)
    assert schema is not None
    return schema(name=name, **settings)


class Sampler:
    def __init__(self, cfg: SamplerConfig, labels: torch.Tensor, num_classes: int, epochs: int) -> None:
        self.cfg, self.epochs = cfg, epochs
        self.index = ClassIndex(labels, num_classes)
        self.fn = SAMPLERS.get(cfg.name).builder

    def epoch_indices(self, epoch: int, gen: torch.Generator) -> torch.Tensor:
        """The global index stream of one epoch (the same on every rank for the same generator)."""
        return self.fn(self.index, epoch, self.epochs, self.cfg, gen)


def shard(stream: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s interleaved slice; the stream is padded by wrapping so every rank gets as many."""
    if world_size == 1:
        return stream
    pad = (-len(stream)) % world_size
    if pad:
        stream = torch.cat([stream, stream[:pad]])
    return stream[rank::world_size]
