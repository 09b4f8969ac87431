"""Foundation backbones (ltbench.models.foundation), gradient accumulation, and test-time ensembling.

Tiny random-weight models only (an open_clip model config written here, timm ``vit_tiny_patch16_224`` at 32 px with
one block); weight files are written by the tests in each library's own format.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_cifar
from torch import nn

from ltbench.config import ScheduleConfig
from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.fit import TestTimeEnsemble, Trainer, fit
from ltbench.methods import Method
from ltbench.models.foundation import FoundationConfig, TimmConfig, build_foundation
from ltbench.models.peft import PeftConfig
from ltbench.optim import build_optimizer, model_groups
from ltbench.registry import load_components
from ltbench.tasks.classification import Classification, ClassificationConfig

load_components()

TIMM_KW = {"img_size": 32, "depth": 1}
DATA = SimpleNamespace(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))  # a dataset's normalisation


@pytest.fixture(scope="module")
def compose_cfg():
    """The train config without experiment=smoke (whose ResNet sizes a foundation model does not have)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=["progress=false", "device=cpu", *o])


@pytest.fixture(scope="module")
def clip_file(tiny_clip_arch, tmp_path_factory):
    """A random tiny CLIP saved as open_clip saves checkpoints (its state dict), and the model itself."""
    import open_clip

    from ltbench.models.foundation import _register_arch

    torch.manual_seed(1)
    clip = open_clip.create_model(_register_arch(tiny_clip_arch))
    path = tmp_path_factory.mktemp("weights") / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    return path, clip


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_open_clip_file_loads_exactly_and_records_its_sha256(tiny_clip_arch, clip_file):
    import open_clip

    path, clip = clip_file
    cfg = FoundationConfig(arch=tiny_clip_arch, pretrained=str(path), pretrained_tag="openai")
    net = build_foundation(cfg, 10, DATA)
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(net.visual.state_dict()[k], v), k
    assert net.weights == {"library": "open_clip", "arch": "ltbench_tiny_clip", "tag": "openai", "file": str(path),
                           "sha256": _sha(path)}  # fmt: skip
    # the tag's preprocessing: OpenAI mean/std, bicubic; the resolution is the tower's
    assert net.preprocess()["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    assert (net.image_size, net.feature_dim, net.interpolation) == (32, 16, "bicubic")
    # the text tower: the file's, frozen, outside the module tree (not in checkpoints)
    texts = ["a photo of a cat.", "a photo of a dog."]
    tok = open_clip.get_tokenizer("ltbench_tiny_clip")(texts)
    with torch.no_grad():
        want = clip.encode_text(tok)
    assert torch.allclose(net.text.encode(texts), want, atol=1e-6)
    assert not any(k.startswith(("transformer.", "token_embedding")) for k in net.state_dict())


def test_local_timm_file_loads_exactly_without_its_classifier(tmp_path):
    import timm

    torch.manual_seed(2)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=7, **TIMM_KW)  # a checkpoint with a head
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    net = build_foundation(TimmConfig(arch="vit_tiny_patch16_224", arch_kwargs=TIMM_KW, pretrained=str(path),
                                      pretrained_tag="augreg_in21k"), 5, DATA)  # fmt: skip
    for k, v in net.visual.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert net.weights["sha256"] == _sha(path) and net.weights["tag"] == "augreg_in21k"
    assert net.preprocess()["mean"] == [0.5, 0.5, 0.5] and net.image_size == 32 and net.text is None
    x = torch.randn(3, 3, 32, 32)
    ref.eval(), net.eval()
    with torch.no_grad():  # features = timm's pre-logits (class token after the final norm)
        assert torch.allclose(net.visual(x), ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-6)


def test_bad_weights_are_one_line_config_errors(tiny_clip_arch, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="no such weights file"):
        FoundationConfig(arch=tiny_clip_arch, pretrained=str(tmp_path / "missing.pt"))
    from ltbench.config import to_schema

    with pytest.raises(ConfigError, match="not a open_clip tag of ViT-B-16") as e:
        to_schema(compose_cfg("model=clip_vit_b16", "model.pretrained=nosuchtag"))
    assert "\n" not in str(e.value) and "laion2b_s34b_b88k" in str(e.value)
    with pytest.raises(ConfigError, match="not a timm tag"):
        to_schema(compose_cfg("model=vit_b16", "model.pretrained=nosuchtag"))
    bad = tmp_path / "bad.pt"
    torch.save({"visual.nothing": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="does not fit"):
        build_foundation(FoundationConfig(arch=tiny_clip_arch, pretrained=str(bad)), 10, DATA)


def test_images_reach_the_backbone_resized_and_normalised_as_its_own_transform(tiny_clip_arch):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    net = build_foundation(FoundationConfig(arch=tiny_clip_arch), 10, DATA)
    torch.manual_seed(0)
    x01 = torch.rand(2, 3, 20, 28)  # not square, smaller than the tower's 32
    fed = (x01 - torch.tensor(DATA.mean)[:, None, None]) / torch.tensor(DATA.std)[:, None, None]
    mean, std = torch.tensor(net.mean)[:, None, None], torch.tensor(net.std)[:, None, None]
    want = TF.center_crop(TF.resize(x01, 32, InterpolationMode.BICUBIC), [32, 32])  # open_clip: shortest + crop
    assert torch.allclose(net.prepare(fed), (want - mean) / std, atol=1e-5)
    assert net.prepare(fed).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("library", ["open_clip", "timm"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_clip_arch, library):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = (FoundationConfig(arch=tiny_clip_arch, grad_checkpoint=ckpt, peft=PeftConfig(kind="full"))
               if library == "open_clip" else
               TimmConfig(arch="vit_tiny_patch16_224", arch_kwargs=TIMM_KW, grad_checkpoint=ckpt,
                          peft=PeftConfig(kind="full")))  # fmt: skip
        net = build_foundation(cfg, 4, DATA).train()
        tower = net.visual.transformer if library == "open_clip" else net.visual
        assert tower.grad_checkpointing is ckpt
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        net(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_a_frozen_tower_runs_without_a_graph_and_only_the_head_trains(tiny_clip_arch):
    net = build_foundation(FoundationConfig(arch=tiny_clip_arch, peft=PeftConfig(kind="linear")), 4, DATA)
    x = torch.randn(2, 3, 32, 32)
    assert net.trainable_tower == [] and not net.features(x).requires_grad
    assert net(x).requires_grad and [n for n, p in net.named_parameters() if p.requires_grad] == ["head.weight"]
    out = build_foundation(FoundationConfig(arch=tiny_clip_arch, head="linear", head_scale=25.0), 4, DATA)
    with torch.no_grad():
        assert torch.allclose(out(x), 25.0 * out.head(out.features(x)))


def test_text_initialised_head_is_the_prompt_features_of_the_class_names(tiny_clip_arch, clip_file, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    import open_clip
    import torch.nn.functional as F

    from ltbench.models.classnames import CIFAR10

    monkeypatch.setenv("LTBENCH_CACHE", str(tmp_path))
    path, clip = clip_file
    data = SimpleNamespace(name="cifar10lt", class_counts=[5] * 10, mean=DATA.mean, std=DATA.std)
    for head in ("cosine", "linear"):
        net = build_foundation(FoundationConfig(arch=tiny_clip_arch, pretrained=str(path), head=head,
                                                head_init="text"), 10, data)  # fmt: skip
        tok = open_clip.get_tokenizer("ltbench_tiny_clip")([f"a photo of a {n}." for n in CIFAR10])
        with torch.no_grad():
            want = F.normalize(F.normalize(clip.encode_text(tok), dim=-1), dim=-1)  # one template: LIFT "default"
        got = net.head.weight.t() if head == "cosine" else net.head.weight
        assert torch.allclose(got, want, atol=1e-5), head
    assert torch.all(net.head.bias == 0)


def test_lifts_pre_projection_features_and_head_init(tiny_clip_arch, clip_file, tmp_path, monkeypatch):
    """model.feature=pre_proj is LIFT's classifier space (shijxcs/LIFT trainer.py init_head_text_feat and the image
    encoder without ``proj``): features = ln_post(class token), the head starts from normalize(normalize(text) @
    proj.T), and the logits are head_scale x cosine."""
    import open_clip
    import torch.nn.functional as F

    from ltbench.models.classnames import CIFAR10

    monkeypatch.setenv("LTBENCH_CACHE", str(tmp_path))
    path, clip = clip_file
    data = SimpleNamespace(name="cifar10lt", class_counts=[5] * 10, mean=DATA.mean, std=DATA.std)
    net = build_foundation(FoundationConfig(arch=tiny_clip_arch, pretrained=str(path), head_init="text",
                                            feature="pre_proj", head_scale=25.0), 10, data)  # fmt: skip
    tok = open_clip.get_tokenizer("ltbench_tiny_clip")([f"a photo of a {n}." for n in CIFAR10])
    proj = clip.visual.proj.detach()
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tok), dim=-1)
        want_w = F.normalize(text @ proj.t(), dim=-1)  # LIFT: text_features @ image_encoder.proj.t(), normalised
        x = torch.randn(3, 3, 32, 32)
        visual = clip.visual.eval()
        feats = net.eval().features(x)
        logits = net(x)
    assert feats.shape == (3, proj.shape[0]) and net.feature_dim == proj.shape[0]
    assert torch.allclose(net.head.weight.t(), want_w, atol=1e-5)
    assert torch.allclose(feats @ proj, visual(net.prepare(x)), atol=1e-4)  # CLIP's embedding = features @ proj
    assert torch.allclose(logits, 25.0 * F.normalize(feats, dim=-1) @ want_w.t(), atol=1e-4)
    with pytest.raises(ConfigError, match=r"model\.feature=pre_proj drops CLIP.s image projection"):
        TimmConfig(feature="pre_proj")


# ---------------------------------------------------------------------------------------- gradient accumulation


class _MeanSquare(Method):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def step(self, model, batch, ep):
        self.sizes.append(len(batch))
        out = model(batch.x)
        loss = ((out - batch.y.float()[:, None]) ** 2).mean()
        return loss, {"correct": (out.detach().round().squeeze(1) == batch.y).sum()}


def _trained(accumulate: int, batch: int = 8) -> tuple[nn.Module, list[dict], list[int]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.LayerNorm(5), nn.Linear(5, 1))  # no batch statistics
    x, y = torch.randn(27, 6, generator=torch.Generator().manual_seed(3)), torch.arange(27) % 3
    sched = ScheduleConfig(epochs=2, batch_size=batch, lr=0.1, warmup=0.0, milestones=[], accumulate=accumulate)

    def batches(ep: Epoch):
        ep.size = len(y)
        return (Batch(x[i : i + batch], y[i : i + batch], torch.arange(i, min(i + batch, 27)))
                for i in range(0, len(y), batch))  # fmt: skip  # the last batch (3) does not divide

    opt = build_optimizer(sched, model_groups(model, []))
    method = _MeanSquare()
    tr = Trainer("t", model, method, opt, sched, batches, lambda e: torch.Generator(),
                 Classification(ClassificationConfig()), amp=False)  # fmt: skip
    fit(tr, [])
    return model, tr.rows, method.sizes


def test_gradient_accumulation_equals_one_big_batch():
    big, rows, sizes = _trained(1)
    assert sizes == [8, 8, 8, 3] * 2
    for k, micro in ((2, [4, 4] * 3 + [2, 1]), (4, [2, 2, 2, 2] * 3 + [1, 1, 1])):
        small, small_rows, small_sizes = _trained(k)
        assert small_sizes == micro * 2  # the method saw micro-batches, the optimiser stepped once per batch
        for (n, p), q in zip(big.named_parameters(), small.parameters()):
            assert torch.allclose(p, q, atol=1e-6), (k, n)
        assert [r["train_loss"] for r in small_rows] == pytest.approx([r["train_loss"] for r in rows], abs=1e-6)
        assert [r["train_acc"] for r in small_rows] == [r["train_acc"] for r in rows]
    with pytest.raises(ConfigError, match="accumulate"):
        ScheduleConfig(batch_size=10, accumulate=4)


# ------------------------------------------------------------------------------------ test-time ensembling


def lift_tte_transform(resolution: int, expand: int, mode: str):
    """Transcribed from shijxcs/LIFT, trainer.py, ``Trainer.build_data_loader`` (the ``cfg.tte`` branch), without
    ToTensor/Normalize (the batch here is a tensor already; normalisation is affine and commutes): Resize(resolution
    + expand), then FiveCrop / TenCrop(resolution), crops stacked."""
    from torchvision import transforms

    crop = transforms.FiveCrop(resolution) if mode == "fivecrop" else transforms.TenCrop(resolution)
    return transforms.Compose([
        transforms.Resize(resolution + expand),
        crop,
        transforms.Lambda(lambda crops: torch.stack(list(crops))),
    ])  # fmt: skip


def lift_tte_logits(model, images, resolution, expand, mode):
    """shijxcs/LIFT trainer.py ``Trainer.test``: crops through the model, logits averaged over the crops."""
    t = lift_tte_transform(resolution, expand, mode)
    image = torch.stack([t(img) for img in images])  # bsz x ncrops x c x h x w
    bsz, ncrops, c, h, w = image.size()
    out = model(image.view(bsz * ncrops, c, h, w))
    return out.view(bsz, ncrops, -1).mean(dim=1)


@pytest.mark.parametrize(("mode", "size", "expand", "shape"), [
    ("fivecrop", None, 6, (16, 16)), ("tencrop", None, 5, (16, 21)), ("fivecrop", 12, 4, (20, 17)),
    ("tencrop", None, 0, (16, 16)),
])  # fmt: skip
def test_test_time_ensemble_matches_lift(mode, size, expand, shape):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    if size is not None:
        conv.image_size = size  # a model with its own resolution: the crops are of that size
    x = torch.randn(4, 3, *shape)
    tte = TestTimeEnsemble(conv, mode, expand)
    resolution = size or min(shape)
    with torch.no_grad():
        got, want = tte(x), lift_tte_logits(conv, x, resolution, expand, mode)
        assert torch.allclose(got, want, atol=1e-5)
        if expand == 0 and shape[0] == shape[1]:  # every crop is the whole image, mirrored in half of them
            assert torch.allclose(got, (conv(x) + conv(x.flip(-1))) / 2, atol=1e-5)
    assert tte.crops() == (5 if mode == "fivecrop" else 10)


def test_tte_settings_are_checked_at_compose_time(compose_cfg):
    from ltbench.config import to_schema

    with pytest.raises(ConfigError, match="tte must be one of none, fivecrop, tencrop"):
        to_schema(compose_cfg("tte=threecrop"))
    with pytest.raises(ConfigError, match="tte=fivecrop crops images; dataset=stsb_dir gives text"):
        to_schema(compose_cfg("experiment=stsb_dir", "tte=fivecrop"))


# ---------------------------------------------------------------------------------------------- end to end


def test_clip_run_trains_with_local_weights_and_records_them(tiny_clip_arch, clip_file, compose_cfg, cifar10_root,
                                                             tmp_path):  # fmt: skip
    from ltbench.runner import run

    path, _ = clip_file
    cfg = compose_cfg(
        "model=clip_vit_b16", f"model.arch={tiny_clip_arch}", f"model.pretrained={path}", "model.head_init=random",
        "model.peft.kind=full", "schedule.accumulate=2", "tte=fivecrop", "tte_expand=4",
        "schedule.epochs=1", "schedule.batch_size=64", "schedule.warmup=0", "schedule.lr=0.01",
        *tiny_cifar(cifar10_root), f"results_dir={tmp_path}",
    )  # fmt: skip
    m = run(cfg, tmp_path / "run")
    assert m["status"] == "completed" and 0 <= m["top1"] <= 100
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["model_weights"] == {"library": "open_clip", "arch": "ltbench_tiny_clip", "tag": "file",
                                      "file": str(path), "sha256": _sha(path)}  # fmt: skip
    assert saved["preprocess"]["image_size"] == 32 and saved["tte"] == {"mode": "fivecrop", "expand": 4, "crops": 5,
                                                                        "applied": True}  # fmt: skip
    blocks = sum(p.numel() for n, p in build_foundation(FoundationConfig(arch=tiny_clip_arch, peft=PeftConfig(
        kind="full")), 10, DATA).named_parameters() if p.requires_grad)  # fmt: skip
    assert saved["cost"]["trainable_parameters"]["train"] == blocks < saved["num_parameters"]


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    from ltbench.errors import ConfigError
    from ltbench.models.foundation import FoundationConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model=clip_vit_b16 needs open_clip: pip install 'ltbench\[foundation\]'"):
        FoundationConfig().check(None)


@pytest.mark.parametrize("preset", ["lift", "clip_linear", "clip_full"])
def test_every_fine_tuning_preset_trains_and_resumes_inside_its_stage_to_identical_numbers(
    preset, tiny_clip_arch, clip_file, compose_cfg, cifar10_root, tmp_path, monkeypatch
):
    """The CIFAR-100 presets of LIFT and its baselines, on a tiny random CLIP saved as a local file and tiny
    CIFAR-10 data: 2 epochs trained straight, and the same run interrupted in epoch 2 and resumed."""
    from conftest import interrupt_at

    from ltbench.config import to_schema
    from ltbench.runner import run

    monkeypatch.setenv("LTBENCH_CACHE", str(tmp_path / "cache"))
    path, _ = clip_file

    def cfg(results):
        return to_schema(compose_cfg(
            f"experiment={preset}_cifar100", "dataset=cifar10lt", f"model.arch={tiny_clip_arch}",
            f"model.pretrained={path}", "schedule.epochs=2", "schedule.batch_size=32", "schedule.eval_batch_size=64",
            *tiny_cifar(cifar10_root), f"results_dir={results}",
        ))  # fmt: skip

    full = run(cfg(tmp_path / "a"), tmp_path / "full")
    interrupt_at(monkeypatch, lambda: run(cfg(tmp_path / "b"), tmp_path / "cut"), at=2, stage="train")
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["per_class_acc"] == full["per_class_acc"] and resumed["top1"] == full["top1"]
    trainable = full["cost"]["trainable_parameters"]["train"]
    if preset == "clip_linear":
        assert trainable == 32 * 10  # the cosine head on the 32-d pre-projection features, nothing of the tower
    else:
        assert trainable > 32 * 10


def test_every_peft_kind_trains_end_to_end_and_records_what_it_trained(tiny_clip_arch, clip_file, compose_cfg,
                                                                      cifar10_root, tmp_path, monkeypatch):  # fmt: skip
    """One epoch of LIFT's recipe with each PEFT kind through run(): the record counts the kind's own parameters
    (ltbench.models.peft) plus the head, and the tower's other weights are the file's."""
    from ltbench.config import to_schema
    from ltbench.runner import run

    monkeypatch.setenv("LTBENCH_CACHE", str(tmp_path / "cache"))
    path, _ = clip_file
    for kind in ("bitfit", "ln", "vpt_shallow", "vpt_deep", "adapter", "lora", "ssf"):
        cfg = to_schema(compose_cfg(
            "experiment=lift_cifar100", "dataset=cifar10lt", f"model.arch={tiny_clip_arch}", f"model.pretrained={path}",
            f"model.peft.kind={kind}", "schedule.epochs=1", "schedule.batch_size=64", "schedule.eval_batch_size=64",
            *tiny_cifar(cifar10_root), f"results_dir={tmp_path / kind}",
        ))  # fmt: skip
        m = run(cfg, tmp_path / kind / "run")
        net = build_foundation(FoundationConfig(arch=tiny_clip_arch, feature="pre_proj", peft=PeftConfig(kind=kind)),
                               10, DATA)  # fmt: skip
        own = sum(p.numel() for n, p in net.named_parameters() if p.requires_grad)  # the kind's modules + the head
        assert m["status"] == "completed" and m["cost"]["trainable_parameters"]["train"] == own, kind
