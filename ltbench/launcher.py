"""Packing the runs of a sweep onto one device (``hydra/launcher=pack``, conf/hydra/launcher/pack.yaml).

:func:`pack_jobs` chooses how many runs share one device from the model's size; the OmegaConf resolver
``ltbench_pack`` (``n_jobs: ${ltbench_pack:${model},${dataset}}``) applies it to a composed config. Importing this
module registers the resolver; ``ltbench.conf`` imports it, so the launcher config composes wherever ltbench's
configs do (the CLI, the compose API, tests) without importing the training loop first.

Invariants: the choice is at least 1 and at most ``cores // CORES_PER_JOB`` (each run keeps two cores); image-file
datasets and models whose size is unknown without their data get 1; counting parameters allocates nothing (the
model is built on the meta device).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from omegaconf import OmegaConf

__all__ = ["CORES_PER_JOB", "PACK_RULE", "pack_jobs"]

log = logging.getLogger("ltbench")

# Parameters below which one run leaves a GPU mostly idle at CIFAR resolution (batch 128): the step is bound by
# kernel launches and Python, not arithmetic. ResNet-32 (0.46M) and WRN-28-2 (1.5M) pack 8 to a GPU; a
# 224-pixel network or an image-file dataset fills the device (and the CPUs decoding JPEGs) alone.
PACK_RULE = ((2_000_000, 8), (8_000_000, 4), (30_000_000, 2))
CORES_PER_JOB = 2  # one core for a run's Python loop and kernel launches, one for its data and the rest


def pack_jobs(num_params: int | None, *, image_files: bool, cores: int) -> int:
    """How many runs share one device: by model size (:data:`PACK_RULE`), at most ``cores // CORES_PER_JOB`` so
    that each run keeps two cores (joblib gives each worker ``cores // n_jobs`` threads), at least 1. One run for
    image-file datasets (JPEG decoding already takes the CPUs) and for a model of unknown size."""
    if image_files or num_params is None:
        return 1
    by_size = next((n for limit, n in PACK_RULE if num_params < limit), 1)
    return max(1, min(by_size, cores // CORES_PER_JOB))


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pack_resolver(model: Any, dataset: Any) -> int:
    """``${ltbench_pack:${model},${dataset}}``: :func:`pack_jobs` for a composed config (its model is built on the
    meta device, so counting parameters allocates nothing)."""
    from ltbench.models import build_model

    image_files = "image_size" in dataset  # ImageNet-LT, Places-LT, folders: decoded from files by workers
    try:
        cfg = OmegaConf.to_object(model)
        with torch.device("meta"):
            net = build_model(cfg, int(dataset.get("num_classes", 10) or 10), None)  # type: ignore[arg-type]
        params: int | None = sum(p.numel() for p in net.parameters())
    except Exception:  # a model that needs its data to be built (text, tabular): no estimate
        params = None
    n = pack_jobs(params, image_files=image_files, cores=available_cores())
    log.info("hydra/launcher=pack: %d runs at a time (model %s, %s parameters)", n, model.get("name"), params)
    return n


def register_resolvers() -> None:
    """Register ``ltbench_pack`` with OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver("ltbench_pack", _pack_resolver, replace=True)


register_resolvers()
