"""Self-supervised pre-training (SSP) of the backbone, a stage before the training stage: ``pretrain=rotation`` or
``pretrain=simsiam`` (Yang & Xu 2020, "Rethinking the Value of Labels for Improving Class-Imbalanced Learning").

The pre-training stage sees the training images only (labels unused). It trains the backbone with a head of its own,
which is then dropped: the training stage starts from the pre-trained backbone (BatchNorm statistics included) and the
model's untouched classifier, as imbalanced-semi-self's ``train.py --pretrained_model`` does (it loads everything but
the ``fc`` head, and fine-tunes the whole network).

- ``rotation`` (Gidaris et al. 2018, the imbalanced-semi-self CIFAR recipe, ``pretrain_rot.py``): each image of the
  (augmented, normalised) batch is rotated by one of 0/90/180/270 degrees, the four labels balanced within the batch,
  and a 4-way linear head predicts the rotation; the schedule is the CIFAR-LT reference recipe (200 epochs, lr 0.1).
- ``simsiam`` (Chen & He 2021): two views of each image (RandomResizedCrop 0.2-1, flip, colour jitter 0.4/0.4/0.4/0.1
  with p 0.8, grayscale p 0.2, batched on the device), a projector and a predictor, and the symmetric negative cosine
  with a stop-gradient. Chosen over MoCo v2 because it needs no queue, no momentum encoder and no negatives (which a
  long-tailed batch would draw mostly from the head classes) and is robust at small batch sizes (Chen & He, Table 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import PretrainConfig, ScheduleConfig
from ltbench.core import Batch, Epoch, autocast
from ltbench.errors import ConfigError
from ltbench.methods import PRETRAIN, Method

if TYPE_CHECKING:
    from ltbench.contracts import StageContext


@dataclass
class RotationConfig(PretrainConfig):
    name: str = "rotation"
    label_suffix = "+SSP"  # how the report marks runs with this pre-training
    reads = ("images",)  # it learns from rotated images


def rotation_labels(n: int, gen: torch.Generator) -> torch.Tensor:
    """0..3 for n images, balanced: a permutation of [0, 1, 2, 3, 0, 1, ...] (imbalanced-semi-self utils.rotation)."""
    return (torch.arange(n) % 4)[torch.randperm(n, generator=gen)]


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Image i rotated by k_i * 90 degrees (counter-clockwise, as torch.rot90 on the H, W axes)."""
    out = x.clone()
    for r in (1, 2, 3):
        sel = k == r
        if bool(sel.any()):
            out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return out


class HeadNet(nn.Module):
    """The backbone of a model with another head: ``forward(x) = head(model.features(x))``."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.model, self.head = model, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.features(x))


@PRETRAIN.register("rotation", RotationConfig)
class Rotation(Method):
    """Rotation prediction (4 classes) on the training images, labels unused."""

    def __init__(self, cfg: RotationConfig, ctx: StageContext, model: nn.Module, base: Method | None = None) -> None:
        super().__init__()
        self.head = nn.Linear(model.feature_dim, 4)
        nn.init.kaiming_normal_(self.head.weight)  # as every Linear of the CIFAR ResNet of the reference

    def wrap(self, model: nn.Module) -> nn.Module:
        return HeadNet(model, self.head)

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k = rotation_labels(len(batch), ep.gen).to(batch.x.device)
        with autocast(batch.x.device, ep.amp):
            out = net(rotate(batch.x, k))
        loss = F.cross_entropy(out.float(), k)
        return loss, {"mean_rotation_acc": (out.detach().argmax(1) == k).sum() * 100.0}


def _simsiam_schedule() -> ScheduleConfig:
    # Chen & He 2021, appendix D (CIFAR-10): SGD, lr 0.03 x 512/256, wd 5e-4, momentum 0.9, cosine, 800 epochs
    return ScheduleConfig(
        epochs=800, batch_size=512, lr=0.06, weight_decay=5e-4, warmup=0.0, decay="cosine", milestones=[]
    )


@dataclass
class SimSiamConfig(PretrainConfig):
    name: str = "simsiam"
    schedule: ScheduleConfig = field(default_factory=_simsiam_schedule)
    proj_dim: int = 2048  # output of the 2-layer projector (CIFAR: Chen & He, appendix D)
    pred_dim: int = 512  # bottleneck of the predictor
    label_suffix = "+SSP(simsiam)"
    reads = ("images",)  # it learns from augmented views of images

    def check(self, root: Any) -> None:
        if self.proj_dim < 1 or self.pred_dim < 1:
            raise ConfigError("pretrain.proj_dim and pretrain.pred_dim must be >= 1")


class SimSiamNet(nn.Module):
    """Backbone -> projector -> predictor; ``forward(v1, v2)`` is the symmetric SimSiam loss."""

    def __init__(self, model: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.model, self.projector, self.predictor = model, projector, predictor

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """As facebookresearch/simsiam simsiam/builder.py: each view through the encoder and the predictor on its
        own (so BatchNorm normalises over the N images of one view, not over 2N), then
        ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2`` (main_simsiam.py's criterion)."""
        z1, z2 = (self.projector(self.model.features(v).float()) for v in (v1, v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        z1, z2 = z1.detach(), z2.detach()  # the stop-gradient
        return -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2


@PRETRAIN.register("simsiam", SimSiamConfig)
class SimSiam(Method):
    """SimSiam on two batched views of each training image (labels unused)."""

    inputs = "raw"  # the feed hands over the uint8 images; the method makes and normalises its views

    def __init__(self, cfg: SimSiamConfig, ctx: StageContext, model: nn.Module, base: Method | None = None) -> None:
        super().__init__()
        d, p, q = model.feature_dim, cfg.proj_dim, cfg.pred_dim
        self.projector = nn.Sequential(
            nn.Linear(d, p, bias=False), nn.BatchNorm1d(p), nn.ReLU(inplace=True),
            nn.Linear(p, p, bias=False), nn.BatchNorm1d(p, affine=False),
        )  # fmt: skip
        self.predictor = nn.Sequential(
            nn.Linear(p, q, bias=False), nn.BatchNorm1d(q), nn.ReLU(inplace=True), nn.Linear(q, p)
        )
        self.mean, self.std = ctx.data.mean, ctx.data.std
        self.size = getattr(ctx.cfg.dataset, "image_size", None)

    def wrap(self, model: nn.Module) -> nn.Module:
        return SimSiamNet(model, self.projector, self.predictor)

    def step(self, net: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ltbench.data.views import normalize01, simsiam_view

        size = self.size if batch.x.shape[-1] != 32 else None
        v1, v2 = (normalize01(simsiam_view(batch.x, ep.gen, size), self.mean, self.std) for _ in range(2))
        with autocast(batch.x.device, ep.amp):
            loss = net(v1, v2)
        return loss.float(), {"mean_neg_cosine": loss.detach().double() * len(batch)}
