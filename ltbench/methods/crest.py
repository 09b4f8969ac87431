"""CReST and CReST+ (Wei et al., CVPR 2021, "CReST: A Class-Rebalancing Self-Training Framework for Imbalanced
Semi-Supervised Learning"; google-research/crest), as the USB benchmark runs them (microsoft/Semi-supervised-learning
``semilearn/imb_algorithms/crest/crest.py``, ``utils.py``): ``semi=crest``, ``semi=crest_plus``.

``num_gens`` generations of FixMatch, each from a freshly initialised network. After a generation, its evaluated
(EMA) network predicts the whole unlabeled set; per class c (classes ranked by their labeled frequency, rank 0 the
most frequent) the ``int(len(list_c) * (mu ** (K - 1 - rank_c)) ** (1 / alpha))`` most confident images predicted
as c are picked, ``mu = (N_min / N_max) ** (1 / (K - 1))`` of the labeled counts: the next generation trains on the
labeled set plus these picks, labeled with their predicted class. CReST+ adds progressive distribution alignment of
the weak view's probabilities (USB ``ProgressiveDistAlignEMAHook``): ``p * p_target' / p_model`` renormalised, with
``p_target`` the labeled class distribution raised to ``t`` (renormalised), ``t`` going linearly from 1 in the first
generation to ``dist_align_t`` in the last, and ``p_model`` an EMA (momentum 0.999) of the batch-mean predictions,
kept across generations as USB's hook keeps it.

Stages: the ``crest`` stage (registered here, before the training stage) trains generations 0 .. num_gens - 2 in
turn through the one training loop; its checkpoint carries the generation in progress and the records of the
finished ones (``spec.state``), so a run killed inside any generation resumes to identical results. Its record
holds each generation's picks (indices into the unlabeled set, per-class counts, per-class precision against the
true labels, never trained on) and its test scores (recorded, nothing is selected on them); it hands on a freshly
initialised network. The training stage trains the last generation with the last picks. Every generation's epochs
are in ``crest_epochs.csv`` (column ``generation``) and in metrics.json's ``cost``.

ltbench differs from USB: the picks join the labeled batch in proportion (``ceil(B * N_picks / N_labeled)`` picked
images beside the sampler's B labeled ones, a pass over the picks per pass over the labeled set, as a sampler over
their union would) instead of enlarging the labeled dataset; a generation's length is ``schedule.epochs`` (USB: 128
epochs, 65,536 iterations per generation). Ranks come from a stable sort of the labeled counts (USB uses the class
index, the same for its head-first labeled sets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import ScheduleConfig, TrainConfig
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.methods import SEMI, Method
from ltbench.methods.semi import FixMatch, FixMatchConfig
from ltbench.seeding import derive_seed
from ltbench.stages import RunContext, Stage, StageResult, StageSpec, register_stage, train

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


@dataclass
class CrestConfig(FixMatchConfig):
    name: str = "crest"
    num_gens: int = 6
    alpha: float = 3.0  # sampling exponent: the tail's rate (N_min / N_max) ** (rank / ((K - 1) alpha)) from head
    pro_dist_align: bool = False
    dist_align_t: float = 0.5  # the last generation's temperature of p_target (CReST+)
    align_momentum: float = 0.999  # of p_model's EMA (USB DistAlignEMAHook)
    label_suffix = "+FixMatch+CReST"

    def check(self, root: Any) -> None:
        super().check(root)
        if root.pretrain is not None:
            raise ConfigError(f"semi={self.name} trains a fresh network every generation: it takes no pretrain=")
        if self.num_gens < 2 or not self.alpha > 0:
            raise ConfigError("semi.num_gens >= 2 and semi.alpha > 0 are needed")
        if not (0 < self.dist_align_t <= 1 and 0 <= self.align_momentum < 1):
            raise ConfigError("semi.dist_align_t in (0, 1] and semi.align_momentum in [0, 1) are needed")


@dataclass
class CrestPlusConfig(CrestConfig):
    name: str = "crest_plus"
    pro_dist_align: bool = True
    label_suffix = "+FixMatch+CReST+"


# ------------------------------------------------------------------------------------------------ the parts


def pick_rates(labeled_counts: list[int] | torch.Tensor, alpha: float) -> torch.Tensor:
    """Per class, the share of its predicted images picked: ``(mu ** (K - 1 - rank)) ** (1 / alpha)``, ``mu`` from
    the smallest non-zero and the largest labeled count; rank 0 is the most frequent class (stable on ties)."""
    counts = torch.as_tensor(labeled_counts, dtype=torch.float64)
    k = len(counts)
    order = torch.argsort(-counts, stable=True)
    rank = torch.empty(k, dtype=torch.float64)
    rank[order] = torch.arange(k, dtype=torch.float64)
    low = counts[counts > 0].min() if (counts > 0).any() else counts.new_tensor(1.0)
    mu = (low / counts.max().clamp(min=1)) ** (1 / max(k - 1, 1))
    return (mu ** (k - 1 - rank)) ** (1 / alpha)


def select_picks(probs: torch.Tensor, labeled_counts: list[int] | torch.Tensor, alpha: float) -> dict[str, Any]:
    """CReST's picks from the unlabeled set's class probabilities ``probs`` (N x K): per class, its images by
    descending confidence (stable), the first ``int(len * rate)`` kept. Returns ``indices`` and ``labels``
    (class by class), ``per_class`` counts and ``predicted`` (images predicted as each class)."""
    conf, pred = probs.float().max(1)
    rates = pick_rates(labeled_counts, alpha)
    indices: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    per_class, predicted = [], []
    for c in range(probs.shape[1]):
        idx = torch.nonzero(pred == c).flatten()
        idx = idx[torch.argsort(conf[idx], descending=True, stable=True)]
        n = int(len(idx) * float(rates[c]))
        indices.append(idx[:n])
        labels.append(torch.full((n,), c, dtype=torch.long))
        per_class.append(n)
        predicted.append(len(idx))
    return {"indices": torch.cat(indices).tolist(), "labels": torch.cat(labels).tolist(), "per_class": per_class,
            "predicted": predicted}  # fmt: skip


def align_temperature(gen: int, num_gens: int, t: float) -> float:
    """CReST+'s temperature of generation ``gen``: 1 at the first, ``t`` at the last, linear between."""
    cur = gen / (num_gens - 1)
    return (1.0 - cur) * 1.0 + cur * t


class ProgressiveAlign(nn.Module):
    """Distribution alignment with an EMA of the model's predictions (buffers: the checkpoint carries them):
    ``align(p, t)`` updates ``p_model`` with the batch mean (the first batch sets it), then returns
    ``p (p_target ** t / sum + 1e-6) / (p_model + 1e-6)`` renormalised per row (USB ``ProgressiveDistAlignEMAHook``)."""

    p_target: torch.Tensor
    p_model: torch.Tensor
    started: torch.Tensor

    def __init__(self, p_target: torch.Tensor, momentum: float, p_model: list[float] | None = None) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("p_target", p_target.float() / p_target.float().sum())
        start = torch.tensor(p_model if p_model is not None else [0.0] * len(p_target), dtype=torch.float32)
        self.register_buffer("p_model", start)
        self.register_buffer("started", torch.tensor(p_model is not None))

    @torch.no_grad()
    def forward(self, probs: torch.Tensor, t: float) -> torch.Tensor:
        mean = probs.mean(0)
        self.p_model.copy_(torch.where(self.started, self.p_model * self.momentum + mean * (1 - self.momentum), mean))
        self.started.fill_(True)
        target = self.p_target
        if t != 1:
            target = target**t
            target = target / target.sum()
        aligned = probs * (target + 1e-6) / (self.p_model + 1e-6)
        return aligned / aligned.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------------ the method


@SEMI.register("crest", CrestConfig)
class CReST(FixMatch):
    """CReST (Wei et al. 2021): FixMatch over generations, the labeled set grown by class-rebalanced picks."""

    pick_idx: torch.Tensor
    pick_y: torch.Tensor
    align: ProgressiveAlign | None
    base: Any  # the stage's supervised method: its loss_fn, weight and task

    def __init__(
        self,
        cfg: CrestConfig,
        ctx: StageContext,
        model: nn.Module,
        base: Method | None,
        gen: int | None = None,
        picks: dict[str, Any] | None = None,
        p_model: list[float] | None = None,
    ) -> None:
        super().__init__(cfg, ctx, model, base)
        if gen is None:  # the training stage: the last generation, with the crest stage's last picks
            gen, picks, p_model = cfg.num_gens - 1, ctx.output("crest", "picks"), ctx.output("crest", "p_model")
        self.gen, self.t = gen, align_temperature(gen, cfg.num_gens, cfg.dist_align_t)
        picks = picks or {"indices": [], "labels": []}
        self.register_buffer("pick_idx", torch.as_tensor(picks["indices"], dtype=torch.long))
        self.register_buffer("pick_y", torch.as_tensor(picks["labels"], dtype=torch.long))
        counts = torch.as_tensor(ctx.stats.counts, dtype=torch.float32)
        self.align = ProgressiveAlign(counts, cfg.align_momentum, p_model) if cfg.pro_dist_align else None
        self._feed, self._num_labeled = ctx.feed, len(ctx.data.train_y)
        self._order = torch.zeros(0, dtype=torch.long)  # this epoch's permutation of the picks (drawn from ep.gen)
        self._cursor = 0

    def on_epoch_start(self, ep: Epoch) -> None:
        super().on_epoch_start(ep)
        self._order, self._cursor = torch.randperm(len(self.pick_idx), generator=ep.gen), 0

    def pick_batch(self, n: int, ep: Epoch) -> tuple[torch.Tensor, torch.Tensor]:
        """The picks joining a labeled batch of ``n``: weak views (normalised) and their pseudo-labels."""
        num = len(self.pick_idx)
        k = -(-n * num // max(self._num_labeled, 1)) if num else 0
        if k == 0:
            return self.pick_y.new_zeros((0,)).float(), self.pick_y[:0]
        pos = self._order[(self._cursor + torch.arange(k)) % num]
        self._cursor += k
        from ltbench.data.views import normalize01, weak_view

        idx = self.pick_idx.cpu()[pos]
        u = next(self._feed.unlabeled(idx, k))
        return normalize01(weak_view(u.x, ep.gen), self.mean, self.std), self.pick_y[pos.to(self.pick_y.device)]

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.unlabeled is not None
        self._net[:] = [net]
        px, py = self.pick_batch(len(batch), ep)
        weak, strong = self.views(batch.unlabeled.x, ep.gen)
        parts = [batch.x, px, weak, strong] if len(px) else [batch.x, weak, strong]
        with autocast(batch.x.device, ep.amp):
            out = net(torch.cat(parts))
        n, k, m = len(batch), len(px), len(weak)
        lx = self.base.loss_fn(out[: n + k], torch.cat([batch.y, py.to(batch.y.device)]), self.base.weight)
        probs = out[n + k : n + k + m].detach().float().softmax(1)
        if self.align is not None:
            probs = self.align(probs, self.t)
        conf, pseudo = probs.max(1)
        mask = conf >= self.cfg.threshold
        lu = (F.cross_entropy(out[n + k + m :].float(), pseudo, reduction="none") * mask).mean()
        self.stats.add(pseudo, mask, batch.unlabeled.y)
        sums = self.base.task.step_sums(out[:n], batch.y)
        return lx + self.cfg.lambda_u * lu, {**sums, "mean_loss_u": lu.detach().double() * n}

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        return {**super().row_extras(ep), "generation": self.gen, "picks": len(self.pick_idx)}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "crest_generation": self.gen, "crest_picks": len(self.pick_idx),
                **({"crest_align_t": self.t} if self.align is not None else {})}  # fmt: skip


SEMI.register("crest_plus", CrestPlusConfig)(CReST)


# ------------------------------------------------------------------------------------------------ the stage


def _reinit(ctx: RunContext, model: nn.Module, gen: int) -> None:
    """Give ``model`` the weights of a fresh network, seeded by (run seed, generation)."""
    from ltbench.models import build_model

    torch.manual_seed(derive_seed(ctx.cfg.seed, f"crest-gen{gen}"))
    model.load_state_dict(build_model(ctx.cfg.model, ctx.task.out_dim(ctx.data), ctx.data).state_dict())


def _precision(picks: dict[str, Any], truth: torch.Tensor, num_classes: int) -> list[float | None]:
    """Per-class precision (%) of the picks against the unlabeled set's true labels (None: no pick)."""
    idx, y = torch.as_tensor(picks["indices"], dtype=torch.long), torch.as_tensor(picks["labels"], dtype=torch.long)
    right = torch.bincount(y, weights=(truth[idx] == y).double(), minlength=num_classes)
    total = torch.bincount(y, minlength=num_classes)
    return [float(r) / int(n) * 100 if n else None for r, n in zip(right.tolist(), total.tolist())]


@register_stage
class CrestStage(Stage):
    """CReST's generations before the last (``semi=crest|crest_plus``): each trains FixMatch from a fresh network
    on the labeled set and the previous generation's picks, then picks for the next. Declared outputs: ``picks``
    (the last), ``p_model`` (CReST+'s EMA), ``generations`` (each one's picks, counts, precision, test scores)."""

    name, title, record_key, stream, order, section = "crest", "CReST generations", "crest", "crest-", 25, "semi"
    sections = ("task", "dataset", "model", "loss", "sampler", "reweight", "synth", "augment", "schedule", "semi")

    @classmethod
    def enabled(cls, cfg: TrainConfig) -> bool:
        return isinstance(cfg.semi, CrestConfig)

    def schedule(self, cfg: TrainConfig) -> ScheduleConfig | None:
        return cfg.schedule

    def run(self, ctx: RunContext, sctx: StageContext, model: nn.Module, ckpt: dict | None) -> StageResult:
        cfg = ctx.cfg.semi
        assert isinstance(cfg, CrestConfig)
        done: dict[str, Any] = ckpt["crest"] if ckpt is not None else {"generation": 0, "generations": [], "rows": []}
        gens, rows = list(done["generations"]), list(done["rows"])
        for g in range(int(done["generation"]), cfg.num_gens - 1):
            resume = ckpt if ckpt is not None and g == int(done["generation"]) else None
            if resume is None and g > 0:
                _reinit(ctx, model, g)
            gen_rows, entry = self._generation(ctx, sctx, model, g, gens, rows, resume)
            rows += gen_rows
            gens.append(entry)
        ctx.rundir.write_csv(f"{self.name}_epochs.csv", rows)  # every generation's epochs
        _reinit(ctx, model, cfg.num_gens - 1)  # the last generation (the training stage) starts fresh too
        last = gens[-1]
        record = {"num_gens": cfg.num_gens, "alpha": cfg.alpha, "generations": gens, "p_model": last["p_model"],
                  "picks": {"indices": last["indices"], "labels": last["labels"]}}  # fmt: skip
        return StageResult(model, record, rows)

    def _generation(
        self, ctx: RunContext, sctx: StageContext, model: nn.Module, g: int, gens: list, rows: list, resume
    ) -> tuple[list[dict], dict[str, Any]]:
        """Train generation ``g`` (from ``resume``, its checkpoint, if any) on the labeled set and the picks of the
        generation before, then pick from the unlabeled set with its evaluated network; returns its epoch-log rows
        and its record."""
        from ltbench.losses import build_loss
        from ltbench.methods.supervised import Supervised
        from ltbench.reweight import Reweighting

        cfg, semi = ctx.cfg, ctx.cfg.semi
        assert isinstance(semi, CrestConfig)
        prev = gens[-1] if gens else {}
        loss = build_loss(cfg.loss, ctx.stats).to(ctx.device)
        no_decay = loss.prepare(model)
        base = Supervised(loss, ctx.task, Reweighting(cfg.reweight, ctx.stats.counts, cfg.schedule.epochs))
        method = CReST(semi, sctx, model, base, g, prev or None, prev.get("p_model")).to(ctx.device)
        state = {"crest": {"generation": g, "generations": gens, "rows": rows}}
        spec = StageSpec(model, method, cfg.schedule, cfg.sampler, cfg.augment, None, no_decay, state)
        self.stream = f"crest{g}-"  # type: ignore[misc]  # each generation its own random streams
        gen_rows = train(ctx, sctx, self, spec, resume)
        net = method.eval_model(model)
        picks = select_picks(ctx.predict(net, "unlabeled").float().softmax(1).cpu(), ctx.stats.counts, semi.alpha)
        truth = ctx.data.unlabeled_y
        assert truth is not None
        entry = {"generation": g, **picks, "total": len(picks["indices"]),
                 "precision": _precision(picks, truth.cpu(), ctx.data.num_classes),
                 "p_model": method.align.p_model.cpu().tolist() if method.align is not None else None,
                 "test": ctx.task.brief(ctx.evaluate(ctx.predict(net, "test"), "test"))}  # fmt: skip
        return gen_rows, entry


__all__ = ["CReST", "CrestConfig", "CrestPlusConfig", "CrestStage", "ProgressiveAlign", "select_picks"]
