"""Supervised training: a loss on the model's outputs, with re-weighting and synthetic samples."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ltbench.core import Batch, Epoch, autocast
from ltbench.losses import LTLoss, mixed_loss
from ltbench.methods import Method
from ltbench.reweight import Reweighting
from ltbench.synth import Synthesizer
from ltbench.tasks import Task


def unwrapped(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (hooks go on it; the forward still runs through DDP)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class Supervised(Method):
    """``loss(model(x), y, weight)``: the weight from the re-weighting of the current epoch (deferred methods switch
    it on late), and, while synthesis is on, mixed batches (mixup, remix) or feature-space synthesis (manifold
    mixup, feature SMOTE: a hook on the model for one forward, :meth:`Synthesizer.feature_edit`). Replacement
    synthesis (SMOTE, noise) acts on the inputs before augmentation, in the data feed."""

    def __init__(
        self, loss_fn: LTLoss, task: Task, reweight: Reweighting | None = None, synth: Synthesizer | None = None
    ):
        super().__init__()
        self.loss_fn, self.task, self.reweight, self.synth = loss_fn, task, reweight, synth
        self.weight: torch.Tensor | None = None
        self.synth_on = False
        if synth is not None and synth.bank is not None:
            self.bank = synth.bank  # feature SMOTE's bank is method state: checkpointed, restored on resume

    def on_epoch_start(self, ep: Epoch) -> None:
        w = self.reweight.at(ep.index) if self.reweight is not None else None
        self.weight = w.to(self.loss_fn.counts.device) if w is not None else None
        self.synth_on = self.synth is not None and self.synth.active(ep.index)

    def step(self, model: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch.x, batch.y
        if self.synth_on and self.synth.in_features:  # type: ignore[union-attr]
            return self._feature_step(model, batch, ep)
        mixed = self.synth.mix(x, y, ep.gen) if (self.synth_on and self.synth.mixes) else None  # type: ignore[union-attr]
        with autocast(x.device, ep.amp):
            out = model(mixed.x if mixed else x)
        if mixed is not None:
            loss = mixed_loss(self.loss_fn, out, mixed.y_a, mixed.y_b, mixed.lam, self.weight)
        else:
            loss = self.loss_fn(out, y, self.weight)
        sums = self.task.step_sums(out, y)
        if self.synth is not None and self.synth.bank is not None:  # the column stays when synthesis stops
            sums["mean_synthetic"] = torch.zeros((), dtype=torch.float64, device=out.device)
        return loss, sums

    def _feature_step(self, model: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, Any]]:
        """One forward with the synthesis hooked into the model; accuracy is counted on the real samples (their
        first label for mixed ones, as for input mixup); ``mean_synthetic``: synthetic features per real sample."""
        x, y = batch.x, batch.y
        edit = self.synth.feature_edit(y, batch.index, ep.gen)  # type: ignore[union-attr]
        with edit.installed(unwrapped(model)), autocast(x.device, ep.amp):
            out = model(edit.inputs(x))
        loss = edit.loss(self.loss_fn, out, y, self.weight)
        return loss, {**self.task.step_sums(out[: len(y)], y), **edit.sums(out, len(y))}

    def param_groups(self):
        return self.loss_fn.param_groups()

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        if self.reweight is None and self.synth is None:
            return {}
        return {"reweight_on": self.weight is not None, "synth_on": self.synth_on}
