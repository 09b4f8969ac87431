"""Data-loading throughput of the image-file pipelines, on generated ImageNet-sized JPEGs.

    python scripts/bench_loading.py --images 400 --workers 0 1 2        # the DataLoader pipeline (decode per epoch)
    python scripts/bench_loading.py --images 400 --workers 0 --cached --threads 1 --repeats 3   # + cache, one core
    python scripts/bench_loading.py --images 2048 --batch-size 256 --workers 8 --cached --device cuda \
        --decoder cuda --model resnet50 --out /tmp/bl          # the GPU figures of issue 19 (--model vit_b_16 too)

1. The DataLoader pipeline (decode + RandomResizedCrop 224 + flip + colour jitter + normalise in workers): images/s
   per worker count; with 0 workers the per-CPU-second figure is the JPEG pipeline's rate on one core.
2. ``--decoder cuda``: ``torchvision.io.decode_jpeg`` on the GPU, batched (bytes already in memory): images/s of
   the decode alone; the cache is then built with that decoder (``dataset.decoder=cuda``).
3. ``--cached``: building the decoded cache (Resize(256) + CenterCrop(256), uint8 shards), then images/s of the
   training recipe on ``--device`` from the cache (``dataset.cache=disk``: memory-mapped shards gathered per batch,
   pinned, copied asynchronously; ``device``: the cache in device memory), and of evaluation (centre crop);
   ``--repeats`` timed passes each after a warm-up pass, reported as min / median / max.
4. ``--model resnet50|vit_b_16``: the end-to-end training step (forward, backward, SGD step; bf16 autocast on CUDA)
   fed by each pipeline, with the wall-clock split: time waiting for the next batch (its augmentation included)
   vs the whole step (GPU-bound when the wait is under 5%).

``--out DIR`` also writes every figure to DIR/loading.json and DIR/loading.md. The JPEGs are smooth random images
of ImageNet's typical size (500 x 375, quality 90), so decoding costs about what real photographs cost. On a shared
CPU read the per-CPU-second figures (``--threads 1``: one core) and give the machine's load (``uptime``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    args.torch_threads = torch.get_num_threads()
    print(f"load average {load:.2f}, {os.cpu_count()} cores, {args.torch_threads} torch threads, {device}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_jpegs(root, args.images)
        labels = torch.zeros(len(files), dtype=torch.long)
        for name, tf in (("train", train_transform(224, MEAN, STD)), ("eval", eval_transform(256, 224, MEAN, STD))):
            ds = ImageFiles(root, files, labels, tf)
            for w in args.workers if args.loader else []:
                idx = torch.randperm(len(files))
                it = loader_batches(ds, idx, args.batch_size, w, torch.device("cpu"), torch.Generator().manual_seed(0))
                rate, per_cpu, n = _rate(it, lambda: None)
                record(rows, f"dataloader {name}", f"{w} workers", rate, per_cpu if w == 0 else None, n)
        if args.decoder == "cuda":
            bench_gpu_decode(rows, root, files, args.batch_size, device)
        if args.cached or args.model:
            bench_cached(rows, root, files, labels, args, device, Path(tmp) / "cache")
        if args.model:
            bench_step(rows, root, files, labels, args, device, Path(tmp) / "cache")
    if args.out:
        write_tables(args.out, rows, args, load)
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers (the last one "
                   "also builds the cache and feeds the model's DataLoader run)")  # fmt: skip
    p.add_argument("--no-loader", dest="loader", action="store_false", help="skip the DataLoader-only figures")
    p.add_argument("--cached", action="store_true", help="also measure the decoded cache with device-side augmentation")
    p.add_argument("--decoder", choices=("pil", "cuda"), default="pil", help="the cache's decoder (cuda: "
                   "torchvision.io.decode_jpeg on the GPU, also timed alone)")  # fmt: skip
    p.add_argument("--model", choices=("resnet50", "vit_b_16"), default=None, help="time a training step fed by "
                   "each pipeline")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each cached pipeline (after a warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="folder for loading.json and loading.md")
    args = p.parse_args(argv)
    if args.decoder == "cuda" and not args.device.startswith("cuda"):
        p.error("--decoder cuda needs --device cuda")
    return args


def record(rows: list[dict], what: str, how: str, rate: float, per_cpu: float | None, n: int, **extra) -> None:
    """One figure: printed, and kept for --out."""
    row = {"what": what, "how": how, "images_per_s": round(rate, 1),
           "per_cpu_s": None if per_cpu is None else round(per_cpu, 1), "images": n, **extra}  # fmt: skip
    cpu = "" if per_cpu is None else f", {per_cpu:8.1f} per CPU-second"
    more = "".join(f", {k} {v}" for k, v in extra.items())
    print(f"{what:28s} {how:28s} {rate:8.1f} images/s{cpu} ({n} images{more})")
    rows.append(row)


def write_tables(out: Path, rows: list[dict], args: argparse.Namespace, load: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    head = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average": load, "cores": os.cpu_count(),
            "torch_threads": args.torch_threads, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip
    (out / "loading.json").write_text(json.dumps({**head, "rows": rows}, indent=1) + "\n")
    md = [f"# bench_loading ({head['gpu'] or 'CPU'}, load {load:.2f}, {head['torch_threads']} threads)", "",
          "| pipeline | setting | images/s | per CPU-second | images | more |",
          "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        more = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("what", "how", "images_per_s", "per_cpu_s",
                                                                        "images"))  # fmt: skip
        cpu = "" if r["per_cpu_s"] is None else f"{r['per_cpu_s']:.1f}"
        md.append(f"| {r['what']} | {r['how']} | {r['images_per_s']:.1f} | {cpu} | {r['images']} | {more} |")
    (out / "loading.md").write_text("\n".join(md) + "\n")


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
                where: str, workers: int, decoder: str = "pil"):  # fmt: skip
    """A CachedFeed over the generated images (train = test = the whole list)."""
    from types import SimpleNamespace

    from ltbench.data.image_aug import CachedFeed

    data = SimpleNamespace(root=str(root), train_files=files, val_files=[], test_files=files, train_y=labels,
                           val_y=labels[:0], test_y=labels, mean=MEAN, std=STD, image_recipe="imagenet")  # fmt: skip
    cfg = SimpleNamespace(image_size=224, resize=256, decoder=decoder, cache_dir=str(cache_dir), num_workers=workers,
                          cache=where)  # fmt: skip
    threads = torch.get_num_threads()
    feed = CachedFeed(data, cfg, device)
    torch.set_num_threads(threads)  # an in-process build (0 workers) leaves the process at 1 thread
    return feed


def bench_gpu_decode(rows: list[dict], root: Path, files: list[str], batch_size: int, device: torch.device) -> None:
    """``torchvision.io.decode_jpeg`` on the GPU, batched, from bytes in host memory (file reads not timed)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    data = [read_file(str(root / f)) for f in files]
    batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    decode_jpeg(batches[0], mode=ImageReadMode.RGB, device=device)  # warm-up: nvJPEG handles
    rates = []
    for _ in range(2):
        rate, per_cpu, n = _rate(((decode_jpeg(b, mode=ImageReadMode.RGB, device=device),) for b in batches),
                                 _sync(device))  # fmt: skip
        rates.append(rate)
    record(rows, "decode_jpeg", f"{device}, batch {batch_size}", max(rates), per_cpu, n)


def bench_cached(rows: list[dict], root, files, labels, args, device, cache_dir) -> None:
    """Cache build, then the training recipe and evaluation from the cache: ``--repeats`` timed passes after a
    warm-up (page cache, kernels), min / median / max of the images per CPU-second."""
    workers = max(args.workers)
    t0 = time.perf_counter()
    cached_feed(root, files, labels, torch.device("cpu"), cache_dir, "disk", workers, args.decoder)
    dt = time.perf_counter() - t0
    record(rows, "cache build", f"{args.decoder}, {workers} workers", len(files) / dt, None, len(files))
    for where in ("disk", "device"):
        feed = cached_feed(root, files, labels, device, cache_dir, where, workers, args.decoder)
        for name in ("train", "eval"):
            rates, per_cpus = [], []
            for rep in range(args.repeats + 1):
                g = torch.Generator().manual_seed(rep)
                it = (feed.train(torch.randperm(len(files), generator=g), args.batch_size, True, g) if name == "train"
                      else feed.evaluate("test", args.batch_size))  # fmt: skip
                rate, per_cpu, n = _rate(it, _sync(device))
                if rep:
                    rates.append(rate)
                    per_cpus.append(per_cpu)
            spread = f"{min(per_cpus):.0f} / {statistics.median(per_cpus):.0f} / {max(per_cpus):.0f}"
            record(rows, f"cached {name}", f"cache={where}, {device}", statistics.median(rates),
                   statistics.median(per_cpus), n, per_cpu_min_med_max=spread)  # fmt: skip


def _model(name: str, device: torch.device):
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=1000).to(device)
    if name.startswith("resnet"):
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def bench_step(rows: list[dict], root, files, labels, args, device, cache_dir) -> None:
    """Training steps of a torchvision model fed by the DataLoader pipeline and by the cache: images/s and the
    share of the step spent waiting for data (wall clock, synchronised per step; the wait includes the device-side
    augmentation), the first step of each pass untimed (kernels, prefetch)."""
    model, opt = _model(args.model, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = _sync(device)
    ds = ImageFiles(root, files, labels, train_transform(224, MEAN, STD))
    workers = max(args.workers)
    for name, where in {"dataloader": None, "cache=disk": "disk", "cache=device": "device"}.items():
        feed = None if where is None else cached_feed(root, files, labels, device, cache_dir, where, workers,
                                                      args.decoder)  # fmt: skip
        for rep in range(2):  # the first pass warms up
            g = torch.Generator().manual_seed(rep)
            idx = torch.randint(0, len(files), (args.steps * args.batch_size,), generator=g)
            it = (loader_batches(ds, idx, args.batch_size, workers, device, g) if feed is None
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
                if n:
                    wait, total = wait + (t_data - t_end), total + (now - t_end)
                n += 1
                t_end = now
        imgs = (n - 1) * args.batch_size
        record(rows, f"{args.model} step", f"{name}, {device}", imgs / max(total, 1e-9), None, imgs,
               data_wait_pct=round(100 * wait / max(total, 1e-9), 1), batch=args.batch_size)  # fmt: skip


if __name__ == "__main__":
    main()
