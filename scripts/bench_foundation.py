"""Memory and speed of the foundation-model recipes on one device (issue 18 item 6): can a 20 GB GPU run them?

    python scripts/bench_foundation.py --device cuda --out /tmp/fm            # CLIP ViT-B/16, batch 128, bf16
    python scripts/bench_foundation.py --quick                                # a tiny CLIP on CPU, to check the script

For each row (``--kinds`` x grad checkpointing off / on x ``--accumulate``), the training step of
``model=clip_vit_b16`` (random weights: the cost does not depend on them) at ``--batch-size`` images of 224 x 224
(CIFAR-sized 32 x 32 uint8 inputs resized on the device by the model, as a CIFAR-100-LT LIFT run does), SGD lr 0.01
momentum 0.9, a cosine head over 100 classes, bf16 autocast on CUDA (ltbench's ``amp=true``): images/s (median of
``--windows`` timed windows of ``--steps`` steps, after ``--warmup`` steps) and the peak device memory of a step
(``torch.cuda.max_memory_allocated``). The verdict column says whether the peak fits in ``--budget-gb`` (20).
Prints a markdown table; ``--out DIR`` also writes DIR/foundation.md and DIR/foundation.json after every row, so a
run stopped by a time limit keeps the rows measured so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from ltbench.models import build_model
from ltbench.models.foundation import FoundationConfig
from ltbench.models.peft import PeftConfig

TINY_ARCH = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip


def build(kind: str, checkpoint: bool, classes: int, arch: str) -> torch.nn.Module:
    cfg = FoundationConfig(name="clip_vit_b16", arch=arch, pretrained="none", peft=PeftConfig(kind=kind),
                           head_scale=25.0, grad_checkpoint=checkpoint)  # fmt: skip
    data = SimpleNamespace(mean=(0.507, 0.487, 0.441), std=(0.267, 0.256, 0.276))
    return build_model(cfg, classes, data)


def measure(net: torch.nn.Module, args: argparse.Namespace, accumulate: int, device: torch.device) -> dict[str, Any]:
    """Images/s and the peak memory of ``args.steps``-step windows of SGD on one batch already on the device."""
    net = net.to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), generator=gen, dtype=torch.uint8).to(device)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=gen).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    micro = args.batch_size // accumulate

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for i in range(accumulate):
            xb, yb = x[i * micro : (i + 1) * micro].float() / 255, y[i * micro : (i + 1) * micro]
            with amp:
                loss = F.cross_entropy(net(xb), yb) / accumulate
            loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_s": round(statistics.median(rates), 1), "peak_gib": round(peak, 2),
            "trainable": sum(p.numel() for p in params)}  # fmt: skip


def table(rows: list[dict[str, Any]], budget: float) -> str:
    md = ["| kind | grad checkpoint | accumulate | trainable | images/s | peak GiB | fits in "
          f"{budget:g} GB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        fits = "—" if r.get("error") or r["peak_gib"] != r["peak_gib"] else ("yes" if r["peak_gib"] <= budget else "no")
        cells = (f"error: {r['error']}", "", "") if r.get("error") else (f"{r['trainable']:,}", r["images_per_s"],
                                                                         r["peak_gib"])  # fmt: skip
        md.append(f"| {r['kind']} | {r['checkpoint']} | {r['accumulate']} | {cells[0]} | {cells[1]} | {cells[2]} "
                  f"| {fits} |")  # fmt: skip
    return "\n".join(md)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    device = torch.device(args.device)
    arch = args.arch
    if args.quick:
        path = Path(args.out or "/tmp") / "tiny_clip.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(TINY_ARCH))
        arch, args.batch_size, args.steps, args.windows, args.warmup = str(path), 8, 2, 1, 1
    rows: list[dict[str, Any]] = []
    for kind in args.kinds.split(","):
        for checkpoint in (False, True):
            for accumulate in args.accumulate:
                row: dict[str, Any] = {"kind": kind, "checkpoint": checkpoint, "accumulate": accumulate}
                try:
                    row.update(measure(build(kind, checkpoint, args.classes, arch), args, accumulate, device))
                except torch.OutOfMemoryError as e:
                    row["error"] = f"out of memory ({str(e).splitlines()[0][:60]})"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                if args.out:
                    out = Path(args.out)
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "foundation.json").write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
                    (out / "foundation.md").write_text(table(rows, args.budget_gb) + "\n")
    print(table(rows, args.budget_gb))
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="ViT-B-16", help="an open_clip architecture (or a model-config JSON)")
    p.add_argument("--kinds", default="adaptformer,full", help="model.peft.kind values, comma-separated")
    p.add_argument("--accumulate", type=int, nargs="+", default=[1])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-gb", type=float, default=20.0)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="a tiny CLIP and few steps (CPU check of the script)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
