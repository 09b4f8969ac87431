"""Training throughput of one run: ltbench's loop against a bare PyTorch step and a peer-style loop (issue 13).

    python scripts/bench_throughput.py --device cuda --out docs/bench   # ResNet-32, batch 128: the issue's figures
    python scripts/bench_throughput.py --quick                          # tiny CPU settings, to check the script

Rows, each on the same network (ltbench's CIFAR ResNet-32, SGD momentum 0.9, weight decay 2e-4, lr 0.1):

(a) ``ltbench``: the real training loop (:func:`ltbench.fit.train_epoch` with the supervised method and
    cross-entropy) over CIFAR-10-LT-shaped data at ratio 100 (12,406 images; the instance sampler's epoch stream,
    the device-side gather, crop + flip on uint8, normalisation): one timed window is one whole epoch, its last
    partial batch included. For each ``--modes`` entry (eager = ``compile=none``, or a torch.compile mode) and
    ``--dtypes`` entry (bf16 = ltbench's ``amp=true`` autocast, fp32); the evaluation throughput unless
    ``--no-eval``. On CUDA, also the host syncs of a 10-step epoch (torch.cuda.set_sync_debug_mode; the epoch's
    one read of its totals included, so 1 is the floor).
(b) ``bare``: a hand-written minimal eager step (zero_grad, forward, cross-entropy, backward, SGD step) on one
    batch already on the device, no augmentation: the ratio (a)/(b) is the headline figure.
(c) ``peer``: the loop of the published CIFAR-LT code (kaidic/LDAM-DRW, cifar_train.py): a torchvision ``CIFAR10``
    dataset (PIL images, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), a ``DataLoader``
    with workers and pinned memory, fp32 NCHW, ``loss.item()`` and top-1/top-5 accuracy every step.

The data are the real CIFAR-10 files when ``--data`` (default: $LTBENCH_DATA, else /work/shared/data) holds
``cifar-10-batches-py``, else random images with the same class counts (the cost of every row is independent of
pixel values). Warm-up epochs (compilation, CUDA-graph recording, cudnn autotuning, worker start-up) are excluded;
each figure is the median of ``--windows`` timed windows; the device is synchronised only around timed windows.
Prints a markdown table; ``--out DIR`` also writes DIR/throughput.md and DIR/throughput.json, rewritten after every
row (a run stopped by a time limit keeps the rows measured so far).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ltbench.config import AugmentConfig, ScheduleConfig
from ltbench.core import Batch, Epoch
from ltbench.data.augment import normalize
from ltbench.errors import LtbenchError
from ltbench.feed import tensor_batches
from ltbench.fit import Trainer, check_compile, predict, train_epoch
from ltbench.losses.classification import CrossEntropy
from ltbench.methods.supervised import Supervised
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.optim import build_optimizer, model_groups
from ltbench.samplers import Sampler, sampler_config
from ltbench.seeding import generator
from ltbench.tasks.classification import Classification, ClassificationConfig

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT at ratio 100 (Cao et al. 2019)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # LDAM-DRW's normalisation
TEST_IMAGES = 10_000


# ------------------------------------------------------------------------------------------------- the data


def load_data(root: str | None, quick: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """CIFAR-10-LT-shaped training data (uint8 NCHW, labels): the first COUNTS[c] images of each class of the real
    files when present, else random images with the same counts. ``quick``: a 1/40 subset."""
    counts = [max(2, c // 40) for c in COUNTS] if quick else COUNTS
    folder = Path(root) / "cifar-10-batches-py" if root else None
    if folder is not None and (folder / "data_batch_1").exists():
        from ltbench.data.cifar import load_cifar

        x, y, *_ = load_cifar(root, 10, False)
        x, y = torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y)).long()
        keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c, n in enumerate(counts)])
        return x[keep].contiguous(), y[keep], f"CIFAR-10 files in {root}"
    g = torch.Generator().manual_seed(0)
    y = torch.repeat_interleave(torch.arange(10), torch.tensor(counts))
    x = torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, y, "random images (no CIFAR-10 files found)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def windows(run: Callable[[], int], n: int, device: torch.device) -> list[float]:
    """images/s of ``n`` calls of ``run`` (each returns the images it trained), synchronised around each."""
    rates = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        images = run()
        sync(device)
        rates.append(images / (time.perf_counter() - t0))
    return rates


def row(loop: str, mode: str, dtype: str, rates: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "loop": loop, "compile": mode, "dtype": dtype, "images_per_s": round(statistics.median(rates), 1),
        "min": round(min(rates), 1), "max": round(max(rates), 1), "windows": len(rates), **extra,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------- (a) ltbench's loop


def ltbench_trainer(args, x: torch.Tensor, y: torch.Tensor, device: torch.device, mode: str, amp: bool) -> Trainer:
    """The training stage as ltbench builds it for ``strategy=ce`` (stages.train), on tensors already on the device."""
    torch.manual_seed(0)
    model = CifarResNet(args.depth, args.width, 10).to(device, memory_format=torch.channels_last)
    task = Classification(ClassificationConfig())
    counts = torch.bincount(y, minlength=10).tolist()
    method = Supervised(CrossEntropy(counts).to(device), task)
    sched = ScheduleConfig(epochs=10_000, lr=0.1, warmup=0.0, milestones=[])
    opt = build_optimizer(sched, model_groups(model, []))
    sampler = Sampler(sampler_config("instance"), y, 10, sched.epochs)
    xd, yd = x.to(device), y.to(device)

    def batches(ep: Epoch):
        indices = sampler.epoch_indices(ep.index, generator(0, ep.index, "sampler"))[: ep.size or None]
        ep.size = len(indices)
        return tensor_batches(xd, yd, indices, batch_size=args.batch_size, mean=MEAN, std=STD,
                              augment=AugmentConfig(), synth=None, synth_on=False, gen=ep.gen)  # fmt: skip

    gen = lambda e: generator(0, e, "batch")  # noqa: E731
    return Trainer("bench", model, method, opt, sched, batches, gen, task, amp, compile=mode)


def epoch_runner(tr: Trainer, size: int = 0) -> Callable[[], int]:
    """Each call trains the next epoch (``size`` images; 0: the whole sampler stream) and returns its images."""
    state = {"epoch": 0}

    def run() -> int:
        e = state["epoch"]
        state["epoch"] += 1
        ep = Epoch("bench", e, tr.schedule.epochs, 0.1, tr.epoch_gen(e), tr.amp, size=size)
        return int(train_epoch(tr, ep, tr.batches(ep), [tr.method])["images"])

    return run


def syncs_in_steps(tr: Trainer, batch_size: int, steps: int = 10) -> int:
    """Host syncs (CUDA's sync debug mode) in one epoch of ``steps`` steps, the epoch's read of its totals included."""
    run = epoch_runner(tr, steps * batch_size)
    run()  # warm (a different epoch size: compiled code is already there)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def eval_rate(model: torch.nn.Module, device: torch.device, amp: bool, mode: str, bs: int = 1000) -> float:
    """images/s of ltbench's prediction over a 10,000-image test set in batches of 1000 (median of 3 passes)."""
    xt = torch.randint(0, 256, (TEST_IMAGES, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.zeros(TEST_IMAGES, dtype=torch.long, device=device)

    def run() -> int:
        batches = (Batch(normalize(xt[i : i + bs], MEAN, STD), labels[i : i + bs]) for i in range(0, len(xt), bs))
        return len(predict(model, batches, amp=amp, compile=mode))

    run()
    return statistics.median(windows(run, 3, device))


def ltbench_rows(args, x, y, device: torch.device, mode: str, dtype: str) -> dict[str, Any]:
    tr = ltbench_trainer(args, x, y, device, mode, amp=dtype == "bf16")
    torch.compiler.reset()
    run = epoch_runner(tr, args.epoch_images)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        run()
    sync(device)
    warm = time.perf_counter() - t0
    rates = windows(run, args.windows, device)
    extra: dict[str, Any] = {"warmup_s": round(warm, 1)}
    if args.eval:
        extra["eval_images_per_s"] = round(eval_rate(tr.model, device, dtype == "bf16", mode), 1)
    if device.type == "cuda":
        extra["host_syncs_in_10_steps"] = syncs_in_steps(tr, args.batch_size)
    return row("ltbench", mode, dtype, rates, **extra)


# ---------------------------------------------------------------------------------------- (b) the bare step


def bare_row(args, device: torch.device, dtype: str, epoch_images: int) -> dict[str, Any]:
    """A minimal eager step on one batch already on the device, as many steps a window as an epoch of (a)."""
    torch.manual_seed(0)
    model = CifarResNet(args.depth, args.width, 10).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16" and device.type == "cuda" else None
    steps = math.ceil(epoch_images / args.batch_size)

    def run() -> int:
        for _ in range(steps):
            with amp or nullcontext():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * args.batch_size

    for _ in range(args.warmup):
        run()
    return row("bare eager step", "none", dtype, windows(run, args.windows, device))


# ------------------------------------------------------------------------------------------ (c) a peer's loop


class CIFAR10Like(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's item: an HWC uint8 array -> PIL image -> transform (random images)."""

    def __init__(self, data: np.ndarray, targets: list[int], transform) -> None:
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def peer_dataset(x: torch.Tensor, y: torch.Tensor, root: str | None, real: bool):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])  # fmt: skip
    full = None
    if real:  # torchvision's own CIFAR10 over the same long-tailed subset
        try:
            full = datasets.CIFAR10(str(root), train=True, download=False, transform=tf)
        except RuntimeError:  # files that fail torchvision's checksum (a packed subset, a fixture): the same items
            full = None
    if full is not None:
        targets = torch.tensor(full.targets)
        counts = torch.bincount(y, minlength=10).tolist()
        keep = torch.cat([torch.nonzero(targets == c).flatten()[:n] for c, n in enumerate(counts)])
        return torch.utils.data.Subset(full, keep.tolist())
    return CIFAR10Like(x.permute(0, 2, 3, 1).numpy(), y.tolist(), tf)


def peer_row(args, x, y, device: torch.device, root: str | None, real: bool) -> dict[str, Any]:
    """kaidic/LDAM-DRW cifar_train.py's train(): DataLoader (shuffle, workers, pinned), fp32, loss.item() and
    top-1/top-5 accuracy every step."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        peer_dataset(x, y, root, real), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )  # fmt: skip
    model = CifarResNet(args.depth, args.width, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)

    def run() -> int:
        seen, loss_sum = 0, 0.0
        for inp, target in loader:
            if args.epoch_images and seen >= args.epoch_images:
                break
            inp, target = inp.to(device, non_blocking=True), target.to(device, non_blocking=True)
            output = model(inp)
            loss = F.cross_entropy(output, target)
            top = output.topk(5, 1).indices.eq(target[:, None])
            _acc1, _acc5 = top[:, :1].sum() * 100.0 / len(target), top.sum() * 100.0 / len(target)
            loss_sum += loss.item() * len(target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(target)
        return seen

    for _ in range(max(1, args.warmup - 1)):
        run()
    return row(f"peer (torchvision CIFAR10 + PIL + DataLoader, {args.workers} workers)", "none", "fp32",
               windows(run, args.windows, device))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def to_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = (
        f"Training throughput, ResNet-{meta['depth']} (width {meta['width']}), batch {meta['batch_size']}, on "
        f"{meta['device']} (torch {meta['torch']}); data: {meta['data']}; {meta['warmup']} warm-up windows "
        f"excluded, median of {meta['windows']} windows of {meta['window_images']:,} images (min-max).\n\n"
        "| loop | compile | dtype | train images/s | min-max | ratio to bare eager | eval images/s | warm-up s |"
        " host syncs / 10 steps |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        ratio = r.get("ratio_to_bare")
        lines.append(
            f"| {r['loop']} | {r['compile']} | {r['dtype']} | {r['images_per_s']:,.0f} | {r['min']:,.0f}-"
            f"{r['max']:,.0f} | {'' if ratio is None else f'{ratio:.2f}'} | "
            f"{r.get('eval_images_per_s', '') and format(r['eval_images_per_s'], ',.0f')} | "
            f"{r.get('warmup_s', '')} | {r.get('host_syncs_in_10_steps', '')} |"
        )
    return head + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--modes", nargs="+", help="none (eager) and torch.compile modes for (a) "
                   "(default: none default reduce-overhead on CUDA, none default on CPU)")  # fmt: skip
    p.add_argument("--dtypes", nargs="+", choices=["bf16", "fp32"], help="(a) and (b): bf16 autocast (ltbench's "
                   "amp=true, CUDA only) and/or fp32 (default: bf16 fp32 on CUDA, fp32 on CPU)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--windows", type=int, default=5, help="timed windows (an epoch each) per row")
    p.add_argument("--epoch-images", type=int, default=0, help="images per window (0: a whole epoch of the data, "
                   "12,406); a smaller window for slow devices")  # fmt: skip
    p.add_argument("--warmup", type=int, default=3, help="warm-up epochs per row, excluded")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the peer loop (LDAM-DRW: 4)")
    p.add_argument("--data", default=os.environ.get("LTBENCH_DATA") or "/work/shared/data")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip", nargs="*", default=[], choices=["ltbench", "bare", "peer"])
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the evaluation throughput (on CUDA "
                   "with a compile mode it compiles a second graph)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny settings (ResNet-8 width 8, batch 32, 1/40 of the "
                   "data, 2 windows) to check the script on a CPU; the numbers mean nothing")  # fmt: skip
    p.add_argument("--out", type=Path, help="write throughput.md and throughput.json here")
    args = p.parse_args(argv)
    if args.quick:  # tiny sizes where the command line left the defaults
        quick = {"depth": 8, "width": 8, "batch_size": 32, "windows": 2, "warmup": 1, "workers": 1}
        for k, v in quick.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    dev = torch.device(args.device)
    args.modes = args.modes or (["none", "default", "reduce-overhead"] if dev.type == "cuda" else ["none", "default"])
    args.dtypes = args.dtypes or (["bf16", "fp32"] if dev.type == "cuda" else ["fp32"])
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as ltbench's runner sets it
    x, y, source = load_data(args.data, args.quick)
    real = source.startswith("CIFAR")
    meta = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "data": source, "window_images": args.epoch_images or len(y),
            "depth": args.depth,
            "width": args.width, "batch_size": args.batch_size, "warmup": args.warmup, "windows": args.windows,
            "timing": "median images/s over timed windows (an epoch of (a) each), warm-up excluded, "
                      "synchronised only around each window"}  # fmt: skip
    rows: list[dict[str, Any]] = []
    bare: dict[str, float] = {}

    def add(r: dict[str, Any], base: str | None = None) -> None:
        if base in bare:
            r["ratio_to_bare"] = round(r["images_per_s"] / bare[base], 3)  # type: ignore[index]
        rows.append(r)
        print(r, flush=True)
        write_results(args.out, "throughput", to_markdown(meta, rows), meta, rows, echo=False)

    if "bare" not in args.skip:
        for dtype in args.dtypes:
            add(bare_row(args, device, dtype, args.epoch_images or len(y)))
            bare[dtype] = rows[-1]["images_per_s"]
    if "ltbench" not in args.skip:
        for mode in args.modes:
            try:
                if mode != "none":
                    check_compile(mode, device)
            except LtbenchError as e:
                add({"loop": "ltbench", "compile": mode, "dtype": "", "images_per_s": 0, "min": 0, "max": 0,
                     "error": str(e)})  # fmt: skip
                continue
            for dtype in args.dtypes:
                add(ltbench_rows(args, x, y, device, mode, dtype), dtype)
    if "peer" not in args.skip:
        add(peer_row(args, x, y, device, args.data, real), "fp32")
    write_results(args.out, "throughput", to_markdown(meta, rows), meta, rows)
    return rows


def write_results(out: Path | None, stem: str, md: str, meta: dict, rows: list[dict], echo: bool = True) -> None:
    """Print the markdown table (``echo``); with ``out``, also write out/<stem>.md and out/<stem>.json (meta + rows),
    each replaced whole (written beside, then renamed), so a reader never sees half a table."""
    if echo:
        print("\n" + md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in ((f"{stem}.md", md), (f"{stem}.json", json.dumps({**meta, "rows": rows}, indent=1) + "\n")):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)


if __name__ == "__main__":
    main()
