"""The types a training stage and its components share: a batch, an epoch, a hook, running totals.

Components (methods, loggers, the data feed) depend on these and never on the training loop itself
(:mod:`ltbench.fit`), so the dependency arrows run one way: runner -> stages -> fit -> components -> core/config.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA; CPU runs stay in fp32 so they are bit-reproducible."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class Batch:
    """Inputs and targets on the training device; ``views`` holds extra augmented views of ``x`` when a method asks
    for them, ``unlabeled`` a batch of the unlabeled stream (semi-supervised methods)."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None  # positions in the training set
    views: list[torch.Tensor] = field(default_factory=list)
    unlabeled: Batch | None = None

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Epoch:
    """One epoch as the hooks and the method see it. ``gen`` is the epoch's batch stream: augmentation, synthesis
    and mixing draw from it in order, so an epoch's draws are a function of (seed, stage, epoch)."""

    stage: str
    index: int  # 0-based
    epochs: int
    lr: float
    gen: torch.Generator
    amp: bool
    size: int = 0  # samples in the epoch's stream (set when its batches are made)
    stats: dict[str, float] = field(default_factory=dict)  # filled when the epoch ends
    row: dict[str, Any] = field(default_factory=dict)  # its line of the epoch log


class Hook:
    """Called by :func:`fit` around every epoch and after every step; override what you need."""

    def on_epoch_start(self, ep: Epoch) -> None: ...

    def after_step(self, ep: Epoch, totals: Totals) -> None: ...

    def on_epoch_end(self, ep: Epoch) -> None: ...


class Totals:
    """Running sums of an epoch kept on the device; :meth:`values` is the one host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = 0
        self.steps = 0
        self.last = 0  # samples of the last step

    def add(self, n: int, sums: dict[str, torch.Tensor]) -> None:
        self.seen, self.steps, self.last = self.seen + n, self.steps + 1, n
        for k, v in sums.items():
            self.sums[k] = v if k not in self.sums else self.sums[k] + v

    def values(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        vals = torch.stack([self.sums[k].detach().double().cpu() for k in keys]).tolist()
        return dict(zip(keys, vals))

    def mean(self, key: str) -> float:
        return float(self.sums[key]) / max(self.seen, 1) if key in self.sums else float("nan")
