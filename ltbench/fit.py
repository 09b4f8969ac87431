"""The one training loop of ltbench, and prediction.

Every stage (pre-training, training, classifier retraining) trains through :func:`fit`: set the epoch's lr, let
the hooks prepare the epoch (a deferred re-weighting switching on, synthesis switching off, a progress bar), run the
steps, let the hooks close the epoch (the epoch log, a checkpoint, loggers, running statistics). What a step
computes belongs to the stage's :class:`~ltbench.methods.Method`; the loop only does forward-backward-step and
keeps running sums on the device, so a step never waits for the host (one sync per epoch, and one every
``SYNC_EVERY`` steps for the progress bar).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ltbench.config import ScheduleConfig
from ltbench.core import Batch, Epoch, Hook, Totals, autocast
from ltbench.errors import LtbenchError
from ltbench.optim import lr_at, set_lr

__all__ = ["Batch", "Epoch", "Hook", "Totals", "Trainer", "autocast", "fit", "predict", "train_epoch"]

if TYPE_CHECKING:
    from ltbench.methods import Method
    from ltbench.tasks import Task


@dataclass
class Trainer:
    """Everything one stage trains with. ``batches(ep)`` yields the epoch's :class:`Batch` es."""

    stage: str
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    schedule: ScheduleConfig
    batches: Callable[[Epoch], Iterable[Batch]]
    epoch_gen: Callable[[int], torch.Generator]
    task: Task
    amp: bool
    start_epoch: int = 0
    rows: list[dict] = field(default_factory=list)


def fit(tr: Trainer, hooks: list[Hook]) -> None:
    """Train from ``tr.start_epoch`` to the stage's last epoch."""
    hooks = [tr.method, *hooks]
    for epoch in range(tr.start_epoch, tr.schedule.epochs):
        ep = Epoch(tr.stage, epoch, tr.schedule.epochs, lr_at(epoch, tr.schedule), tr.epoch_gen(epoch), tr.amp)
        set_lr(tr.optimizer, ep.lr)
        stream = tr.batches(ep)  # sets ep.size; draws nothing from ep.gen until iterated
        for h in hooks:
            h.on_epoch_start(ep)
        ep.stats = train_epoch(tr, ep, stream, hooks)
        if not math.isfinite(ep.stats["loss"]):
            raise LtbenchError(
                f"{tr.stage}: training diverged at epoch {epoch + 1} (loss {ep.stats['loss']}); lower the lr"
            )
        ep.row = epoch_row(tr, ep)
        tr.rows.append(ep.row)
        for h in hooks:
            h.on_epoch_end(ep)


def train_epoch(tr: Trainer, ep: Epoch, stream: Iterable[Batch], hooks: list[Hook]) -> dict[str, float]:
    """One pass over the epoch's batches: forward (the method's step), backward, optimiser step."""
    tr.model.train()
    totals = Totals()
    t0 = time.perf_counter()
    for batch in stream:
        if len(batch) < 2:  # a batch of one breaks BatchNorm; it is at most one sample an epoch
            continue
        loss, sums = tr.method.step(tr.model, batch, ep)
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
        n = len(batch)
        totals.add(n, {"loss": loss.detach().double() * n, **sums})
        for h in hooks:
            h.after_step(ep, totals)
    sums = totals.values()
    seconds = time.perf_counter() - t0
    seen = max(totals.seen, 1)
    return {
        "loss": sums.get("loss", float("nan")) / seen,
        "metric": tr.task.epoch_metric(sums, totals.seen),
        "images": totals.seen,
        "seconds": seconds,
        **{k: v / seen for k, v in sums.items() if k.startswith("mean_")},
    }


def epoch_row(tr: Trainer, ep: Epoch) -> dict[str, Any]:
    """The epoch's line of the stage's epoch log (epoch is 1-based)."""
    s = ep.stats
    return {
        "epoch": ep.index + 1,
        "lr": ep.lr,
        "train_loss": round(s["loss"], 6),
        tr.task.train_metric: round(s["metric"], 4),
        "images": int(s["images"]),
        "seconds": round(s["seconds"], 3),
        "images_per_s": round(s["images"] / max(s["seconds"], 1e-9), 1),
        **{k[len("mean_") :]: round(v, 6) for k, v in s.items() if k.startswith("mean_")},
        **tr.method.row_extras(ep),
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    amp: bool,
    features: bool = False,
    on_batch: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Model outputs (or backbone features) of every batch, in order, float32 on the CPU."""
    model.eval()
    out: list[torch.Tensor] = []
    for b in batches:
        with autocast(b.x.device, amp):
            o = model.features(b.x) if features else model(b.x)
        out.append(o.float().cpu())
        if on_batch is not None:
            on_batch(len(b))
    return torch.cat(out) if out else torch.zeros(0)
