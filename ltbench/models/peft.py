"""Parameter-efficient fine-tuning (PEFT) of a ViT image tower: the family LIFT compares.

Shi et al., "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts", ICML 2024; reference code shijxcs/LIFT,
``models/peft_modules.py`` (the modules, their initialisation) and ``models/peft_vit.py`` (``ViT_Tuner``: what trains
and the default sizes; ``Peft_ViT.forward``: where each module acts in a block). :func:`apply_peft` modifies an
open_clip ``VisionTransformer`` (``transformer.resblocks[i]``: ``ln_1, attn, ln_2, mlp``) or a timm
``VisionTransformer`` (``blocks[i]``: ``norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2``) in place, keeping the
libraries' own forward and parameter names (so pretrained weights still load after it):

- a module that edits a sub-module's output is its child ``peft`` and runs in a forward hook (SSF after LayerNorms and
  linear layers, LoRA on the fused q/k/v projection, the Adapter after the MLP);
- open_clip's attention is ``nn.MultiheadAttention``, whose fused ``in_proj_weight`` is no module: for LoRA and SSF
  its class becomes :class:`PeftMultiheadAttention`, the same computation written out with the q/v edit points;
- VPT inserts prompt tokens in a forward pre-hook on the block; AdaptFormer (parallel to the MLP, fed the block's
  residual stream before ``ln_2``) swaps the block's class for a subclass whose forward adds it.

Invariant: afterwards exactly the returned parameters of ``visual`` have ``requires_grad`` (the run's trainable count
adds the head, which the caller owns). Differences from LIFT: LoRA is written here rather than taken from the ``peft``
library, because both towers fuse q, k, v in one projection and ``peft`` would adapt k as well (same count, 4*d*r per
block, different function); VPT drops the previous layer's prompts by count rather than by truncating to the
pre-trained sequence length (equal results, and correct under open_clip's patch dropout).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.errors import ConfigError

KINDS = ("full", "linear", "bitfit", "ln", "vpt_shallow", "vpt_deep", "adapter", "adaptformer", "lora", "ssf")
SCOPES = ("blocks", "tower")
LAYERED = ("full", "vpt_deep", "adapter", "adaptformer", "lora", "ssf")  # kinds that ``layers`` restricts (LIFT)


@dataclass
class PeftConfig:
    """Which PEFT kind trains, and its sizes; every default is LIFT's (``utils/config.py``, ``ViT_Tuner``).

    ``kind``: full | linear (frozen tower, only the head trains) | bitfit (biases) | ln (LayerNorm affine) |
    vpt_shallow | vpt_deep | adapter | adaptformer | lora (q and v) | ssf (after ln_1/ln_2, qkv/out, fc1/fc2).
    ``scope``: for full / bitfit / ln, ``blocks`` (LIFT: only the transformer blocks' parameters) or ``tower`` (also
    the patch embedding, class and position embeddings, pre/post norms and projection).
    ``layers``: LIFT's ``partial``, the last N blocks get the module (0 = all); it restricts full, vpt_deep, adapter,
    adaptformer, lora and ssf, as in LIFT. ``vpt_len``: prompt tokens per layer (0 = LIFT's 10). ``bottleneck``:
    Adapter / AdaptFormer hidden width and ``lora_rank`` LoRA's rank (0 = LIFT's
    ``2 ** max(0, int(log2(num_classes / (2 * n_layers))))``, which needs the class count). ``lora_alpha``: LoRA
    scales by ``lora_alpha / rank`` (LIFT: 1 / rank). ``scale``: AdaptFormer's output scale, None = learnable from 1
    (LIFT), a number = fixed (the AdaptFormer paper's 0.1).
    """

    kind: str = "linear"
    scope: str = "blocks"
    layers: int = 0
    vpt_len: int = 0
    bottleneck: int = 0
    lora_rank: int = 0
    lora_alpha: float = 1.0
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"model.peft.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"model.peft.scope must be blocks or tower, got {self.scope!r}")
        for key in ("layers", "vpt_len", "bottleneck", "lora_rank"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"model.peft.{key} must be >= 0, got {getattr(self, key)}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"model.peft.lora_alpha must be > 0, got {self.lora_alpha}")


def default_bottleneck(num_classes: int, n_layers: int) -> int:
    """LIFT's adapter width (``ViT_Tuner``): 4 for CIFAR-100 with 12 blocks, 32 for ImageNet-LT, 256 for iNat."""
    return int(2 ** max(0, int(math.log2(num_classes / (n_layers * 2)))))


# ---------------------------------------------------------------------------------------------------------- modules


class VPT(nn.Module):
    """Learned prompt tokens appended after the sequence; ``drop`` = the previous layer's prompts, removed first.

    Init as LIFT's ``VPT``: uniform(+-sqrt(6 / (3 * patch_area + dim))). ``batch_first`` is the token layout.
    """

    def __init__(self, length: int, dim: int, patch_area: int, drop: int, batch_first: bool, **dd: Any) -> None:
        super().__init__()
        self.drop, self.batch_first = drop, batch_first
        self.prompt = nn.Parameter(torch.empty(length, dim, **dd))
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))
        nn.init.uniform_(self.prompt, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.drop:
            x = x[:, : x.shape[1] - self.drop]
        x = torch.cat([x, self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return x if self.batch_first else x.transpose(0, 1)


class Adapter(nn.Module):
    """LayerNorm -> down -> ReLU -> up, as LIFT's ``Adapter``; up-projection zero, so it outputs 0 at init.

    With ``scale`` (AdaptFormer) the output is multiplied by it: a learnable scalar from 1 when ``scale`` is None.
    """

    def __init__(self, dim: int, bottleneck: int, adaptformer: bool = False, scale: float | None = None, **dd: Any):
        super().__init__()
        self.ln = nn.LayerNorm(dim, **dd)
        self.down_proj = nn.Linear(dim, bottleneck, **dd)
        self.up_proj = nn.Linear(bottleneck, dim, **dd)
        nn.init.kaiming_normal_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)
        if adaptformer and scale is None:
            self.scale: nn.Parameter | torch.Tensor | None = nn.Parameter(torch.ones(1, **dd))
        elif adaptformer and scale is not None:
            self.register_buffer("scale", torch.full((1,), scale, **dd))
        else:
            self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up_proj(F.relu(self.down_proj(self.ln(x))))
        return x if self.scale is None else x * self.scale


class LoRA(nn.Module):
    """``scaling * x @ A @ B`` with B zero (no change at init), as LIFT's ``LoRA``.

    A is (in, rank) and initialised as LIFT does, ``kaiming_uniform_(a=sqrt(5))`` on that (in, rank) tensor (so its
    bound is 1/sqrt(rank), not the usual 1/sqrt(in)); ``scaling = alpha / rank`` (LIFT: alpha = 1).
    """

    def __init__(self, in_dim: int, rank: int, out_dim: int, alpha: float = 1.0, **dd: Any) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(in_dim, rank, **dd))
        self.lora_B = nn.Parameter(torch.zeros(rank, out_dim, **dd))
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (x @ self.lora_A @ self.lora_B)


class SSF(nn.Module):
    """Scale and shift of the last dimension: scale ~ N(1, 0.02), shift ~ N(0, 0.02), as LIFT's ``SSF``."""

    def __init__(self, dim: int, **dd: Any) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim, **dd))
        self.shift = nn.Parameter(torch.empty(dim, **dd))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class PostEdit(nn.Module):
    """What runs on a sub-module's output (LIFT's order): LoRA on q and v of a fused qkv, then SSF, then Adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_q: LoRA | None = None
        self.lora_v: LoRA | None = None
        self.ssf: SSF | None = None
        self.adapter: Adapter | None = None

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.lora_q is not None and self.lora_v is not None:
            q, k, v = out.chunk(3, dim=-1)
            out = torch.cat([q + self.lora_q(x), k, v + self.lora_v(x)], dim=-1)
        if self.ssf is not None:
            out = self.ssf(out)
        if self.adapter is not None:
            out = out + self.adapter(out)
        return out


def _post_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return cast(PostEdit, module.peft)(args[0], output)


def _vpt_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (cast(VPT, module.peft_vpt)(args[0]), *args[1:])


def _edit(module: nn.Module) -> PostEdit:
    """The module's :class:`PostEdit` child, created (with its forward hook) on first use."""
    edit = getattr(module, "peft", None)
    if not isinstance(edit, PostEdit):
        edit = module.peft = PostEdit()
        if not isinstance(module, PeftMultiheadAttention):  # the attention calls its in-projection edit itself
            module.register_forward_hook(_post_hook)
    return edit


class PeftMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (self-attention, open_clip's) written out so LoRA and SSF reach the fused qkv.

    Same parameters and names; ``self.peft`` edits the qkv projection and ``out_proj`` runs as a module, so its hook
    applies. Equal to the parent's forward for self-attention without padding masks (what a ViT uses).
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Any = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or key_padding_mask is not None:
            raise NotImplementedError("PEFT attention covers a ViT's self-attention without padding masks")
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # MHA: True = masked; SDPA: True = attend
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(attn_mask, float("-inf"))
        x = query if self.batch_first else query.transpose(0, 1)  # N x L x D
        n, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        edit = getattr(self, "peft", None)
        if isinstance(edit, PostEdit):
            qkv = edit(x, qkv)
        shape = (n, length, self.num_heads, dim // self.num_heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in qkv.chunk(3, -1))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


class _AdaptFormerBlock(nn.Module):
    """Mixin over open_clip's ``ResidualAttentionBlock`` / timm's ``Block``: x1 + mlp(ln_2(x1)) + adaptformer(x1).

    As LIFT's ``Peft_ViT.forward`` (the AdaptFormer branch is fed the residual stream before ``ln_2`` and added
    outside the block's layer scale, an identity in CLIP and the in21k ViT).
    """

    peft_adaptformer: Adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        m: Any = self
        if hasattr(m, "ln_1"):  # open_clip: (q_x, k_x, v_x, attn_mask)
            mask = kwargs.get("attn_mask", args[2] if len(args) > 2 else None)
            x = x + m.ls_1(m.attention(q_x=m.ln_1(x), attn_mask=mask))
            return x + m.ls_2(m.mlp(m.ln_2(x))) + self.peft_adaptformer(x)
        x = x + m.drop_path1(m.ls1(m.attn(m.norm1(x), *args, **kwargs)))
        return x + m.drop_path2(m.ls2(m.mlp(m.norm2(x)))) + self.peft_adaptformer(x)


@functools.cache
def _adaptformer_class(base: Any) -> type:
    """The block class with AdaptFormer, registered in this module so that a whole model pickles (deepcopy for EMA)."""
    name = f"AdaptFormer{base.__name__}"
    cls = type(name, (_AdaptFormerBlock, base), {"__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls


# ------------------------------------------------------------------------------------------------------------ tower


@dataclass
class _Tower:
    """The parts of a ViT that PEFT touches, whichever library built it."""

    blocks: list[nn.Module]
    dim: int
    patch_area: int
    batch_first: bool
    is_open_clip: bool


def _tower(visual: nn.Module) -> _Tower:
    v: Any = visual
    if hasattr(v, "transformer") and hasattr(v.transformer, "resblocks") and hasattr(v, "conv1"):
        kh, kw = v.conv1.kernel_size
        return _Tower(list(v.transformer.resblocks), v.conv1.out_channels, kh * kw, v.transformer.batch_first, True)
    if hasattr(v, "blocks") and hasattr(v, "patch_embed"):
        kh, kw = v.patch_embed.proj.kernel_size
        return _Tower(list(v.blocks), v.patch_embed.proj.out_channels, kh * kw, True, False)
    raise ConfigError(f"model.peft: {type(visual).__name__} is neither an open_clip nor a timm VisionTransformer")


def _parts(block: nn.Module, is_open_clip: bool) -> dict[str, nn.Module]:
    """Named sub-modules of one block: ln_1, attn (the module holding qkv), qkv/out (timm), ln_2, fc1, fc2."""
    b: Any = block
    if is_open_clip:
        return {"ln_1": b.ln_1, "attn": b.attn, "ln_2": b.ln_2, "fc1": b.mlp.c_fc, "fc2": b.mlp.c_proj}
    return {
        "ln_1": b.norm1,
        "attn": b.attn,
        "qkv": b.attn.qkv,
        "out": b.attn.proj,
        "ln_2": b.norm2,
        "fc1": b.mlp.fc1,
        "fc2": b.mlp.fc2,
    }


def _qkv_site(parts: dict[str, nn.Module], is_open_clip: bool) -> nn.Module:
    """The module whose :class:`PostEdit` sees the fused qkv projection (open_clip: the swapped attention)."""
    if not is_open_clip:
        return parts["qkv"]
    attn = parts["attn"]
    if type(attn) is nn.MultiheadAttention:
        attn.__class__ = PeftMultiheadAttention
    return attn


def _out_site(parts: dict[str, nn.Module], is_open_clip: bool) -> nn.Module:
    if not is_open_clip:
        return parts["out"]
    attn: Any = _qkv_site(parts, True)  # out_proj runs as a module only in the written-out attention
    return attn.out_proj


def _attach(block: nn.Module, t: _Tower, cfg: PeftConfig, first: bool, width: int, dd: dict[str, Any]) -> None:
    """Add the modules of ``cfg.kind`` to one block (LIFT's placement); ``first``: the first block that gets one."""
    kind, dim, parts = cfg.kind, t.dim, _parts(block, t.is_open_clip)
    if kind in ("vpt_shallow", "vpt_deep"):
        length = cfg.vpt_len or 10
        block.peft_vpt = VPT(length, dim, t.patch_area, 0 if first else length, t.batch_first, **dd)
        block.register_forward_pre_hook(_vpt_hook)
    elif kind == "adapter":
        _edit(parts["fc2"]).adapter = Adapter(dim, width, **dd)
    elif kind == "adaptformer":
        block.peft_adaptformer = Adapter(dim, width, adaptformer=True, scale=cfg.scale, **dd)
        block.__class__ = _adaptformer_class(cast(Any, type(block)))
    elif kind == "lora":
        edit = _edit(_qkv_site(parts, t.is_open_clip))
        edit.lora_q = LoRA(dim, width, dim, cfg.lora_alpha, **dd)
        edit.lora_v = LoRA(dim, width, dim, cfg.lora_alpha, **dd)
    elif kind == "ssf":
        fc1: Any = parts["fc1"]
        _edit(parts["ln_1"]).ssf = SSF(dim, **dd)
        _edit(_qkv_site(parts, t.is_open_clip)).ssf = SSF(3 * dim, **dd)
        _edit(_out_site(parts, t.is_open_clip)).ssf = SSF(dim, **dd)
        _edit(parts["ln_2"]).ssf = SSF(dim, **dd)
        _edit(fc1).ssf = SSF(fc1.out_features, **dd)
        _edit(parts["fc2"]).ssf = SSF(dim, **dd)


def _selected(visual: nn.Module, cfg: PeftConfig, blocks: list[nn.Module]) -> set[int]:
    """Ids of the existing parameters that full / bitfit / ln train (LIFT: within the blocks; ``tower``: all)."""
    owners: list[nn.Module] = [visual] if cfg.scope == "tower" else blocks
    if cfg.kind == "full":
        return {id(p) for m in owners for p in m.parameters()}
    if cfg.kind == "bitfit":
        return {id(p) for m in owners for name, p in m.named_parameters() if name.endswith("bias")}
    if cfg.kind == "ln":
        norms = [mod for m in owners for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
        return {id(p) for mod in norms for p in mod.parameters(recurse=False)}
    return set()


def apply_peft(visual: nn.Module, cfg: PeftConfig, num_classes: int | None = None) -> list[str]:
    """Attach the PEFT modules of ``cfg.kind`` to ``visual`` in place, freeze the rest, return the trainable names.

    ``num_classes`` sizes LIFT's default bottleneck / LoRA rank when ``cfg.bottleneck`` / ``cfg.lora_rank`` is 0.
    New modules take the device and dtype of the tower's first parameter and draw their initial values from torch's
    generator, like every module built at construction. Applying twice is an error.
    """
    if getattr(visual, "_ltbench_peft", None) is not None:
        raise ConfigError(f"model.peft: the tower already has PEFT kind {visual._ltbench_peft!r}")
    t = _tower(visual)
    n = len(t.blocks)
    if cfg.layers > n:
        raise ConfigError(f"model.peft.layers={cfg.layers} exceeds the tower's {n} blocks")
    start = n - cfg.layers if cfg.kind in LAYERED and cfg.layers else 0
    chosen = t.blocks[start:] if cfg.kind != "vpt_shallow" else t.blocks[:1]
    keep = _selected(visual, cfg, chosen if cfg.kind == "full" else t.blocks)
    if cfg.kind in ("adapter", "adaptformer", "lora"):
        width = cfg.lora_rank if cfg.kind == "lora" else cfg.bottleneck
        if not width and num_classes is None:
            raise ConfigError(f"model.peft: set the {cfg.kind} width, or pass num_classes for LIFT's default")
        width = width or default_bottleneck(int(num_classes or 1), n)
    else:
        width = 0
    before = {id(p) for p in visual.parameters()}
    p0 = next(visual.parameters())
    for i, block in enumerate(chosen if cfg.kind not in ("full", "bitfit", "ln", "linear") else []):
        _attach(block, t, cfg, i == 0, width, {"device": p0.device, "dtype": p0.dtype})
    keep |= {id(p) for p in visual.parameters() if id(p) not in before}
    names = []
    for name, param in visual.named_parameters():
        param.requires_grad_(id(param) in keep)
        if id(param) in keep:
            names.append(name)
    object.__setattr__(visual, "_ltbench_peft", cfg.kind)
    return names
