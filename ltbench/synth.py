"""Synthetic samples made inside the training batch.

Two kinds, applied at different points of the batch pipeline:

- *replacements* (``smote``, ``noise``) act on the raw uint8 images before augmentation: a sample of class c is
  replaced by a synthetic one with probability ``1 - n_c / n_max``. Under random over-sampling (where a fraction
  ``1 - n_c / n_max`` of each class's entries are repeats) this turns the repeats into synthetic images, which is
  what SMOTE does; the largest class is never touched.
- *mixing* (``mixup``, ``remix``) acts on the normalised float batch and returns two label vectors and a
  per-sample label weight, consumed by :func:`ltbench.losses.mixed_loss`. Mixing applies to every class; remix's
  label rule favours the minority class of each pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ltbench.config import SynthConfig, epoch_at
from ltbench.errors import ConfigError
from ltbench.registry import Registry

SYNTHS: Registry[type[Synthesizer]] = Registry("synth", SynthConfig)


@dataclass
class MixupConfig(SynthConfig):
    name: str = "mixup"
    alpha: float = 1.0  # lam ~ Beta(alpha, alpha)

    def check(self, root) -> None:
        if root.dataset.inputs == "text":
            raise ConfigError(f"synth={self.name} mixes inputs; dataset={root.dataset.name} gives token ids")
        if self.name != "mixup":
            _classification_only(root, self.name)


def _classification_only(root, name: str) -> None:
    if root.task.name != "classification":
        raise ConfigError(f"synth={name} works on classes (task=classification); for regression use synth=mixup")


@dataclass
class RemixConfig(MixupConfig):
    name: str = "remix"
    kappa: float = 3.0  # count ratio above which the label goes to the minority class (Chou et al. 2020)
    tau: float = 0.5  # mixing-weight threshold (Chou et al. 2020)


@dataclass
class SmoteConfig(SynthConfig):
    name: str = "smote"
    k: int = 5  # nearest same-class neighbours (Chawla et al. 2002)

    def check(self, root) -> None:
        _classification_only(root, self.name)


@dataclass
class NoiseConfig(SynthConfig):
    name: str = "noise"
    sigma: float = 0.1  # std of the Gaussian noise, on the [0, 1] pixel scale

    def check(self, root) -> None:
        _classification_only(root, self.name)


@dataclass
class Mixed:
    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor  # per-sample weight of y_a in the label


def beta_sample(alpha: float, gen: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw from a torch generator (torch's Beta has no generator argument)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator) -> Mixed:
    """mixup (Zhang et al. 2018): one lam ~ Beta(alpha, alpha) per batch; partner j = perm(i)."""
    lam = beta_sample(alpha, gen)
    perm = torch.randperm(len(y), generator=gen).to(y.device)
    x_mix = lam * x + (1 - lam) * x[perm]
    return Mixed(x_mix, y, y[perm], torch.full((len(y),), lam, device=x.device))


def remix_labels(
    lam: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, counts: torch.Tensor, kappa: float, tau: float
) -> torch.Tensor:
    """Remix (Chou et al. 2020) label weight of y_a, given the input weight ``lam`` of x_a.

    0 if n_a / n_b >= kappa and lam < tau (x_a is the majority sample and contributes little: the label goes to
    the minority y_b); 1 if n_a / n_b <= 1/kappa and 1 - lam < tau (the symmetric case); lam otherwise.
    """
    ratio = counts[y_a].double() / counts[y_b].double()
    lam_y = lam.clone()
    lam_y[(ratio >= kappa) & (lam < tau)] = 0.0
    lam_y[(ratio <= 1.0 / kappa) & (1 - lam < tau)] = 1.0
    return lam_y


def knn_within_class(x: torch.Tensor, y: torch.Tensor, classes: list[int], k: int) -> torch.Tensor:
    """For every image of ``classes``, the indices of its k nearest same-class images (L2 on pixels).

    Returns an N x k tensor (-1 where not computed: other classes, or fewer than 2 images in the class).
    """
    nbrs = torch.full((len(y), k), -1, dtype=torch.long)
    flat = x.reshape(len(x), -1).float()
    for c in classes:
        members = torch.nonzero(y == c).flatten()
        if len(members) < 2:
            continue
        kk = min(k, len(members) - 1)
        for chunk in members.split(1024):
            d = torch.cdist(flat[chunk], flat[members])
            d[torch.arange(len(chunk)), torch.searchsorted(members, chunk)] = float("inf")  # not itself
            near = d.topk(kk, largest=False).indices
            nbrs[chunk, :kk] = members[near]
            if kk < k:  # pad by repeating the nearest ones
                nbrs[chunk, kk:] = members[near[:, torch.arange(k - kk) % kk]]
    return nbrs


class Synthesizer:
    """Builds the synthetic samples of one config for one training set."""

    def __init__(
        self,
        cfg: SynthConfig,
        train_x: torch.Tensor | None,
        train_y: torch.Tensor,
        counts: list[int],
        epochs: int | None = None,
    ) -> None:
        SYNTHS.get(cfg.name)
        self.stop_epoch = None if cfg.stop is None or epochs is None else epoch_at(cfg.stop, epochs)
        if cfg.name in ("smote", "noise") and train_x is None:
            raise ConfigError(
                f"synth={cfg.name} works on CIFAR-scale tensor data only (image files have no pixel array)"
            )
        self.cfg = cfg
        self.counts = torch.as_tensor(counts, dtype=torch.float64)
        # Probability that a sample of class c is replaced: 1 - n_c / n_max (0 for the largest class).
        self.replace_p = 1.0 - self.counts / self.counts.max()
        self.neighbours: torch.Tensor | None = None
        if cfg.name == "smote":
            minority = [c for c in range(len(counts)) if self.replace_p[c] > 0]
            self.neighbours = knn_within_class(train_x, train_y.cpu(), minority, cfg.k)

    def active(self, epoch: int) -> bool:
        return self.cfg.name != "none" and (self.stop_epoch is None or epoch < self.stop_epoch)

    @property
    def mixes(self) -> bool:
        return self.cfg.name in ("mixup", "remix")

    @property
    def replaces(self) -> bool:
        return self.cfg.name in ("smote", "noise")

    def replace(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, train_x: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SMOTE / noise replacements on a uint8 batch; returns the batch and the mask of replaced samples."""
        n = len(y)
        y_cpu = y.cpu()
        chosen = torch.rand(n, generator=gen, dtype=torch.float64) < self.replace_p[y_cpu]
        if self.cfg.name == "smote":
            assert self.neighbours is not None
            nb = self.neighbours[idx.cpu()]
            pick = nb[torch.arange(n), torch.randint(0, nb.shape[1], (n,), generator=gen)]
            chosen &= pick >= 0
            u = torch.rand(n, generator=gen).to(x.device)[:, None, None, None]
            partner = train_x[pick.clamp(min=0).to(train_x.device)].to(x.device).float()
            synth = x.float() + u * (partner - x.float())
        else:  # noise
            noise = torch.randn(x.shape, generator=gen).to(x.device) * (self.cfg.sigma * 255.0)
            synth = x.float() + noise
        synth = synth.round_().clamp_(0, 255).to(torch.uint8)
        mask = chosen.to(x.device)
        return torch.where(mask[:, None, None, None], synth, x), mask

    def mix(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Mixed:
        m = mixup(x, y, self.cfg.alpha, gen)
        if self.cfg.name == "remix":
            m.lam = remix_labels(m.lam, m.y_a, m.y_b, self.counts.to(y.device), self.cfg.kappa, self.cfg.tau)
        return m

    def describe(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "replace_p": [round(float(p), 4) for p in self.replace_p]}


for _name, _schema in [
    ("none", SynthConfig),
    ("mixup", MixupConfig),
    ("remix", RemixConfig),
    ("smote", SmoteConfig),
    ("noise", NoiseConfig),
]:
    SYNTHS.register(_name, _schema)(Synthesizer)
