"""Batches for training and evaluation, whatever the data kind: one interface over the tensor-resident CIFAR path
(gather, synthetic replacement, batched augmentation on the device) and the image-file DataLoader path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ltbench.config import AugmentConfig, DatasetConfig
from ltbench.core import Batch
from ltbench.data import LTData
from ltbench.data.augment import augment_batch, cutout, normalize
from ltbench.synth import Synthesizer


def tensor_batches(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    indices: torch.Tensor,
    *,
    batch_size: int,
    mean,
    std,
    augment: AugmentConfig | None,
    synth: Synthesizer | None,
    synth_on: bool,
    gen: torch.Generator,
) -> Iterator[Batch]:
    """CIFAR-scale batches: gather from the uint8 tensor on the device, optionally replace by synthetic samples,
    crop/flip (and AutoAugment) on uint8, normalise, Cutout. No per-image Python work except AutoAugment."""
    device = train_x.device
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        idx_dev = idx.to(device, non_blocking=True)
        x, y = train_x[idx_dev], train_y[idx_dev]
        if synth is not None and synth_on and synth.replaces:
            x, _ = synth.replace(x, y, idx, train_x, gen)
        if augment is not None:
            x = augment_batch(x, augment, gen)
        x = normalize(x, mean, std)
        if augment is not None and augment.cutout:
            x = cutout(x, augment.cutout, gen)
        yield Batch(x, y, idx)


class DataFeed:
    """Batches of one dataset on one device. Tensor data (``tensor``: uint8 images; ``features``: any inputs) lives
    on the device; image files are decoded by DataLoader workers."""

    def __init__(self, data: LTData, cfg: DatasetConfig, device: torch.device) -> None:
        self.data, self.cfg, self.device = data, cfg, device
        self._workers = int(getattr(cfg, "num_workers", 0))  # DataLoader workers of image-file datasets
        self._device_splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached = None  # image files served from the decoded cache (dataset.cache disk | device)
        if data.kind == "files" and getattr(cfg, "cache", "none") != "none":
            from ltbench.data.image_aug import CachedFeed

            self._cached = CachedFeed(data, cfg, device)
        elif data.kind in ("tensor", "features"):
            assert data.train_x is not None
            self.train_x, self.train_y = data.train_x.to(device), data.train_y.to(device)
            if data.unlabeled_x is not None and data.unlabeled_y is not None:
                self.unlabeled_x, self.unlabeled_y = data.unlabeled_x.to(device), data.unlabeled_y.to(device)
        else:
            self._files = self._file_sets(data, cfg)

    @staticmethod
    def _file_sets(data: LTData, cfg: Any) -> dict:
        """The image-file sets of ``data`` (``cfg``: its ImageFilesConfig or a dataset schema with the same keys)."""
        from ltbench.data.images import ImageFiles, eval_transform, raw_transform, train_transform

        tr, ev, raw = data.transforms or (
            train_transform(cfg.image_size, data.mean, data.std),
            eval_transform(cfg.resize, cfg.image_size, data.mean, data.std),
            raw_transform(cfg.resize),
        )
        train_files, test_files, val_files = data.train_files or [], data.test_files or [], data.val_files or []
        return {
            "train": ImageFiles(data.root, train_files, data.train_y, tr),
            "train_plain": ImageFiles(data.root, train_files, data.train_y, ev),
            "train_raw": ImageFiles(data.root, train_files, data.train_y, raw),
            "test": ImageFiles(data.root, test_files, data.test_y, ev),
            "val": ImageFiles(data.root, val_files, data.val_y, ev),
            "val_train": ImageFiles(data.root, val_files, data.val_y, tr),
        }

    def split_batch(
        self, split: str, positions: torch.Tensor, augment: AugmentConfig | None, gen: torch.Generator
    ) -> Batch:
        """One batch of ``split`` ("val": the validation stream a method draws from, e.g. Meta-Weight-Net's meta
        batch) at ``positions``, with the training augmentation (None: without), the draws from ``gen``; the same
        for every data kind (``index``: the positions)."""
        data = self.data
        if data.kind == "files":
            from ltbench.data.images import loader_batches

            if self._cached is not None:
                x, y, _ = next(self._cached.train(positions, len(positions), augment is not None, gen, split=split))
                return Batch(x, y, positions)
            ds = self._files[f"{split}_train" if augment is not None else split]
            x, y = next(iter(loader_batches(ds, positions, len(positions), self._workers, self.device, gen)))
            return Batch(x, y, positions)
        x_all, y_all = self._on_device(split)
        if data.kind == "features":
            dev = positions.to(y_all.device)
            return Batch(x_all[dev], y_all[dev], positions)
        return next(tensor_batches(x_all, y_all, positions, batch_size=len(positions), mean=data.mean, std=data.std,
                                   augment=augment, synth=None, synth_on=False, gen=gen))  # fmt: skip

    def _on_device(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split's tensors on the device, moved once."""
        if split not in self._device_splits:
            x, y = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y")
            if x is None:
                raise ValueError(f"{self.data.name} has no {split} tensors")
            self._device_splits[split] = (x.to(self.device), y.to(self.device))
        return self._device_splits[split]

    def train(
        self,
        indices: torch.Tensor,
        *,
        batch_size: int,
        augment: AugmentConfig | None,
        synth: Synthesizer | None,
        synth_on: bool,
        gen: torch.Generator,
        raw: bool = False,
    ) -> Iterator[Batch]:
        """Training batches in the order of ``indices``; ``augment=None``: no augmentation; ``raw``: the uint8 images
        as stored (image files: resized and centre-cropped to ``dataset.resize``), for methods that make their views."""
        kind = self.data.kind
        if self._cached is not None:
            for x, y, idx in self._cached.train(indices, batch_size, augment is not None, gen, raw):
                yield Batch(x, y, idx)
        elif kind == "files":
            from ltbench.data.images import loader_batches

            ds = self._files["train_raw" if raw else ("train" if augment is not None else "train_plain")]
            for start, (x, y) in zip(
                range(0, len(indices), batch_size),
                loader_batches(ds, indices, batch_size, self._workers, self.device, gen),
            ):
                yield Batch(x, y, indices[start : start + batch_size])
        elif kind == "features" or raw:
            yield from self._gathered(self.train_x, self.train_y, indices, batch_size)
        else:
            yield from tensor_batches(
                self.train_x, self.train_y, indices, batch_size=batch_size, mean=self.data.mean, std=self.data.std,
                augment=augment, synth=synth, synth_on=synth_on, gen=gen,
            )  # fmt: skip

    def _gathered(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            idx_dev = idx.to(self.device, non_blocking=True)
            yield Batch(x[idx_dev], y[idx_dev], idx)

    def unlabeled(self, indices: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        """Unlabeled batches (uint8 images, the true labels for measuring pseudo-labels, the indices)."""
        return self._gathered(self.unlabeled_x, self.unlabeled_y, indices, batch_size)

    def evaluate(self, split: str, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Batches of a split ("test", "val", "train", "unlabeled": no augmentation), in order (or ``indices``)."""
        data = self.data
        if self._cached is not None:
            for x, y in self._cached.evaluate(split, batch_size, indices):
                yield Batch(x, y)
            return
        if data.kind == "files":
            from ltbench.data.images import loader_batches

            ds = self._files["train_plain" if split == "train" else split]
            order = torch.arange(len(ds)) if indices is None else indices
            for x, y in loader_batches(ds, order, batch_size, self._workers, self.device, torch.Generator()):
                yield Batch(x, y)
            return
        x_all = getattr(data, f"{split}_x")
        y_all = getattr(data, f"{split}_y")
        assert x_all is not None
        if indices is not None:
            x_all, y_all = x_all[indices], y_all[indices]
        for start in range(0, len(x_all), batch_size):
            xb = x_all[start : start + batch_size].to(self.device, non_blocking=True)
            xb = xb if data.kind == "features" else normalize(xb, data.mean, data.std)
            yield Batch(xb, y_all[start : start + batch_size])
