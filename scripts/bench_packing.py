"""Aggregate training throughput of N runs packed onto one device (issue 13): N = 1, 2, 4, 8 at once.

    python scripts/bench_packing.py --device cuda --out docs/bench   # ResNet-32, batch 128, N = 1 2 4 8
    python scripts/bench_packing.py --quick                          # tiny CPU settings, to check the script

For each N, N processes (spawned, so each has its own CUDA context, as the runs of a packed sweep have: joblib's
workers, ``hydra/launcher=pack``) each train with ltbench's real loop, row (a) of scripts/bench_throughput.py
(CIFAR-10-LT-shaped data, instance sampler, crop + flip, cross-entropy, SGD), with ``cores // N`` CPU threads as a
packed sweep gives them. Every process warms up (compilation, CUDA-graph recording), waits at a barrier, then trains
whole epochs for ``--seconds``; the aggregate is all their images over the common window (first start to last end,
wall clock). The order N = 1, 2, 4, 8 lets the larger N reuse the compiled kernels that N = 1 wrote to inductor's
cache. A process that dies is reported and the others carry on.
Prints a markdown table; ``--out DIR`` also writes DIR/packing.md and DIR/packing.json, rewritten after every N.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_throughput as bt  # the same loop and data as the single-run benchmark


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker(rank: int, n: int, args: argparse.Namespace, barrier, results) -> None:
    """One packed run: warm up, wait for the others, train whole epochs for ``args.seconds``, report."""
    torch.set_num_threads(max(1, cores() // n))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out: dict[str, Any] = {"rank": rank, "threads": torch.get_num_threads()}
    try:
        x, y, _ = bt.load_data(args.data, args.quick)
        tr = bt.ltbench_trainer(args, x, y, device, args.mode, amp=args.dtype == "bf16")
        run = bt.epoch_runner(tr)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            run()
        bt.sync(device)
        out["warmup_s"] = round(time.perf_counter() - t0, 1)
        try:
            barrier.wait(timeout=args.barrier_timeout)
        except Exception:  # a sibling died or is far behind: time anyway, flagged
            out["barrier_broken"] = True
        start, images = time.time(), 0
        while time.time() - start < args.seconds:
            images += run()
        bt.sync(device)
        out.update(start=start, end=time.time(), images=images)
        if device.type == "cuda":
            out["max_memory_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
        with contextlib.suppress(Exception):
            barrier.abort()  # the others need not wait for this one
    results.put(out)


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, n, args, barrier, results)) for r in range(n)]
    t0 = time.time()
    for p in procs:
        p.start()
    reports = []
    for _ in procs:
        try:
            reports.append(results.get(timeout=args.seconds + args.barrier_timeout + 600))
        except Exception:
            break
    for p in procs:
        p.join(timeout=60)
    ok = [r for r in reports if "images" in r]
    died = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    res: dict[str, Any] = {"jobs": n, "runs_ok": len(ok), "wall_s": round(time.time() - t0, 1), "exitcodes": died,
                           "errors": [r["error"] for r in reports if "error" in r]}  # fmt: skip
    if ok:
        window = max(r["end"] for r in ok) - min(r["start"] for r in ok)
        res.update(
            aggregate_images_per_s=round(sum(r["images"] for r in ok) / window, 1),
            per_run_images_per_s=round(statistics.median(r["images"] / (r["end"] - r["start"]) for r in ok), 1),
            window_s=round(window, 1),
            threads_per_run=ok[0]["threads"],
            warmup_s=max(r["warmup_s"] for r in ok),
            barrier_broken=any(r.get("barrier_broken") for r in ok),
            max_memory_gib=max((r.get("max_memory_gib", 0) for r in ok), default=0),
        )
    return res


def to_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = (
        f"Packed runs on one device: ResNet-{meta['depth']} (width {meta['width']}), batch {meta['batch_size']}, "
        f"compile={meta['mode']}, {meta['dtype']}, on {meta['device']} (torch {meta['torch']}); each run ltbench's "
        f"training loop with cores // N threads; {meta['seconds']} s timed after warm-up.\n\n"
        "| runs at once | aggregate images/s | x N = 1 | images/s per run | threads per run | GPU memory per run "
        "(GiB) | runs ok |\n|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    base = next((r.get("aggregate_images_per_s") for r in rows if r["jobs"] == 1), None)
    lines = []
    for r in rows:
        agg = r.get("aggregate_images_per_s")
        gain = f"{agg / base:.2f}" if agg and base else ""
        lines.append(
            f"| {r['jobs']} | {agg or 0:,.0f} | {gain} | {r.get('per_run_images_per_s', 0):,.0f} | "
            f"{r.get('threads_per_run', '')} | {r.get('max_memory_gib', '')} | {r['runs_ok']}/{r['jobs']} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--mode", default=None, help="compile mode of every run (default: reduce-overhead on CUDA, none "
                   "on CPU)")  # fmt: skip
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seconds", type=float, default=20.0, help="timed training per run, after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="warm-up epochs per run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--data", default=os.environ.get("LTBENCH_DATA") or "/work/shared/data")
    p.add_argument("--barrier-timeout", type=float, default=900.0)
    p.add_argument("--quick", action="store_true", help="tiny settings (ResNet-8 width 8, batch 32, 1/40 of the "
                   "data, N = 1 2, 3 s) to check the script on a CPU; the numbers mean nothing")  # fmt: skip
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:  # tiny sizes where the command line left the defaults
        for k, v in {"depth": 8, "width": 8, "batch_size": 32, "warmup": 1, "seconds": 3.0}.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
        args.jobs = [j for j in args.jobs if j <= 2] or [1]
    device = torch.device(args.device)
    args.mode = args.mode or ("reduce-overhead" if device.type == "cuda" else "none")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    meta = {"device": bt.device_name(device).split(",")[0], "torch": torch.__version__, "cores": cores(),
            "mode": args.mode, "dtype": args.dtype, "depth": args.depth, "width": args.width,
            "batch_size": args.batch_size, "seconds": args.seconds, "warmup": args.warmup}  # fmt: skip
    rows = []
    for n in args.jobs:
        rows.append(measure(n, args))
        print(rows[-1], flush=True)
        bt.write_results(args.out, "packing", to_markdown(meta, rows), meta, rows, echo=False)  # kept if stopped
    bt.write_results(args.out, "packing", to_markdown(meta, rows), meta, rows)
    return rows


if __name__ == "__main__":
    main()
