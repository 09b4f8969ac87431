"""Batched augmentation of image-file datasets on the training device, and the feed that serves the decoded cache.

Every random parameter is drawn on the CPU from the batch's ``torch.Generator`` (a few numbers per image), then
moved to the device: CPU and GPU runs draw the same augmentations, and the global RNG is never touched.

The ImageNet-LT training recipe (``ltbench.data.images.train_transform``: RandomResizedCrop(size) with
antialiasing, RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0)) becomes

* :func:`rrc_flip`: the crop box of torchvision's ``RandomResizedCrop.get_params`` (scale 0.08-1, ratio 3/4-4/3;
  ``ltbench.data.views.rrc_params``), resampled with the antialiased bilinear filter of ``torch.nn.functional.
  interpolate(..., antialias=True)`` (aten ``upsample_bilinear2d_aa``, PIL's ``ImagingResample``: a triangle filter
  stretched by the scale when downsampling, truncated to the box and renormalised), written as two per-image
  resampling matrices so that a whole batch is two batched matmuls; the flip is the column matrix reversed.
* :func:`color_jitter3`: brightness, contrast, saturation factors uniform in [0.6, 1.4], in a random order per
  image (torchvision ``ColorJitter`` with hue 0 applies three ops), torchvision's float formulas.

On the CPU, :func:`imagenet_train` runs the whole recipe one image at a time (:func:`_train_cpu`: uint8 resize,
float jitter with fewer passes, normalise, one copy into the channels_last batch) with the same draws: about 2.7x
the rate of the batched ops on one core (scripts/bench_loading.py; the batched ops stay the path of other devices).

Inputs are the cached S x S squares, not the full-resolution images: the crop box is drawn over the centre square
at the cache's resolution (the reference draws it over the whole decoded photo), the one documented difference of
the cached training pipeline. Evaluation (centre crop of the cached square) equals the reference bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ltbench.data.augment import random_crop, random_flip
from ltbench.data.views import adjust_brightness, adjust_contrast, adjust_saturation, normalize01, rrc_params


# ------------------------------------------------------------------------------------------------- resampling
def aa_weights(start: Tensor, length: Tensor, in_size: int, out_size: int, device: torch.device) -> Tensor:
    """Per-image resampling matrices N x out_size x in_size: output pixel i of image n reads the box
    [start[n], start[n] + length[n]) of an axis of ``in_size`` pixels with aten's antialiased bilinear weights.

    aten (``_compute_weights_aa``, align_corners=False): scale = length / out; support = scale if scale >= 1 else 1;
    centre = scale (i + 0.5); taps j in [max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5),
    length)); weight triangle((j - centre + 0.5) / max(scale, 1)), normalised to sum 1. Computed in float64, so the
    float32 result differs from aten's float32 weights by rounding only."""
    length64 = length.to(device=device, dtype=torch.float64)[:, None, None]
    scale = length64 / out_size
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))
    inv = 1.0 / support
    centre = scale * (torch.arange(out_size, device=device, dtype=torch.float64)[None, :, None] + 0.5)
    lo = torch.clamp((centre - support + 0.5).trunc(), min=0)
    hi = torch.minimum((centre + support + 0.5).trunc(), length64)
    j = torch.arange(in_size, device=device, dtype=torch.float64)[None, None, :] - start.to(device)[:, None, None]
    w = torch.clamp(1 - ((j - centre + 0.5) * inv).abs(), min=0) * ((j >= lo) & (j < hi))
    return (w / w.sum(-1, keepdim=True).clamp_min(1e-12)).float()


def resized_crop_aa(
    x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, size: int, flip: Tensor | None = None
) -> Tensor:
    """Box (top, left, height, width) of each image of a float N x C x H x W batch resized to size x size with
    antialiasing (= torchvision ``resized_crop(..., antialias=True)`` on float tensors up to float rounding), then
    mirrored where ``flip`` (CPU bool) holds. Box tensors are CPU int64."""
    h, w = x.shape[-2:]
    wy = aa_weights(top, height, h, size, x.device)
    wx = aa_weights(left, width, w, size, x.device)
    if flip is not None:
        wx = torch.where(flip.to(x.device)[:, None, None], wx.flip(1), wx)
    tmp = torch.matmul(wy[:, None], x)  # N x C x size x W
    return torch.matmul(tmp, wx.transpose(1, 2)[:, None])  # N x C x size x size


def resized_crop_loop(
    x_uint8: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, size: int, flip: Tensor | None = None
) -> Tensor:
    """As :func:`resized_crop_aa`, one ``interpolate(antialias=True)`` call per image on the uint8 crop (channels
    last): on the CPU this is aten's vectorised uint8 kernel, the very call torchvision's ``resized_crop`` makes on a
    uint8 tensor, so the result equals torchvision's uint8 output exactly, and is several times faster there than the
    matmuls. Returns float [0, 1]."""
    import torch.nn.functional as nnf

    x = x_uint8.contiguous(memory_format=torch.channels_last)
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8, device=x.device)
    mirror = [False] * len(x) if flip is None else flip.tolist()
    for i, (t, lf, h, w) in enumerate(zip(top.tolist(), left.tolist(), height.tolist(), width.tolist())):
        crop = x[i : i + 1, :, t : t + h, lf : lf + w]
        y = nnf.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = y.flip(-1) if mirror[i] else y
    return out.float().div_(255.0)  # contiguous N x C x H x W: the jitter's row gathers are plain copies


def rrc_flip(x_uint8: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """RandomResizedCrop(size, antialias=True) then RandomHorizontalFlip on a uint8 batch -> float [0, 1].

    The same draws on every device; the resampling differs by rounding only: on the CPU per image in uint8
    (:func:`resized_crop_loop`, = torchvision on uint8), elsewhere as batched float matmuls (:func:`resized_crop_aa`,
    = torchvision on float to about 5e-6, so within one uint8 level of the CPU result)."""
    n, _, h, w = x_uint8.shape
    top, left, height, width = rrc_params(n, h, w, gen, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    flip = torch.rand(n, generator=gen) < 0.5
    if x_uint8.device.type == "cpu":
        return resized_crop_loop(x_uint8, top, left, height, width, size, flip)
    return resized_crop_aa(x_uint8.float().div_(255.0), top, left, height, width, size, flip).clamp_(0, 1)


_JITTER3 = (adjust_brightness, adjust_contrast, adjust_saturation)


def jitter_params(n: int, gen: torch.Generator, strength: float = 0.4) -> tuple[Tensor, Tensor]:
    """(factors N x 3 uniform in [1 - s, 1 + s], order N x 3: a random permutation of brightness, contrast,
    saturation per image), drawn on the CPU."""
    factors = 1 - strength + 2 * strength * torch.rand(n, 3, generator=gen, dtype=torch.float64)
    order = torch.rand(n, 3, generator=gen).argsort(dim=1)
    return factors.float(), order


def color_jitter3(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """ColorJitter(b, c, s, hue=0) on float [0, 1] images with per-image factors and op order (torchvision's float
    formulas: ``ltbench.data.views.adjust_*``)."""
    x = x.clone()  # updated in place below
    for perm in order.unique(dim=0):  # at most 3! groups: each image is gathered, jittered and written back once
        rows = (order == perm).all(1).nonzero().squeeze(1)
        idx = rows.to(x.device)
        y = x.index_select(0, idx)
        for k in perm.tolist():
            y = _JITTER3[k](y, factors[rows, k])
        x.index_copy_(0, idx, y)
    return x


def to_normalized(x_uint8: Tensor, mean, std) -> Tensor:
    """uint8 -> float32 normalised, channels_last, with torchvision's arithmetic (``ToDtype(float32, scale=True)``
    multiplies by 1/255, ``Normalize`` subtracts and divides), so that the evaluation batches of the cache equal
    those of the DataLoader pipeline bit for bit (``augment.normalize`` divides by 255: one ulp apart).

    Computed in an N x H x (W * 3) buffer (the channels_last memory) against per-channel rows tiled W times: the
    same elementwise ops as ``normalize01`` (so the same bits), but each a contiguous, vectorised loop instead of one
    broadcasting a 3-vector over the innermost dimension (several times faster on the CPU)."""
    n, c, h, w = x_uint8.shape
    out = torch.empty((n, h, w, c), dtype=torch.float32, device=x_uint8.device)
    out.copy_(x_uint8.permute(0, 2, 3, 1))
    m = torch.tensor(mean, dtype=torch.float32, device=out.device).repeat(w)
    s = torch.tensor(std, dtype=torch.float32, device=out.device).repeat(w)
    out.view(n, h, w * c).mul_(1.0 / 255).sub_(m).div_(s)
    return out.permute(0, 3, 1, 2)


def center_crop(x: Tensor, size: int) -> Tensor:
    """The centre size x size window (torchvision ``center_crop`` offsets: int(round((H - size) / 2)))."""
    h, w = x.shape[-2:]
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return x[..., top : top + size, left : left + size]


def imagenet_train(x_uint8: Tensor, size: int, mean, std, gen: torch.Generator) -> Tensor:
    """The ImageNet-LT training recipe on the device -> normalised float32, channels_last.

    Draws (from ``gen``, in this order): the crop boxes, the flips, the jitter factors and orders; the same on every
    device. On the CPU each image goes through the whole recipe while it sits in the cache (:func:`_train_cpu`),
    elsewhere the batch goes through each op in turn (:func:`rrc_flip`, :func:`color_jitter3`)."""
    if x_uint8.device.type == "cpu":
        return _train_cpu(x_uint8, size, mean, std, gen)
    x = rrc_flip(x_uint8, size, gen)
    factors, order = jitter_params(len(x), gen)
    return normalize01(color_jitter3(x, factors, order), mean, std)


_LUMA = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale


def jitter_inplace(y: Tensor, gray: Tensor, factors: list[float], order: list[int]) -> Tensor:
    """ColorJitter(b, c, s, hue=0) on one contiguous float [0, 1] image 3 x S x S, in place (``gray``: an S x S
    scratch plane); torchvision's float formulas (``adjust_brightness`` / ``_contrast`` / ``_saturation``), op k with
    factor ``factors[k]``, in ``order``.

    Fewer passes than :func:`color_jitter3`, equal to it up to float rounding (a few ulps): saturation's (1 - f)
    is folded into the luma weights, and an op with factor <= 1 is not clamped (x f <= x; a convex blend of values
    in [0, 1] stays in [0, 1] up to one ulp)."""
    r, g, b = y.unbind(0)
    for k in order:
        f = factors[k]
        if k == 0:
            y.mul_(f)
            if f > 1:
                y.clamp_(max=1.0)
            continue
        w = 1.0 if k == 1 else 1.0 - f  # contrast blends with the mean luma, saturation with the luma plane
        torch.mul(r, _LUMA[0] * w, out=gray).add_(g, alpha=_LUMA[1] * w).add_(b, alpha=_LUMA[2] * w)
        if k == 1:
            y.mul_(f).add_((1.0 - f) * float(gray.mean()))
        else:
            y.mul_(f).add_(gray)
        if f > 1:
            y.clamp_(0, 1)
    return y


def _train_cpu(x_uint8: Tensor, size: int, mean, std, gen: torch.Generator) -> Tensor:
    """:func:`imagenet_train` on the CPU, one image at a time through the whole recipe (its ~0.6 MB of floats stay
    in the core's cache; the batched ops stream the whole batch through memory once per op): aten's uint8
    antialiased resize of the crop (= torchvision on uint8, :func:`resized_crop_loop`), the flip, ``ToDtype(float32,
    scale=True)`` (x * (1/255)), :func:`jitter_inplace`, ``Normalize`` on the contiguous planes, then one copy into
    the channels_last output. Equal to torchvision's ops on the same draws up to float rounding (tests/
    test_image_aug.py); about 3x the batched ops' rate on one core."""
    import torch.nn.functional as nnf

    n, _, h, w = x_uint8.shape
    top, left, height, width = rrc_params(n, h, w, gen, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    mirror = (torch.rand(n, generator=gen) < 0.5).tolist()
    factors, order = jitter_params(n, gen)
    x = x_uint8.contiguous(memory_format=torch.channels_last)  # a view when it comes from the N x S x S x 3 cache
    out = torch.empty((n, 3, size, size), dtype=torch.float32, memory_format=torch.channels_last)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    y, gray = torch.empty((3, size, size)), torch.empty((size, size))
    boxes = zip(top.tolist(), left.tolist(), height.tolist(), width.tolist(), factors.tolist(), order.tolist())
    for i, (t, lf, bh, bw, f, o) in enumerate(boxes):
        crop = x[i : i + 1, :, t : t + bh, lf : lf + bw]
        y8 = nnf.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        y.copy_(y8.flip(-1) if mirror[i] else y8).mul_(1.0 / 255)
        out[i].copy_(jitter_inplace(y, gray, f, o).sub_(m).div_(s))
    return out


def dir_train(x_uint8: Tensor, mean, std, gen: torch.Generator) -> Tensor:
    """DIR's AgeDB recipe after Resize((s, s)): RandomCrop(s, padding=16) (zero fill), flip, normalise."""
    return to_normalized(random_flip(random_crop(x_uint8, 16, gen), gen), mean, std)


# --------------------------------------------------------------------------------------------------------- feed
def resident_or_disk(cache: str, n: int, side: int, device: torch.device) -> str:
    """Where ``dataset.cache`` puts the images: ``auto`` is ``device`` on a GPU whose free memory is at least twice
    the cache's size (n x S x S x 3 bytes), else ``disk``."""
    if cache != "auto":
        return cache
    if device.type != "cuda":
        return "disk"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if 2 * n * side * side * 3 <= free else "disk"


class CachedFeed:
    """Batches of an image-file dataset served from its decoded cache (``dataset.cache`` disk or device).

    One cache per dataset: the sorted union of its train, val and test lists (a different holdout seed or
    val_per_class reuses it). ``disk``: rows are gathered from the memory-mapped shards on a background thread, one
    batch ahead, into pinned memory (on CUDA) and copied asynchronously; ``device``: the cache lives on the device.
    Recipes: ``imagenet`` (cache = Resize(resize) + CenterCrop(resize); evaluation = CenterCrop(image_size)) and
    ``dir`` (cache = Resize((s, s)); evaluation = the cache).
    """

    def __init__(self, data, cfg, device: torch.device) -> None:
        from pathlib import Path

        from ltbench.data.cache import ensure_cache

        self.data, self.device, self.size = data, device, cfg.image_size
        self.recipe = data.image_recipe or "imagenet"
        side = cfg.resize if self.recipe == "imagenet" else cfg.image_size
        mode = "short_center" if self.recipe == "imagenet" else "square"
        splits = {"train": data.train_files, "val": data.val_files or [], "test": data.test_files}
        pool = sorted(set().union(*splits.values()))
        row = {p: i for i, p in enumerate(pool)}
        self.rows = {k: np.asarray([row[p] for p in v], dtype=np.int64) for k, v in splits.items()}
        self.labels = {k: getattr(data, f"{k}_y").to(device) for k in splits}
        self.cache = ensure_cache(Path(data.root), pool, side, mode, cfg.decoder, cfg.cache_dir, cfg.num_workers)
        self.where = resident_or_disk(cfg.cache, len(pool), side, device)
        self.resident = self.cache.to_device(device) if self.where == "device" else None
        self._pool = ThreadPoolExecutor(1) if self.resident is None else None

    def _fetch(self, rows: np.ndarray) -> Tensor:
        """uint8 N x 3 x S x S (a channels_last view of the N x S x S x 3 rows) on the device."""
        if self.resident is not None:
            return self.resident.index_select(0, torch.from_numpy(rows).to(self.device)).permute(0, 3, 1, 2)
        pin = self.device.type == "cuda"
        host = torch.empty((len(rows), self.cache.side, self.cache.side, 3), dtype=torch.uint8, pin_memory=pin)
        self.cache.gather(rows, out=host.numpy())
        return host.to(self.device, non_blocking=pin).permute(0, 3, 1, 2)

    def _raw(self, split: str, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(uint8 images, labels, indices) in the order of ``order``; on disk, the next batch is read meanwhile."""
        rows, labels = self.rows[split], self.labels[split]
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        if self._pool is None:
            for idx in chunks:
                yield self._fetch(rows[idx.cpu().numpy()]), labels[idx.to(self.device)], idx
            return
        ahead = self._pool.submit(self._fetch, rows[chunks[0].cpu().numpy()]) if chunks else None
        for k, idx in enumerate(chunks):
            x = ahead.result()
            if k + 1 < len(chunks):
                ahead = self._pool.submit(self._fetch, rows[chunks[k + 1].cpu().numpy()])
            yield x, labels[idx.to(self.device)], idx

    def train(self, indices: Tensor, batch_size: int, augmented: bool, gen: torch.Generator, raw: bool = False,
              split: str = "train"):  # fmt: skip
        """Training batches (x, y, idx) of ``split`` (the training set, or a validation stream a method draws): the
        recipe's augmentation, the evaluation view (``augmented`` false) or the uint8 cache images (``raw``, what
        ``raw_transform`` gives)."""
        d = self.data
        for x, y, idx in self._raw(split, indices, batch_size):
            if raw:
                yield x.contiguous(), y, idx
            elif not augmented:
                yield self._eval_view(x), y, idx
            elif self.recipe == "imagenet":
                yield imagenet_train(x, self.size, d.mean, d.std, gen), y, idx
            else:
                yield dir_train(x, d.mean, d.std, gen), y, idx

    def _eval_view(self, x: Tensor) -> Tensor:
        x = center_crop(x, self.size) if self.recipe == "imagenet" else x
        return to_normalized(x, self.data.mean, self.data.std)

    def evaluate(self, split: str, batch_size: int, indices: Tensor | None = None):
        """Evaluation batches (x, y) of ``split`` in order (or ``indices``)."""
        name = "train" if split == "train" else split
        order = torch.arange(len(self.rows[name])) if indices is None else indices
        for x, y, _ in self._raw(name, order, batch_size):
            yield self._eval_view(x), y
