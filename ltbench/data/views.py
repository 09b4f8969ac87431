"""Batched views for self-/semi-supervised methods: SimSiam's augmentation, FixMatch's weak view and RandAugmentMC.

Every function takes a batch N x 3 x H x W on any device and a CPU ``torch.Generator``. All random parameters are
drawn from that generator on the CPU (a few numbers per image, always the same draws whatever the flags), then moved
to the batch's device, so CPU and GPU draw the same augmentations and a run is reproducible; the global RNG is never
touched. Images are processed together with tensor ops; the only Python loops run over op kinds, never over images.

Images are float in [0, 1] inside (uint8 input is divided by 255); outputs stay in [0, 1].
References:

* ``simsiam_view``: SimSiam's CIFAR augmentation (Chen & He 2021, appendix D: the MoCo-v2 recipe without blur) as
  torchvision transforms: RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)), ColorJitter(0.4, 0.4, 0.4, 0.1) with
  p=0.8, RandomGrayscale(p=0.2), RandomHorizontalFlip.
* ``weak_view``: FixMatch's weak augmentation (flip, reflect-pad by 4, random crop).
* ``rand_augment``: FixMatch's RandAugmentMC (kekmodel/FixMatch-pytorch ``dataset/randaugment.py``, the port of the TF
  original's ``AugmentPoolRAMC``), then Cutout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ltbench.data.augment import random_flip

GRAY = 127 / 255  # the FixMatch port's Cutout colour (127, 127, 127)
RA_OPS = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
    "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY",
)  # fmt: skip
_ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")


# ---------------------------------------------------------------------------------------------------------- helpers
def to_float01(x: Tensor) -> Tensor:
    """uint8 -> float32 / 255; a float tensor is returned as it is (assumed to be in [0, 1])."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a batch N x 3 x H x W, got shape {tuple(x.shape)}")
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def normalize01(x: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32) -> Tensor:
    """Float [0, 1] NCHW -> (x - mean) / std in ``dtype``, channels_last (as ``ltbench.data.augment.normalize``)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x.float() - m) / s).to(dtype).contiguous(memory_format=torch.channels_last)


def _rows(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``fn`` applied to the images where the CPU bool ``mask`` holds: ``fn(those images, their CPU indices)``."""
    rows = mask.nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    idx = rows.to(x.device)
    return x.index_copy(0, idx, fn(x.index_select(0, idx), rows))


def _col(t: Tensor, x: Tensor) -> Tensor:
    """A per-image value (N,) as N x 1 x 1 x 1 on x's device and dtype."""
    return t.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _quantize(x: Tensor) -> Tensor:
    """Float [0, 1] -> the nearest of the 256 uint8 levels, as a float tensor of integers (exact for k/255 input)."""
    return x.mul(255.0).round_().clamp_(0, 255)


# ---------------------------------------------------------------- colour ops (per-image factors, torchvision formulas)
def gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, N x 1 x H x W (torchvision ``rgb_to_grayscale``: 0.2989 R + 0.587 G + 0.114 B)."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """f * a + (1 - f) * b clamped to [0, 1], f per image (PIL ImageEnhance / torchvision ``_blend``)."""
    f = _col(f, a)
    return (a * f + b * (1 - f)).clamp_(0, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    """Blend with black: torchvision ``adjust_brightness`` (PIL ImageEnhance.Brightness)."""
    return (x * _col(f, x)).clamp_(0, 1)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """Blend with the image's mean luma: torchvision ``adjust_contrast`` (PIL ImageEnhance.Contrast)."""
    return _blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """Blend with the luma image: torchvision ``adjust_saturation`` (PIL ImageEnhance.Color)."""
    return _blend(x, gray(x), f)


def adjust_sharpness(x: Tensor, f: Tensor) -> Tensor:
    """Blend with the 3x3 smoothed image (kernel 1 1 1 / 1 5 1 / 1 1 1, /13), border pixels kept: torchvision
    ``adjust_sharpness`` (PIL ImageEnhance.Sharpness)."""
    c = x.shape[1]
    kernel = torch.full((3, 3), 1.0 / 13.0, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0 / 13.0
    blurred = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.add_((blurred - inner) * (1 - _col(f, x)))
    return out.clamp_(0, 1)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV (each N x H x W, in [0, 1]) -> RGB N x 3 x H x W (Pillow's / torchvision's sector formulas)."""
    h6 = h * 6
    i = torch.floor(h6)
    fr = h6 - i
    sector = i.long().remainder_(6)
    sxf = s * fr
    p = ((1.0 - s) * v).clamp_(0, 1)
    q = ((1.0 - sxf) * v).clamp_(0, 1)
    t = ((sxf + (1.0 - s)) * v).clamp_(0, 1)
    vpqt = torch.stack((v, p, q, t), dim=1)
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=h.device)
    return vpqt.gather(1, table[:, sector].movedim(0, 1))


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Shift the hue by ``f`` turns (f in [-0.5, 0.5]) through RGB -> HSV -> RGB: torchvision ``adjust_hue`` (exact
    HSV rotation, not a YIQ approximation)."""
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    h = (h + f.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(h, s, maxc)


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """torchvision ColorJitter with per-image factors: ``factors[i]`` = (brightness, contrast, saturation, hue),
    applied in image i's own order ``order[i]`` (a permutation of 0..3, as ColorJitter's per-call randperm).
    ``factors`` and ``order`` are CPU tensors (N x 4)."""
    for pos in range(order.shape[1]):
        for k, op in enumerate(_JITTER):
            x = _rows(x, order[:, pos] == k, lambda y, rows, op=op, k=k: op(y, factors[rows, k]))
    return x


# ------------------------------------------------------------------------------------------------ geometric helpers
def _reflect(i: Tensor, size: int) -> Tensor:
    """Index i in [-(size-1), 2 size - 2] mirrored into [0, size) without repeating the edge (padding_mode reflect)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def reflect_crop_at(x: Tensor, dy: Tensor, dx: Tensor, padding: int) -> Tensor:
    """The H x W window at offset (dy, dx) of each image reflect-padded by ``padding`` (any dtype; dy, dx CPU)."""
    n, _, h, w = x.shape
    rows = _reflect(dy[:, None] - padding + torch.arange(h), h).to(x.device)[:, :, None]  # n x h x 1
    cols = _reflect(dx[:, None] - padding + torch.arange(w), w).to(x.device)[:, None, :]  # n x 1 x w
    batch = torch.arange(n, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def resized_crop(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, size: tuple[int, int]) -> Tensor:
    """Box [top, top+height) x [left, left+width) of each image resized to ``size``, bilinear with half-pixel
    centres, through a per-image affine grid (affine_grid + grid_sample). Sample points are clamped to the box's
    pixel centres, so only pixels inside the box are read: this equals torchvision ``resized_crop(...,
    antialias=False)`` (crop, then ``interpolate`` which clamps at the crop border); no antialiasing, which only
    matters when the box is larger than ``size``."""
    n, c, h, w = x.shape
    if n == 0:
        return x.new_empty(0, c, *size)
    top, left, height, width = (t.to(device=x.device, dtype=torch.float32) for t in (top, left, height, width))
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = width / w, (2 * left + width) / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = height / h, (2 * top + height) / h - 1
    grid = F.affine_grid(theta, [n, 1, *size], align_corners=False)
    lo = torch.stack(((2 * left + 1) / w - 1, (2 * top + 1) / h - 1), dim=-1)[:, None, None]
    hi = torch.stack(((2 * (left + width) - 1) / w - 1, (2 * (top + height) - 1) / h - 1), dim=-1)[:, None, None]
    grid = torch.minimum(torch.maximum(grid, lo), hi)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_pil(x: Tensor, coeffs: Tensor, fill: float) -> Tensor:
    """PIL ``Image.transform(size, AFFINE, (a, b, c, d, e, f))`` per image, nearest neighbour, outside = ``fill``.

    ``coeffs`` (N x 6) maps an output point to its source in PIL pixel coordinates (pixel i spans [i, i+1], so its
    centre is i + 0.5): x_in = a x + b y + c, y_in = d x + e y + f. Converted to affine_grid's normalised coordinates
    and sampled with ``grid_sample(mode='nearest')``; a ones channel sampled alongside marks what fell outside.
    """
    n, _, h, w = x.shape
    a, b, c, d, e, f = coeffs.to(device=x.device, dtype=torch.float32).unbind(1)
    theta = torch.stack(
        (a, b * h / w, a + b * h / w + 2 * c / w - 1, d * w / h, e, d * w / h + e + 2 * f / h - 1), dim=1
    ).view(n, 2, 3)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False).to(x.dtype)
    both = F.grid_sample(torch.cat((x, x.new_ones(n, 1, h, w)), 1), grid, mode="nearest", align_corners=False)
    return torch.where(both[:, -1:] > 0.5, both[:, :-1], torch.full_like(x[:1, :1, :1, :1], fill))


def _rotation(deg: Tensor, h: int, w: int) -> Tensor:
    """PIL ``Image.rotate(deg)`` (counter-clockwise about the image centre) as affine coefficients, N x 6."""
    t = torch.deg2rad(deg.double())
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2.0, h / 2.0
    return torch.stack((cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy), dim=1)


# ------------------------------------------------------------------------------------------------------ simsiam view
class SimSiamParams(NamedTuple):
    """Per-image draws of ``simsiam_view`` (CPU): crop box, jitter on/factors/order, grayscale on, flip on."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    gray: Tensor
    flip: Tensor


def rrc_params(
    n: int,
    h: int,
    w: int,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision ``RandomResizedCrop.get_params`` for n images at once -> (top, left, height, width), int64 CPU.

    Up to ``tries`` (area fraction, log aspect) draws per image; the first whose rounded box fits is kept, else
    torchvision's fallback (the whole image, or a central crop clamped to ``ratio``). The offset is uniform over the
    positions that keep the box inside the image, so 0 <= top, top + height <= h (likewise for left, width).
    """
    area = torch.empty(n, tries, dtype=torch.float64).uniform_(scale[0], scale[1], generator=gen) * (h * w)
    aspect = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = aspect.exp()
    cw, ch = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.long().argmax(1, keepdim=True)  # the first try that fits (0 if none)
    cw, ch, found = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1), ok.any(1)
    if w / h < min(ratio):
        fw, fh = w, round(w / min(ratio))
    elif w / h > max(ratio):
        fw, fh = round(h * max(ratio)), h
    else:
        fw, fh = w, h
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    u = torch.rand(n, 2, dtype=torch.float64, generator=gen)
    top = torch.where(found, (u[:, 0] * (h - ch + 1)).floor().long(), (h - ch) // 2)
    left = torch.where(found, (u[:, 1] * (w - cw + 1)).floor().long(), (w - cw) // 2)
    return top, left, ch, cw


def simsiam_params(n: int, h: int, w: int, gen: torch.Generator) -> SimSiamParams:
    """All draws of one ``simsiam_view`` call, in a fixed order (independent of the flags and the device)."""
    top, left, height, width = rrc_params(n, h, w, gen)
    jitter = torch.rand(n, generator=gen) < 0.8
    lo = torch.tensor([0.6, 0.6, 0.6, -0.1])  # ColorJitter(0.4, 0.4, 0.4, 0.1): [1 - 0.4, 1 + 0.4], hue [-0.1, 0.1]
    factors = lo + (torch.tensor([1.4, 1.4, 1.4, 0.1]) - lo) * torch.rand(n, 4, generator=gen)
    order = torch.rand(n, 4, generator=gen).argsort(dim=1)
    gray_on = torch.rand(n, generator=gen) < 0.2
    flip = torch.rand(n, generator=gen) < 0.5
    return SimSiamParams(top, left, height, width, jitter, factors, order, gray_on, flip)


def simsiam_view(
    x_uint8: Tensor,
    gen: torch.Generator,
    size: int | None = None,
    *,
    crop: bool = True,
    jitter: bool = True,
    grayscale: bool = True,
    flip: bool = True,
) -> Tensor:
    """One SimSiam view per image (Chen & He 2021, appendix D; MoCo-v2's augmentation without blur) -> float [0, 1].

    Fixed op order, as the torchvision Compose: RandomResizedCrop(size, scale=(0.2, 1), ratio=(3/4, 4/3)) (bilinear,
    box always inside the image, see ``resized_crop``), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 (brightness,
    contrast, saturation as blends; hue through HSV; the four in a random order per image, as torchvision),
    RandomGrayscale(p=0.2) (ITU-R 601 luma on all three channels), horizontal flip p=0.5. ``size`` None keeps H x W.
    The flags switch single ops off (for tests); the draws are the same whatever the flags.
    """
    x = to_float01(x_uint8)
    n, _, h, w = x.shape
    out_size = (h, w) if size is None else (size, size)
    p = simsiam_params(n, h, w, gen)
    if crop:
        x = resized_crop(x, p.top, p.left, p.height, p.width, out_size)
    elif out_size != (h, w):
        full = torch.zeros(n, dtype=torch.long)
        x = resized_crop(x, full, full, full + h, full + w, out_size)
    if jitter:
        x = _rows(x, p.jitter, lambda y, rows: color_jitter(y, p.factors[rows], p.order[rows]))
    if grayscale:
        x = _rows(x, p.gray, lambda y, rows: gray(y).expand_as(y).contiguous())
    if flip:
        x = torch.where(p.flip.to(x.device)[:, None, None, None], x.flip(3), x)
    return x


# ---------------------------------------------------------------------------------------------------------- weak view
def weak_view(x_uint8: Tensor, gen: torch.Generator, padding: int = 4) -> Tensor:
    """FixMatch's weak augmentation -> float [0, 1]: horizontal flip (p=0.5), then RandomCrop(H x W, padding,
    padding_mode='reflect') (the TF original's ``augment_shift``; kekmodel's port uses the same order).
    Needs padding < min(H, W)."""
    n, _, h, w = x_uint8.shape
    if not 0 <= padding < min(h, w):
        raise ValueError(f"padding must be in [0, {min(h, w)}), got {padding}")
    x = random_flip(x_uint8, gen)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    if padding:
        x = reflect_crop_at(x, dy, dx, padding)
    return to_float01(x)


# ------------------------------------------------------------------------------------------------------ rand_augment
class RAParams(NamedTuple):
    """Per-image draws of ``rand_augment`` (CPU): op codes, magnitudes v, applied, signs (all N x n); Cutout centre."""

    ops: Tensor
    v: Tensor
    on: Tensor
    sign: Tensor
    cy: Tensor
    cx: Tensor


def ra_params(n: int, n_ops: int, h: int, w: int, gen: torch.Generator) -> RAParams:
    """Draws of RandAugmentMC(n_ops, m=10): ops with replacement from ``RA_OPS``, v ~ randint(1, 10) (numpy's
    exclusive upper bound as in the port: 1..9), p=0.5 each, a random sign; Cutout centre uniform in the image."""
    ops = torch.randint(0, len(RA_OPS), (n, n_ops), generator=gen)
    v = torch.randint(1, 10, (n, n_ops), generator=gen)
    on = torch.rand(n, n_ops, generator=gen) < 0.5
    sign = torch.where(torch.rand(n, n_ops, generator=gen) < 0.5, -1, 1)
    cy = torch.rand(n, dtype=torch.float64, generator=gen) * h
    cx = torch.rand(n, dtype=torch.float64, generator=gen) * w
    return RAParams(ops, v, on, sign, cy, cx)


def ra_level(name: str, v: Tensor, sign: Tensor, h: int, w: int) -> Tensor:
    """The op's parameter for magnitudes v in 1..9 (kekmodel ``fixmatch_augment_pool``, PARAMETER_MAX 10), float64:
    Brightness/Color/Contrast/Sharpness factor v*0.09 + 0.05; Posterize bits int(v*4/10) + 4; Rotate +-3v degrees;
    ShearX/Y +-v*0.03; Solarize threshold 256 - int(v*25.6) (on 0..255); TranslateX/Y +-int(v*0.03*W or H) pixels
    (int() truncates toward zero; integer arithmetic gives the same values without float noise)."""
    v, s = v.long(), sign.long()
    if name in _ENHANCE:
        return v.double() * 0.9 / 10 + 0.05
    table = {
        "Posterize": (v * 4) // 10 + 4,
        "Rotate": s * ((v * 30) // 10),
        "Solarize": 256 - (v * 256) // 10,
        "TranslateX": s * ((v * 3 * w) // 100),
        "TranslateY": s * ((v * 3 * h) // 100),
    }
    if name in ("ShearX", "ShearY"):
        return s.double() * v.double() * 0.3 / 10
    return table[name].double() if name in table else torch.zeros(v.shape, dtype=torch.float64)


def _autocontrast(x: Tensor) -> Tensor:
    """Per image and channel, stretch [min, max] to [0, 1]; a flat channel is left alone (torchvision float)."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), hi - lo)
    return ((x - torch.where(flat, torch.zeros_like(lo), lo)) / scale).clamp_(0, 1)


def _equalize(x: Tensor) -> Tensor:
    """PIL ``ImageOps.equalize`` per image and channel on the uint8 levels (histograms via scatter_add, cumsum):
    lut[i] = (step // 2 + #pixels below level i) // step, step = (#pixels - #pixels at the top level) // 255;
    a channel with step 0 is left alone (torchvision ``equalize`` computes the same)."""
    m, c, h, w = x.shape
    q = _quantize(x).long().flatten(2)  # m x c x hw
    hist = torch.zeros(m, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, q, torch.ones_like(q))
    top = 255 - (hist > 0).flip(2).long().argmax(2, keepdim=True)  # the highest level present
    step = (h * w - hist.gather(2, top)) // 255
    lut = ((hist.cumsum(2) - hist + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(2, q), q)
    return out.view(m, c, h, w).to(x.dtype) / 255


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` bits of each uint8 level (PIL ``ImageOps.posterize``, torchvision on uint8)."""
    unit = torch.exp2(8 - _col(bits, x))
    return torch.floor(_quantize(x) / unit) * unit / 255


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert levels >= threshold (threshold on the 0..255 scale; PIL ``ImageOps.solarize``)."""
    return torch.where(x >= _col(threshold, x) / 255, 1 - x, x)


def _geometric(name: str, level: Tensor, h: int, w: int) -> Tensor:
    """PIL affine coefficients (N x 6, float64) of a geometric op at its level (kekmodel: ``img.transform``/``rotate``;
    shears act about the top-left corner as in PIL, translations are whole pixels)."""
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    if name == "Rotate":
        return _rotation(level, h, w)
    rows = {
        "ShearX": (one, level, zero, zero, one, zero),
        "ShearY": (one, zero, zero, level, one, zero),
        "TranslateX": (one, zero, level, zero, one, zero),
        "TranslateY": (one, zero, zero, zero, one, level),
    }[name]
    return torch.stack(rows, dim=1)


def ra_op(x: Tensor, name: str, level: Tensor, fill: float = GRAY) -> Tensor:
    """One RandAugment op on every image of ``x`` (float [0, 1]), ``level`` per image from ``ra_level``.
    Geometric ops resample with nearest neighbour (PIL's default in the port) and fill the outside with ``fill``."""
    h, w = x.shape[-2:]
    level = level.to(x.device)
    if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        return affine_pil(x, _geometric(name, level.double(), h, w), fill)
    ops: dict[str, Callable[[], Tensor]] = {
        "AutoContrast": lambda: _autocontrast(x),
        "Brightness": lambda: adjust_brightness(x, level),
        "Color": lambda: adjust_saturation(x, level),
        "Contrast": lambda: adjust_contrast(x, level),
        "Equalize": lambda: _equalize(x),
        "Identity": lambda: x,
        "Posterize": lambda: _posterize(x, level),
        "Sharpness": lambda: adjust_sharpness(x, level),
        "Solarize": lambda: _solarize(x, level),
    }
    return ops[name]()


def cutout_at(x: Tensor, cy: Tensor, cx: Tensor, size: int, fill: float = GRAY) -> Tensor:
    """kekmodel ``CutoutAbs``: x0 = int(max(0, cx - size/2)), x1 = min(W, x0 + size) (likewise y), filled with
    ``fill``. The port draws with PIL's inclusive rectangle (17 x 17 px); this fills [x0, x1) x [y0, y1): size x size,
    less where clipped at the right/bottom border."""
    h, w = x.shape[-2:]
    y0 = (cy - size / 2).clamp(min=0).floor().long().to(x.device)[:, None, None]
    x0 = (cx - size / 2).clamp(min=0).floor().long().to(x.device)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return x.masked_fill(inside[:, None], fill)


def rand_augment(
    x_float01: Tensor, gen: torch.Generator, n: int = 2, cutout: int = 16, *, fill: float = GRAY
) -> Tensor:
    """FixMatch's RandAugmentMC(n, 10) + Cutout (kekmodel/FixMatch-pytorch ``RandAugmentMC``) -> float [0, 1].

    Per image, ``n`` ops drawn with replacement from the 14 of ``RA_OPS``; each is applied with p=0.5 at magnitude
    v ~ randint(1, 10) (1..9) through ``ra_level``; then a ``cutout`` x ``cutout`` gray (127/255) square (0: none).
    Each op runs once per step on all the images that drew it. Colour ops follow torchvision's float formulas
    (PIL rounds to uint8 after each op: differences of about 1/255 per op); Posterize/Equalize work on the uint8
    levels. uint8 input is accepted too (divided by 255).
    Geometric ops are nearest-neighbour and fill with ``fill`` (default gray 127/255, like the Cutout; the port's PIL
    calls fill with black: pass ``fill=0.0`` for that). n=0 and cutout=0 returns the input unchanged.
    """
    x = to_float01(x_float01)
    m, _, h, w = x.shape
    p = ra_params(m, n, h, w, gen)
    for k in range(n):
        for code, name in enumerate(RA_OPS):
            if name != "Identity":
                x = _rows(x, (p.ops[:, k] == code) & p.on[:, k], _ra_step(name, p.v[:, k], p.sign[:, k], fill))
    return cutout_at(x, p.cy, p.cx, cutout) if cutout > 0 else x


def _ra_step(name: str, v: Tensor, sign: Tensor, fill: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The ``_rows`` callback applying op ``name`` to the selected images at their own magnitudes."""

    def step(y: Tensor, rows: Tensor) -> Tensor:
        return ra_op(y, name, ra_level(name, v[rows], sign[rows], *y.shape[-2:]), fill)

    return step
