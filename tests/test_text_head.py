"""Class names, the CLIP prompt-ensemble text classifier, its cache, and zero-shot CLIP (ltbench.models.text_head,
ltbench.models.classnames), on tiny random open_clip models.

Reference: shijxcs/LIFT (commit 661ead9b) ``trainer.py`` ``Trainer.init_head_text_feat`` (prompt=ensemble / default,
with ``get_tokenized_prompts``) and ``models/classifiers.py`` ``CosineClassifier``, transcribed below.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cifar

from ltbench.errors import ConfigError
from ltbench.models.classnames import class_names, read_list
from ltbench.models.text_head import TEMPLATES, cache_key, encode_names, text_weights, zero_shot_logits

DATA = SimpleNamespace(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), name="cifar10lt", class_counts=[1] * 10)


@pytest.fixture(scope="module")
def net(tiny_clip_arch):
    from ltbench.models.foundation import FoundationConfig, build_foundation

    torch.manual_seed(0)
    return build_foundation(FoundationConfig(arch=tiny_clip_arch, head_init="random"), 10, DATA)


# ---------------------------------------------------------------- the reference, transcribed (shijxcs/LIFT)


def lift_tokenized_prompts(classnames, template, tokenize):
    """trainer.py Trainer.get_tokenized_prompts."""
    prompts = [template.format(c.replace("_", " ")) for c in classnames]
    return torch.cat([tokenize(p) for p in prompts])


def lift_init_head_text_feat(encode_text, classnames, templates, tokenize):
    """trainer.py Trainer.init_head_text_feat, prompt=ensemble (a one-template list: prompt=default)."""
    all_text_features = []
    for template in templates:
        prompts = lift_tokenized_prompts(classnames, template, tokenize)
        text_features = encode_text(prompts)
        text_features = F.normalize(text_features, dim=-1)
        all_text_features.append(text_features)
    all_text_features = torch.stack(all_text_features)
    return all_text_features.mean(dim=0)


class LiftCosineClassifier(torch.nn.Module):
    """models/classifiers.py _Classifier + CosineClassifier (scale 25: utils/config.py _C.scale)."""

    def __init__(self, feat_dim, num_classes, scale=25):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_classes, feat_dim))
        self.weight.data.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)
        self.scale = scale

    def forward(self, x):
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1)) * self.scale

    def apply_weight(self, weight):
        self.weight.data = weight.clone()


# ------------------------------------------------------------------------------------------------- tests


def test_class_name_lists_have_their_lengths_and_known_entries():
    c100 = read_list("cifar100")
    assert len(c100) == 100 and c100[0] == "apple" and c100[1] == "aquarium_fish" and c100[99] == "worm"
    assert c100 == sorted(c100) and len(set(c100)) == 100  # the meta file's order is alphabetical
    assert read_list("cifar10")[0] == "airplane" and read_list("cifar10")[9] == "truck"
    imnet = read_list("imagenet")
    assert len(imnet) == 1000 and imnet[0] == "tench" and imnet[1] == "goldfish" and imnet[999] == "toilet paper"
    places = read_list("places365")
    assert len(places) == 365 and places[0] == "airfield" and places[116] == "desert_road"
    assert places[117] == "desert-sand" and places[364] == "zen_garden"
    c100_data = SimpleNamespace(name="cifar100lt", class_counts=[5] * 100)
    assert class_names(None, c100_data)[:2] == ["apple", "aquarium_fish"]


def test_inat_names_come_from_the_data_and_label_numbers_are_an_error():
    got = class_names(None, SimpleNamespace(name="inat18", class_names=["Aa", "Bb"], class_counts=[3, 1]))
    assert got == ["Aa", "Bb"]
    with pytest.raises(ConfigError, match=r"categories\.json"):
        class_names(None, SimpleNamespace(name="inat18", class_names=["0", "1"], class_counts=[3, 1]))
    with pytest.raises(ConfigError, match="100 classes but 10"):
        class_names(SimpleNamespace(name="cifar10lt", num_classes=100), None)


def test_templates_are_lifts():
    assert TEMPLATES["default"] == ["a photo of a {}."]
    ens = TEMPLATES["ensemble"]
    assert len(ens) == 80 and ens[0] == "a bad photo of a {}." and ens[-1] == "a tattoo of the {}."


@pytest.mark.parametrize("templates", ["ensemble", "default"])
def test_prompt_ensemble_equals_the_reference(net, templates):
    names = ["maple_tree", "aquarium_fish", "cat"]
    tmpl = TEMPLATES[templates]
    clip, tok = net.text.clip, net.text.tokenizer
    with torch.no_grad():
        ref = lift_init_head_text_feat(lambda t: clip.encode_text(t).float(), names, tmpl, tok)
    got = encode_names(net, names, tmpl)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, F.normalize(ref, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))


def test_text_initialised_cosine_head_equals_lifts_at_scale_25(net):
    """The ltbench cosine head with weights from text_weights, times head_scale 25, gives LIFT's logits, and the
    same gradients with respect to the weights and the features."""
    names = read_list("cifar10")
    w = text_weights(net, names, TEMPLATES["ensemble"][:8], use_cache=False)
    from ltbench.models.heads import CosineHead

    ours = CosineHead(16, 10)
    with torch.no_grad():
        ours.weight.copy_(w.t())
    ref = LiftCosineClassifier(16, 10)
    ref.apply_weight(w)
    x = torch.randn(6, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = ours(x) * 25.0, ref(x2)
    torch.testing.assert_close(a, b)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    F.cross_entropy(a, y).backward()
    F.cross_entropy(b, y).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad.t(), ref.weight.grad)
    assert a.abs().max() <= 25.0 + 1e-4


def test_cache_is_keyed_by_names_templates_and_weights(net, tmp_path, monkeypatch):
    names = ["cat", "dog"]
    text_weights(net, names, TEMPLATES["default"], cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.pt"))  # random weights: nothing cached
    monkeypatch.setattr(net, "weights", {"arch": "tiny", "sha256": "ab" * 32})
    w1 = text_weights(net, names, TEMPLATES["default"], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    w2 = text_weights(net, ["dog", "cat"], TEMPLATES["default"], cache_dir=tmp_path)  # a changed list: no reuse
    torch.testing.assert_close(w2, w1.flip(0))
    assert len(list(tmp_path.glob("*.pt"))) == 2
    key = cache_key("a:1", names, TEMPLATES["default"])
    assert key != cache_key("a:2", names, TEMPLATES["default"]) != cache_key("a:1", names, ["{}"])
    # a reused entry is what was written: poison it and see it come back
    f = next(p for p in tmp_path.glob("*.pt") if torch.allclose(torch.load(p), w1))
    torch.save(torch.zeros_like(w1), f)
    assert text_weights(net, names, TEMPLATES["default"], cache_dir=tmp_path).abs().sum() == 0
    monkeypatch.setattr(net, "weights", {"arch": "tiny", "sha256": "cd" * 32})  # other weights: a new entry
    torch.testing.assert_close(text_weights(net, names, TEMPLATES["default"], cache_dir=tmp_path), w1)
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_zero_shot_accuracy_equals_open_clips_helper(tiny_clip_arch):
    """ltbench's zero-shot logits vs open_clip.zero_shot_classifier on the same random tiny CLIP and images."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from ltbench.models.foundation import _register_arch

    torch.manual_seed(1)
    clip = open_clip.create_model(_register_arch(tiny_clip_arch)).eval()
    tok = open_clip.get_tokenizer(_register_arch(tiny_clip_arch))
    names = read_list("cifar10")
    tmpl = [lambda c, t=t: t.format(c) for t in TEMPLATES["ensemble"][:8]]
    with torch.no_grad():
        ref_w = build_zero_shot_classifier(clip, tok, names, tmpl, num_classes_per_batch=None, device="cpu")  # D x C
        img = clip.encode_image(torch.randn(32, 3, 32, 32))
    ns = SimpleNamespace(text=SimpleNamespace(encode=lambda p, device: clip.encode_text(tok(p))),
                         parameters=lambda: iter([torch.zeros(1)]))  # fmt: skip
    ours = encode_names(ns, names, TEMPLATES["ensemble"][:8])
    torch.testing.assert_close(ours, ref_w.t(), rtol=1e-5, atol=1e-6)
    ref_pred = (F.normalize(img, dim=-1) @ ref_w).argmax(1)
    assert torch.equal(zero_shot_logits(img, ours).argmax(1), ref_pred)


def test_zero_shot_clip_run_trains_nothing(tiny_clip_arch, cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LTBENCH_CACHE", str(tmp_path / "cache"))
    from hydra import compose, initialize_config_module

    from ltbench.runner import run

    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=clip_zeroshot_cifar100", "dataset=cifar10lt", "progress=false", "device=cpu",
            f"model.arch={tiny_clip_arch}", "model.pretrained=none", *tiny_cifar(cifar10_root),
            f"results_dir={tmp_path}", "schedule.eval_batch_size=64",
        ])  # fmt: skip
    from ltbench.config import to_schema

    m = run(to_schema(cfg), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "completed" and 0 <= m["top1"] <= 100
    assert saved["cost"]["image_steps_total"] == 0
    assert set(saved["cost"]["trainable_parameters"].values()) == {0}


def test_text_initialised_foundation_net_predicts_as_open_clips_zero_shot(tiny_clip_arch):
    """model head_init=text: the FoundationNet's predictions are open_clip's zero-shot predictions."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from ltbench.models.foundation import FoundationConfig, build_foundation

    torch.manual_seed(2)
    net = build_foundation(FoundationConfig(arch=tiny_clip_arch, head_init="text", head_scale=25.0), 10, DATA).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref_w = build_zero_shot_classifier(net.text.clip, net.text.tokenizer, read_list("cifar10"),
                                           TEMPLATES["default"], num_classes_per_batch=None)  # fmt: skip
        ref = F.normalize(net.visual(net.prepare(x)), dim=-1) @ ref_w
        got = net(x)
    torch.testing.assert_close(got, 25.0 * ref, rtol=1e-4, atol=1e-5)
