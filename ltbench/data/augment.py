"""Batched augmentation on uint8 image tensors, on whatever device the batch lives.

Random parameters come from a CPU ``torch.Generator`` (a few numbers per image) and are moved to the batch's
device, so a run draws the same augmentations on CPU and GPU and resumes exactly at an epoch boundary.

Invariant: nothing here waits for the device (no host sync per batch, except AutoAugment, which runs per image on
the CPU). The draws are copied with ``non_blocking=True``: from pageable CPU memory the driver stages the bytes
before the call returns, so the CPU tensor may be freed at once and the copy never waits for the kernels queued
before it; the normalisation constants are made once per device. The values, and so every number of a run, are
those of the blocking copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltbench.config import AugmentConfig


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and take a random HxW window per image (torchvision RandomCrop(padding=p))."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    d = to_device(torch.stack([dy, dx]), x.device)  # one copy for both offsets
    rows = (d[0][:, None] + torch.arange(h, device=x.device))[:, :, None]  # n x h x 1
    cols = (d[1][:, None] + torch.arange(w, device=x.device))[:, None, :]  # n x 1 x w
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing gives n x h x w x c; move channels back.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = to_device(torch.rand(x.shape[0], generator=gen) < 0.5, x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def rotation_grid(angles: torch.Tensor, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``grid_sample`` grids (N x h x w x 2) rotating each image counter-clockwise by ``angles`` degrees (CPU tensor)
    about its centre, output size = input size: the arithmetic of torchvision's tensor ``rotate`` (v2
    ``rotate_image``: ``angle % 360``, ``_get_inverse_affine_matrix(center=[0, 0], -angle)``, ``_affine_grid``).

    Pixel centres sit at ``i + 0.5 - w/2`` with the image centre at 0 (align_corners=False), so the rotation is about
    the centre of the image, not of pixel (0, 0). The inverse matrix maps an output point (x, y) (y down) to its
    source [[cos a, -sin a], [sin a, cos a]] (x, y); it is built in float64, cast to ``dtype`` and divided by the half
    sizes there, like torchvision. The grid is multiply-adds per element (torchvision: one bmm), so it is computed the
    same way on every device (a matmul could run in TF32 on a GPU).
    """
    a = torch.deg2rad(-torch.remainder(angles.double(), 360.0))  # torchvision: radians(-(angle % 360))
    cos, sin = torch.cos(a), torch.sin(a)
    m = torch.stack((cos, sin, -sin, cos), 1).to(dtype)  # inverse matrix [d, -b, -c, a] of the reference, N x 4
    m = to_device(m / torch.tensor([0.5 * w, 0.5 * w, 0.5 * h, 0.5 * h], dtype=dtype), device)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, dtype=torch.float32, device=device).to(dtype)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, dtype=torch.float32, device=device).to(dtype)
    xs, ys = xs[None, None, :], ys[None, :, None]
    gx = xs * m[:, 0, None, None] + ys * m[:, 1, None, None]
    gy = xs * m[:, 2, None, None] + ys * m[:, 3, None, None]
    return torch.stack((gx, gy), -1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate image i of an NCHW batch by ``angles[i]`` degrees counter-clockwise about the image centre: nearest
    neighbour, same size, zero fill (torchvision ``rotate(img, angle, NEAREST)`` with fill 0, which is what
    ``RandomRotation(d)`` applies). uint8 is sampled in float32 and cast back exactly (nearest copies values)."""
    if len(x) == 0:
        return x
    dtype = x.dtype if x.is_floating_point() else torch.float32
    grid = rotation_grid(angles, x.shape[-2], x.shape[-1], dtype, x.device)
    out = F.grid_sample(x.to(dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out if x.is_floating_point() else out.round_().to(x.dtype)


def random_rotate(x: torch.Tensor, degrees: float, gen: torch.Generator) -> torch.Tensor:
    """torchvision ``RandomRotation(degrees)`` per image (RIDE's CIFAR recipe: 15, after RandomCrop and
    RandomHorizontalFlip): one angle uniform in [-degrees, degrees) per image, drawn on CPU from ``gen``."""
    angles = (torch.rand(x.shape[0], generator=gen, dtype=torch.float64) * 2 - 1) * degrees
    return rotate(x, angles)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a size x size square centred at a random pixel of each image (clipped at the border)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen)
    cx = torch.randint(0, w, (n,), generator=gen)
    c = to_device(torch.stack([cy, cx]), x.device)
    cy, cx = c[0], c[1]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    half = size // 2
    inside = (
        (ys >= (cy - half)[:, None, None])
        & (ys < (cy - half + size)[:, None, None])
        & (xs >= (cx - half)[:, None, None])
        & (xs < (cx - half + size)[:, None, None])
    )
    return x.masked_fill(inside[:, None], 0)


_AUTOAUGMENT = None


def autoaugment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """torchvision's CIFAR-10 AutoAugment policy, one policy draw per image (uint8 in, uint8 out)."""
    global _AUTOAUGMENT
    from torchvision.transforms import v2

    if _AUTOAUGMENT is None:
        _AUTOAUGMENT = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    # torchvision draws from the global RNG: fork it and seed from our generator to stay reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([_AUTOAUGMENT(img) for img in x.cpu()])
    return out.to(x.device)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Geometric/colour augmentation of a uint8 batch, in torchvision's order of the CIFAR recipes: crop, flip,
    rotation, AutoAugment (Cutout is applied after normalisation, see ltbench.feed). A step that is off draws nothing
    from ``gen``: with ``rotate`` 0 the batches and the stream are exactly those from before the option existed."""
    if cfg.crop:
        x = random_crop(x, cfg.padding, gen)
    if cfg.flip:
        x = random_flip(x, gen)
    if cfg.rotate:
        x = random_rotate(x, cfg.rotate, gen)
    if cfg.autoaugment:
        x = autoaugment(x, gen)
    return x


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor of random draws on ``device`` without waiting for the device (see the module's invariant)."""
    return t if t.device == device else t.to(device, non_blocking=True)


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (device, mean, std) -> (mean, std) 1 x C x 1 x 1


def _mean_std(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if key not in _CONSTANTS:
        m = torch.tensor(key[1], dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(key[2], dtype=torch.float32).view(1, -1, 1, 1)
        _CONSTANTS[key] = (m.to(device), s.to(device))
    return _CONSTANTS[key]


def normalize(x: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> float, (x/255 - mean) / std, channels_last for faster convolutions. The constants are float32
    tensors of ``mean`` / ``std`` made once per device (read-only: never modified in place)."""
    m, s = _mean_std(mean, std, x.device)
    out = (x.float().div_(255.0) - m) / s
    return out.to(dtype).contiguous(memory_format=torch.channels_last)


def resize_short(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Float NCHW batch with its short side resized to ``size``, the long side ``int(size * long / short)``
    (torchvision ``Resize(size)``'s output size), with the antialiased (PIL-matching) kernels, torchvision's default."""
    h, w = x.shape[-2:]
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if new == (h, w):
        return x
    align = None if mode == "nearest" else False
    return F.interpolate(x, size=new, mode=mode, align_corners=align, antialias=mode != "nearest")


def five_crops(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """torchvision ``FiveCrop(size)`` of a batch, in its order: top-left, top-right, bottom-left, bottom-right,
    centre (centre offsets ``int(round((h - size) / 2))``, as ``center_crop``)."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"a crop of {size} does not fit images of {h} x {w}")
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    boxes = ((0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left))
    return [x[..., i : i + size, j : j + size] for i, j in boxes]


def tte_views(x: torch.Tensor, size: int, expand: int, mode: str) -> list[torch.Tensor]:
    """The test-time-ensemble views of LIFT (shijxcs/LIFT trainer.py ``build_data_loader``, ``tte_mode``):
    ``Resize(size + expand)`` (bilinear, torchvision's default) then ``FiveCrop(size)`` (``fivecrop``) or
    ``TenCrop(size)`` (``tencrop``: the five crops, then the five of the horizontally flipped image)."""
    big = resize_short(x.float(), size + expand, "bilinear")
    views = five_crops(big, size)
    if mode == "tencrop":
        views += five_crops(big.flip(-1), size)
    return views
