"""The types a training stage and its components share: a batch, an epoch, a hook, running totals.

Components (methods, loggers, the data feed) depend on these and never on the training loop itself
(:mod:`ltbench.fit`), so the dependency arrows run one way: runner -> stages -> fit -> components -> core/config.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA; CPU runs stay in fp32 so they are bit-reproducible."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class Batch:
    """Inputs and targets on the training device; ``unlabeled``: a batch of the unlabeled stream, for a method that
    declares one (``Streams(unlabeled=True)``)."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None  # positions in the training set
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
    """Called around a stage, every epoch and every step; override what you need.

    Order: the stage's method first, then the stage's hooks by ``order`` (lower first; ties keep their listed
    order): progress 10, epoch log 20, checkpoint 30, loggers 40, anything else 50 by default. The checkpoint
    comes after the epoch log, so a resumed run never lacks a row it logged. ``on_stage_start`` / ``on_stage_end``
    bracket a stage's training (the end runs after an error or an interrupt too, with ``ok`` False).
    """

    order: ClassVar[int] = 50

    def on_stage_start(self, stage: str) -> None: ...

    def on_stage_end(self, stage: str, ok: bool) -> None: ...

    def on_epoch_start(self, ep: Epoch) -> None: ...

    def after_backward(self, ep: Epoch, model: Any) -> None: ...

    def after_step(self, ep: Epoch, totals: Totals) -> None: ...

    def on_epoch_end(self, ep: Epoch) -> None: ...


class Totals:
    """Running sums of an epoch kept on the device; :meth:`values` is the one host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = 0
        self.steps = 0
        self.last = 0  # samples of the last step
        # mean(): per key, the copy to the host in flight (pinned tensor, its event, samples) and the last value read
        self._inflight: dict[str, tuple[torch.Tensor, Any, int]] = {}
        self._shown: dict[str, float] = {}

    def add(self, n: int, sums: dict[str, torch.Tensor]) -> None:
        self.seen, self.steps, self.last = self.seen + n, self.steps + 1, n
        for k, v in sums.items():  # the first value is copied: it may be memory a CUDA graph's next replay reuses
            self.sums[k] = v.detach().clone() if k not in self.sums else self.sums[k] + v

    def values(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        vals = torch.stack([self.sums[k].detach().double().cpu() for k in keys]).tolist()
        return dict(zip(keys, vals))

    def mean(self, key: str) -> float:
        """The running mean of ``key`` for display (the progress bar). On CUDA it never waits for the device: it
        returns the value of the last copy that has landed and starts a new one (so it lags by one call); the first
        call of an epoch waits once. Elsewhere it is exact."""
        if key not in self.sums:
            return float("nan")
        value = self.sums[key].detach()
        if value.device.type != "cuda":
            return float(value) / max(self.seen, 1)
        pending = self._inflight.get(key)
        if pending is not None and pending[1].query():
            self._shown[key] = float(pending[0]) / max(pending[2], 1)
            pending = None
        if key not in self._shown:  # nothing read yet: wait this once
            self._shown[key] = float(value) / max(self.seen, 1)
        elif pending is None:
            host = value.to("cpu", non_blocking=True)  # pinned: the copy runs behind the queued kernels
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(value.device))
            self._inflight[key] = (host, event, self.seen)
        return self._shown[key]
