"""Device-side augmentation of image-file datasets (ltbench.data.image_aug) against torchvision.transforms.v2's
functional ops given the same drawn parameters (RandomResizedCrop's box, flip, ColorJitter's factors and order)."""

import pytest
import torch
from torchvision.transforms.v2 import functional as F

import ltbench.data.image_aug as A
from ltbench.data.views import rrc_params

N = 12


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.randint(0, 256, (N, 3, 9, 11), generator=g, dtype=torch.uint8).float()
    big = torch.nn.functional.interpolate(smooth, size=(60, 76), mode="bicubic", align_corners=False)
    return big.round().clamp(0, 255).to(torch.uint8)  # photo-like content, 60 x 76 (not square)


def params(x: torch.Tensor, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    top, left, h, w = rrc_params(len(x), x.shape[2], x.shape[3], g, scale=(0.08, 1.0))
    return top, left, h, w, torch.rand(len(x), generator=g) < 0.5


def reference(x: torch.Tensor, p, size: int) -> torch.Tensor:
    top, left, h, w, flip = p
    out = []
    for i in range(len(x)):
        y = F.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size], antialias=True)
        out.append(F.horizontal_flip(y) if flip[i] else y)
    return torch.stack(out)


@pytest.mark.parametrize("size", [24, 100])  # down- and up-sampling boxes
def test_batched_resized_crop_equals_torchvision_on_float(batch, size):
    p = params(batch)
    ours = A.resized_crop_aa(batch.float() / 255, *p[:4], size, p[4])
    # float32 weights from float64 vs aten's float32: rounding only
    assert (ours - reference(batch.float() / 255, p, size)).abs().max() < 1e-5
    # and within one level of torchvision's uint8 path (aten rounds its fixed-point uint8 result)
    assert (ours.mul(255).round() - reference(batch, p, size).float()).abs().max() <= 1


def test_per_image_uint8_resized_crop_is_torchvision_exactly(batch):
    p = params(batch, seed=2)
    assert torch.equal(A.resized_crop_loop(batch, *p[:4], 32, p[4]).mul(255).round().to(torch.uint8),
                       reference(batch, p, 32))  # fmt: skip


def test_rrc_flip_draws_the_same_boxes_on_either_resampling_path(batch):
    a = A.rrc_flip(batch, 32, torch.Generator().manual_seed(7))  # CPU: the per-image path
    p = params(batch, seed=7)  # rrc_flip draws the box, then the flips, from its generator
    b = A.resized_crop_aa(batch.float() / 255, *p[:4], 32, p[4])
    assert (a - b).abs().max() <= 1 / 255 + 1e-6


def test_color_jitter_equals_torchvision_in_each_images_order(batch):
    x = batch[:, :, :20, :20].float() / 255
    factors, order = A.jitter_params(len(x), torch.Generator().manual_seed(3))
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and sorted(order[0].tolist()) == [0, 1, 2]
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    ref = []
    for i in range(len(x)):
        y = x[i]
        for k in order[i].tolist():
            y = ops[k](y, float(factors[i, k]))
        ref.append(y)
    assert (A.color_jitter3(x, factors, order) - torch.stack(ref)).abs().max() < 1e-6


def test_center_crop_and_normalisation_are_torchvision_exactly(batch):
    from torchvision.transforms import v2

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = v2.Compose([v2.CenterCrop(33), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ours = A.to_normalized(A.center_crop(batch, 33), mean, std)
    assert torch.equal(ours, torch.stack([ref(img) for img in batch]))


def test_imagenet_recipe_is_reproducible_and_in_range(batch):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    a = A.imagenet_train(batch, 32, mean, std, torch.Generator().manual_seed(5))
    b = A.imagenet_train(batch, 32, mean, std, torch.Generator().manual_seed(5))
    c = A.imagenet_train(batch, 32, mean, std, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (N, 3, 32, 32)
    assert a.min() >= -2 - 1e-6 and a.max() <= 2 + 1e-6  # [0, 1] normalised by mean 0.5, std 0.25


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TV_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)


def tv_jitter(y: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    for k in order.tolist():
        y = TV_JITTER[k](y, float(factors[k]))
    return y


@pytest.fixture(scope="module")
def bright(batch) -> torch.Tensor:
    """The batch pushed towards white and black (many 0 and 255 pixels): every clamp of the jitter binds."""
    return (batch.float() * 2 - 100).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("which", ["batch", "bright"])
def test_in_place_jitter_equals_torchvision_at_the_extreme_factors(which, request):
    x = request.getfixturevalue(which)[:, :, :20, :24].float() / 255
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    g = torch.Generator().manual_seed(4)
    for i in range(len(x)):  # every image: extreme factors (0.6 or 1.4), every order over the batch
        factors = torch.where(torch.rand(3, generator=g) < 0.5, 0.6, 1.4)
        order = perms[i % 6]
        ours = A.jitter_inplace(x[i].clone(), torch.empty(20, 24), factors.tolist(), order.tolist())
        assert (ours - tv_jitter(x[i], factors, order)).abs().max() <= 3e-7


@pytest.mark.parametrize("which", ["batch", "bright"])
@pytest.mark.parametrize("size", [24, 100])  # down- and up-sampling boxes
def test_cpu_train_recipe_equals_torchvision_on_the_same_draws(which, size, request):
    x = request.getfixturevalue(which)
    ours = A.imagenet_train(x, size, MEAN, STD, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)  # the recipe's draws, in its order: boxes, flips, jitter
    top, left, h, w = rrc_params(len(x), x.shape[2], x.shape[3], g, scale=(0.08, 1.0))
    flip = torch.rand(len(x), generator=g) < 0.5
    factors, order = A.jitter_params(len(x), g)
    ref = []
    for i in range(len(x)):
        y = F.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size], antialias=True)
        y = F.to_dtype(F.horizontal_flip(y) if flip[i] else y, torch.float32, scale=True)
        ref.append(F.normalize(tv_jitter(y, factors[i], order[i]), list(MEAN), list(STD)))
    assert ours.is_contiguous(memory_format=torch.channels_last) and ours.dtype == torch.float32
    assert (ours - torch.stack(ref)).abs().max() <= 1e-6  # a few ulps of values up to 2.64 (measured: 8.3e-7)


def test_cpu_recipe_and_the_batched_ops_of_other_devices_agree(batch):
    """The CPU's per-image path and the batched ops (rrc_flip, color_jitter3: what a GPU runs) draw the same."""
    ours = A.imagenet_train(batch, 32, MEAN, STD, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    x = A.rrc_flip(batch, 32, g)
    factors, order = A.jitter_params(len(x), g)
    other = A.normalize01(A.color_jitter3(x, factors, order), MEAN, STD)
    assert (ours - other).abs().max() <= 2e-6
