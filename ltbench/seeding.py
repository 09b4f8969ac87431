"""Independent, stateless random streams: a generator is a function of (seed, epoch, stream name, ...)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (seed, epoch, stream name...): independent streams without shared state."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts``: the same draws whether a run resumed or not, on any device."""
    return torch.Generator().manual_seed(derive_seed(*parts))
