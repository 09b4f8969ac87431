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


class Supervised(Method):
    """``loss(model(x), y, weight)``: the weight from the re-weighting of the current epoch (deferred methods switch
    it on late), and mixed batches (mixup, remix) while synthesis is on. Replacement synthesis (SMOTE, noise) acts
    on the inputs before augmentation, in the data feed."""

    def __init__(
        self, loss_fn: LTLoss, task: Task, reweight: Reweighting | None = None, synth: Synthesizer | None = None
    ):
        super().__init__()
        self.loss_fn, self.task, self.reweight, self.synth = loss_fn, task, reweight, synth
        self.weight: torch.Tensor | None = None
        self.synth_on = False

    def on_epoch_start(self, ep: Epoch) -> None:
        w = self.reweight.at(ep.index) if self.reweight is not None else None
        self.weight = w.to(self.loss_fn.counts.device) if w is not None else None
        self.synth_on = self.synth is not None and self.synth.active(ep.index)

    def step(self, model: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch.x, batch.y
        mixed = self.synth.mix(x, y, ep.gen) if (self.synth_on and self.synth.mixes) else None  # type: ignore[union-attr]
        with autocast(x.device, ep.amp):
            out = model(mixed.x if mixed else x)
        if mixed is not None:
            loss = mixed_loss(self.loss_fn, out, mixed.y_a, mixed.y_b, mixed.lam, self.weight)
        else:
            loss = self.loss_fn(out, y, self.weight)
        return loss, self.task.step_sums(out, y)

    def param_groups(self):
        return self.loss_fn.param_groups()

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        if self.reweight is None and self.synth is None:
            return {}
        return {"reweight_on": self.weight is not None, "synth_on": self.synth_on}
