"""augment.rotate: RIDE's RandomRotation(15) as a batched rotation (ltbench.data.augment).

Reference: frank-xwang/RIDE-LongTailRecognition ``data_loader/cifar_data_loaders.py`` (ImbalanceCIFAR100DataLoader:
``RandomCrop(32, padding=4), RandomHorizontalFlip(), RandomRotation(15)``), i.e. torchvision ``RandomRotation``
defaults: nearest neighbour, expand=False, the image centre, fill 0, one angle uniform in [-15, 15] per image.

Tolerances: against torchvision's tensor ``rotate`` the result is exact (the same grid arithmetic, the same
``grid_sample``). Against PIL's ``Image.rotate`` (what the reference's loader runs, on PIL images) nearest-neighbour
ties of the sampling grid may round the other way (PIL works in double precision, grid_sample on a float32
coordinate): at most 4 pixels of an image's 1024 differ.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import SMOKE
from hydra import compose, initialize_config_module

import ltbench.data.augment as A
from ltbench.config import AugmentConfig, to_schema
from ltbench.errors import ConfigError
from ltbench.runner import run
from ltbench.seeding import generator

ANGLES = [15.0, -15.0, 7.3, -0.4, 1e-3, 11.25, -14.99, 45.0, 90.0, -170.5]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(
        0, 256, (len(ANGLES), 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8
    )


@pytest.fixture(scope="module")
def compose_cfg():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=list(o))


def _tv(img: torch.Tensor, angle: float) -> torch.Tensor:
    return TF.rotate(img, angle, interpolation=TF.InterpolationMode.NEAREST)


# ---------------------------------------------------------------------------------- the rotation against references


def test_rotation_equals_torchvision_rotate_exactly(images):
    angles = torch.tensor(ANGLES, dtype=torch.float64)
    out = A.rotate(images, angles)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i, a in enumerate(ANGLES):
        assert torch.equal(out[i], _tv(images[i], a)), a
    x = images.float() / 255  # float input as augment_batch may receive it: sampled in its own dtype
    out_f = A.rotate(x, angles)
    assert out_f.dtype == torch.float32
    for i, a in enumerate(ANGLES):
        assert torch.equal(out_f[i], _tv(x[i], a)), a


def test_rotation_of_non_square_images_equals_torchvision(images):
    x = images[:4, :, :24, :]  # the half sizes differ per axis: the matrix is rescaled per axis
    out = A.rotate(x, torch.tensor(ANGLES[:4], dtype=torch.float64))
    for i in range(4):
        assert torch.equal(out[i], _tv(x[i], ANGLES[i]))


def test_rotation_matches_pil_rotate_up_to_grid_ties(images):
    out = A.rotate(images, torch.tensor(ANGLES, dtype=torch.float64))
    for i, a in enumerate(ANGLES):
        pil = PIL.Image.fromarray(images[i].permute(1, 2, 0).numpy()).rotate(a, resample=PIL.Image.NEAREST)
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        assert (ref != out[i]).any(0).sum() <= 4, a


def test_positive_angles_turn_counter_clockwise_about_the_image_centre():
    x = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    x[0, 0, 15, 28] = 255  # right of the centre (16, 16): centre of the pixel at (28.5, 15.5)
    out = A.rotate(x, torch.tensor([90.0], dtype=torch.float64))
    # (dx, dy) = (12.5, -0.5) turned a quarter counter-clockwise (y down) is (-0.5, -12.5): pixel (row 3, col 15)
    assert out[0, 0].nonzero().tolist() == [[3, 15]]
    corners = A.rotate(torch.full((1, 3, 32, 32), 200, dtype=torch.uint8), torch.tensor([15.0], dtype=torch.float64))
    assert corners[0, :, 0, 0].eq(0).all() and corners[0, :, 16, 16].eq(200).all()  # zero fill, centre kept


# ------------------------------------------------------------------------------------------------ in augment_batch


def test_rotate_zero_leaves_the_batch_and_the_random_stream_unchanged(images):
    """rotate=0 (the default) draws nothing: the crop/flip output and the generator's state are those of the
    pipeline before the option existed (crop then flip, written out here), so existing runs stay bit-identical."""
    g_old, g_new = generator(0, 1, "batch"), generator(0, 1, "batch")
    before = A.random_flip(A.random_crop(images, 4, g_old), g_old)
    after = A.augment_batch(images, AugmentConfig(rotate=0.0), g_new)
    assert AugmentConfig().rotate == 0.0
    assert torch.equal(before, after)
    assert torch.equal(g_old.get_state(), g_new.get_state())
    assert torch.equal(torch.rand(4, generator=g_old), torch.rand(4, generator=g_new))


def test_rotation_comes_after_crop_and_flip_with_angles_in_range(images, monkeypatch):
    """torchvision's order in the reference: crop, flip, then rotation; angles uniform in [-rotate, rotate]."""
    x = images.repeat(26, 1, 1, 1)  # 260 images: the angles spread over the range
    seen = []
    real = A.rotate
    monkeypatch.setattr(A, "rotate", lambda y, a: seen.append(a) or real(y, a))
    out = A.augment_batch(x, AugmentConfig(rotate=15), generator(0, 2, "batch"))
    (angles,) = seen
    assert angles.device.type == "cpu" and len(angles) == len(x)
    assert angles.abs().max() <= 15 and angles.min() < -12 and angles.max() > 12 and abs(angles.mean()) < 2

    g = generator(0, 2, "batch")
    cropped_flipped = A.random_flip(A.random_crop(x, 4, g), g)
    expected_angles = (torch.rand(len(x), generator=g, dtype=torch.float64) * 2 - 1) * 15
    assert torch.equal(angles, expected_angles)
    assert torch.equal(out, real(cropped_flipped, expected_angles))


def test_same_seed_and_epoch_same_batch_other_epoch_other_batch(images):
    cfg = AugmentConfig(rotate=15)
    a = A.augment_batch(images, cfg, generator(7, 3, "batch"))
    assert torch.equal(a, A.augment_batch(images, cfg, generator(7, 3, "batch")))
    assert not torch.equal(a, A.augment_batch(images, cfg, generator(7, 4, "batch")))


def test_empty_batch():
    x = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    assert A.augment_batch(x, AugmentConfig(rotate=15), torch.Generator()).shape == x.shape


# ------------------------------------------------------------------------------------------------------ the config


@pytest.mark.parametrize("value", ["-1", "181", "nan"])
def test_bad_rotate_is_refused_at_composition(compose_cfg, value):
    with pytest.raises(ConfigError, match=r"augment\.rotate"):
        to_schema(compose_cfg(f"augment.rotate={value}"))


def test_ride_recipe_rotates_15_degrees_and_the_default_does_not(compose_cfg):
    ride = to_schema(compose_cfg("experiment=ride_cifar100", "strategy=ride")).augment
    assert (ride.crop, ride.padding, ride.flip, ride.rotate, ride.cutout, ride.autoaugment) == (
        True, 4, True, 15.0, 0, False,
    )  # fmt: skip
    for group in ("standard", "cutout", "autoaugment", "none"):
        assert to_schema(compose_cfg(f"augment={group}")).augment.rotate == 0.0
    assert math.isclose(to_schema(compose_cfg("augment.rotate=7.5")).augment.rotate, 7.5)


def test_ride_trains_with_rotation_end_to_end(compose_cfg, cifar10_root, tmp_path):
    over = [*SMOKE, "strategy=ride", "augment.rotate=15", "model.layer2_width=4", "model.layer3_width=6"]
    data = [f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10"]
    m = run(compose_cfg(*over, *data, f"results_dir={tmp_path}"), tmp_path / "run")
    assert m["status"] == "completed"
    assert "rotate: 15" in (tmp_path / "run" / "config.yaml").read_text()


def test_rotate_at_its_default_leaves_every_identity_as_before_it_existed(compose_cfg):
    """augment.rotate was added after runs were recorded: at 0 it is left out of the config hash and the stage keys
    (existing runs keep their directories, resume and stage caches); any other value is part of them."""
    from ltbench.config import to_schema
    from ltbench.identity import config_hash, identity_tree

    base, rotated = to_schema(compose_cfg()), to_schema(compose_cfg("augment.rotate=15"))
    assert "rotate" not in identity_tree(base, {"stage", "run"})["augment"]
    assert identity_tree(rotated, {"stage", "run"})["augment"]["rotate"] == 15
    assert config_hash(base) == "00afcd58db73", (
        "the default config's identity changed (its hash at 697543b, before augment.rotate): existing runs would lose "
        "their directories, resume and stage caches; mark new fields with ltbench.config.added"
    )
    assert config_hash(rotated) != config_hash(base)
