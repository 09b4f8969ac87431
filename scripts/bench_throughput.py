"""Training throughput of the real pipeline (index gather, batched crop/flip, normalise, forward, backward, SGD step).

    python scripts/bench_throughput.py                      # ResNet-32, batch 128, CPU
    python scripts/bench_throughput.py --device cuda --depth 32 --steps 200

Times whole optimiser steps of ltbench's training loop (:func:`ltbench.fit.train_epoch`: the method's step, running
totals on the device) after warm-up steps, on synthetic uint8 images of CIFAR size (the pipeline's cost does not
depend on pixel values). Prints images/s; this is where speed goals live, not in the tests.
"""

from __future__ import annotations

import argparse
import time

import torch

from ltbench.config import AugmentConfig, ScheduleConfig
from ltbench.core import Epoch
from ltbench.feed import tensor_batches
from ltbench.fit import Trainer, train_epoch
from ltbench.losses.classification import CrossEntropy
from ltbench.methods.supervised import Supervised
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.optim import build_optimizer, model_groups
from ltbench.tasks.classification import Classification, ClassificationConfig

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT at ratio 100


def ltbench_steps(args: argparse.Namespace, device: torch.device) -> float:
    """images/s of ltbench's training loop over ``args.steps`` steps."""
    y = torch.repeat_interleave(torch.arange(10), torch.tensor(COUNTS))
    x = torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    model = CifarResNet(args.depth, 16, 10).to(device, memory_format=torch.channels_last)
    task = Classification(ClassificationConfig())
    method = Supervised(CrossEntropy(COUNTS).to(device), task)
    sched = ScheduleConfig(lr=0.01)
    opt = build_optimizer(sched, model_groups(model, []))
    xd, yd = x.to(device), y.to(device)

    def batches(ep: Epoch):
        idx = torch.randperm(len(y), generator=ep.gen)[: ep.size]
        return tensor_batches(xd, yd, idx, batch_size=args.batch_size, mean=(0.5,) * 3, std=(0.25,) * 3,
                              augment=AugmentConfig(), synth=None, synth_on=False, gen=ep.gen)  # fmt: skip

    tr = Trainer("bench", model, method, opt, sched, batches, lambda e: torch.Generator(), task, amp=True)

    def run(n: int) -> float:
        ep = Epoch("bench", 0, 1, 0.01, torch.Generator().manual_seed(0), True, size=n * args.batch_size)
        stats = train_epoch(tr, ep, batches(ep), [method])
        return stats["images"] / stats["seconds"]

    run(args.warmup)
    return run(args.steps)


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
    t0 = time.perf_counter()
    ips = ltbench_steps(args, device)
    print(
        f"ResNet-{args.depth} batch {args.batch_size} on {device} ({torch.get_num_threads()} threads): "
        f"{ips:,.0f} images/s over {args.steps} steps ({time.perf_counter() - t0:.1f} s)"
    )


if __name__ == "__main__":
    main()
