"""Image-file pipeline: parallel decoding and augmentation in DataLoader workers, driven by ltbench's samplers.

Training: RandomResizedCrop + horizontal flip + colour jitter (0.4 brightness/contrast/saturation), as in the
ImageNet-LT reference recipe; evaluation: resize the short side to ``resize`` and centre-crop ``image_size``.
Batches come out normalised, float32, pinned (on CUDA), in the order of the sampler's index stream.

Every image's random augmentation is seeded by its own number, drawn from the epoch's generator in stream order, so
the draws are the same whatever the number of workers and whichever worker decodes the image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


def train_transform(size: int, mean, std):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def eval_transform(resize: int, size: int, mean, std):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def raw_transform(resize: int):
    """uint8 images resized (short side) and centre-cropped to ``resize`` x ``resize``, not normalised: the input of
    methods that make their own views on the device (SimSiam)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(resize), v2.ToImage()])


class ImageFiles(Dataset):
    """(image, label) for a list of paths relative to ``root``; images decoded with PIL, converted to RGB."""

    def __init__(self, root: str | Path, files: list[str], labels: torch.Tensor, transform) -> None:
        self.root, self.files, self.labels, self.transform = Path(root), files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]):
        i, seed = item if isinstance(item, tuple) else (item, None)
        with Image.open(self.root / self.files[i]) as img:
            rgb = img.convert("RGB")
        if seed is None:
            return self.transform(rgb), self.labels[i]
        with torch.random.fork_rng(devices=[]):  # the process's own RNG stays untouched
            torch.manual_seed(seed)
            return self.transform(rgb), self.labels[i]


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding parallelism comes from the workers


def loader_batches(
    dataset: ImageFiles,
    indices: torch.Tensor,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    gen: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``dataset`` in the order of ``indices`` (a sampler's stream), decoded in parallel.

    ``gen`` draws one seed per image of the stream, so an epoch's augmentations are a function of (seed, epoch) and
    of nothing else (not of the number of workers).
    """
    seeds = torch.randint(0, 2**62, (len(indices),), generator=gen).tolist()
    pairs = list(zip(indices.tolist(), seeds))
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=gen,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    for x, y in loader:
        yield (
            x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
            y.to(device, non_blocking=True),
        )
