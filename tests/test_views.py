"""ltbench.data.views (batched SimSiam / FixMatch views) against per-image torchvision and PIL references, and the
WRN-28-2 backbone (ltbench.models.wrn). CPU only, a few seconds.

Tolerances: colour ops run in float32 like torchvision's float kernels, so they match to 1e-5 (a different order of
the same float operations); ops on uint8 levels (Posterize, Solarize, Equalize) and whole-pixel translations match
exactly; nearest-neighbour shears and rotations match PIL except at exact ties of the sampling grid (PIL floors in
double precision, grid_sample rounds a float32 coordinate), at most 2% of the pixels.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ltbench.data import views as V
from ltbench.errors import ConfigError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """8 uint8 32x32 images: noise, smooth gradients, a low-contrast one, a flat one and a two-level one."""
    g = _gen(1)
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8)
    x[1] = ramp[None, :, None].expand(3, 32, 32)
    x[2, 0], x[2, 1], x[2, 2] = ramp[None, :], ramp[:, None], 255 - ramp[None, :]
    x[3] = torch.randint(100, 141, (3, 32, 32), generator=g, dtype=torch.uint8)
    x[4] = 77
    x[5] = torch.where(torch.rand(1, 32, 32, generator=g) < 0.3, 200, 40).to(torch.uint8).expand(3, 32, 32)
    return x


def _pil(img: torch.Tensor) -> PIL.Image.Image:
    return PIL.Image.fromarray(img.permute(1, 2, 0).numpy())


def _from_pil(im: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------- colour ops vs torchvision
@pytest.mark.parametrize(
    "ours,ref,lo,hi",
    [
        (V.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
        (V.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
        (V.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
        (V.adjust_sharpness, TF.adjust_sharpness, 0.0, 2.0),
        (V.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_colour_ops_with_per_image_factors_match_torchvision(images, ours, ref, lo, hi):
    x = images.float() / 255
    f = torch.linspace(lo, hi, len(x))
    out = ours(x, f)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], ref(x[i].clone(), float(f[i])), atol=1e-5, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_color_jitter_follows_each_images_order(images):
    x = images.float() / 255
    p = V.simsiam_params(len(x), 32, 32, _gen(3))
    out = V.color_jitter(x, p.factors, p.order)
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(len(x)):
        y = x[i].clone()
        for k in p.order[i].tolist():
            y = refs[k](y, float(p.factors[i, k]))
        torch.testing.assert_close(out[i], y, atol=1e-5, rtol=0)
    assert {tuple(o) for o in p.order.tolist()} != {(0, 1, 2, 3)}  # orders differ between images


# ------------------------------------------------------------------------------------ RandAugment ops vs references
def test_ra_levels_follow_the_fixmatch_pool():
    v, plus, minus = torch.tensor([1, 9]), torch.ones(2, dtype=torch.long), -torch.ones(2, dtype=torch.long)
    expect = {
        "Brightness": [0.14, 0.86], "Sharpness": [0.14, 0.86], "Posterize": [4, 7], "Rotate": [3, 27],
        "ShearX": [0.03, 0.27], "Solarize": [231, 26], "TranslateX": [0, 8], "TranslateY": [0, 8],
    }  # fmt: skip
    for name, want in expect.items():
        torch.testing.assert_close(V.ra_level(name, v, plus, 32, 32), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(V.ra_level("Rotate", v, minus, 32, 32), torch.tensor([-3.0, -27.0], dtype=torch.float64))
    assert V.ra_level("TranslateX", torch.tensor([9]), torch.tensor([-1]), 32, 100).item() == -27  # +-int(v*0.03*W)


@pytest.mark.parametrize("v", [1, 5, 9])
def test_ra_point_ops_match_torchvision(images, v):
    x = images.float() / 255
    n = len(x)
    level = {name: V.ra_level(name, torch.full((n,), v), torch.ones(n), 32, 32) for name in V.RA_OPS}
    for i in range(n):
        u8, f = images[i], x[i]
        exact = {
            "Posterize": TF.posterize(u8, int(level["Posterize"][i])),
            "Solarize": TF.solarize(u8, float(level["Solarize"][i])),
            "Equalize": TF.equalize(u8),
        }
        for name, ref in exact.items():
            assert torch.equal((V.ra_op(x[i : i + 1], name, level[name][i : i + 1])[0] * 255).round(), ref.float())
        close = {
            "AutoContrast": TF.autocontrast(f),
            "Brightness": TF.adjust_brightness(f, float(level["Brightness"][i])),
            "Color": TF.adjust_saturation(f, float(level["Color"][i])),
            "Contrast": TF.adjust_contrast(f, float(level["Contrast"][i])),
            "Sharpness": TF.adjust_sharpness(f.clone(), float(level["Sharpness"][i])),
            "Identity": f,
        }
        for name, ref in close.items():
            torch.testing.assert_close(V.ra_op(x[i : i + 1], name, level[name][i : i + 1])[0], ref, atol=1e-5, rtol=0)


def test_ra_batched_point_ops_equal_single_images(images):
    """Per-image statistics (AutoContrast, Equalize, Contrast) must not leak between the images of a batch."""
    x = images.float() / 255
    level = torch.linspace(0.1, 0.9, len(x), dtype=torch.float64)
    for name in ("AutoContrast", "Equalize", "Contrast", "Posterize", "Solarize"):
        lv = level * 255 if name == "Solarize" else (level * 8).ceil() if name == "Posterize" else level
        batched = V.ra_op(x, name, lv)
        single = torch.cat([V.ra_op(x[i : i + 1], name, lv[i : i + 1]) for i in range(len(x))])
        torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"])
def test_ra_geometric_ops_match_pil(images, name):
    """The port's PIL calls (nearest, black outside), so compared with fill=0."""
    x = images[:4].float() / 255
    for v in range(1, 10):
        for sign in (1, -1):
            level = V.ra_level(name, torch.full((4,), v), torch.full((4,), sign), 32, 32)
            out = (V.ra_op(x, name, level, fill=0.0) * 255).round().to(torch.uint8)
            lv = float(level[0])
            for i in range(4):
                im = _pil(images[i])
                coeffs = {
                    "ShearX": (1, lv, 0, 0, 1, 0), "ShearY": (1, 0, 0, lv, 1, 0),
                    "TranslateX": (1, 0, int(lv), 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, int(lv)),
                }  # fmt: skip
                ref = _from_pil(
                    im.rotate(lv) if name == "Rotate" else im.transform(im.size, PIL.Image.AFFINE, coeffs[name])
                )
                wrong = (ref != out[i]).any(0).float().mean().item()
                assert wrong == 0 if name.startswith("Translate") else wrong <= 0.02, (v, sign, i, wrong)


def test_ra_rotate_matches_torchvision_and_fills_gray(images):
    x = images[:2].float() / 255
    level = torch.tensor([27.0, -15.0], dtype=torch.float64)
    out = V.ra_op(x, "Rotate", level)
    for i in range(2):
        ref = TF.rotate(x[i], float(level[i]), interpolation=TF.InterpolationMode.NEAREST, fill=V.GRAY)
        assert (out[i] != ref).any(0).float().mean() <= 0.01
    assert torch.all(out[:, :, 0, 0] == V.GRAY)  # corners rotate out of view


def test_rand_augment_equals_the_ops_applied_image_by_image(images):
    x = images.float() / 255
    out = V.rand_augment(x, _gen(5), n=3, cutout=16)
    p = V.ra_params(len(x), 3, 32, 32, _gen(5))
    drawn = p.ops[p.on]
    assert len(set(drawn.tolist())) >= 8  # the batch exercises many op kinds
    for i in range(len(x)):
        y = x[i : i + 1]
        for k in range(3):
            if p.on[i, k]:
                name = V.RA_OPS[p.ops[i, k]]
                y = V.ra_op(y, name, V.ra_level(name, p.v[i : i + 1, k], p.sign[i : i + 1, k], 32, 32))
        y = V.cutout_at(y, p.cy[i : i + 1], p.cx[i : i + 1], 16)
        torch.testing.assert_close(out[i : i + 1], y, atol=1e-6, rtol=0)


def test_rand_augment_without_ops_and_cutout_is_the_identity(images):
    x = images.float() / 255
    assert torch.equal(V.rand_augment(x, _gen(), n=0, cutout=0), x)


def test_cutout_box_follows_the_port():
    x = torch.zeros(3, 3, 32, 32)
    out = V.cutout_at(x, torch.tensor([0.3, 16.0, 31.9], dtype=torch.float64), torch.tensor([20.0, 3.0, 31.9]), 16)
    filled = out[:, 0] == V.GRAY
    assert torch.equal(filled[0].nonzero()[:, 0].unique(), torch.arange(0, 16))  # y0 = max(0, 0.3 - 8) = 0
    assert torch.equal(filled[0].nonzero()[:, 1].unique(), torch.arange(12, 28))
    assert torch.equal(filled[1].nonzero()[:, 1].unique(), torch.arange(0, 16))  # shifted right, not clipped
    assert filled[2].sum() == 9 * 9  # x0 = int(23.9) = 23: clipped at the border
    assert torch.equal(out[:, 0], out[:, 2])  # all channels


# ----------------------------------------------------------------------------------------- SimSiam and weak views
def test_rrc_boxes_stay_inside_with_the_right_area_and_ratio():
    top, left, h, w = V.rrc_params(4000, 32, 32, _gen(2))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).double() / 1024
    assert area.min() >= 0.17 and area.max() <= 1  # scale (0.2, 1) up to rounding of the sides
    ratio = w.double() / h
    assert ratio.min() >= 0.6 and ratio.max() <= 1.6  # (3/4, 4/3) up to rounding of small sides
    assert len(set(top.tolist())) > 10 and area.std() > 0.1


def test_resized_crop_matches_torchvision(images):
    x = images.float() / 255
    top, left, h, w = V.rrc_params(len(x), 32, 32, _gen(4))
    for size in ((32, 32), (24, 24)):
        out = V.resized_crop(x, top, left, h, w, size)
        for i in range(len(x)):
            box = (int(top[i]), int(left[i]), int(h[i]), int(w[i]))
            if size[0] < max(box[2:]):
                continue  # torchvision would antialias a downscale; we do not
            ref = TF.resized_crop(x[i], *box, list(size), antialias=False)
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_simsiam_crop_reads_only_pixels_inside_the_image():
    """A constant image stays constant when only the crop (and the flip) run: no sample falls outside it."""
    x = torch.full((64, 3, 32, 32), 180, dtype=torch.uint8)
    out = V.simsiam_view(x, _gen(6), jitter=False, grayscale=False)
    torch.testing.assert_close(out, torch.full_like(out, 180 / 255), atol=1e-6, rtol=0)


def test_simsiam_grayscale_and_flip_match_torchvision(images):
    p = V.simsiam_params(len(images), 32, 32, _gen(7))
    out = V.simsiam_view(images, _gen(7), crop=False, jitter=False)
    assert p.gray.any() and (~p.gray).any() and p.flip.any() and (~p.flip).any()
    for i in range(len(images)):
        ref = images[i].float() / 255
        ref = TF.rgb_to_grayscale(ref, num_output_channels=3) if p.gray[i] else ref
        ref = TF.horizontal_flip(ref) if p.flip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_weak_view_matches_torchvision(images):
    g = _gen(8)
    flip = torch.rand(len(images), generator=g) < 0.5
    dy, dx = (torch.randint(0, 9, (len(images),), generator=g) for _ in range(2))
    out = V.weak_view(images, _gen(8))
    for i in range(len(images)):
        ref = TF.horizontal_flip(images[i]) if flip[i] else images[i]
        ref = TF.pad(ref, [4], padding_mode="reflect")[:, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], ref.float() / 255)


@pytest.mark.parametrize(
    "view",
    [
        lambda x, g: V.simsiam_view(x, g),
        lambda x, g: V.simsiam_view(x, g, size=24),
        lambda x, g: V.weak_view(x, g),
        lambda x, g: V.rand_augment(x.float() / 255, g),
    ],
)
def test_views_shapes_ranges_and_determinism(images, view):
    rng = torch.get_rng_state()
    a, b, c = view(images, _gen(11)), view(images, _gen(11)), view(images, _gen(12))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never used
    assert a.dtype == torch.float32 and a.shape[:2] == (8, 3) and a.shape[2] == a.shape[3] in (24, 32)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_views_reject_a_bad_batch():
    with pytest.raises(ValueError):
        V.simsiam_view(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), _gen())
    with pytest.raises(ValueError):
        V.weak_view(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), _gen(), padding=4)


def test_views_handle_empty_and_non_square_batches():
    x = torch.randint(0, 256, (3, 3, 40, 24), generator=_gen(), dtype=torch.uint8)
    assert V.simsiam_view(x, _gen()).shape == (3, 3, 40, 24) and V.simsiam_view(x, _gen(), size=16).shape[-2:] == (
        16,
        16,
    )
    assert V.rand_augment(x, _gen()).shape == V.weak_view(x, _gen()).shape == (3, 3, 40, 24)
    empty = x[:0]
    assert V.simsiam_view(empty, _gen()).shape == V.rand_augment(empty, _gen()).shape == (0, 3, 40, 24)


def test_normalize01():
    x = torch.full((2, 3, 4, 4), 0.5)
    out = V.normalize01(x, (0.5, 0.25, 0.0), (0.5, 0.25, 0.5))
    assert torch.allclose(out[:, 0], torch.zeros(1)) and torch.allclose(out[:, 1], torch.ones(1))
    assert torch.allclose(out[:, 2], torch.ones(1))


# --------------------------------------------------------------------------------------------------------- WRN-28-2
def test_wrn28_2_size_shapes_and_one_sgd_step():
    from ltbench.models import build_model
    from ltbench.models.wrn import WRNConfig

    torch.manual_seed(0)
    model = build_model(WRNConfig(), 10)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 1.47e6) / 1.47e6 < 0.01, n_params
    assert model.feature_dim == 128 and model.bn.momentum == 0.001
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert model.features(x).shape == (4, 128)
    logits = model(x)
    assert logits.shape == (4, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    before = model.head.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.head.weight)
    assert model.head.bias.abs().sum() > 0 and torch.isfinite(model(x)).all()


def test_wrn_config_checks_and_yaml_composes():
    from hydra import compose, initialize_config_module

    from ltbench.config import to_schema
    from ltbench.models.wrn import WRNConfig

    with pytest.raises(ConfigError, match="6n\\+4"):
        WRNConfig(depth=27)
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = to_schema(compose("train", overrides=["model=wrn28_2"]))
    assert isinstance(cfg.model, WRNConfig) and (cfg.model.depth, cfg.model.widen) == (28, 2)
