"""Data-loading throughput of the image-file pipelines, on generated ImageNet-sized JPEGs.

    python scripts/bench_loading.py --images 400 --workers 0 1 2          # the DataLoader pipeline (decode per epoch)
    python scripts/bench_loading.py --images 400 --cached                 # + the decoded cache, device-side aug
    python scripts/bench_loading.py --images 2048 --cached --model resnet50 --device cuda   # + a ResNet-50 step

1. The DataLoader pipeline (decode + RandomResizedCrop 224 + flip + colour jitter + normalise in workers): images/s
   per worker count; with 1 worker this is the JPEG decode rate of one core.
2. ``--cached``: building the decoded cache (Resize(256) + CenterCrop(256), uint8 shards), then images/s of the
   training recipe on the device from the cache (``dataset.cache=disk``: memory-mapped shards gathered per batch,
   pinned, copied asynchronously; ``device``: the cache in device memory), and of evaluation (centre crop).
3. ``--model resnet50``: the end-to-end training step (forward, backward, SGD step; bf16 autocast on CUDA) fed by
   each pipeline, with the wall-clock split: time waiting for the next batch vs the whole step (GPU-bound when the
   wait is under 5%).

The JPEGs are smooth random images of ImageNet's typical size (500 x 375, quality 90), so decoding costs about
what real photographs cost.
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
    p.add_argument("--cached", action="store_true", help="also measure the decoded cache with device-side augmentation")
    p.add_argument("--model", default=None, help="resnet50 | vit_b_16: time a training step fed by each pipeline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: torch's default)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_jpegs(root, args.images)
        labels = torch.zeros(len(files), dtype=torch.long)
        for name, tf in (("train", train_transform(224, MEAN, STD)), ("eval", eval_transform(256, 224, MEAN, STD))):
            ds = ImageFiles(root, files, labels, tf)
            for w in args.workers:
                idx = torch.randperm(len(files))
                it = loader_batches(ds, idx, args.batch_size, w, torch.device("cpu"), torch.Generator().manual_seed(0))
                rate, per_cpu, n = _rate(it, lambda: None)
                cpu = f", {per_cpu:7.1f} per CPU-second (in-process decode)" if w == 0 else ""
                print(f"{name:5s} pipeline, {w} workers: {rate:7.1f} images/s{cpu} ({n} images)")
        if args.cached:
            bench_cached(root, files, labels, args.batch_size, device, Path(tmp) / "cache", max(args.workers))
        if args.model:
            bench_step(root, files, labels, args, device, Path(tmp) / "cache")


def _rate(batches, sync) -> tuple[float, float, int]:
    """(images per wall-clock second, images per CPU-second of this process, images): on a shared CPU the second is
    the steadier figure (with torch's threads at 1 it is the rate of one core)."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for x, *_ in batches:
        n += len(x)
    sync()
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9), n


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def cached_feed(root: Path, files: list[str], labels: torch.Tensor, device: torch.device, cache_dir: Path,
                where: str, workers: int):  # fmt: skip
    """A CachedFeed over the generated images (train = test = the whole list)."""
    from types import SimpleNamespace

    from ltbench.data.image_aug import CachedFeed

    data = SimpleNamespace(root=str(root), train_files=files, val_files=[], test_files=files, train_y=labels,
                           val_y=labels[:0], test_y=labels, mean=MEAN, std=STD, image_recipe="imagenet")  # fmt: skip
    cfg = SimpleNamespace(image_size=224, resize=256, decoder="pil", cache_dir=str(cache_dir), num_workers=workers,
                          cache=where)  # fmt: skip
    return CachedFeed(data, cfg, device)


def bench_cached(root, files, labels, batch_size, device, cache_dir, workers) -> None:
    t0 = time.perf_counter()
    cached_feed(root, files, labels, torch.device("cpu"), cache_dir, "disk", workers)
    dt = time.perf_counter() - t0
    print(f"cache build ({workers} workers): {len(files) / dt:7.1f} images/s ({len(files)} images in {dt:.1f} s)")
    for where in ("disk", "device"):
        feed = cached_feed(root, files, labels, device, cache_dir, where, workers)
        for name in ("train", "eval"):
            for rep in range(2):  # the first pass warms up (page cache, kernels)
                g = torch.Generator().manual_seed(rep)
                it = (feed.train(torch.randperm(len(files), generator=g), batch_size, True, g) if name == "train"
                      else feed.evaluate("test", batch_size))  # fmt: skip
                rate, per_cpu, n = _rate(it, _sync(device))
            print(f"cached ({where:6s}) {name:5s} on {device}: {rate:8.1f} images/s, {per_cpu:8.1f} per CPU-second "
                  f"({n} images, {torch.get_num_threads()} threads)")  # fmt: skip


def bench_step(root, files, labels, args, device, cache_dir) -> None:
    """Training steps of a torchvision model fed by the DataLoader pipeline and by the cache; prints images/s and
    the share of the step spent waiting for data (wall clock, synchronised per step)."""
    import torchvision

    model = getattr(torchvision.models, args.model)(num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = _sync(device)
    ds = ImageFiles(root, files, labels, train_transform(224, MEAN, STD))
    feeds = {"dataloader": None, "cache=disk": "disk", "cache=device": "device"}
    for name, where in feeds.items():
        feed = None if where is None else cached_feed(root, files, labels, device, cache_dir, where, max(args.workers))
        for rep in range(2):
            g = torch.Generator().manual_seed(rep)
            idx = torch.randint(0, len(files), (args.steps * args.batch_size,), generator=g)
            it = (loader_batches(ds, idx, args.batch_size, max(args.workers), device, g) if feed is None
                  else ((x, y) for x, y, _ in feed.train(idx, args.batch_size, True, g)))  # fmt: skip
            wait = total = 0.0
            n = 0
            t_end = time.perf_counter()
            for x, y in it:
                sync()
                t_data = time.perf_counter()
                with amp:
                    loss = torch.nn.functional.cross_entropy(model(x), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()
                now = time.perf_counter()
                if n:  # the first step compiles kernels and fills the prefetch
                    wait, total = wait + (t_data - t_end), total + (now - t_end)
                n += 1
                t_end = now
        imgs = (n - 1) * args.batch_size
        print(
            f"{args.model} step, {name:12s} on {device}: {imgs / total:8.1f} images/s, data wait "
            f"{100 * wait / total:5.1f}% of the step ({n - 1} timed steps of {args.batch_size})"
        )


if __name__ == "__main__":
    main()
