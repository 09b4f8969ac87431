"""CLIP text features of class-name prompts: the zero-shot classifier and LIFT's head initialisation.

LIFT (Shi et al., "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts", ICML 2024; shijxcs/LIFT
``trainer.py`` ``init_head_text_feat``): each prompt ``template.format(name.replace("_", " "))`` is encoded by the
frozen text tower and L2-normalised; an ensemble averages the normalised features over the templates. The head is a
``CosineClassifier`` (``models/classifiers.py``: cos(x, w_c) * scale, scale 25 in ``utils/config.py``) whose rows are
these features, trained with the logit-adjusted loss (``utils/losses.py`` ``LogitAdjustedLoss``: tau 1, log of the
class prior; ltbench ``loss=logit_adjust`` with ``tau: 1.0`` is the same loss). Zero-shot CLIP
(``models/models.py`` ``ZeroShotCLIP``) uses the single template ``a photo of a {}.``, and so does LIFT's main
recipe (``_C.prompt = "default"``); the 80-prompt ensemble is its Table 13 ablation (``prompt ensemble``).

Invariant: :func:`text_weights` returns C x D rows of unit norm, in label order, a function of (text-tower weights,
names, templates) only; the on-disk cache is keyed by exactly those, so a changed name list or template set never
reuses a stale entry.

Difference from LIFT: LIFT's CLIP-ViT head lives before the image projection (its weights are the text features
times ``proj.T``); ltbench's head reads the projected image embedding, the space of the text features, so at
initialisation its logits are the CLIP zero-shot cosines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

log = logging.getLogger("ltbench")


@cache
def _openai_imagenet() -> list[str]:
    """CLIP's 80 ImageNet prompts (open_clip ``OPENAI_IMAGENET_TEMPLATES``): LIFT's ``ZEROSHOT_TEMPLATES['imagenet']``,
    the same 80 strings in the same order (checked at shijxcs/LIFT 661ead9b)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


class _Templates(Mapping[str, list[str]]):
    """The prompt sets by name; the CLIP ensemble is read from open_clip on first use (importing open_clip takes
    seconds, and every ltbench start imports this module)."""

    # CLIP / LIFT default (and zero-shot), LIFT prompt=classname
    _fixed: ClassVar[dict[str, list[str]]] = {"default": ["a photo of a {}."], "classname": ["{}"]}

    def __getitem__(self, key: str) -> list[str]:
        if key == "ensemble":  # LIFT prompt=ensemble
            return list(_openai_imagenet())
        return list(self._fixed[key])

    def __iter__(self) -> Iterator[str]:
        return iter([*self._fixed, "ensemble"])

    def __len__(self) -> int:
        return len(self._fixed) + 1


TEMPLATES: Mapping[str, list[str]] = _Templates()


def prompts_for(names: list[str], template: str) -> list[str]:
    return [template.format(n.replace("_", " ")) for n in names]


def tower_digest(net: Any) -> str | None:
    """What identifies the text tower: its architecture and the sha256 of the weights file loaded (None for random
    weights, which are never cached: they differ from run to run)."""
    weights = getattr(net, "weights", None) or {}
    return f"{weights.get('arch', '')}:{weights['sha256']}" if weights.get("sha256") else None


def cache_key(digest: str, names: list[str], templates: list[str]) -> str:
    blob = json.dumps({"tower": digest, "names": list(names), "templates": list(templates)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_text_cache() -> Path:
    """``$LTBENCH_CACHE/text_features`` (else the XDG / home cache of :func:`ltbench.data.cache.default_cache_dir`)."""
    from ltbench.data.cache import default_cache_dir

    return default_cache_dir() / "text_features"


def encode_names(net: Any, names: list[str], templates: list[str], device: Any = None) -> torch.Tensor:
    """C x D: per template the L2-normalised text features, averaged over the templates, L2-normalised."""
    if getattr(net, "text", None) is None:
        from ltbench.errors import ConfigError

        raise ConfigError("a text head needs a CLIP model (its text tower); this model has none")
    if device is None:
        device = next(net.parameters()).device
    feats = [F.normalize(net.text.encode(prompts_for(names, t), device=device).float(), dim=-1) for t in templates]
    return F.normalize(torch.stack(feats).mean(dim=0), dim=-1)


def text_weights(net: Any, names: list[str], templates: list[str], cache_dir: str | Path | None = None,
                 use_cache: bool = True) -> torch.Tensor:  # fmt: skip
    """The C x D unit-norm text classifier of ``names`` (:func:`encode_names`), computed once and cached on disk
    under ``cache_dir`` (default :func:`default_text_cache`), keyed by (weights sha256, names, templates); a model
    with random weights (no weights file) is encoded every time."""
    digest = tower_digest(net)
    if not use_cache or digest is None:
        return encode_names(net, names, templates)
    key = cache_key(digest, names, templates)
    path = Path(cache_dir) if cache_dir is not None else default_text_cache()
    f = path / f"{key}.pt"
    if f.is_file():
        try:
            w = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(w, torch.Tensor) and w.shape[0] == len(names):
                log.info("text features reused from %s", f)
                return w
        except Exception:  # a broken entry is recomputed
            pass
    w = encode_names(net, names, templates).cpu()
    path.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    torch.save(w, tmp)
    os.replace(tmp, f)
    return w


def zero_shot_logits(features: torch.Tensor, weights: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """CLIP zero-shot logits: ``scale`` * cos(image feature, class text feature) (OpenAI CLIP's logit scale is
    exp(4.6052) = 100; argmax, hence accuracy, does not depend on it)."""
    return scale * F.normalize(features.float(), dim=-1) @ F.normalize(weights.float(), dim=-1).t()
