"""Pre-trained foundation backbones: CLIP image (and text) towers through open_clip_torch, ViTs through timm.

Models ``clip_vit_b16`` (open_clip ``ViT-B-16``), ``clip_vit_l14`` (``ViT-L-14``) and ``vit_b16`` (timm
``vit_base_patch16_224``), the backbones of LIFT (Shi et al., "Long-Tail Learning with Foundation Model: Heavy
Fine-Tuning Hurts", ICML 2024; code shijxcs/LIFT, ``trainer.py`` ``load_clip_to_cpu`` / ``load_vit_to_cpu``).

Weights (``model.pretrained``): ``none`` (random initialisation: what the tests use), a tag of the library
(open_clip: ``openai``, ``laion2b_s34b_b88k``...; timm: ``augreg_in21k``, ``augreg2_in21k_ft_in1k``...), resolved to a
local file through the library's own cache (offline: it must be there already), or a path to a local file (an
open_clip checkpoint, a timm ``.safetensors`` / ``.pth`` / ``.npz``). ``model.pretrained_tag`` says which tag a local
file holds (its preprocessing and, for OpenAI CLIP weights, QuickGELU). Invariant: the file that was loaded is the
file that is hashed; :attr:`FoundationNet.weights` (``{tag, sha256, arch, file}``) goes into metrics.json as
``model_weights``.

Preprocessing. The feed hands over images normalised with the dataset's mean/std at their stored size (CIFAR: 32 x
32). :meth:`FoundationNet.prepare` maps them, batched on their device, to what the backbone was trained on: the
per-channel affine map to the backbone's mean/std (exact: normalisation is affine) and a resize to the backbone's
resolution with its own interpolation (bicubic for CLIP and the ViTs; short side to the resolution, then a centre
crop, open_clip's ``resize_mode=shortest``). LIFT resizes PIL images (uint8, clamped to [0, 255]); here the resize
runs on normalised floats, so bicubic overshoot is not clamped.

Memory: ``model.grad_checkpoint`` recomputes each block in the backward (the library's own checkpointing); a tower
with no trainable parameter runs under ``torch.no_grad``; the text tower is never trained, lives outside the module
tree (not in checkpoints) and runs under ``no_grad``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.config import runtime
from ltbench.errors import ConfigError
from ltbench.models import MODELS, NetConfig
from ltbench.models.heads import build_head
from ltbench.models.peft import PeftConfig, apply_peft

log = logging.getLogger("ltbench")

LIBRARIES = ("open_clip", "timm")
HEAD_INITS = ("random", "text")
FEATURES = ("proj", "pre_proj")  # CLIP: the head reads the projected embedding, or the tower's width before it (LIFT)


@dataclass
class FoundationConfig(NetConfig):
    """A pre-trained backbone with an ltbench head.

    ``arch``: the open_clip model name (or a path to an open_clip model-config JSON, registered under its file stem)
    or the timm model name; ``arch_kwargs``: more keyword arguments of the timm model (``img_size``, ``depth``...).
    ``pretrained``: ``none`` | a tag | a local file; ``pretrained_tag``: the tag a local file holds.
    ``head_init``: ``random`` | ``text`` (CLIP only: the class-name prompt features of ``templates``);
    ``head_scale``: logits multiplied by it (LIFT's cosine classifier: 25). ``feature`` (CLIP): ``proj``, the head
    reads the projected image embedding (the text features' space: a text-initialised head is CLIP's zero-shot
    classifier), or ``pre_proj``, the class token after ``ln_post`` (the tower's width, 768 for ViT-B/16), as LIFT's
    classifier does, a text-initialised head then starting from ``normalize(text @ proj.T)`` (LIFT trainer.py
    ``init_head_text_feat``): the same numerator, other norms. ``grad_checkpoint``: activation
    checkpointing of the tower's blocks (same numbers, less memory). ``cache_dir``: the libraries' download cache.
    """

    library = "open_clip"  # declared by each option's schema

    name: str = "clip_vit_b16"
    head: str = "cosine"
    arch: str = "ViT-B-16"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str = "none"
    pretrained_tag: str | None = None
    peft: PeftConfig = field(default_factory=PeftConfig)
    head_init: str = "random"
    feature: str = "proj"
    head_scale: float = 1.0
    templates: str = "default"
    grad_checkpoint: bool = runtime(False)
    cache_dir: str | None = runtime(None)

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ConfigError(f"model.feature must be one of {', '.join(FEATURES)}, got {self.feature!r}")
        if self.feature == "pre_proj" and self.library != "open_clip":
            raise ConfigError(f"model.feature=pre_proj drops CLIP's image projection; model={self.name} has none")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"model.head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.head_init == "text" and self.library != "open_clip":
            raise ConfigError(f"model.head_init=text needs a CLIP text tower; model={self.name} has none")
        if not self.head_scale > 0:
            raise ConfigError(f"model.head_scale must be > 0, got {self.head_scale}")
        if self.pretrained_tag is not None and not _is_file_spec(self.pretrained):
            raise ConfigError("model.pretrained_tag names what a local weights file holds: model.pretrained is a tag")
        if _is_file_spec(self.pretrained) and not Path(self.pretrained).expanduser().is_file():
            raise ConfigError(f"model.pretrained={self.pretrained}: no such weights file")

    def check(self, root: Any) -> None:
        """The library installed, the head, and a weights tag the library knows for ``arch`` (at compose time,
        before any download)."""
        import importlib.util

        module = "open_clip" if self.library == "open_clip" else "timm"
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"model={self.name} needs {module}: pip install 'ltbench[foundation]'")
        super().check(root)
        tags = [t for t in (self.pretrained, self.pretrained_tag) if t and t != "none" and not _is_file_spec(t)]
        for tag in tags:
            known = known_tags(self.library, self.arch)
            if tag not in known:
                raise ConfigError(f"model.pretrained={tag}: not a {self.library} tag of {self.arch} "
                                  f"(tags: {', '.join(known) or 'none'}) nor a weights file")  # fmt: skip


def known_tags(library: str, arch: str) -> list[str]:
    """The weight tags ``library`` lists for ``arch`` (a model-config JSON path has none)."""
    if arch.endswith(".json"):
        return []
    if library == "open_clip":
        import open_clip

        return list(open_clip.list_pretrained_tags_by_model(arch))
    import timm

    return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*") if "." in n]


@dataclass
class TimmConfig(FoundationConfig):
    library = "timm"

    name: str = "vit_b16"
    arch: str = "vit_base_patch16_224"


def _is_file_spec(spec: str) -> bool:
    """A local file is meant when the value looks like a path (a separator or a weights-file suffix)."""
    return os.sep in spec or "/" in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ClipText:
    """The frozen CLIP text tower (not an ``nn.Module`` attribute of the network: never trained, never in a
    checkpoint). ``encode(texts)`` -> N x D text embeddings (not normalised), computed under ``no_grad`` on the
    device of the image tower it is asked for."""

    def __init__(self, clip: nn.Module, tokenizer: Any) -> None:
        self.clip, self.tokenizer = clip, tokenizer
        for p in clip.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def encode(self, texts: list[str], device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
        self.clip.to(device).eval()
        out = [self.clip.encode_text(self.tokenizer(texts[i : i + batch_size]).to(device))  # type: ignore[operator]
               for i in range(0, len(texts), batch_size)]  # fmt: skip
        return torch.cat(out).float()


class FoundationNet(nn.Module):
    """A pre-trained image tower ``visual`` with an ltbench ``head``: ``features(x)`` -> N x ``feature_dim`` (CLIP:
    the projected image embedding, the space of the text features), ``forward(x) = head_scale * head(features(x))``.

    Invariants: ``features`` accepts images of any size normalised with ``in_mean``/``in_std`` (the dataset's) and
    gives the backbone ``image_size`` x ``image_size`` inputs normalised with ``mean``/``std`` (the backbone's); the
    tower runs under ``no_grad`` whenever none of its parameters requires a gradient.
    """

    def __init__(self, visual: nn.Module, feature_dim: int, out_dim: int, head: str, prep: dict[str, Any],
                 in_stats: tuple[Any, Any], head_scale: float = 1.0, text: ClipText | None = None) -> None:  # fmt: skip
        super().__init__()
        self.visual, self.feature_dim, self.text = visual, feature_dim, text
        self.head = build_head(head, feature_dim, out_dim)
        self.head_scale = float(head_scale)
        self.image_size = int(prep["image_size"])
        self.interpolation = str(prep["interpolation"])
        self.mean, self.std = tuple(map(float, prep["mean"])), tuple(map(float, prep["std"]))
        in_mean, in_std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in in_stats)
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (self.mean, self.std))
        # x_backbone = (x01 - mean) / std with x01 = x * in_std + in_mean: one per-channel affine map
        self.register_buffer("_scale", in_std / std, persistent=False)
        self.register_buffer("_shift", (in_mean - mean) / std, persistent=False)
        self.weights: dict[str, Any] = {}
        self.trainable_tower: list[str] = []

    def preprocess(self) -> dict[str, Any]:
        """The backbone's input contract, as recorded with the run."""
        return {"image_size": self.image_size, "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std)}  # fmt: skip

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Dataset-normalised images (any size) -> backbone-normalised ``image_size`` x ``image_size``, batched."""
        scale, shift = self._scale, self._shift
        assert isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)
        x = x.float() * scale + shift
        return resize_square(x, self.image_size, self.interpolation)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.visual.parameters()):
            with torch.no_grad():
                return self.visual(x)
        return self.visual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        return out * self.head_scale if self.head_scale != 1.0 else out


def resize_square(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize a float NCHW batch so its short side is ``size`` (``mode``: bicubic | bilinear | nearest; with the
    antialiased kernels, which are PIL's: what torchvision's Resize does to the PIL images of open_clip and timm),
    then centre-crop ``size`` x ``size`` (torchvision CenterCrop: offsets ``round((h - size) / 2)``). A batch
    already of that size is returned as it is."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if h <= w else (new_long, size)
    if (h, w) != new:  # antialias=True: torch's PIL-matching kernels (bicubic a = -0.5), up- and downsampling
        align = None if mode == "nearest" else False
        x = F.interpolate(x, size=new, mode=mode, align_corners=align, antialias=mode != "nearest")
    top, left = round((new[0] - size) / 2.0), round((new[1] - size) / 2.0)
    return x[..., top : top + size, left : left + size]


# ------------------------------------------------------------------------------------------ loading the weights


def _weights_file(cfg: FoundationConfig) -> tuple[str | None, str]:
    """(the local file to load or None for random weights, the tag recorded)."""
    spec = cfg.pretrained
    if spec == "none":
        return None, "none"
    if _is_file_spec(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained={spec}: no such weights file")
        return str(path), cfg.pretrained_tag or "file"
    return (_open_clip_file(cfg, spec) if cfg.library == "open_clip" else _timm_file(cfg, spec)), spec


def _offline(what: str, e: Exception) -> ConfigError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"{what} could not be fetched ({msg}): download it where there is a network and pass "
                       "model.pretrained=/path/to/the/file (with model.pretrained_tag=<its tag>)")  # fmt: skip


def _open_clip_file(cfg: FoundationConfig, tag: str) -> str:
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(cfg.arch, tag)
    if not pcfg:
        tags = ", ".join(known_tags("open_clip", cfg.arch)) or "none"
        raise ConfigError(f"model.pretrained={tag}: not an open_clip tag of {cfg.arch} (tags: {tags}) nor a file")
    try:
        return str(open_clip.pretrained.download_pretrained(pcfg, cache_dir=cfg.cache_dir))
    except Exception as e:
        raise _offline(f"the open_clip weights {cfg.arch}/{tag}", e) from e


def _timm_file(cfg: FoundationConfig, tag: str) -> str:
    import timm

    name = f"{cfg.arch}.{tag}"
    if tag not in known_tags("timm", cfg.arch):
        tags = ", ".join(known_tags("timm", cfg.arch)) or "none"
        raise ConfigError(f"model.pretrained={tag}: not a timm tag of {cfg.arch} (tags: {tags}) nor a file")
    pcfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(pcfg, "hf_hub_id", None)
    try:
        from huggingface_hub import hf_hub_download

        if not hub:
            raise RuntimeError("no Hugging Face hub copy is listed")
        try:
            return hf_hub_download(hub, "model.safetensors", cache_dir=cfg.cache_dir)
        except Exception:
            return hf_hub_download(hub, "pytorch_model.bin", cache_dir=cfg.cache_dir)
    except Exception as e:
        raise _offline(f"the timm weights {name}", e) from e


def _build_open_clip(cfg: FoundationConfig, path: str | None) -> tuple[nn.Module, dict[str, Any]]:
    import open_clip

    arch = _register_arch(cfg.arch)
    tag = cfg.pretrained if path is None or not _is_file_spec(cfg.pretrained) else cfg.pretrained_tag
    pcfg = open_clip.get_pretrained_cfg(arch, tag) if tag and tag != "none" else {}
    try:
        clip = open_clip.create_model(arch, pretrained=path, force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
                                      force_preprocess_cfg={k: pcfg[k] for k in ("mean", "std", "interpolation")
                                                            if k in pcfg} or None)  # fmt: skip
    except RuntimeError as e:
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise ConfigError(f"model.pretrained={cfg.pretrained} does not fit {arch}: {first}") from e
    pre = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    size = clip.visual.image_size
    prep = {"image_size": size[0] if isinstance(size, (tuple, list)) else size,
            "mean": pre.get("mean", open_clip.OPENAI_DATASET_MEAN), "std": pre.get("std", open_clip.OPENAI_DATASET_STD),
            "interpolation": pre.get("interpolation", "bicubic")}  # fmt: skip
    return clip, prep


def _register_arch(arch: str) -> str:
    """An open_clip model name; a path to a model-config JSON is registered under its file stem first."""
    if arch.endswith(".json"):
        import open_clip

        path = Path(arch).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.arch={arch}: no such open_clip model config")
        open_clip.add_model_config(path)
        return path.stem
    return arch


def _build_timm(cfg: FoundationConfig, path: str | None) -> tuple[nn.Module, dict[str, Any]]:
    import timm

    try:
        net = timm.create_model(cfg.arch, pretrained=False, num_classes=0, **dict(cfg.arch_kwargs))
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"model.arch={cfg.arch}: {str(e).splitlines()[0]}") from e
    if path is not None:
        _load_timm(net, path)
    data_cfg = timm.data.resolve_data_config({}, model=net)
    tag = cfg.pretrained_tag if path is not None and _is_file_spec(cfg.pretrained) else cfg.pretrained
    if tag and tag not in ("none", "file"):  # a tag's own preprocessing (in21k: mean/std 0.5)
        known = timm.list_pretrained(f"{cfg.arch}.{tag}")
        if known:
            pcfg = timm.models.get_pretrained_cfg(known[0])
            pc = pcfg.to_dict() if pcfg is not None else {}
            data_cfg.update({k: pc[k] for k in ("mean", "std", "interpolation") if pc.get(k) is not None})
    embed = getattr(net, "patch_embed", None)  # the built model's own input size (arch_kwargs may change it)
    size = embed.img_size[-1] if embed is not None and getattr(embed, "img_size", None) else data_cfg["input_size"][-1]
    prep = {"image_size": int(size), "mean": data_cfg["mean"], "std": data_cfg["std"],
            "interpolation": data_cfg.get("interpolation", "bicubic")}  # fmt: skip
    return net, prep


def _load_timm(net: nn.Module, path: str) -> None:
    """A timm checkpoint into ``net`` (no classifier): ``.npz`` through timm's JAX loader, anything else through
    timm's state-dict reader and the ViT checkpoint filter; missing or unexpected keys are an error."""
    from timm.models import load_state_dict

    if path.endswith(".npz"):
        net.load_pretrained(path)  # type: ignore[operator]
        return
    state = load_state_dict(path)
    try:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, net)  # type: ignore[arg-type]
    except Exception:  # not a ViT checkpoint layout: load as it is
        pass
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"model.pretrained={path} does not fit the model: missing {list(missing)[:4]}, "
                          f"unexpected {list(unexpected)[:4]}")  # fmt: skip


def build_foundation(cfg: FoundationConfig, out_dim: int, data: Any = None) -> FoundationNet:
    """The backbone of ``cfg`` with its weights, PEFT modules, head (text-initialised on request) and record."""
    if data is None or getattr(data, "mean", None) is None:
        raise ConfigError(f"model={cfg.name} reads normalised images with the dataset's mean/std")
    path, tag = _weights_file(cfg)
    text: ClipText | None = None
    proj: torch.Tensor | None = None
    if cfg.library == "open_clip":
        import open_clip

        clip, prep = _build_open_clip(cfg, path)
        visual: Any = clip.visual
        dim = int(visual.output_dim)
        if cfg.feature == "pre_proj":  # LIFT: the features before the projection, which is kept for the text init
            proj = visual.proj.detach().clone()  # width x joint dim
            visual.proj = None
            dim = int(proj.shape[0])
        clip.visual = nn.Identity()  # the text side keeps no second reference to the trained tower
        text = ClipText(clip, open_clip.get_tokenizer(_register_arch(cfg.arch)))
    else:
        visual, prep = _build_timm(cfg, path)
        dim = int(visual.num_features)  # type: ignore[arg-type]
    if cfg.grad_checkpoint:
        visual.set_grad_checkpointing(True)
    net = FoundationNet(visual, dim, out_dim, cfg.head, prep, (data.mean, data.std), cfg.head_scale, text)
    if proj is not None:
        net.register_buffer("text_to_feature", proj.t().contiguous(), persistent=False)  # joint dim -> width
    net.trainable_tower = apply_peft(net.visual, cfg.peft, num_classes=out_dim)
    arch = cfg.arch if not cfg.arch.endswith(".json") else Path(cfg.arch).stem
    net.weights = {"library": cfg.library, "arch": arch, "tag": tag, "file": path,
                   "sha256": sha256_file(path) if path else None}  # fmt: skip
    if cfg.head_init == "text":
        init_head_from_text(net, cfg, data)
    return net


def init_head_from_text(net: FoundationNet, cfg: FoundationConfig, data: Any) -> None:
    """Head weights = the L2-normalised prompt-ensemble text features of the class names (LIFT ``init_head_text_feat``;
    :func:`ltbench.models.text_head.text_weights`); a linear head's bias starts at 0."""
    from ltbench.models.classnames import class_names
    from ltbench.models.text_head import TEMPLATES, text_weights

    if cfg.templates not in TEMPLATES:
        raise ConfigError(f"model.templates={cfg.templates!r}; choose one of {', '.join(TEMPLATES)}")
    names = class_names(getattr(data, "dataset_cfg", None), data)
    w = text_weights(net, names, TEMPLATES[cfg.templates]).float()  # C x D (the joint space, L2-normalised)
    to_feature = getattr(net, "text_to_feature", None)
    if isinstance(to_feature, torch.Tensor):  # feature=pre_proj: into the tower's space, as LIFT
        w = F.normalize(w @ to_feature.to(w), dim=-1)
    head = net.head
    with torch.no_grad():
        if isinstance(head, nn.Linear):
            head.weight.copy_(w)
            if head.bias is not None:
                head.bias.zero_()
        else:  # CosineHead: D x C
            head.weight.copy_(w.t())  # type: ignore[operator]


MODELS.register("clip_vit_b16", FoundationConfig)(build_foundation)
MODELS.register("clip_vit_l14", FoundationConfig)(build_foundation)
MODELS.register("vit_b16", TimmConfig)(build_foundation)
