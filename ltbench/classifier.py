"""The classifier stage of decoupled training (Kang et al. 2020): only the classifier changes; the backbone is frozen.

- ``crt``: a freshly initialised classifier retrained with class-balanced sampling;
- ``lws``: the stage-1 classifier kept, one learnable scale per class (logits * s_c), class-balanced sampling;
- ``tau_norm``: each class weight vector w_c divided by ||w_c||^tau (the bias is left as it is, so tau=0 is the
  stage-1 classifier);
- ``ncm``: nearest class mean: cosine similarity to the mean of the L2-normalised training features of each class;
- ``posthoc_la``: logits - tau * log(prior) (Menon et al. 2021).

The stage-2 methods that bring their own loss and training rules (``mislas``, ``wb``, ``oltr``) live in
:mod:`ltbench.decoupled`.

``crt`` and ``lws`` train (through the one training loop, with the settings under ``classifier.schedule``); the
others are computed from features. tau is chosen on the validation split (balanced accuracy: the mean per-class
accuracy over the classes it holds), never on the test set; the whole curve, validation and test, is recorded.
Each method gives the model a new ``head``, so the final network is an ordinary backbone + head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import ClassifierConfig, ScheduleConfig
from ltbench.errors import ConfigError
from ltbench.registry import Registry
from ltbench.tasks.classification import balanced_accuracy

if TYPE_CHECKING:
    from ltbench.contracts import StageContext
    from ltbench.methods import Method

CLASSIFIERS: Registry[Any] = Registry("classifier", ClassifierConfig)


def _stage2_schedule() -> ScheduleConfig:
    # Kang et al. 2020: 10 epochs, cosine decay from lr 0.1, no warm-up
    return ScheduleConfig(epochs=10, lr=0.1, weight_decay=5e-4, warmup=0.0, decay="cosine", milestones=[])


@dataclass
class RetrainConfig(ClassifierConfig):
    """crt / lws: the classifier is trained on the frozen backbone."""

    schedule: ScheduleConfig = field(default_factory=_stage2_schedule)
    sampler: str = "class_balanced"  # any sampler without settings
    augment: bool = True  # the training augmentation of stage 1

    def training_schedule(self) -> ScheduleConfig | None:
        return self.schedule

    def check(self, root: Any) -> None:
        from ltbench.samplers import SAMPLERS

        SAMPLERS.get(self.sampler)


def _default_grid() -> list[float]:
    return [round(0.1 * i, 1) for i in range(21)]


@dataclass
class TauConfig(ClassifierConfig):
    """tau_norm / posthoc_la: tau chosen on the validation split from ``tau_grid``."""

    tau_grid: list[float] = field(default_factory=_default_grid)
    selects_on_validation = True  # every class must be in the validation split

    def check(self, root: Any) -> None:
        if not self.tau_grid:
            raise ConfigError("classifier.tau_grid is empty")
        if root.dataset.val_per_class < 1:
            raise ConfigError(
                f"classifier={self.name} chooses tau on the validation split: set dataset.val_per_class > 0"
            )
        if self.name == "tau_norm" and root.model.head != "linear":
            raise ConfigError("classifier=tau_norm needs a linear head (a cosine head has unit-norm class weights)")


@dataclass
class NCMConfig(ClassifierConfig):
    name: str = "ncm"


# ------------------------------------------------------------------------------------------------ heads


class ScaledHead(nn.Module):
    """LWS: a classifier whose logits are multiplied by one learnable scale per class (initially 1).

    ``frozen`` (LWS, Kang et al. 2020): only the scales learn. MiSLAS (Zhong et al. 2021) fine-tunes the classifier
    together with its scales (``frozen=False``).
    """

    def __init__(self, head: nn.Module, num_classes: int, frozen: bool = True) -> None:
        super().__init__()
        self.head = head
        for p in self.head.parameters():
            p.requires_grad_(not frozen)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f) * self.scales


class AdjustedHead(nn.Module):
    """Post-hoc logit adjustment: ``head(f) - tau * log(prior)``."""

    def __init__(self, head: nn.Module, class_counts, tau: float) -> None:
        super().__init__()
        self.head, self.tau = head, tau
        self.register_buffer("counts", torch.as_tensor(list(class_counts), dtype=torch.float32))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return posthoc_adjust(self.head(f), self.counts, self.tau)


class NCMHead(nn.Module):
    """Nearest class mean: cosine similarity of the normalised feature to each class mean."""

    def __init__(self, means: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return ncm_logits(f, self.means.to(f.dtype))


BACKBONE_MODES = ("frozen", "shift_bn", "finetune")


class FrozenBackbone(nn.Module):
    """A stage-1 model (the backbone) under a new ``head``; ``mode`` says what happens to the backbone meanwhile.

    - ``frozen`` (crt, lws, ...): no gradient and eval mode, so every backbone tensor, BatchNorm running statistics
      included, stays that of stage 1;
    - ``shift_bn`` (MiSLAS "shift learning on BatchNorm", Zhong et al. 2021; the code of weight balancing): still no
      gradient (no parameter changes, BN affine included), but the backbone runs in train mode: BatchNorm normalises
      with batch statistics and re-estimates its running mean/variance on the stage's stream (class-balanced for
      MiSLAS), as the references' ``model.train()`` under ``torch.no_grad()`` does;
    - ``finetune`` (OLTR, Liu et al. 2019): the backbone trains too (train mode, gradients); its learning rate is the
      classifier method's business (:class:`ltbench.decoupled.LrFactor`).

    Evaluation (``eval()``) always uses the running statistics.
    """

    def __init__(self, model: nn.Module, head: nn.Module, mode: str = "frozen") -> None:
        super().__init__()
        if mode not in BACKBONE_MODES:
            raise ValueError(f"backbone mode must be one of {BACKBONE_MODES}, got {mode!r}")
        self.backbone, self.backbone_mode = model, mode
        for p in self.backbone.parameters():
            p.requires_grad_(mode == "finetune")
        for p in getattr(model, "head", nn.Module()).parameters():  # the stage-1 head: unused by features()
            p.requires_grad_(False)
        self.head = head

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        if self.backbone_mode == "frozen":
            self.backbone.eval()  # BatchNorm statistics stay those of stage 1
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The features the head trains on (float32): with a gradient only when the backbone is fine-tuned."""
        if self.backbone_mode == "finetune":
            return self.backbone.features(x).float()
        with torch.no_grad():
            return self.backbone.features(x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_input(x))


def tau_normalized(head: nn.Linear, tau: float) -> nn.Linear:
    """A copy of a linear classifier with w_c / ||w_c||^tau (bias unchanged)."""
    out = copy.deepcopy(head)
    with torch.no_grad():
        norms = head.weight.norm(dim=1, keepdim=True).clamp(min=1e-12)
        out.weight.copy_(head.weight / norms.pow(tau))
    return out


def posthoc_adjust(logits: torch.Tensor, class_counts, tau: float) -> torch.Tensor:
    """logits - tau * log(prior), prior = n_c / N."""
    n = torch.as_tensor(class_counts, dtype=logits.dtype, device=logits.device)
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


# ------------------------------------------------------------------------------------------------ methods


@dataclass
class PostHoc:
    """What a feature-based method gives: the new head, what it chose, the curve, and the logits it computed."""

    head: nn.Module
    outputs: dict[str, torch.Tensor]
    chosen: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)


class ClassifierMethod:
    """What the classifier stage asks of a ``classifier=`` option; builders have the methods' signature
    ``(cfg, ctx, model, base)`` (:data:`ltbench.methods.Builder`).

    Two kinds, declared by ``fits``:

    - ``fits = True``: a head trained through the one loop on the stage-1 backbone: :meth:`head` makes it,
      ``backbone_mode`` says what the backbone does meanwhile (``frozen``, ``shift_bn`` or ``finetune``, see
      :class:`FrozenBackbone`), :meth:`method` gives the training method (default: plain cross-entropy), then
      :meth:`chosen` what the record keeps and :meth:`outputs` the stage's final outputs where they are not
      ``model(x)`` (None: they are);
    - ``fits = False``: computed from the features of the splits in ``needs`` by :meth:`apply` (tau chosen on
      validation, class means), no training.
    """

    fits: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, ctx: StageContext | None = None, model: nn.Module | None = None,
                 base: Method | None = None) -> None:  # fmt: skip
        self.cfg = cfg

    @property
    def backbone_mode(self) -> str:
        return "frozen"

    def head(self, model: nn.Module, head_name: str, num_classes: int) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} trains (fits=True) but makes no head")

    def method(self, ctx: StageContext, net: FrozenBackbone) -> Method:
        """The method the head trains with: plain cross-entropy unless the option brings its own."""
        from ltbench.losses.classification import CrossEntropy
        from ltbench.methods.supervised import Supervised

        return Supervised(CrossEntropy(ctx.stats), ctx.task)

    def chosen(self, head: nn.Module) -> dict[str, Any]:
        """What the stage's record keeps about the trained head."""
        return {}

    def outputs(self, ctx: StageContext, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(val/test outputs, notes for the record) where the final outputs are not ``model(x)``; None: they are."""
        return None

    def apply(self, model: nn.Module, feats: dict[str, torch.Tensor], data: Any, summarize_test) -> PostHoc:
        raise NotImplementedError(f"{type(self).__name__} is computed from features (fits=False) but has no apply")


class Retrain(ClassifierMethod):
    """crt / lws: the head to train on the frozen backbone."""

    def head(self, model: nn.Module, head_name: str, num_classes: int) -> nn.Module:
        from ltbench.models.heads import build_head

        if self.cfg.name == "crt":
            return build_head(head_name, model.feature_dim, num_classes)
        return ScaledHead(copy.deepcopy(model.head), num_classes)

    def chosen(self, head: nn.Module) -> dict[str, Any]:
        if isinstance(head, ScaledHead):
            return {"scales": [round(float(v), 4) for v in head.scales.detach().cpu()]}
        return {}


def select_tau(
    grid: list[float],
    logits_at: Callable[[float, str], torch.Tensor],
    val_y: torch.Tensor,
    num_classes: int,
    summarize_test: Callable[[torch.Tensor], dict],
) -> tuple[float, list[dict]]:
    """The first tau of the grid with the best validation balanced accuracy, and the whole curve."""
    curve, best_tau, best = [], grid[0], -1.0
    for tau in grid:
        val_acc = balanced_accuracy(logits_at(tau, "val").argmax(1), val_y, num_classes)
        test = summarize_test(logits_at(tau, "test"))
        curve.append(
            {"tau": tau, "val_balanced_acc": val_acc, **{k: test[k] for k in ("top1", "many", "medium", "few")}}
        )
        if val_acc is not None and val_acc > best:  # first maximum: ties go to the smaller tau
            best_tau, best = tau, val_acc
    return best_tau, curve


class TauMethod(ClassifierMethod):
    """tau_norm / posthoc_la: tau from the grid, chosen on validation."""

    fits = False
    needs = ("val", "test")

    def apply(self, model: nn.Module, feats: dict[str, torch.Tensor], data: Any, summarize_test) -> PostHoc:
        head = copy.deepcopy(model.head).cpu().float()
        if self.cfg.name == "tau_norm":
            heads = {tau: tau_normalized(head, tau) for tau in self.cfg.tau_grid}
        else:
            heads = {tau: AdjustedHead(head, data.class_counts, tau) for tau in self.cfg.tau_grid}

        def logits_at(tau: float, split: str) -> torch.Tensor:
            with torch.no_grad():
                return heads[tau](feats[split])

        tau, curve = select_tau(self.cfg.tau_grid, logits_at, data.val_y, data.num_classes, summarize_test)
        outputs = {s: logits_at(tau, s) for s in ("val", "test")}
        return PostHoc(heads[tau], outputs, {"tau": tau}, curve)


class NCMMethod(ClassifierMethod):
    """ncm: class means of normalised training features."""

    fits = False
    needs = ("train", "val", "test")

    def apply(self, model: nn.Module, feats: dict[str, torch.Tensor], data: Any, summarize_test) -> PostHoc:
        head = NCMHead(class_means(feats["train"], data.train_y, data.num_classes))
        with torch.no_grad():
            outputs = {s: head(feats[s]) for s in ("val", "test")}
        return PostHoc(head, outputs)


for _name in ("crt", "lws"):
    CLASSIFIERS.register(_name, RetrainConfig)(Retrain)
for _name in ("tau_norm", "posthoc_la"):
    CLASSIFIERS.register(_name, TauConfig)(TauMethod)
CLASSIFIERS.register("ncm", NCMConfig)(NCMMethod)
