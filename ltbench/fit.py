"""The one training loop of ltbench, and prediction.

Every stage (pre-training, training, classifier retraining) trains through :func:`fit`: set the epoch's lr, let
the hooks prepare the epoch (a deferred re-weighting switching on, synthesis switching off, a progress bar), run the
steps, let the hooks close the epoch (the epoch log, a checkpoint, loggers, running statistics). What a step
computes belongs to the stage's :class:`~ltbench.methods.Method`; the loop only does forward-backward-step and
keeps running sums on the device, so a step never waits for the host: one sync per epoch, and the progress bar
reads the running loss without waiting for the device (:meth:`~ltbench.core.Totals.mean`).

``compile`` (the run's ``compile=`` setting) puts the model's forward under ``torch.compile`` in training and in
evaluation (:class:`ltbench.compile.Compiled`: full-size batches compiled, the last partial batch eager). How many
runs of a sweep share one device is :mod:`ltbench.launcher`'s business.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ltbench.compile import Compiled, check_compile, device_of, first_compiled_call
from ltbench.config import ScheduleConfig
from ltbench.core import Batch, Epoch, Hook, Totals, autocast
from ltbench.errors import LtbenchError
from ltbench.optim import lr_at, set_lr

__all__ = [
    "Batch", "Compiled", "Epoch", "Hook", "TestTimeEnsemble", "Totals", "Trainer", "autocast", "check_compile", "fit",
    "predict", "train_epoch",
]  # fmt: skip

if TYPE_CHECKING:
    from ltbench.methods import Method
    from ltbench.tasks import Task

log = logging.getLogger("ltbench")


@dataclass
class Trainer:
    """Everything one stage trains with. ``batches(ep)`` yields the epoch's :class:`Batch` es. ``compile``: a
    torch.compile mode of the forward (:data:`ltbench.config.COMPILE_MODES`; "none": eager)."""

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
    compile: str = "none"
    compiled: Compiled | None = field(default=None, init=False, repr=False)


def fit(tr: Trainer, hooks: list[Hook]) -> None:
    """Train from ``tr.start_epoch`` to the stage's last epoch."""
    hooks = [tr.method, *hooks]
    if tr.compile != "none":  # one clear error before the first step if torch.compile cannot work here
        torch.compiler.reset()  # the stage compiles its own module: no caches, guards or CUDA graphs of another
        check_compile(tr.compile, device_of(tr.model))
    try:
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
    finally:
        if tr.compiled is not None:  # gradients may live in the CUDA-graph pool: nothing reads them after the stage
            tr.optimizer.zero_grad(set_to_none=True)
            tr.compiled = None


def train_epoch(tr: Trainer, ep: Epoch, stream: Iterable[Batch], hooks: list[Hook]) -> dict[str, float]:
    """One pass over the epoch's batches: forward (the method's step), backward, optimiser step. No host sync: the
    loss and the method's sums are added up on the device and read once, at the end."""
    tr.model.train()
    if tr.compile != "none" and tr.compiled is None:
        tr.compiled = Compiled(tr.model, tr.compile, f"the {tr.stage} stage's model")
    totals = Totals()
    t0 = time.perf_counter()
    for batch in stream:
        n = len(batch)
        if n < 2:  # a batch of one breaks BatchNorm; it is at most one sample an epoch
            continue
        if tr.schedule.accumulate > 1:
            net, loss, sums = accumulated_step(tr, batch, ep)
        else:
            net = tr.model if tr.compiled is None else tr.compiled.pick(n)
            with first_compiled_call(tr.compiled, net):
                loss, sums = tr.method.step(net, batch, ep)  # type: ignore[arg-type]  # a compiled module is callable
                tr.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # (a compiled forward's backward is compiled at its first call)
        for h in hooks:
            h.after_backward(ep, net)  # gradients are there, the step not taken yet (clipping, gradient edits)
        tr.optimizer.step()
        totals.add(n, {"loss": loss.detach().double() * n, **sums})
        for h in hooks:
            h.after_step(ep, totals)
    epoch_sums = totals.values()
    seconds = time.perf_counter() - t0
    seen = max(totals.seen, 1)
    return {
        "loss": epoch_sums.get("loss", float("nan")) / seen,
        "metric": tr.task.epoch_metric(epoch_sums, totals.seen),
        "images": totals.seen,
        "seconds": seconds,
        **{k: v / seen for k, v in epoch_sums.items() if k.startswith("mean_")},
    }


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` in ``parts`` consecutive micro-batches (inputs, targets, indices and an attached unlabeled batch
    split alike; the last ones shorter when the batch does not divide)."""

    def cut(t: torch.Tensor | None) -> list[Any]:
        return [None] * parts if t is None else list(torch.tensor_split(t, parts))

    unl = batch.unlabeled
    unl_parts = [None] * parts if unl is None else split_batch(unl, parts)
    return [Batch(x, y, i, u) for x, y, i, u in zip(cut(batch.x), cut(batch.y), cut(batch.index), unl_parts)
            if len(y)]  # fmt: skip


def accumulated_step(tr: Trainer, batch: Batch, ep: Epoch) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """Gradient accumulation (``schedule.accumulate``): the batch's micro-batches go forward and backward one after
    another, each loss weighted by its share of the batch, so the summed gradient is that of the batch's mean loss
    (exact for a per-sample-mean loss without batch statistics). Returns the last module called, the batch's mean
    loss (detached) and the summed step sums; the optimiser steps once, in the caller."""
    n, loss_sum = len(batch), torch.zeros((), dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    tr.optimizer.zero_grad(set_to_none=True)
    net: Any = tr.model
    for part in split_batch(batch, tr.schedule.accumulate):
        net = tr.model if tr.compiled is None else tr.compiled.pick(len(part))
        with first_compiled_call(tr.compiled, net):
            loss, part_sums = tr.method.step(net, part, ep)
            (loss * (len(part) / n)).backward()
        loss_sum = loss_sum.to(loss.device) + loss.detach().double() * len(part)
        for k, v in part_sums.items():
            sums[k] = v if k not in sums else sums[k] + v
    return net, (loss_sum / n).float(), sums


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


class TestTimeEnsemble(nn.Module):
    """Test-time ensembling (``tte=fivecrop|tencrop``, LIFT's ``tte``): ``forward(x)`` is the mean of the model's
    outputs over the views of :func:`ltbench.data.augment.tte_views` of ``x`` (the images as the feed gives them);
    the crop size is the model's ``image_size`` if it has one, else the input's short side. Any image model can use
    it; it changes evaluation only. ``features`` are the model's own (no ensembling)."""

    __test__ = False  # not a pytest class

    def __init__(self, model: nn.Module, mode: str, expand: int) -> None:
        super().__init__()
        self.model, self.mode, self.expand = model, mode, int(expand)

    def crops(self) -> int:
        return 10 if self.mode == "tencrop" else 5

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ltbench.data.augment import tte_views

        size = int(getattr(self.model, "image_size", 0) or min(x.shape[-2:]))
        views = tte_views(x, size, self.expand, self.mode)
        return torch.stack([self.model(v.contiguous()) for v in views]).mean(0)  # a view at a time: eval memory


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    amp: bool,
    features: bool = False,
    on_batch: Callable[[int], Any] | None = None,
    compile: str = "none",
) -> torch.Tensor:
    """Model outputs (or backbone features) of every batch, in order, float32 on the CPU.

    Outputs are copied to the host without waiting (pinned memory) and the device is synchronised once, at the
    end. ``compile``: the forward under torch.compile for batches of the first batch's size (the last, smaller
    batch runs eagerly); if compilation fails, a warning and eager evaluation: the numbers do not depend on it.
    """
    model.eval()
    eager: Callable[[torch.Tensor], torch.Tensor] = model.features if features else model  # type: ignore[assignment]
    fast = Compiled(eager, compile, "the evaluation forward") if compile != "none" else None
    out: list[torch.Tensor] = []
    device = None
    for b in batches:
        device = b.x.device
        f = eager if fast is None else fast.pick(len(b))
        try:
            with first_compiled_call(fast, f), autocast(device, amp):
                o = f(b.x)
        except LtbenchError as e:
            log.warning("%s; evaluating eagerly", e)
            fast = None
            with autocast(device, amp):
                o = eager(b.x)
        out.append(o.float().to("cpu", non_blocking=device.type == "cuda"))
        if on_batch is not None:
            on_batch(len(b))
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # the non-blocking copies have landed
    return torch.cat(out) if out else torch.zeros(0)
