"""Meta-Weight-Net (Shu et al., NeurIPS 2019, "Meta-Weight-Net: Learning an Explicit Mapping For Sample Weighting"):
``method=mwn``.

A weighting net ``V(l; Theta) = sigmoid(W2 relu(W1 l + b1) + b2)`` (1-100-1, ``resnet.py::VNet`` of the reference
xjtushujun/Meta-weight-net_class-imbalance) maps each training sample's loss to its weight. Every step
(``meta-weight-net-class-imbalance.py::train`` of the reference):

1. ``l_i`` = per-sample loss of the batch (the run's loss, cross-entropy in the preset); ``w_i = V(l_i)``;
   ``w~ = w / sum(w)`` (``w`` itself when the sum is 0); ``L_train(theta, Theta) = sum_i w~_i l_i``.
2. Look-ahead: ``theta^ = theta - lr_t * grad_theta L_train`` (plain SGD, no momentum or weight decay; the gradient
   keeps its graph, ``create_graph=True``, so ``theta^`` is a function of ``Theta``). As in the reference code, the
   inner gradient also differentiates ``l_i`` inside ``V`` (the paper's equation treats ``V(l_i)`` as a factor).
3. ``L_meta = mean CE(f(x_meta; theta^), y_meta)`` on one balanced meta batch; ``Theta`` takes one step of its own
   SGD on ``dL_meta / dTheta`` (exact: ``torch.func.functional_call`` runs the network at ``theta^``).
4. The real update: weights from the updated ``V`` without gradient, ``L = sum_i w~_i l_i``, returned to the stage's
   optimiser (which trains the network only).

Invariants:

- The meta set is the run's seeded **validation split** (``dataset.val_per_class`` images per class, training images
  the long-tailed subset does not use; the method declares ``selects_on_validation`` so every class is in it). It is
  never the test set, and no meta image is a training image. Meta batches are drawn with ``ep.gen`` (a function of
  seed and epoch, so a resumed run draws the same), augmented like the training batches (the reference's meta set
  uses its ``transform_train``), on the training device.
- The look-ahead never changes the network: its parameters enter ``functional_call`` as new tensors, its buffers as
  clones. The meta batch's forward runs in training mode (batch statistics), as the reference's freshly built
  ``meta_model`` does, and its BatchNorm running statistics go to the clones, which are dropped. The training batch
  is forwarded once, through the real network: its output serves the look-ahead and the real update (the reference
  forwards the same batch twice, through the copy and through the model, with the same parameters and batch
  statistics, so with the same outputs), and the network's running statistics are updated once per step, as in the
  reference.
- ``V`` has its own optimiser (the reference's: SGD, lr 1e-5 fixed, momentum 0.9, Nesterov, weight decay 5e-4),
  stepped inside :meth:`MWN.step`; the stage's optimiser and its lr schedule never see ``V``. Its state (momentum
  buffers) is part of the method's ``state_dict`` (``get_extra_state``), so a resumed run continues exactly.
- ``lr_t`` is the stage's lr of the epoch (``ep.lr``). The reference lowers its look-ahead lr at epochs 80 and 90
  and its classifier's one epoch earlier (``adjust_learning_rate(optimizer_a, epoch + 1)``); here both use the one
  schedule.

One process only: the look-ahead is not distributed (the reference trains on one GPU). The training step runs
eagerly whatever ``compile=`` says (it differentiates twice through the forward, which compiled code does not
support); evaluation still uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ltbench.config import run_level
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError, DataError
from ltbench.methods import METHODS, Method, MethodConfig, Streams

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


def _curve_grid() -> list[float]:
    # per-sample CE: 0 (confident, right) ... ln 10 = 2.30 (uniform over CIFAR-10) ... ln 100 = 4.61 ... badly wrong
    return [0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0]


@dataclass
class MWNConfig(MethodConfig):
    """Meta-Weight-Net; the defaults are the reference's CIFAR settings."""

    name: str = "mwn"
    hidden: int = 100  # VNet(1, 100, 1)
    meta_lr: float = 1e-5  # the VNet's own SGD (fixed lr; the stage's schedule does not apply)
    meta_momentum: float = 0.9
    meta_nesterov: bool = True
    meta_weight_decay: float = 5e-4
    meta_batch_size: int = 100  # images of the validation split per step (all of them when it holds fewer)
    meta_augment: bool = True  # meta images get the run's training augmentation, as the reference's meta loader
    curve: list[float] = run_level(factory=_curve_grid)  # losses at which the record shows the learned v(loss)
    selects_on_validation = True  # the meta set is the validation split, every class in it
    tasks = ("classification",)  # it weights classification losses

    def __post_init__(self) -> None:
        ok = self.hidden >= 1 and self.meta_lr > 0 and 0 <= self.meta_momentum < 1 and self.meta_weight_decay >= 0
        if not ok or self.meta_batch_size < 2:
            raise ConfigError(
                "method.hidden >= 1, method.meta_lr > 0, method.meta_momentum in [0, 1), method.meta_weight_decay "
                ">= 0 and method.meta_batch_size >= 2 (BatchNorm needs two images) are needed"
            )

    def check(self, root: Any) -> None:
        if root.dataset.val_per_class < 1:
            raise ConfigError(
                "method=mwn learns its weighting net on the validation split (the meta set): "
                "set dataset.val_per_class >= 1"
            )
        if root.reweight.name != "none" or root.synth.name != "none":
            raise ConfigError(
                f"method=mwn learns each sample's weight itself: it does not combine with "
                f"reweight={root.reweight.name} or synth={root.synth.name} (use none)"
            )


class VNet(nn.Module):
    """``v(l) = sigmoid(W2 relu(W1 l + b1) + b2)``: one loss in, one weight in (0, 1) out (``resnet.py::VNet``; its
    ``MetaLinear`` layers keep ``nn.Linear``'s default initialisation)."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(1, hidden), nn.Linear(hidden, 1)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """Weights of a vector of per-sample losses (same shape)."""
        return torch.sigmoid(self.out(F.relu(self.hidden(losses[:, None])))).squeeze(1)


def normalized(w: torch.Tensor) -> torch.Tensor:
    """``w / sum(w)``, or ``w`` itself when the sum is 0 (the reference's ``if norm_c != 0``), without a host sync."""
    s = w.sum()
    return w / torch.where(s != 0, s, torch.ones_like(s))


def look_ahead_loss(
    model: nn.Module,
    vnet: nn.Module,
    losses: torch.Tensor,
    meta: Batch,
    lr: float,
    amp: bool = False,
) -> torch.Tensor:
    """``L_meta(theta^(Theta))``: the meta batch's mean CE at ``theta^ = theta - lr grad_theta sum_i w~_i l_i``.

    ``losses`` are the training batch's per-sample losses with their graph to the network's trainable parameters;
    the result is differentiable in ``vnet``'s parameters. The network's parameters and buffers are not changed
    (buffers enter as clones: the meta forward's BatchNorm statistics update those, then they are dropped).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    inner = (normalized(vnet(losses)) * losses).sum()
    grads = torch.autograd.grad(inner, [p for _, p in named], create_graph=True, retain_graph=True, allow_unused=True)
    fast = {n: p if g is None else p - lr * g for (n, p), g in zip(named, grads)}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with autocast(meta.x.device, amp):
        out = functional_call(model, {**buffers, **fast}, (meta.x,))
    return F.cross_entropy(_fp32(out), meta.y)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Autocast (bf16) outputs in float32 for the losses; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@METHODS.register("mwn", MWNConfig)
class MWN(Method):
    """Meta-Weight-Net on top of the stage's supervised method (its loss gives the per-sample losses)."""

    streams = Streams(validation=True)  # its meta batches: the validation split, through the stage's feed

    def __init__(self, cfg: MWNConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__()
        if ctx.info.enabled:
            raise ConfigError("method=mwn trains in one process (its look-ahead is not distributed): no torchrun")
        data = ctx.data
        if len(data.val_y) < 2:
            raise DataError(f"method=mwn needs a validation split (the meta set); {data.name} gives none")
        self.cfg, self.base = cfg, base
        from ltbench.seeding import derive_seed

        with torch.random.fork_rng(devices=[]):  # its own seeded initialisation; the run's RNG is left as it was
            torch.manual_seed(derive_seed(ctx.cfg.seed, "mwn-vnet"))
            self.vnet = VNet(cfg.hidden).to(ctx.device)
        self.vopt = torch.optim.SGD(self.vnet.parameters(), lr=cfg.meta_lr, momentum=cfg.meta_momentum,
                                    nesterov=cfg.meta_nesterov, weight_decay=cfg.meta_weight_decay)  # fmt: skip
        self.feed, self.num_val = ctx.feed, len(data.val_y)
        self.augment = ctx.cfg.augment if cfg.meta_augment else None
        self.meta_classes = [int(c) for c in torch.bincount(data.val_y, minlength=data.num_classes)]
        from ltbench.metrics import class_groups

        self.groups = class_groups(ctx.cfg.dataset.groups, ctx.stats.counts)
        for name in ("weight_sum", "weight_n"):  # per class, this epoch: persistent, so a resumed record is the same
            self.register_buffer(name, torch.zeros(data.num_classes, dtype=torch.float64, device=ctx.device))

    # ------------------------------------------------------------------------------------------ one step

    def meta_batch(self, ep: Epoch) -> Batch:
        """A batch of the validation split (``index``: positions in it), drawn without replacement with ``ep.gen``,
        from the stage's feed (device tensors, or image files through the loader)."""
        pos = torch.randperm(self.num_val, generator=ep.gen)[: self.cfg.meta_batch_size]
        return self.feed.split_batch("val", pos, self.augment, ep.gen)

    def meta_update(self, model: nn.Module, losses: torch.Tensor, ep: Epoch) -> torch.Tensor:
        """One SGD step of the VNet on the look-ahead's meta loss; returns that loss (detached)."""
        meta_loss = look_ahead_loss(model, self.vnet, losses, self.meta_batch(ep), ep.lr, ep.amp)
        params = list(self.vnet.parameters())
        for p, g in zip(params, torch.autograd.grad(meta_loss, params)):
            p.grad = g
        self.vopt.step()
        return meta_loss.detach()

    def step(self, model: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = getattr(model, "_orig_mod", model)  # eager: torch.compile'd code has no double backward
        x, y = batch.x, batch.y
        with autocast(x.device, ep.amp):
            out = model(x)
        losses = self.base.loss_fn.per_sample(_fp32(out), y)  # type: ignore[attr-defined]
        meta_loss = self.meta_update(model, losses, ep)
        with torch.no_grad():
            w = self.vnet(losses.detach())
        loss = (normalized(w) * losses).sum()
        self.weight_sum.index_add_(0, y, w.double())
        self.weight_n.index_add_(0, y, torch.ones_like(w, dtype=torch.float64))
        n = len(batch)
        sums = self.base.task.step_sums(out, y)  # type: ignore[attr-defined]
        return loss, {**sums, "mean_meta_loss": meta_loss.double() * n, "mean_weight": w.double().sum()}

    # ------------------------------------------------------------------------------------------ hooks, state, record

    def on_epoch_start(self, ep: Epoch) -> None:
        self.base.on_epoch_start(ep)
        self.weight_sum.zero_()
        self.weight_n.zero_()

    def param_groups(self):
        return self.base.param_groups()  # the VNet is not the stage optimiser's: it has its own

    def get_extra_state(self) -> dict[str, Any]:
        return {"vnet_optimizer": self.vopt.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.vopt.load_state_dict(state["vnet_optimizer"])

    def class_weights(self) -> list[float | None]:
        """Mean weight v(l) (before normalisation) of each class's samples this epoch (None: no sample)."""
        s, n = self.weight_sum.tolist(), self.weight_n.tolist()
        return [a / b if b else None for a, b in zip(s, n)]

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        s, n = self.weight_sum.tolist(), self.weight_n.tolist()
        out = {}
        for g, classes in self.groups.items():
            total = sum(n[c] for c in classes)
            out[f"weight_{g}"] = round(sum(s[c] for c in classes) / total, 6) if total else None
        return out

    @torch.no_grad()
    def weight_curve(self) -> list[dict[str, float]]:
        """The learned v(l) at the losses of ``curve``."""
        grid = torch.tensor(self.cfg.curve, dtype=torch.float32, device=self.weight_sum.device)
        v = self.vnet(grid).tolist() if len(grid) else []
        return [{"loss": float(loss), "weight": round(float(w), 6)} for loss, w in zip(self.cfg.curve, v)]

    def summary(self) -> dict[str, Any]:
        cw = self.class_weights()
        return {
            "mwn": {
                "weight_curve": self.weight_curve(),
                "class_weight_last_epoch": [None if v is None else round(v, 6) for v in cw],
                "meta_set": {"source": "validation split", "per_class": self.meta_classes},
            }
        }


__all__ = ["MWN", "MWNConfig", "VNet", "look_ahead_loss", "normalized"]
