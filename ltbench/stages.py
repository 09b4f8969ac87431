"""Two-stage decoupled training (Kang et al. 2020): stage-2 classifier methods and the stage-1 cache.

Stage 1 trains the whole network (any strategy). Stage 2 freezes the backbone (BatchNorm statistics included) and
changes only how features become logits:

- ``crt``: a freshly initialised classifier retrained with class-balanced sampling;
- ``lws``: the stage-1 classifier kept, one learnable scale per class (logits * s_c), class-balanced sampling;
- ``tau_norm``: each class weight vector w_c divided by ||w_c||^tau (the bias is left as it is, so tau=0 is the
  stage-1 classifier);
- ``ncm``: nearest class mean: cosine similarity to the mean of the L2-normalised training features of each class;
- ``posthoc_la``: logits - tau * log(prior) (Menon et al. 2021).

tau is chosen on the validation split (balanced accuracy: the mean per-class accuracy over the classes it holds),
never on the test set; the whole curve, validation and test, is recorded.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import SamplerConfig, TrainConfig, as_plain
from ltbench.engine import lr_at, predict, train_one_epoch
from ltbench.errors import ConfigError
from ltbench.losses import CrossEntropy
from ltbench.models.heads import build_head
from ltbench.samplers import Sampler
from ltbench.seeding import derive_seed, generator


def stage1_key(cfg: TrainConfig, split_hash: str) -> str:
    """Cache key of a stage-1 backbone: every setting that changes stage-1 training, the seed and the data split.

    Left out: stage 2, the strategy name (a label), the validation split and head/medium/tail groups (they do not
    touch training), paths, device and display settings.
    """
    import ltbench

    d = as_plain(cfg)
    for k in ("strategy", "resume", "device", "progress", "results_dir", "num_threads", "stage1_cache"):
        d.pop(k, None)
    d["schedule"].pop("stage2", None)
    d["schedule"].pop("eval_batch_size", None)
    for k in ("root", "download", "val_per_class", "groups"):
        d["dataset"].pop(k, None)
    d["split_hash"] = split_hash
    d["ltbench_version"] = ltbench.__version__
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ heads


class ScaledHead(nn.Module):
    """LWS: a frozen classifier whose logits are multiplied by one learnable scale per class (initially 1)."""

    def __init__(self, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.head = head
        for p in self.head.parameters():
            p.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f) * self.scales


class FrozenBackbone(nn.Module):
    """A stage-1 model whose feature extractor stays frozen and in eval mode; only ``head`` trains."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = model
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.head = head

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics stay those of stage 1
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.backbone.features(x)
        return self.head(f.float())


def tau_normalized(head: nn.Linear, tau: float) -> nn.Linear:
    """A copy of a linear classifier with w_c / ||w_c||^tau (bias unchanged)."""
    out = copy.deepcopy(head)
    with torch.no_grad():
        norms = head.weight.norm(dim=1, keepdim=True).clamp(min=1e-12)
        out.weight.copy_(head.weight / norms.pow(tau))
    return out


def posthoc_adjust(logits: torch.Tensor, class_counts, tau: float) -> torch.Tensor:
    """logits - tau * log(prior), prior = n_c / N."""
    n = torch.as_tensor(list(class_counts), dtype=logits.dtype, device=logits.device)
    return logits - tau * torch.log(n / n.sum())


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x D means of the L2-normalised features of each class (zero for a class without images)."""
    f = F.normalize(features, dim=1)
    sums = torch.zeros(num_classes, f.shape[1], dtype=f.dtype).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(f.dtype)
    return sums / counts[:, None]


def ncm_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each normalised feature to each normalised class mean."""
    return F.normalize(features, dim=1) @ F.normalize(means, dim=1).T


@torch.no_grad()
def extract_features(model: nn.Module, batches, *, amp: bool) -> torch.Tensor:
    """Backbone features (N x D, float32, CPU) of every batch, in order."""
    from ltbench.engine import autocast

    model.eval()
    out = []
    for x, _ in batches:
        with autocast(x.device, amp):
            out.append(model.features(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.feature_dim)


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float | None:
    """Mean per-class accuracy (%) over the classes present in ``target``; None if it is empty."""
    if len(target) == 0:
        return None
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[pred == target], minlength=num_classes)
    present = total > 0
    return float((correct[present].double() / total[present].double()).mean() * 100.0)


# ------------------------------------------------------------------------------------------------ stage 2


@dataclass
class Stage2Result:
    method: str
    test_logits: torch.Tensor
    val_logits: torch.Tensor
    chosen: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)


def _select_tau(
    grid: list[float],
    logits_at: Callable[[float, str], torch.Tensor],
    val_y: torch.Tensor,
    num_classes: int,
    summarize_test: Callable[[torch.Tensor], dict],
) -> tuple[float, list[dict]]:
    curve, best_tau, best = [], grid[0], -1.0
    for tau in grid:
        val_acc = balanced_accuracy(logits_at(tau, "val").argmax(1), val_y, num_classes)
        test = summarize_test(logits_at(tau, "test").argmax(1))
        curve.append(
            {"tau": tau, "val_balanced_acc": val_acc, **{k: test[k] for k in ("top1", "many", "medium", "few")}}
        )
        if val_acc is not None and val_acc > best:  # first maximum: ties go to the smaller tau
            best_tau, best = tau, val_acc
    return best_tau, curve


def run_stage2(
    cfg: TrainConfig,
    model: nn.Module,
    data,
    feed,
    summarize_test: Callable[[torch.Tensor], dict],
) -> Stage2Result:
    """Apply ``cfg.schedule.stage2.method`` to a trained stage-1 ``model``; logits for the val and test sets."""
    s2 = cfg.schedule.stage2
    method, num_classes = s2.method, data.num_classes
    bs, amp = cfg.schedule.eval_batch_size, cfg.amp
    if method in ("tau_norm", "posthoc_la") and len(data.val_y) == 0:
        raise ConfigError(
            f"{method} chooses tau on the validation split, which is empty: set dataset.val_per_class > 0"
        )
    if method == "tau_norm" and not isinstance(model.head, nn.Linear):
        raise ConfigError("tau_norm needs a linear head (a cosine head has unit-norm class weights already)")

    def split_features() -> dict[str, torch.Tensor]:
        return {split: extract_features(model, feed.evaluate(split, bs), amp=amp) for split in ("val", "test")}

    if method in ("tau_norm", "posthoc_la"):
        feats = split_features()
        head_cpu = copy.deepcopy(model.head).cpu().float()
        if method == "tau_norm":
            cache = {tau: tau_normalized(head_cpu, tau) for tau in s2.tau_grid}

            def logits_at(tau: float, split: str) -> torch.Tensor:
                with torch.no_grad():
                    return cache[tau](feats[split])
        else:
            with torch.no_grad():
                base = {k: head_cpu(v) for k, v in feats.items()}

            def logits_at(tau: float, split: str) -> torch.Tensor:
                return posthoc_adjust(base[split], data.class_counts, tau)

        tau, curve = _select_tau(s2.tau_grid, logits_at, data.val_y, num_classes, summarize_test)
        return Stage2Result(method, logits_at(tau, "test"), logits_at(tau, "val"), {"tau": tau}, curve)

    if method == "ncm":
        feats = split_features()
        train_feats = extract_features(model, feed.evaluate("train", bs), amp=amp)
        means = class_means(train_feats, data.train_y, num_classes)
        return Stage2Result(method, ncm_logits(feats["test"], means), ncm_logits(feats["val"], means))

    if method in ("crt", "lws"):
        torch.manual_seed(derive_seed(cfg.seed, "stage2-init"))
        if method == "crt":
            head = build_head(cfg.model.head, model.feature_dim, num_classes)
        else:
            head = ScaledHead(copy.deepcopy(model.head), num_classes)
        net = FrozenBackbone(model, head).to(feed.device)
        params = [p for p in net.head.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=s2.lr, momentum=s2.momentum, weight_decay=s2.weight_decay)
        sampler = Sampler(SamplerConfig(name=s2.sampler), data.train_y, num_classes, s2.epochs)
        loss_fn = CrossEntropy(data.class_counts).to(feed.device)
        rows = []
        for epoch in range(s2.epochs):
            lr = lr_at(epoch, s2.lr, s2.epochs, 0, "cosine", [], 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = sampler.epoch_indices(epoch, generator(cfg.seed, epoch, "stage2-sampler"))
            gen = generator(cfg.seed, epoch, "stage2-batch")
            batches = feed.train(
                idx,
                batch_size=s2.batch_size,
                augment=cfg.augment if s2.augment else None,
                synth=None,
                synth_on=False,
                gen=gen,
            )
            stats = train_one_epoch(net, opt, loss_fn, batches, gen=gen, amp=amp)
            rows.append(stats.row(epoch + 1, lr, stage=2))
        logits = {split: predict(net, feed.evaluate(split, bs), amp=amp)[1] for split in ("val", "test")}
        chosen = {"scales": [round(float(v), 4) for v in head.scales.detach().cpu()]} if method == "lws" else {}
        return Stage2Result(method, logits["test"], logits["val"], chosen, epochs=rows)

    raise ConfigError(f"unknown stage-2 method {method!r}")
