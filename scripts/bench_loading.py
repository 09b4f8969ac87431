"""Data-loading throughput of the image-file pipeline (decode + RandomResizedCrop 224 + flip + colour jitter +
normalise, in DataLoader workers), on generated ImageNet-sized JPEGs.

    python scripts/bench_loading.py --images 400 --workers 0 1 2

The JPEGs are smooth random images of ImageNet's typical size (500 x 375, quality 90), so decoding costs about
what real photographs cost. No model runs: this is the ceiling the input pipeline puts on training speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ltbench.data.images import ImageFiles, eval_transform, loader_batches, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(root: Path, n: int, size=(500, 375)) -> list[str]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        low = rng.integers(0, 255, size=(size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(size, Image.BICUBIC)  # smooth, photo-like frequency content
        f = f"img_{i}.JPEG"
        img.save(root / f, quality=90)
        files.append(f)
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_jpegs(root, args.images)
        labels = torch.zeros(len(files), dtype=torch.long)
        for name, tf in (("train", train_transform(224, MEAN, STD)), ("eval", eval_transform(256, 224, MEAN, STD))):
            ds = ImageFiles(root, files, labels, tf)
            for w in args.workers:
                idx = torch.randperm(len(files))
                t0 = time.perf_counter()
                n = sum(
                    len(y)
                    for _, y in loader_batches(
                        ds, idx, args.batch_size, w, torch.device("cpu"), torch.Generator().manual_seed(0)
                    )
                )
                dt = time.perf_counter() - t0
                print(f"{name:5s} pipeline, {w} workers: {n / dt:7.1f} images/s ({n} images in {dt:.1f} s)")


if __name__ == "__main__":
    main()
