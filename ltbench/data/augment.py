"""Batched augmentation on uint8 image tensors, on whatever device the batch lives.

Random parameters come from a CPU ``torch.Generator`` (a few numbers per image) and are moved to the batch's
device, so a run draws the same augmentations on CPU and GPU and resumes exactly at an epoch boundary.
"""

from __future__ import annotations

import torch

from ltbench.config import AugmentConfig


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and take a random HxW window per image (torchvision RandomCrop(padding=p))."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n x h x 1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n x 1 x w
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing gives n x h x w x c; move channels back.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a size x size square centred at a random pixel of each image (clipped at the border)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen).to(x.device)
    cx = torch.randint(0, w, (n,), generator=gen).to(x.device)
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
    """Geometric/colour augmentation of a uint8 batch (Cutout is applied after normalisation, see below)."""
    if cfg.crop:
        x = random_crop(x, cfg.padding, gen)
    if cfg.flip:
        x = random_flip(x, gen)
    if cfg.autoaugment:
        x = autoaugment(x, gen)
    return x


def normalize(x: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> float, (x/255 - mean) / std, channels_last for faster convolutions."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    out = (x.float().div_(255.0) - m) / s
    return out.to(dtype).contiguous(memory_format=torch.channels_last)
