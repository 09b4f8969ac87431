"""One epoch of training and one pass of prediction, readable top to bottom.

Batches come from :mod:`ltbench.feed` (CIFAR: gathered from a uint8 tensor on the device and augmented there;
image files: decoded by DataLoader workers), already normalised; here they are optionally mixed and fed to the
model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ltbench.losses import LTLoss, mixed_loss
from ltbench.synth import Synthesizer


@dataclass
class EpochStats:
    loss: float
    acc: float  # training accuracy (%) on the batches as trained (augmented; mixed batches count y_a)
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def row(self, epoch: int, lr: float, **extra) -> dict:
        """One line of a run's epoch log (epoch is 1-based)."""
        return {
            "epoch": epoch,
            "lr": lr,
            "train_loss": round(self.loss, 6),
            "train_acc": round(self.acc, 4),
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 1),
            **extra,
        }


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA; CPU runs stay in fp32 so they are bit-reproducible."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LTLoss,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    synth: Synthesizer | None = None,
    synth_on: bool = False,
    class_weight: torch.Tensor | None = None,
    gen: torch.Generator | None = None,
    amp: bool = True,
    on_batch: Callable[[int, float], None] | None = None,
) -> EpochStats:
    """One pass over ``batches`` (normalised inputs and labels, on the training device)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    device = None
    t0 = time.perf_counter()
    for x, y in batches:
        if len(y) < 2:  # a batch of one breaks BatchNorm; it is at most one image an epoch
            continue
        device = x.device
        mixed = synth.mix(x, y, gen) if (synth is not None and synth_on and synth.mixes) else None
        with autocast(device, amp):
            logits = model(mixed.x if mixed else x)
        if mixed is not None:
            loss = mixed_loss(loss_fn, logits, mixed.y_a, mixed.y_b, mixed.lam, class_weight)
        else:
            loss = loss_fn(logits, y, class_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        n = len(y)
        total_loss += float(loss.detach()) * n
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += n
        if on_batch is not None:
            on_batch(n, float(loss.detach()))
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return EpochStats(total_loss / max(seen, 1), 100.0 * correct / max(seen, 1), seen, time.perf_counter() - t0)


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, amp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, logits) for every batch, in order, on the CPU."""
    model.eval()
    preds, outs = [], []
    for x, _ in batches:
        with autocast(x.device, amp):
            logits = model(x).float()
        preds.append(logits.argmax(1).cpu())
        outs.append(logits.cpu())
    if not outs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(preds), torch.cat(outs)


def lr_at(epoch: int, base_lr: float, epochs: int, warmup: int, decay: str, milestones, gamma: float) -> float:
    """Learning rate of a (0-indexed) epoch: linear warm-up to base_lr over ``warmup`` epochs (epoch e gets
    base_lr * (e+1)/warmup, as in the CIFAR-LT reference), then step decay (x gamma from each milestone on) or
    cosine decay to 0."""
    if epoch < warmup:
        return base_lr * (epoch + 1) / warmup
    if decay == "cosine":
        import math

        span = max(epochs - warmup, 1)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))
    return base_lr * gamma ** sum(epoch >= m for m in milestones)
