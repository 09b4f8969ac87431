"""The decoded-image cache: every image of a file list decoded once into uint8 shards on disk, shared by runs and jobs.

Layout. ``<cache_dir>/<key>/`` holds ``shard_00000.npy`` ... (memory-mappable numpy arrays, N_i x S x S x 3 uint8,
images in list order) and ``manifest.json``, written last: a directory with a manifest is complete. ``key`` is a
sha256 over everything the bytes depend on (:func:`cache_key`): the image root, the file list in order, the side
``S``, the geometry ``mode``, the decoder and the shard size. A changed list, resolution or decoder is another key,
so a stale cache is never read; image bytes are not hashed (as the data fingerprint, too slow at this scale).

Modes (what the cache keeps is a deterministic prefix of the reference pipeline, so evaluation from the cache is
the reference evaluation bit for bit):

* ``short_center``: resize the short side to S (torchvision ``Resize(S)``, PIL bilinear with antialiasing), then
  centre-crop S x S: the first two steps of the ImageNet-LT evaluation transform (Resize(256), CenterCrop(224)).
* ``square``: ``Resize((S, S))``, the first step of DIR's AgeDB pipeline (``YyzHarry/imbalanced-regression``
  ``agedb-dir/datasets.py``).

Building (:func:`ensure_cache`) holds an exclusive ``fcntl`` lock on ``<key>.lock``: of two builders one builds
and the other waits, then reads the same bytes. Each shard is written to a temporary file and renamed, so an
interrupted build keeps its finished shards and the next build resumes after them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltbench.config import added, runtime
from ltbench.errors import ConfigError, DataError

CACHE_VERSION = 1
MODES = ("short_center", "square")
CACHE_PLACES = ("none", "disk", "device", "auto")
DECODERS = ("pil", "cuda")
SHARD_BYTES = 256 * 2**20


@dataclass
class ImageCacheOptions:
    """Settings of the decoded cache, shared by every image-file dataset schema (a mixin: subclasses call
    :meth:`check_cache` from their ``__post_init__``).

    ``cache``: ``none`` decodes JPEGs in DataLoader workers every epoch (the reference pipeline); ``disk`` trains from
    the decoded shards (memory-mapped, gathered per batch into pinned host memory, copied asynchronously) with the
    augmentation on the device; ``device`` holds the whole cache in device memory (as CIFAR); ``auto``: ``device`` on
    a GPU when the cache takes at most half of its free memory, else ``disk``. All three give the same batches.
    ``decoder``: ``pil`` (CPU) or ``cuda`` (``torchvision.io.decode_jpeg`` on the GPU, batched; falls back to PIL
    without CUDA). ``cache_dir``: null = ``$LTBENCH_CACHE``, else ``$XDG_CACHE_HOME/ltbench``, else
    ``~/.cache/ltbench`` (images/ below it).
    """

    cache: str = added("none")
    decoder: str = added("pil")
    cache_dir: str | None = runtime(None)

    def check_cache(self) -> None:
        if self.cache not in CACHE_PLACES:
            raise ConfigError(f"dataset.cache must be one of {', '.join(CACHE_PLACES)}, got {self.cache!r}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"dataset.decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")


def default_cache_dir() -> Path:
    """``$LTBENCH_CACHE``, else ``$XDG_CACHE_HOME/ltbench``, else ``~/.cache/ltbench``."""
    if os.environ.get("LTBENCH_CACHE"):
        return Path(os.environ["LTBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ltbench"


def shard_size(side: int) -> int:
    """Images per shard: about SHARD_BYTES of S x S x 3 uint8 (at least one)."""
    return max(1, SHARD_BYTES // (side * side * 3))


def cache_key(root: str | Path, paths: Sequence[str], side: int, mode: str, decoder: str, per_shard: int) -> str:
    """sha256 (first 24 hex digits) of what the cached bytes depend on; the list's order counts."""
    h = hashlib.sha256()
    head = {"v": CACHE_VERSION, "root": str(Path(root).resolve()), "side": side, "mode": mode, "decoder": decoder}
    h.update(json.dumps({**head, "per_shard": per_shard}, sort_keys=True).encode())
    for p in paths:
        h.update(p.encode("utf-8") + b"\0")
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------- decode
def decode_pil(path: Path, side: int, mode: str) -> np.ndarray:
    """One image -> S x S x 3 uint8 through torchvision's functional ops on the PIL image (the reference steps)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    if mode == "square":
        out = F.resize(rgb, [side, side], antialias=True)
    else:
        out = F.center_crop(F.resize(rgb, side, antialias=True), [side, side])
    return np.asarray(out, dtype=np.uint8)


def _one_thread() -> None:
    """A decoding worker uses one thread (the pool's initializer: never the training process's setting)."""
    torch.set_num_threads(1)


def _decode_one(args: tuple[str, int, str]) -> np.ndarray:
    path, side, mode = args
    try:
        return decode_pil(Path(path), side, mode)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot decode {path}: {e}") from None


def decode_cuda(paths: Sequence[Path], side: int, mode: str, device: torch.device) -> np.ndarray:
    """A batch of JPEGs decoded on the GPU (``torchvision.io.decode_jpeg``, batched), resized with antialiased
    bilinear interpolation on the GPU; other formats, or files nvJPEG refuses, go through PIL. Results differ from
    PIL's by rounding (a level or so), which is why the decoder is part of the cache key.

    Written for the GPU path but not run on this project's CPU-only development machine."""
    import torch.nn.functional as nnf
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    jpeg = [i for i, p in enumerate(paths) if p.suffix.lower() in (".jpg", ".jpeg")]
    out = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    decoded: dict[int, torch.Tensor] = {}
    try:
        imgs = decode_jpeg([read_file(str(paths[i])) for i in jpeg], mode=ImageReadMode.RGB, device=device)
        decoded = dict(zip(jpeg, imgs))
    except RuntimeError:
        decoded = {}
    for i, p in enumerate(paths):
        if i not in decoded:
            out[i] = decode_pil(p, side, mode)
            continue
        img = decoded[i].float()[None]
        h, w = img.shape[-2:]
        short = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)
        size = (side, side) if mode == "square" else short
        img = nnf.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = round((size[0] - side) / 2.0), round((size[1] - side) / 2.0)
        img = img[..., top : top + side, left : left + side].round_().clamp_(0, 255).to(torch.uint8)
        out[i] = img[0].permute(1, 2, 0).cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------------------ build
@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path`` (created if needed), released on exit: a second holder waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def locked_build(directory: Path, build: Callable[[Path], None], manifest: str = "manifest.json") -> Path:
    """The cache-directory protocol, for any cached artefact (decoded images, frozen features): if
    ``directory/manifest`` exists, return at once; else take ``<directory>.lock``, check again (another builder may
    have finished meanwhile), call ``build(directory)`` (which writes its files atomically and the manifest last)."""
    if (directory / manifest).exists():
        return directory
    with file_lock(directory.with_name(directory.name + ".lock")):
        if not (directory / manifest).exists():
            directory.mkdir(parents=True, exist_ok=True)
            build(directory)
            if not (directory / manifest).exists():
                raise DataError(f"building {directory} did not write its {manifest}")
    return directory


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the CLI's progress bars
        return None
    return tqdm(total=total, desc=desc, unit="img", disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _decode_shard(files: list[Path], side: int, mode: str, decoder: str, pool) -> np.ndarray:
    if decoder == "cuda":
        return decode_cuda(files, side, mode, torch.device("cuda"))
    jobs = [(str(f), side, mode) for f in files]
    rows = pool.map(_decode_one, jobs, chunksize=16) if pool is not None else [_decode_one(j) for j in jobs]
    return np.stack(rows) if rows else np.empty((0, side, side, 3), dtype=np.uint8)


def _write_shards(out: Path, files: list[Path], side: int, mode: str, decoder: str, per_shard: int, workers: int):
    """Decode and write the shards that are missing (finished ones are kept: resume), then the manifest."""
    n_shards = max(1, -(-len(files) // per_shard))
    todo = [s for s in range(n_shards) if not (out / f"shard_{s:05d}.npy").exists()]
    bar = _progress(len(files), f"decoding {len(files):,} images at {side}px")
    if bar is not None:
        bar.update(len(files) - sum(len(files[s * per_shard : (s + 1) * per_shard]) for s in todo))
    pool = None
    if workers > 0 and decoder == "pil" and todo:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_one_thread)
    try:
        for s in todo:
            chunk = files[s * per_shard : (s + 1) * per_shard]
            arr = _decode_shard(chunk, side, mode, decoder, pool)
            tmp = out / f"shard_{s:05d}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, out / f"shard_{s:05d}.npy")
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if pool is not None:
            pool.close()
        if bar is not None:
            bar.close()
    return n_shards


def ensure_cache(
    root: str | Path,
    paths: Sequence[str],
    side: int,
    mode: str = "short_center",
    decoder: str = "pil",
    cache_dir: str | Path | None = None,
    workers: int = 0,
) -> ImageCache:
    """The cache of ``paths`` (relative to ``root``) at side ``side``: built on first use (under the lock, resuming
    finished shards), reused afterwards. ``decoder='cuda'`` without CUDA decodes with PIL (and is keyed as such)."""
    if mode not in MODES:
        raise ValueError(f"unknown cache mode {mode!r}")
    if decoder == "cuda" and not torch.cuda.is_available():
        decoder = "pil"
    per_shard = shard_size(side)
    key = cache_key(root, paths, side, mode, decoder, per_shard)
    out = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "images"
    out = out / key
    files = [Path(root) / p for p in paths]

    def build(d: Path) -> None:
        print(f"ltbench: decoding {len(files):,} images at {side} px into {d} (once; later runs reuse it)",
              file=sys.stderr, flush=True)  # fmt: skip
        n = _write_shards(d, files, side, mode, decoder, per_shard, workers)
        meta = {"version": CACHE_VERSION, "images": len(files), "side": side, "mode": mode, "decoder": decoder,
                "per_shard": per_shard, "shards": n, "root": str(Path(root).resolve())}  # fmt: skip
        tmp = d / "manifest.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, d / "manifest.json")

    locked_build(out, build)
    return ImageCache(out)


class ImageCache:
    """A complete cache directory, read through memory maps. Row i is image i of the list it was built from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = json.loads((path / "manifest.json").read_text())
        self.side, self.per_shard = int(self.meta["side"]), int(self.meta["per_shard"])
        self.shards = [np.load(path / f"shard_{s:05d}.npy", mmap_mode="r") for s in range(self.meta["shards"])]
        if sum(len(s) for s in self.shards) != self.meta["images"]:
            raise DataError(f"image cache {path} is inconsistent with its manifest; delete it to rebuild")

    def __len__(self) -> int:
        return int(self.meta["images"])

    def gather(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images ``rows`` (any order, repeats allowed) as N x S x S x 3 uint8, into ``out`` when given."""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), self.side, self.side, 3), dtype=np.uint8)
        shard, pos = np.divmod(rows, self.per_shard)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = self.shards[s][pos[sel]]
        return out

    def to_device(self, device: torch.device) -> torch.Tensor:
        """The whole cache as one N x S x S x 3 uint8 tensor on ``device``, copied shard by shard (no host copy)."""
        full = torch.empty((len(self), self.side, self.side, 3), dtype=torch.uint8, device=device)
        start = 0
        for s in self.shards:
            full[start : start + len(s)].copy_(torch.from_numpy(np.array(s)))  # one shard in host memory at a time
            start += len(s)
        return full
