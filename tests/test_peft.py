"""PEFT modules (ltbench/models/peft.py) against a transcription of the LIFT reference, on tiny random ViTs.

Reference: shijxcs/LIFT, ``models/peft_modules.py`` (classes VPT, Adapter, AdaptFormer, LoRA, SSF), and
``models/peft_vit.py`` (``ViT_Tuner.__init__``: what trains and where; ``Peft_ViT.forward``: where each module acts).
The transcription below keeps the reference's computation; only its ``isinstance`` checks name open_clip's and timm's
``VisionTransformer`` (LIFT ships OpenAI's clip package, whose visual tower has the same structure as open_clip's).
"""

from __future__ import annotations

import copy
import math
import pickle
from functools import reduce
from operator import mul

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as CLIP_ViT
from timm.models.vision_transformer import VisionTransformer as ViT
from torch import nn

from ltbench.errors import ConfigError
from ltbench.models.peft import KINDS, PeftConfig, PeftMultiheadAttention, apply_peft, default_bottleneck

# ------------------------------------------------------------------ transcription of shijxcs/LIFT (reference only)


class RefVPT(nn.Module):  # models/peft_modules.py: VPT
    def __init__(self, vpt_len, seq_len, patch_size, emb_dim, dtype=None):
        super().__init__()
        self.seq_len = seq_len
        self.prompt = nn.Parameter(torch.empty(vpt_len, emb_dim, dtype=dtype))
        init_val = math.sqrt(6.0 / float(3 * reduce(mul, patch_size, 1) + emb_dim))
        nn.init.uniform_(self.prompt, -init_val, init_val)

    def forward(self, x):
        x = x[:, : self.seq_len, :]
        prompt = self.prompt.expand(x.shape[0], -1, -1)
        return torch.cat([x, prompt], dim=1)


class RefAdapter(nn.Module):  # models/peft_modules.py: Adapter (AdaptFormer: the same with a learnable scale)
    def __init__(self, in_dim, bottle_dim, dtype=None, adaptformer=False):
        super().__init__()
        self.ln = nn.LayerNorm(in_dim, dtype=dtype)
        self.down_proj = nn.Linear(in_dim, bottle_dim, dtype=dtype)
        self.relu = nn.ReLU(inplace=True)
        self.up_proj = nn.Linear(bottle_dim, in_dim, dtype=dtype)
        self.scale = nn.Parameter(torch.ones(1, dtype=dtype)) if adaptformer else None
        nn.init.kaiming_normal_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x):
        x = self.up_proj(self.relu(self.down_proj(self.ln(x))))
        return x if self.scale is None else x * self.scale


class RefLoRA(nn.Module):  # models/peft_modules.py: LoRA
    def __init__(self, in_dim, bottle_dim, dtype=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(in_dim, bottle_dim, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(bottle_dim, in_dim, dtype=dtype))
        self.scaling = 1.0 / bottle_dim
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        return self.scaling * (x @ self.lora_A @ self.lora_B)


class RefSSF(nn.Module):  # models/peft_modules.py: SSF
    def __init__(self, in_dim, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(in_dim, dtype=dtype))
        self.shift = nn.Parameter(torch.zeros(in_dim, dtype=dtype))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, x):
        return x * self.scale + self.shift


def ref_tuner(vit: nn.Module, flags: set[str], num_classes: int, partial: int | None = None) -> nn.Module:
    """models/peft_vit.py: ViT_Tuner.__init__ (vpt_len and adapter_dim left at None: the reference's defaults)."""
    if isinstance(vit, CLIP_ViT):
        n_layers, (seq_len, emb_dim) = len(vit.transformer.resblocks), vit.positional_embedding.shape
        patch_size, blocks = vit.conv1.kernel_size, vit.transformer.resblocks
        mlp_in_dim = blocks[0].mlp[0].bias.shape[0]
    else:
        n_layers, seq_len, emb_dim = len(vit.blocks), vit.pos_embed.shape[1], vit.pos_embed.shape[2]
        patch_size, blocks = vit.patch_embed.proj.kernel_size, vit.blocks
        mlp_in_dim = blocks[0].mlp.fc1.bias.shape[0]
    start, end = (0, n_layers) if partial is None else (n_layers - partial, n_layers)
    vpt_len = 10
    adapter_dim = 2 ** max(0, int(math.log2(num_classes / (n_layers * 2))))

    def per_layer(make):
        return nn.ModuleList([make() if start <= i < end else None for i in range(n_layers)])

    t = nn.Module()
    t.block_tuned = blocks[start:end] if "full_tuning" in flags else None
    t.bias_tuned = (
        nn.ParameterList([p for n, p in blocks.named_parameters() if n.endswith("bias")])
        if ("bias_tuning" in flags)
        else None
    )
    t.ln_tuned = (
        nn.ModuleList([m for m in blocks.modules() if isinstance(m, nn.LayerNorm)]) if ("ln_tuning" in flags) else None
    )
    if "vpt_shallow" in flags:
        t.vpt_list = nn.ModuleList([RefVPT(vpt_len, seq_len, patch_size, emb_dim), *[None] * (n_layers - 1)])
    elif "vpt_deep" in flags:
        t.vpt_list = per_layer(lambda: RefVPT(vpt_len, seq_len, patch_size, emb_dim))
    else:
        t.vpt_list = nn.ModuleList([None] * n_layers)
    none = lambda: None  # noqa: E731
    t.adapter_list = per_layer((lambda: RefAdapter(emb_dim, adapter_dim)) if "adapter" in flags else none)
    t.adaptformer_list = per_layer(
        (lambda: RefAdapter(emb_dim, adapter_dim, adaptformer=True)) if "adaptformer" in flags else none
    )
    t.lora_list = per_layer(
        (lambda: nn.ModuleDict({"q": RefLoRA(emb_dim, adapter_dim), "v": RefLoRA(emb_dim, adapter_dim)}))
        if "lora" in flags
        else none
    )
    t.ssf_attn_list = per_layer(
        (lambda: nn.ModuleDict({"attn_in": RefSSF(3 * emb_dim), "attn_out": RefSSF(emb_dim)}))
        if "ssf_attn" in flags
        else none
    )
    t.ssf_mlp_list = per_layer(
        (lambda: nn.ModuleDict({"mlp_in": RefSSF(mlp_in_dim), "mlp_out": RefSSF(emb_dim)}))
        if "ssf_mlp" in flags
        else none
    )
    t.ssf_ln_list = per_layer(
        (lambda: nn.ModuleDict({"ln_1": RefSSF(emb_dim), "ln_2": RefSSF(emb_dim)})) if "ssf_ln" in flags else none
    )
    return t


def ref_forward(vit: nn.Module, tuner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """models/peft_vit.py: Peft_ViT.__init__ + forward (head None: ln_post of the class token, no projection)."""
    clip = isinstance(vit, CLIP_ViT)
    if clip:
        patch, cls, pos, ln_pre, blocks, ln_post = (
            vit.conv1,
            vit.class_embedding,
            vit.positional_embedding,
            vit.ln_pre,
            vit.transformer.resblocks,
            vit.ln_post,
        )
    else:
        patch, cls, pos, ln_pre, blocks, ln_post = (
            vit.patch_embed.proj,
            vit.cls_token,
            vit.pos_embed,
            vit.norm_pre,
            vit.blocks,
            vit.norm,
        )
    x = patch(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = ln_pre(x + pos.to(x.dtype))
    _bsz, _emb_dim = x.shape[0], x.shape[2]
    for i, block in enumerate(blocks):
        vpt, adapter, adaptformer = tuner.vpt_list[i], tuner.adapter_list[i], tuner.adaptformer_list[i]
        lora, ssf_attn, ssf_mlp, ssf_ln = (
            tuner.lora_list[i],
            tuner.ssf_attn_list[i],
            tuner.ssf_mlp_list[i],
            tuner.ssf_ln_list[i],
        )
        if vpt is not None:
            x = vpt(x)
        _seq = x.shape[1]
        x = x.permute(1, 0, 2)
        if clip:
            ln_1, ln_2, attn, mlp = block.ln_1, block.ln_2, block.attn, block.mlp
            w_in, b_in, w_out, b_out = attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias
            w1, b1, act, w2, b2 = mlp[0].weight, mlp[0].bias, mlp[1], mlp[2].weight, mlp[2].bias
        else:
            ln_1, ln_2, attn, mlp = block.norm1, block.norm2, block.attn, block.mlp
            w_in, b_in, w_out, b_out = attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias
            w1, b1, act, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.act, mlp.fc2.weight, mlp.fc2.bias
        heads = attn.num_heads
        head_dim = _emb_dim // heads
        identity = x
        x = ln_1(x)
        if ssf_ln is not None:
            x = ssf_ln["ln_1"](x)
        q, k, v = F.linear(x, w_in, b_in).chunk(3, dim=-1)
        if lora is not None:
            q = q + lora["q"](x)
            v = v + lora["v"](x)
        if ssf_attn is not None:
            q, k, v = ssf_attn["attn_in"](torch.cat([q, k, v], dim=-1)).chunk(3, dim=-1)
        q, k, v = (t.contiguous().view(t.shape[0], t.shape[1] * heads, head_dim).transpose(0, 1) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v)
        x = F.linear(x.transpose(0, 1).contiguous().view(-1, _emb_dim), w_out, b_out)
        if ssf_attn is not None:
            x = ssf_attn["attn_out"](x)
        x = x.view(_seq, _bsz, _emb_dim) + identity
        identity = x
        x = ln_2(x)
        if ssf_ln is not None:
            x = ssf_ln["ln_2"](x)
        x = F.linear(x, w1, b1)
        if ssf_mlp is not None:
            x = ssf_mlp["mlp_in"](x)
        x = F.linear(act(x), w2, b2)
        if ssf_mlp is not None:
            x = ssf_mlp["mlp_out"](x)
        if adapter is not None:
            x = x + adapter(x)
        if adaptformer is not None:
            x = x + adaptformer(identity)
        x = (x + identity).permute(1, 0, 2)
    return ln_post(x[:, 0, :])


# ------------------------------------------------------------------------------------------------------- helpers

FLAGS = {
    "full": {"full_tuning"}, "linear": set(), "bitfit": {"bias_tuning"}, "ln": {"ln_tuning"},
    "vpt_shallow": {"vpt_shallow"}, "vpt_deep": {"vpt_deep"}, "adapter": {"adapter"}, "adaptformer": {"adaptformer"},
    "lora": {"lora"}, "ssf": {"ssf_attn", "ssf_mlp", "ssf_ln"},
}  # fmt: skip
NUM_CLASSES = 24  # LIFT's default width for 3 blocks: 2 ** int(log2(24 / 6)) = 4
DIM, LAYERS = 32, 3


def tiny(lib: str) -> nn.Module:
    torch.manual_seed(0)
    if lib == "open_clip":
        net: nn.Module = CLIP_ViT(image_size=16, patch_size=4, width=DIM, layers=LAYERS, heads=4, mlp_ratio=2.0,
                                  output_dim=16)  # fmt: skip
    else:
        net = ViT(img_size=16, patch_size=4, embed_dim=DIM, depth=LAYERS, num_heads=4, mlp_ratio=2.0, num_classes=0)
    for m in net.modules():  # a non-trivial affine, so that a module fed before or after a LayerNorm differs
        if isinstance(m, nn.LayerNorm):
            m.weight.data.add_(0.3 * torch.randn(m.weight.shape))
            m.bias.data.add_(0.3 * torch.randn(m.bias.shape))
    return net.eval()


def features(lib: str, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tower's own forward, brought to LIFT's output (open_clip projects ln_post(cls); LIFT does not)."""
    if lib == "timm":
        return net(x)
    proj, net.proj = net.proj, None
    try:
        return net(x)
    finally:
        net.proj = proj


def ours_vs_ref(lib: str, net: nn.Module, tuner: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, our module, reference module) for every PEFT module, block by block."""
    oc = lib == "open_clip"
    blocks = net.transformer.resblocks if oc else net.blocks
    pairs = []
    for i, b in enumerate(blocks):
        ln1, ln2, fc1, fc2 = (
            (b.ln_1, b.ln_2, b.mlp.c_fc, b.mlp.c_proj) if oc else (b.norm1, b.norm2, b.mlp.fc1, b.mlp.fc2)
        )
        qkv, out = (b.attn, b.attn.out_proj) if oc else (b.attn.qkv, b.attn.proj)
        cand = [
            ("vpt", getattr(b, "peft_vpt", None), tuner.vpt_list[i]),
            ("adapter", getattr(getattr(fc2, "peft", None), "adapter", None), tuner.adapter_list[i]),
            ("adaptformer", getattr(b, "peft_adaptformer", None), tuner.adaptformer_list[i]),
        ]
        if tuner.lora_list[i] is not None:
            cand += [
                ("lora_q", qkv.peft.lora_q, tuner.lora_list[i]["q"]),
                ("lora_v", qkv.peft.lora_v, tuner.lora_list[i]["v"]),
            ]
        if tuner.ssf_ln_list[i] is not None:
            s_attn, s_mlp, s_ln = tuner.ssf_attn_list[i], tuner.ssf_mlp_list[i], tuner.ssf_ln_list[i]
            cand += [
                ("ssf_ln1", ln1.peft.ssf, s_ln["ln_1"]),
                ("ssf_ln2", ln2.peft.ssf, s_ln["ln_2"]),
                ("ssf_in", qkv.peft.ssf, s_attn["attn_in"]),
                ("ssf_out", out.peft.ssf, s_attn["attn_out"]),
                ("ssf_fc1", fc1.peft.ssf, s_mlp["mlp_in"]),
                ("ssf_fc2", fc2.peft.ssf, s_mlp["mlp_out"]),
            ]
        for name, ours, ref in cand:
            assert (ours is None) == (ref is None), f"block {i}: {name} placed differently from LIFT"
            if ours is not None:
                pairs.append((f"{i}.{name}", ours, ref))
    return pairs


def trainable(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


LIBS = ("open_clip", "timm")
MODULE_KINDS = [("vpt_shallow", 0), ("vpt_deep", 0), ("vpt_deep", 2), ("adapter", 0), ("adaptformer", 0),
                ("lora", 0), ("lora", 1), ("ssf", 0), ("ssf", 2)]  # fmt: skip


# --------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind,layers", MODULE_KINDS)
def test_modules_match_lift_values_and_gradients(lib: str, kind: str, layers: int) -> None:
    net = tiny(lib)
    ref_net = copy.deepcopy(net)
    names = apply_peft(net, PeftConfig(kind=kind, layers=layers), num_classes=NUM_CLASSES)
    tuner = ref_tuner(ref_net, FLAGS[kind], NUM_CLASSES, partial=layers or None)
    gen = torch.Generator().manual_seed(1)
    for p in trainable(net):  # move off the zero init so that every path carries signal
        p.data.add_(0.3 * torch.randn(p.shape, generator=gen))
    pairs = ours_vs_ref(lib, net, tuner)
    for _, ours, ref in pairs:
        ref.load_state_dict(ours.state_dict())
    assert sum(p.numel() for p in trainable(net)) == sum(p.numel() for p in tuner.parameters())
    assert len(names) == len(list(tuner.parameters()))
    x = torch.randn(3, 3, 16, 16, generator=gen)
    weight = torch.randn(3, DIM, generator=gen)
    got, want = features(lib, net, x), ref_forward(ref_net, tuner, x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    (got * weight).sum().backward()
    (want * weight).sum().backward()
    for name, ours, ref in pairs:
        for (pname, p), q in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-4, msg=f"{name}.{pname}")


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["full", "bitfit", "ln", "linear"])
def test_existing_parameter_kinds_train_lifts_set(lib: str, kind: str) -> None:
    net = tiny(lib)
    ref_net = copy.deepcopy(net)
    names = apply_peft(net, PeftConfig(kind=kind))
    tuner = ref_tuner(ref_net, FLAGS[kind], NUM_CLASSES)
    by_id = {id(p): n for n, p in ref_net.named_parameters()}
    want = {by_id[id(p)] for p in tuner.parameters()}
    assert set(names) == want
    assert names == [n for n, p in net.named_parameters() if p.requires_grad]
    per_block = {"full": 8544, "bitfit": 288, "ln": 128, "linear": 0}  # width 32, MLP 64: see the sum below
    assert sum(p.numel() for p in trainable(net)) == LAYERS * per_block[kind]


@pytest.mark.parametrize("lib", LIBS)
def test_tower_scope_and_partial_full(lib: str) -> None:
    net = tiny(lib)
    assert apply_peft(net, PeftConfig(kind="full", scope="tower")) == [n for n, _ in net.named_parameters()]
    net = tiny(lib)
    names = apply_peft(net, PeftConfig(kind="full", layers=1))
    prefix = "transformer.resblocks.2." if lib == "open_clip" else "blocks.2."
    assert names and all(n.startswith(prefix) for n in names)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["adapter", "adaptformer", "lora", "linear", "bitfit"])
def test_zero_initialised_modules_leave_output_unchanged(lib: str, kind: str) -> None:
    net = tiny(lib)
    x = torch.randn(2, 3, 16, 16)
    before = net(x)
    apply_peft(net, PeftConfig(kind=kind), num_classes=NUM_CLASSES)
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    for p in trainable(net):  # random: a constant shift of every feature is what LayerNorm removes
        p.data.add_(0.5 * torch.randn(p.shape))
    if kind != "linear":
        assert not torch.allclose(net(x), before, atol=1e-3)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["vpt_deep", "vpt_shallow"])
def test_vpt_prompts_per_layer(lib: str, kind: str) -> None:
    net = tiny(lib)
    apply_peft(net, PeftConfig(kind=kind, vpt_len=5))
    blocks = net.transformer.resblocks if lib == "open_clip" else net.blocks
    seen: list[torch.Tensor] = []
    for b in blocks:  # registered after ours: sees the block's input once the prompts are in
        b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    net(torch.randn(2, 3, 16, 16))
    seq = 1 + (16 // 4) ** 2
    for i, (b, x) in enumerate(zip(blocks, seen)):
        assert x.shape[1] == seq + 5  # the previous layer's prompts replaced, never stacked
        if kind == "vpt_deep" or i == 0:
            torch.testing.assert_close(x[0, seq:], b.peft_vpt.prompt.detach())
        else:
            assert not hasattr(b, "peft_vpt")


@pytest.mark.parametrize("lib", LIBS)
def test_checkpoint_round_trip_and_grad_checkpointing(lib: str) -> None:
    cfg = PeftConfig(kind="adaptformer", scale=0.1)
    net, fresh = tiny(lib), tiny(lib)
    apply_peft(net, cfg, num_classes=NUM_CLASSES)
    for p in trainable(net):
        p.data.add_(0.2)
    apply_peft(fresh, cfg, num_classes=NUM_CLASSES)
    fresh.load_state_dict(net.state_dict())  # the state dict carries the PEFT modules (and the fixed scale buffer)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh(x), net(x))
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):  # an EMA copy; a pickled model
        torch.testing.assert_close(twin(x), net(x))
    fresh.train()
    fresh.set_grad_checkpointing(True)
    net.train()
    fresh(x).sum().backward()
    net(x).sum().backward()
    for p, q in zip(trainable(net), trainable(fresh)):
        torch.testing.assert_close(p.grad, q.grad)
    assert len(trainable(net)) == LAYERS * 6  # ln (2), down (2), up (2); the fixed scale is a buffer


def test_default_bottleneck_is_lifts() -> None:
    lift = lambda c, n: 2 ** max(0, int(math.log2(c / (n * 2))))  # noqa: E731  (ViT_Tuner.__init__)
    for classes, want in ((100, 4), (1000, 32), (365, 8), (8142, 256), (10, 1)):
        assert default_bottleneck(classes, 12) == lift(classes, 12) == want


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"peft\.kind"):
        PeftConfig(kind="prefix")
    with pytest.raises(ConfigError, match="scope"):
        PeftConfig(scope="all")
    with pytest.raises(ConfigError, match="num_classes"):
        apply_peft(tiny("timm"), PeftConfig(kind="lora"))
    with pytest.raises(ConfigError, match="layers"):
        apply_peft(tiny("timm"), PeftConfig(kind="lora", lora_rank=2, layers=4))
    net = tiny("timm")
    apply_peft(net, PeftConfig(kind="bitfit"))
    with pytest.raises(ConfigError, match="already"):
        apply_peft(net, PeftConfig(kind="ln"))
    with pytest.raises(ConfigError, match="neither"):
        apply_peft(nn.Linear(2, 2), PeftConfig(kind="full"))
    assert set(KINDS) == set(FLAGS)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_written_out_attention_equals_torchs(batch_first: bool, mask: str | None) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16)
    length = x.shape[1] if batch_first else x.shape[0]
    attn_mask = None if mask is None else torch.randn(length, length)
    if mask == "bool":
        attn_mask = (torch.rand(length, length) > 0.6).fill_diagonal_(False)  # True = masked, as torch's MHA
    want = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
    mha.__class__ = PeftMultiheadAttention
    torch.testing.assert_close(mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0], want)
    with pytest.raises(NotImplementedError):
        mha(x, x.clone(), x)
