"""Training throughput of the real pipeline (index gather, batched crop/flip, normalise, forward, backward, SGD step).

    python scripts/bench_throughput.py                      # ResNet-32, batch 128, CPU
    python scripts/bench_throughput.py --device cuda --depth 32 --steps 200

Times whole optimiser steps after warm-up steps, on synthetic uint8 images of CIFAR size (the pipeline's cost does
not depend on pixel values). Prints images/s; this is where speed goals live, not in the tests.
"""

from __future__ import annotations

import argparse
import time

import torch

from ltbench.config import AugmentConfig, LossConfig, ModelConfig
from ltbench.engine import train_one_epoch
from ltbench.feed import tensor_batches
from ltbench.losses import build_loss
from ltbench.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    y = torch.repeat_interleave(torch.arange(10), torch.tensor(counts))
    x = torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=args.depth), 10).to(device, memory_format=torch.channels_last)
    loss = build_loss(LossConfig(), counts).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    xd, yd = x.to(device), y.to(device)

    def steps(n: int) -> float:
        idx = torch.randperm(len(y))[: n * args.batch_size]
        gen = torch.Generator().manual_seed(0)
        batches = tensor_batches(
            xd,
            yd,
            idx,
            batch_size=args.batch_size,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            augment=AugmentConfig(),
            synth=None,
            synth_on=False,
            gen=gen,
        )
        stats = train_one_epoch(model, opt, loss, batches, gen=gen)
        return stats.images_per_s

    steps(args.warmup)
    t0 = time.perf_counter()
    ips = steps(args.steps)
    print(
        f"ResNet-{args.depth} batch {args.batch_size} on {device} ({torch.get_num_threads()} threads): "
        f"{ips:,.0f} images/s over {args.steps} steps ({time.perf_counter() - t0:.1f} s)"
    )


if __name__ == "__main__":
    main()
