"""A run's record on disk: atomic writes, provenance, and loading runs back for reports."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any

METRICS = "metrics.json"

# In a multi-process run only rank 0 writes; the runner turns writing off on the other ranks.
_WRITER = {"enabled": True}


def set_writer(enabled: bool) -> None:
    _WRITER["enabled"] = enabled


def _atomic(path: Path, write) -> None:
    if not _WRITER["enabled"]:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f))


def git_revision() -> dict[str, Any]:
    """The code revision of the ltbench source tree (None outside a git checkout), and whether it was dirty."""
    src = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"commit": None, "dirty": None}
        st = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": rev.stdout.strip(), "dirty": bool(st.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict[str, Any]:
    import hydra
    import numpy
    import omegaconf
    import torch
    import torchvision

    import ltbench

    return {
        "ltbench": ltbench.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "hydra": hydra.__version__,
        "omegaconf": omegaconf.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }


def find_runs(root: Path) -> list[Path]:
    """Every metrics.json under root (sorted)."""
    return sorted(Path(root).rglob(METRICS))


def load_runs(root: Path) -> list[dict[str, Any]]:
    """The records of every run under root; unreadable files come back as failed records."""
    runs = []
    for p in find_runs(root):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            rec = {"status": "unreadable", "error": str(e)}
        rec["run_dir"] = str(p.parent)
        runs.append(rec)
    return runs
