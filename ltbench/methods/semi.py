"""Semi-supervised learning with unlabeled data, on top of the training stage's supervised method (so every loss and
re-weighting of a strategy applies to the labeled part): ``semi=fixmatch``, ``semi=abc``, ``semi=pseudo_label``.

Each training step draws a labeled batch (the stage's sampler) and an unlabeled batch (``mu`` times as large, a
seeded permutation of the unlabeled set per epoch, cycled), as uint8 images the method augments on the device.

- ``fixmatch`` (Sohn et al. 2020): pseudo-labels from a weak view (flip + reflect-padded crop), kept where the
  confidence reaches ``threshold``, taught on a strong view (RandAugment, 2 ops of random magnitude, + Cutout 16);
  loss = L_labeled + lambda_u L_unlabeled; one forward pass over the concatenated batch; an EMA of the weights
  (decay 0.999) is evaluated. Settings of the USB benchmark's imbalanced CIFAR configs (mu 2, threshold 0.95).
- ``abc`` (Lee et al. 2021): FixMatch plus an auxiliary balanced classifier on the shared features, trained on
  labeled samples kept with probability N_min / N_y and on confident unlabeled pseudo-labels kept with a probability
  that falls linearly from 1 to N_min / N_yhat over training; at test time the auxiliary head (of the EMA model)
  classifies. Hard pseudo-labels and one strong view, as USB's port (the original uses soft targets and two views).
- ``pseudo_label`` (Yang & Xu 2020): a base classifier trained on the labeled set (a stage of its own, cached)
  labels the unlabeled set once (argmax, no threshold); the training stage then trains a fresh network on the labeled
  and the pseudo-labeled images, the latter weighted by ``weight``.

The quality of pseudo-labels (their precision and recall per class, against the unlabeled set's true labels, which
are never trained on) is recorded in metrics.json (``pseudo_labels``) and plotted by the report.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import SemiConfig
from ltbench.core import Batch, Epoch, Totals, autocast
from ltbench.errors import ConfigError
from ltbench.methods import SEMI, Method, Streams
from ltbench.methods.ssp import HeadNet

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


@dataclass
class SemiBase(SemiConfig):
    """Shared settings: ``mu`` unlabeled images per labeled image in a step."""

    mu: float = 2.0
    label_suffix = "+SSL"  # how the method is named in the report
    tasks = ("classification",)
    reads = ("images",)

    def check(self, root: Any) -> None:
        if not root.dataset.unlabeled:
            raise ConfigError(f"semi={self.name} needs unlabeled data: a dataset like cifar10lt_ssl")
        if root.synth.name != "none" or root.method is not None:
            raise ConfigError(f"semi={self.name} does not combine with synth={root.synth.name} or method=...")
        if not self.mu > 0:
            raise ConfigError("semi.mu must be > 0")


def mu_batch(mu: float, batch_size: int) -> int:
    return max(1, round(mu * batch_size))


class PseudoLabelStats(nn.Module):
    """Per-class counts of an epoch's pseudo-labels against the true labels (buffers on the device)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        for name in ("correct", "predicted", "actual", "seen", "kept"):
            self.register_buffer(name, torch.zeros(num_classes if name in ("correct", "predicted", "actual") else 1))

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()

    def add(self, pseudo: torch.Tensor, mask: torch.Tensor, truth: torch.Tensor) -> None:
        c = len(self.correct)
        kept = mask.float()
        self.predicted += torch.bincount(pseudo, weights=kept, minlength=c)
        self.correct += torch.bincount(pseudo, weights=kept * (pseudo == truth).float(), minlength=c)
        self.actual += torch.bincount(truth, minlength=c).float()
        self.seen += len(pseudo)
        self.kept += kept.sum()

    def summary(self) -> dict[str, Any]:
        """Precision and recall (%) per class (None without any), and the share of kept pseudo-labels."""
        p, r = self.correct / self.predicted.clamp(min=1), self.correct / self.actual.clamp(min=1)
        return {
            "precision": [float(v) * 100 if n > 0 else None for v, n in zip(p.tolist(), self.predicted.tolist())],
            "recall": [float(v) * 100 if n > 0 else None for v, n in zip(r.tolist(), self.actual.tolist())],
            "kept": float(self.kept / self.seen.clamp(min=1)) * 100,
        }


class EMA(nn.Module):
    """An exponential moving average of a module's parameters (buffers copied): ``p_ema = d p_ema + (1 - d) p``."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(module)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)


@dataclass
class FixMatchConfig(SemiBase):
    name: str = "fixmatch"
    threshold: float = 0.95
    lambda_u: float = 1.0
    ema: float = 0.999
    ops: int = 2  # RandAugment operations per image
    cutout: int = 16
    label_suffix = "+FixMatch"

    def check(self, root: Any) -> None:
        super().check(root)
        if not (0 < self.threshold <= 1 and 0 <= self.ema < 1 and self.lambda_u >= 0):
            raise ConfigError("semi.threshold in (0, 1], semi.ema in [0, 1) and semi.lambda_u >= 0 are needed")


@SEMI.register("fixmatch", FixMatchConfig)
class FixMatch(Method):
    """FixMatch on top of the stage's supervised method (its loss and re-weighting on the labeled batch)."""

    streams = Streams(unlabeled=True)

    def unlabeled_batch(self, batch_size: int, num_labeled: int, num_unlabeled: int) -> int:
        return mu_batch(self.cfg.mu, batch_size)

    def __init__(self, cfg: FixMatchConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__()
        self.cfg, self.base = cfg, base
        self.mean, self.std = ctx.data.mean, ctx.data.std
        self.stats = PseudoLabelStats(ctx.data.num_classes)
        self.add_modules(model, ctx)
        self.ema = EMA(self.wrap(model), cfg.ema)  # the network as trained, averaged
        self._net: list[nn.Module] = []  # the module trained last step (a list: not a submodule, not in the state)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As nn.Module's; checkpoints written before the trained network was kept out of the state (their
        ``_net.*`` entries, a copy of the network the checkpoint holds anyway) load too."""
        kept = {k: v for k, v in state_dict.items() if not k.startswith("_net.")}
        return super().load_state_dict(kept, strict=strict, assign=assign)

    def add_modules(self, model: nn.Module, ctx: StageContext) -> None:
        """Hook for subclasses that train modules of their own (made before the EMA copy)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def views(self, u: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from ltbench.data.views import normalize01, rand_augment, weak_view

        weak = normalize01(weak_view(u, gen), self.mean, self.std)
        strong = rand_augment(weak_view(u, gen), gen, n=self.cfg.ops, cutout=self.cfg.cutout)
        return weak, normalize01(strong, self.mean, self.std)

    def forward_all(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, ...]:
        """Outputs of the labeled batch, the weak and the strong views, from one forward pass."""
        assert batch.unlabeled is not None
        self._net[:] = [net]
        weak, strong = self.views(batch.unlabeled.x, ep.gen)
        with autocast(batch.x.device, ep.amp):
            out = net(torch.cat([batch.x, weak, strong]))
        return out, len(batch), len(weak)

    def fixmatch_loss(self, logits: torch.Tensor, batch: Batch, n: int, m: int) -> tuple[torch.Tensor, ...]:
        lx = self.base.loss_fn(logits[:n], batch.y, self.base.weight)  # type: ignore[attr-defined]
        weak, strong = logits[n : n + m].detach().float(), logits[n + m :].float()
        conf, pseudo = weak.softmax(1).max(1)
        mask = conf >= self.cfg.threshold
        lu = (F.cross_entropy(strong, pseudo, reduction="none") * mask).mean()
        assert batch.unlabeled is not None
        self.stats.add(pseudo, mask, batch.unlabeled.y)
        return lx + self.cfg.lambda_u * lu, lu

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, n, m = self.forward_all(net, batch, ep)
        loss, lu = self.fixmatch_loss(out, batch, n, m)
        sums = self.base.task.step_sums(out[:n], batch.y)  # type: ignore[attr-defined]
        return loss, {**sums, "mean_loss_u": lu.detach().double() * n}

    def on_epoch_start(self, ep: Epoch) -> None:
        self.base.on_epoch_start(ep)
        self.stats.reset()

    def after_step(self, ep: Epoch, totals: Totals) -> None:
        if self._net:
            net = self._net[0]
            self.ema.update(net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.ema.module

    def param_groups(self):
        return self.base.param_groups()

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        s = self.stats.summary()
        return {**self.base.row_extras(ep), "pseudo_kept": round(s["kept"], 2)}

    def summary(self) -> dict[str, Any]:
        return {"pseudo_labels": self.stats.summary()}


@dataclass
class ABCConfig(FixMatchConfig):
    name: str = "abc"
    abc_threshold: float = 0.95
    abc_weight: float = 1.0
    label_suffix = "+FixMatch+ABC"


class ABCNet(HeadNet):
    """The model with an auxiliary head on its features: ``forward(x) -> (logits, auxiliary logits)``."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        super().__init__(model, head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        f = self.model.features(x)
        return self.model.head(f), self.head(f)


@SEMI.register("abc", ABCConfig)
class ABC(FixMatch):
    """FixMatch with the auxiliary balanced classifier (ABC), which classifies at test time."""

    def add_modules(self, model: nn.Module, ctx: StageContext) -> None:
        self.abc_head = nn.Linear(model.feature_dim, ctx.data.num_classes)
        counts = torch.as_tensor(ctx.stats.counts, dtype=torch.float32)
        self.register_buffer("keep_labeled", counts[counts > 0].min() / counts.clamp(min=1))  # N_min / N_k

    def wrap(self, model: nn.Module) -> nn.Module:
        return ABCNet(model, self.abc_head)

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (out, aux), n, m = self.forward_all(net, batch, ep)
        loss, lu = self.fixmatch_loss(out, batch, n, m)
        aux = aux.float()
        rand = torch.rand(n + m, generator=ep.gen).to(aux.device)
        keep_lb = rand[:n] < self.keep_labeled[batch.y]
        l_lb = (F.cross_entropy(aux[:n], batch.y, reduction="none") * keep_lb).mean()
        conf, pseudo = aux[n : n + m].detach().softmax(1).max(1)
        progress = ep.index / max(ep.epochs, 1)
        keep_prob = 1 - progress * (1 - self.keep_labeled[pseudo])
        keep_u = (conf >= self.cfg.abc_threshold) & (rand[n:] < keep_prob)  # type: ignore[attr-defined]
        l_u = (F.cross_entropy(aux[n + m :], pseudo, reduction="none") * keep_u).mean()
        loss = loss + self.cfg.abc_weight * (l_lb + l_u)  # type: ignore[attr-defined]
        sums = self.base.task.step_sums(aux[:n], batch.y)  # type: ignore[attr-defined]
        return loss, {**sums, "mean_loss_u": lu.detach().double() * n}

    def eval_model(self, model: nn.Module) -> nn.Module:
        ema = self.ema.module  # an ABCNet: its backbone with the auxiliary head classifies
        return HeadNet(ema.model, ema.head)


@dataclass
class PseudoLabelConfig(SemiBase):
    name: str = "pseudo_label"
    weight: float = 1.0  # of a pseudo-labeled image's loss, against a labeled one's
    label_suffix = "+PL"
    base_stage = True  # a stage before the training stage trains the base classifier and labels the unlabeled set

    def check(self, root: Any) -> None:
        super().check(root)
        if root.pretrain is not None:
            raise ConfigError("semi=pseudo_label trains a fresh network after its base stage: it takes no pretrain=")
        if self.weight < 0:
            raise ConfigError("semi.weight must be >= 0")


@SEMI.register("pseudo_label", PseudoLabelConfig)
class PseudoLabel(Method):
    """Training on labeled images and on the unlabeled ones with the base classifier's pseudo-labels."""

    streams = Streams(unlabeled=True)

    def __init__(self, cfg: PseudoLabelConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__()
        self.cfg, self.base = cfg, base
        self.register_buffer("pseudo", torch.as_tensor(ctx.output("base", "pseudo_labels"), dtype=torch.long))
        from ltbench.data.augment import augment_batch, normalize

        self._augment, self._normalize = augment_batch, normalize
        self.augment_cfg, self.mean, self.std = ctx.cfg.augment, ctx.data.mean, ctx.data.std

    def unlabeled_batch(self, batch_size: int, num_labeled: int, num_unlabeled: int) -> int:
        """As many unlabeled images a step as make one pass over the unlabeled set per pass over the labeled one,
        like a sampler over their union (the reference adds the pseudo-labeled images to the training set)."""
        return max(1, -(-batch_size * num_unlabeled // max(num_labeled, 1)))

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        u = batch.unlabeled
        assert u is not None and u.index is not None
        xu = self._normalize(self._augment(u.x, self.augment_cfg, ep.gen), self.mean, self.std)
        n, m = len(batch), len(xu)
        with autocast(batch.x.device, ep.amp):
            out = net(torch.cat([batch.x, xu]))
        lx = self.base.loss_fn(out[:n], batch.y, self.base.weight)  # type: ignore[attr-defined]
        lu = F.cross_entropy(out[n:].float(), self.pseudo[u.index.to(self.pseudo.device)])
        loss = (n * lx + self.cfg.weight * m * lu) / (n + m)  # the mean over labeled and pseudo-labeled images
        return loss, self.base.task.step_sums(out[:n], batch.y)  # type: ignore[attr-defined]

    def on_epoch_start(self, ep: Epoch) -> None:
        self.base.on_epoch_start(ep)

    def param_groups(self):
        return self.base.param_groups()
