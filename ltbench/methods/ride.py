"""RIDE (Wang et al., ICLR 2021, "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts"): the
multi-expert training method (``method=ride``) and the expert router of its second stage (``classifier=ride_router``).

Reference: frank-xwang/RIDE-LongTailRecognition, ``model/loss.py::RIDELoss``, ``model/ldam_drw_resnets/
ea_resnet_cifar.py::ResNet_s`` and ``configs/config_imbalance_cifar100_ride{,_ea}.json``.

``method=ride`` (stage 1), on the training stage's supervised method (its loss, re-weighting and synthesis):

    L = sum_j [ base(z_j, y; w) + lambda * Tbar^2 * KL( softmax(z_ens / T) || softmax(z_j / T) ) ]

over the experts j, with z_j the logits of expert j as the loss scales them (s * cos for LDAM, whose s = 30 is the
reference's model scale), z_ens their mean (no gradient), ``base`` the run's loss with the run's re-weighting ``w``
(LDAM with DRW in the preset: effective-number weights from the first lr decay), lambda = ``diversity_factor`` = -0.45
(negative: the KL is *maximised*, the experts are pushed apart). T is ``temperature`` (1) until the run's re-weighting
switches on, then per class ``temperature * w_c`` with w_c = (C pi_c f + 1 - f) / max (f = ``reweight_factor`` =
0.05, pi the class prior): head classes keep T = 1, tail classes get a sharper distribution. Tbar = mean_c T_c;
``F.kl_div(..., reduction="batchmean")`` as in the reference.

``classifier=ride_router`` (stage 2, the reference's "expert assignment" module): the experts are frozen (BatchNorm in
eval mode) and only the routers train, 5 epochs on a class-balanced stream with the training augmentation, SGD lr
0.01 nesterov, wd 5e-4, cosine. Router i (i = 1..E-1, deciding whether expert i+1 is consulted) reads the top-k
(k = 30) sorted logits of the mean of experts 1..i and ReLU(Linear(D -> 16)) of expert i's L2-normalised pooled
feature; one linear layer (16 + k -> 1), shared by the routers, gives its logit. Its target is "experts 1..i are
wrong (the argmax of their mean) AND some longer prefix 1..i' > i is right"; the loss is binary cross-entropy with
``pos_weight`` 100, averaged over the routers. At test time expert 1 is always consulted, expert i+1 only where
sigmoid(router i) > 0.5 (and every expert before it was), and the output is the mean over the consulted experts.
ltbench computes every expert's features (the routed output is the same); the number of experts consulted per
image, the reference's compute figure, is recorded in the stage record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.classifier import CLASSIFIERS, ClassifierMethod, RetrainConfig
from ltbench.config import ScheduleConfig
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError, LtbenchError
from ltbench.losses import mixed_loss
from ltbench.methods import METHODS, Method, MethodConfig
from ltbench.models.ride import ExpertHead

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


def _num_experts(root: Any) -> int | None:
    return getattr(root.model, "num_experts", None)


def _check_experts(root: Any, what: str, minimum: int) -> None:
    n = _num_experts(root)
    if n is None or n < minimum:
        has = "has no experts" if n is None else f"has {n} expert(s)"
        raise ConfigError(f"{what} needs a multi-expert model (model=ride_resnet32); model={root.model.name} {has}")


def logit_scale(loss: Any) -> float:
    """The scale the run's loss puts on the model's logits before its softmax (LDAM's s; 1 for the others): the
    logits RIDE's diversity term and router read are those (``s * cos`` in the reference)."""
    return float(getattr(loss, "s", 1.0))


# ------------------------------------------------------------------------------------------------ the RIDE loss


def diversity_temperature(counts: torch.Tensor, base: float, reweight_factor: float) -> torch.Tensor:
    """Per-class temperatures after the re-weighting switches on: ``base * w_c``, w_c = (C pi_c f + 1 - f) / max_c
    (RIDELoss.__init__, ``per_cls_weights_enabled_diversity``)."""
    prior = counts.double() / counts.double().sum()
    w = len(counts) * prior * reweight_factor + 1 - reweight_factor
    return (base * w / w.max()).float()


def diversity_terms(logits: torch.Tensor, temperature: torch.Tensor, factor: float) -> torch.Tensor:
    """Per expert (E,): ``factor * Tbar^2 * KL(softmax(mean_j z_j / T) || softmax(z_j / T))``, batch-mean KL.

    ``logits``: E x N x C; ``temperature``: (C,) per-class temperatures, Tbar their mean. The ensemble target gets no
    gradient (RIDELoss.forward: ``mean_output_dist`` under ``torch.no_grad``)."""
    t = temperature.to(logits.device, logits.dtype)
    target = F.softmax(logits.detach().mean(0) / t, dim=1)
    scale = factor * t.mean() ** 2  # a device tensor: no host sync in the step
    return torch.stack([scale * F.kl_div(F.log_softmax(z / t, dim=1), target, reduction="batchmean") for z in logits])


@dataclass
class RideConfig(MethodConfig):
    name: str = "ride"
    # lambda (RIDELoss additional_diversity_factor in config_imbalance_cifar100_ride.json): < 0 maximises the KL
    diversity_factor: float = -0.45
    temperature: float = 1.0  # base_diversity_temperature
    reweight_factor: float = 0.05  # f of the class-dependent temperatures (0: the same temperature for every class)

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 <= self.reweight_factor < 1:
            raise ConfigError("method.temperature must be > 0 and method.reweight_factor in [0, 1)")

    tasks = ("classification",)

    def check(self, root: Any) -> None:
        _check_experts(root, "method=ride", 1)
        if root.semi is not None:
            raise ConfigError("method=ride trains every expert with its own loss; it does not combine with semi=...")


class ExpertsNet(nn.Module):
    """The model seen by the RIDE step: ``forward(x)`` = every expert's logits (E x N x C), so the whole forward
    goes through the module the stage optimises (and DDP wraps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.expert_logits(x)


@METHODS.register("ride", RideConfig)
class RideMethod(Method):
    """RIDE's loss over the experts, on top of the supervised method of the stage (its loss, re-weighting, synth)."""

    def __init__(self, cfg: RideConfig, ctx: StageContext, model: nn.Module, base: Method | None) -> None:
        super().__init__()
        self.cfg, self.base = cfg, base
        self.scale = logit_scale(base.loss_fn)  # type: ignore[attr-defined]
        counts = torch.as_tensor(list(ctx.stats.counts), dtype=torch.float64)
        self.register_buffer("class_temperature", diversity_temperature(counts, cfg.temperature, cfg.reweight_factor))
        self.temperature_on = False

    def wrap(self, model: nn.Module) -> nn.Module:
        return ExpertsNet(model)

    def temperature(self) -> torch.Tensor:
        """The temperatures of the current epoch: per class while the re-weighting is on, else ``temperature``."""
        t = self.class_temperature
        return t if self.temperature_on else torch.full_like(t, self.cfg.temperature)

    def on_epoch_start(self, ep: Epoch) -> None:
        self.base.on_epoch_start(ep)
        self.temperature_on = self.base.weight is not None  # type: ignore[attr-defined]

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = self.base
        x, y = batch.x, batch.y
        mixed = b.synth.mix(x, y, ep.gen) if (b.synth_on and b.synth.mixes) else None  # type: ignore[attr-defined]
        with autocast(x.device, ep.amp):
            z = net(mixed.x if mixed else x)
        z = z.float()
        loss_fn, w = b.loss_fn, b.weight  # type: ignore[attr-defined]
        # frank-xwang/RIDE model/loss.py RIDELoss.forward: `ride_loss_logits = output_logits if
        # additional_diversity_factor == 0 else logits_item`: without the diversity term every expert's base term
        # is taken on the ensemble's mean output
        per_expert = [z.mean(0)] * len(z) if self.cfg.diversity_factor == 0 else list(z)
        if mixed is not None:
            base = torch.stack([mixed_loss(loss_fn, zj, mixed.y_a, mixed.y_b, mixed.lam, w) for zj in per_expert])
        else:
            base = torch.stack([loss_fn(zj, y, w) for zj in per_expert])
        div = diversity_terms(self.scale * z, self.temperature(), self.cfg.diversity_factor)
        loss = base.sum() + div.sum()
        n = len(y)
        sums = b.task.step_sums(z.mean(0), y)  # type: ignore[attr-defined]
        return loss, {**sums, "mean_ride_base": base.sum().detach().double() * n,
                      "mean_ride_diversity": div.sum().detach().double() * n}  # fmt: skip

    def param_groups(self):
        return self.base.param_groups()

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        return {**self.base.row_extras(ep), "class_temperature": self.temperature_on}

    def summary(self) -> dict[str, Any]:
        return {"ride": {"logit_scale": self.scale, "class_temperature": self.class_temperature.tolist()}}


# ------------------------------------------------------------------------------------------------ the router


def _router_schedule() -> ScheduleConfig:
    # config_imbalance_cifar100_ride_ea.json: 5 epochs, batch 512, SGD lr 0.01 nesterov, wd 5e-4, CosineAnnealingLR
    # (T_max 5, stepped per epoch), no warm-up
    return ScheduleConfig(
        epochs=5, batch_size=512, lr=0.01, nesterov=True, weight_decay=5e-4, warmup=0.0, decay="cosine", milestones=[]
    )


@dataclass
class RouterConfig(RetrainConfig):
    """ride_router: RIDE's expert routers trained on the frozen experts."""

    name: str = "ride_router"
    schedule: ScheduleConfig = field(default_factory=_router_schedule)
    top_k: int = 30  # top_choices_num: sorted ensemble logits a router reads (capped at the number of classes)
    hidden: int = 16  # expert_hidden_fc_output_dim
    pos_weight: float = 100.0  # BCE weight of "consult the next expert" (the CIFAR-100 EA config)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.hidden < 1 or not self.pos_weight > 0:
            raise ConfigError("classifier.top_k and classifier.hidden must be >= 1 and classifier.pos_weight > 0")

    def check(self, root: Any) -> None:
        super().check(root)
        _check_experts(root, "classifier=ride_router", 2)


class Router(nn.Module):
    """The E-1 routers: per router a hidden layer on an expert's normalised feature, one shared output layer
    (ea_resnet_cifar.py ``expert_help_pred_hidden_fcs`` and ``expert_help_pred_fc``)."""

    def __init__(self, num_experts: int, expert_dim: int, num_classes: int, top_k: int = 30, hidden: int = 16):
        super().__init__()
        self.k = min(top_k, num_classes)
        self.hidden = nn.ModuleList(nn.Linear(expert_dim, hidden) for _ in range(num_experts - 1))
        self.out = nn.Linear(hidden + self.k, 1)
        for m in self.modules():  # the reference's _weights_init
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, i: int, feature: torch.Tensor, mean_logits: torch.Tensor) -> torch.Tensor:
        """Router i's logit (N,) from expert i's pooled feature and the mean logits of experts 0..i."""
        h = F.relu(self.hidden[i](F.normalize(feature, dim=1)))
        top = mean_logits.topk(self.k, dim=1).values
        return self.out(torch.cat([top, h], dim=1)).squeeze(1)


def router_targets(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """N x (E-1) booleans: router i's target = (the mean of experts 0..i is wrong) and (that of some 0..i', i' > i,
    is right). ``logits``: E x N x C (ea_resnet_cifar.py, the training branch of ``forward``)."""
    correct = logits.cumsum(0).argmax(2) == y  # E x N: is the prefix ensemble right (argmax of a sum = of a mean)
    return torch.stack([~correct[i] & correct[i + 1 :].any(0) for i in range(len(logits) - 1)], dim=1)


def router_loss(router_logits: torch.Tensor, targets: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """The mean over routers of the batch-mean BCE-with-logits, positives weighted by ``pos_weight``:
    ``pos_weight * t * softplus(-r) + (1 - t) * softplus(r)`` (``F.binary_cross_entropy_with_logits(pos_weight=)``,
    written out so that no tensor is made on the device in the step)."""
    t = targets.to(router_logits.dtype)
    return (pos_weight * t * F.softplus(-router_logits) + (1 - t) * F.softplus(router_logits)).mean()


def routed_mean(logits: torch.Tensor, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time routing: expert 0 always, expert i > 0 where sigmoid(router i-1) > 0.5 and expert i-1 was consulted;
    returns (the mean logits over the consulted experts (N x C), how many were consulted (N,))."""
    go = (torch.sigmoid(router_logits) > 0.5).long().cumprod(1)  # N x (E-1): expert i+1 consulted
    mask = torch.cat([torch.ones_like(go[:, :1]), go], dim=1).T.to(logits.dtype)  # E x N
    count = mask.sum(0)
    return (logits * mask[..., None]).sum(0) / count[:, None], count.long()


class RoutedHead(nn.Module):
    """The stage-1 experts' classifiers (frozen) and the routers, on the model's concatenated expert features.

    ``scale`` (a buffer, so a saved model routes alike) is the loss's logit scale: the routers read ``scale * z``
    (the reference's s * cos). ``forward`` is the routed output."""

    def __init__(self, experts: ExpertHead, router: Router) -> None:
        super().__init__()
        self.experts, self.router = experts, router
        for p in self.experts.parameters():
            p.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(1.0))

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def expert_logits(self, features: torch.Tensor) -> torch.Tensor:
        """E x N x C, scaled."""
        return self.experts.expert_logits(features) * self.scale

    def router_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """N x (E-1): router i on expert i's feature and the running mean of the (scaled) logits of experts 0..i."""
        chunks = features.split(self.experts.in_features, dim=1)
        steps = torch.arange(1, len(logits) + 1, device=logits.device, dtype=logits.dtype)
        prefix = logits.cumsum(0) / steps[:, None, None]
        return torch.stack([self.router(i, chunks[i], prefix[i]) for i in range(len(logits) - 1)], dim=1)

    def route(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.expert_logits(features)
        out, count = routed_mean(z, self.router_logits(features, z))
        return out / self.scale, count  # on the scale of the model's outputs (cosines for a cosine head)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.route(features)[0]


class RouterNet(nn.Module):
    """The stage's frozen network seen by the router step: ``forward(x)`` = (scaled expert logits, router logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head: RoutedHead = self.net.head
        with torch.no_grad():
            f = self.net.backbone.features(x).float()
            z = head.expert_logits(f)
        return z, head.router_logits(f, z)


class RouterMethod(Method):
    """Trains the routers: BCE on :func:`router_targets`; the epoch log keeps the routed training accuracy, the
    experts consulted per image and the fraction of positive targets."""

    def __init__(self, cfg: RouterConfig, task: Any) -> None:
        super().__init__()
        self.cfg, self.task = cfg, task

    def wrap(self, model: nn.Module) -> nn.Module:
        return RouterNet(model)

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(batch.x.device, ep.amp):
            z, r = net(batch.x)
        z, r = z.float(), r.float()
        targets = router_targets(z, batch.y)
        loss = router_loss(r, targets, self.cfg.pos_weight)
        out, count = routed_mean(z, r)
        sums = self.task.step_sums(out, batch.y)
        return loss, {**sums, "mean_experts": count.sum().double(),
                      "mean_router_positive": targets.double().mean(1).sum()}  # fmt: skip


def routing_summary(count: torch.Tensor, num_experts: int) -> dict[str, Any]:
    """Mean experts consulted per image and the fraction of images that consulted 1..E of them."""
    hist = torch.bincount(count.long().cpu(), minlength=num_experts + 1)[1:].double() / max(len(count), 1)
    return {"mean": round(float(count.double().mean()), 4), "fraction": [round(float(v), 4) for v in hist]}


class RideRouter(ClassifierMethod):
    """classifier=ride_router: a :class:`RoutedHead` trained on the frozen stage-1 model (ClassifierStage's
    ``head`` / ``method`` / ``chosen`` interface)."""

    def __init__(self, cfg: RouterConfig, ctx: StageContext | None = None, model: nn.Module | None = None,
                 base: Method | None = None) -> None:  # fmt: skip
        super().__init__(cfg)
        self._ctx: StageContext | None = None
        self._net: nn.Module | None = None

    def head(self, model: nn.Module, head_name: str, num_classes: int) -> RoutedHead:
        if not isinstance(model.head, ExpertHead):
            raise LtbenchError("classifier=ride_router needs the experts' head of a multi-expert model")
        experts = copy.deepcopy(model.head)
        router = Router(experts.num_experts, experts.in_features, num_classes, self.cfg.top_k, self.cfg.hidden)
        return RoutedHead(experts, router)

    def method(self, ctx: StageContext, net: nn.Module) -> RouterMethod:
        net.head.scale.fill_(logit_scale(ctx.cfg.loss))
        self._ctx, self._net = ctx, net
        return RouterMethod(self.cfg, ctx.task)

    def chosen(self, head: RoutedHead) -> dict[str, Any]:
        """The routers' settings and, on the validation split, the experts consulted per image."""
        out: dict[str, Any] = {"logit_scale": float(head.scale), "top_k": head.router.k}
        ctx = self._ctx
        if ctx is not None and self._net is not None and len(ctx.data.val_y):
            out["experts_per_image_val"] = self._routing(head, ctx.predict(self._net, "val", features=True))[1]
        return out

    def outputs(self, ctx: StageContext, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # type: ignore[override]
        """The routed test outputs (the one pass over the test set) and the experts consulted per test image: what
        ClassifierStage can hand to the runner as the stage's final test outputs (the validation figure is in
        :meth:`chosen`)."""
        out, stats = self._routing(model.head, ctx.predict(model, "test", features=True))
        outputs = {"test": out}
        if len(ctx.data.val_y):  # the validation metrics of the routed network too, not of the plain mean
            outputs["val"] = self._routing(model.head, ctx.predict(model, "val", features=True))[0]
        return outputs, {"experts_per_image_test": stats}

    @staticmethod
    @torch.no_grad()
    def _routing(head: RoutedHead, features: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        out, count = head.route(features.to(head.scale.device))
        return out.float().cpu(), routing_summary(count, head.num_experts)


CLASSIFIERS.register("ride_router", RouterConfig)(RideRouter)
