"""A run's directory: its file names, atomic writes, the one-writer lock and checkpoints.

- Every file is written atomically (temporary file in the same folder, fsync, rename) with the user's normal
  permissions (umask), so a crash or a kill never leaves a half-written record.
- Only the writer writes: in a multi-process run, rank 0; the other ranks hold a RunDir that writes nothing.
- One process at a time: the writer holds an exclusive ``flock`` on ``.lock`` for the whole run. The kernel drops
  it when the process dies (even on kill -9), so :func:`is_live` tells a live run from a stale "running" record.
- Checkpoints keep the previous good one (``*.prev.pt``, a rename, no copy), so a checkpoint damaged after the fact
  (a full disk, a bad copy) still leaves a state to resume from.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any

from ltbench.errors import CheckpointError, LtbenchError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; a result file gets the usual permissions
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


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN: a diverged run's record must still
    be written, with null where a number could not be computed)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f))


def csv_text(rows: list[dict]) -> str:
    """Rows (dicts) as CSV; the header is the union of their keys, in first-seen order."""
    buf = io.StringIO()
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


class RunLockedError(LtbenchError):
    """Another live process writes this run directory."""


def _flock(fd: int) -> bool:
    """Try to take an exclusive lock without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a lock file alone cannot tell live from dead; allow
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def is_live(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's lock (the record's 'running' is current)."""
    path = Path(run_dir) / RunDir.LOCK
    if not path.exists():
        return False
    with open(path, "a+") as f:
        return not _flock(f.fileno())  # taking it succeeds only when nobody holds it; closing releases it


class RunDir:
    """The files of one run. ``writer=False`` (ranks other than 0) makes every write a no-op."""

    CONFIG, METRICS, INDICES, LOCK = "config.yaml", "metrics.json", "train_indices.txt", ".lock"

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        self.path, self.writer = Path(path), writer
        self._lock_file: Any = None
        self.notes: list[str] = []  # what the user should hear about this directory (a fallback checkpoint)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------------------------------- names
    @staticmethod
    def epoch_log_name(stage: str) -> str:
        return "epochs.csv" if stage == "train" else f"{stage}_epochs.csv"

    @staticmethod
    def checkpoint_name(stage: str) -> str:
        return "checkpoint.pt" if stage == "train" else f"{stage}_checkpoint.pt"

    # ------------------------------------------------------------------------------------------- writes
    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            atomic_write_text(self.path / name, text)

    def write_json(self, name: str, obj: Any) -> None:
        if self.writer:
            atomic_write_json(self.path / name, obj)

    def write_csv(self, name: str, rows: list[dict]) -> None:
        self.write_text(name, csv_text(rows))

    def save_checkpoint(self, stage: str, state: dict) -> None:
        """Write a stage's checkpoint; the one it replaces is kept as ``*.prev.pt``."""
        if not self.writer:
            return
        path = self.path / self.checkpoint_name(stage)
        if path.exists():
            os.replace(path, path.with_suffix(".prev.pt"))
        atomic_torch_save(path, state)

    def config(self) -> Any:
        """The run's saved config.yaml as its typed schema (a TrainConfig); one clear error when it is absent or
        cannot be read."""
        from omegaconf import OmegaConf

        from ltbench.config import to_schema

        path = self.path / self.CONFIG
        if not path.exists():
            raise CheckpointError(f"{self.path} is not an ltbench run directory (no {self.CONFIG})")
        try:
            return to_schema(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]
        except LtbenchError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}") from e

    def record(self) -> dict | None:
        """The run's metrics.json, or None if absent or unreadable."""
        try:
            return json.loads((self.path / self.METRICS).read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------------------------------- checkpoints
    def load_checkpoint(self, stage: str) -> dict | None:
        """A stage's last checkpoint (None if it has none); falls back to the previous one when the last cannot be
        read, and says what to do when neither can."""
        import torch

        path = self.path / self.checkpoint_name(stage)
        prev = path.with_suffix(".prev.pt")
        if not path.exists() and not prev.exists():
            return None
        errors = []
        for candidate in (path, prev):
            if not candidate.exists():
                continue
            try:
                ckpt = torch.load(candidate, map_location="cpu", weights_only=True)
                if not isinstance(ckpt, dict) or "epoch" not in ckpt or "model" not in ckpt:
                    raise ValueError("it is not an ltbench checkpoint")
                if candidate == prev:
                    errors.append(f"using the previous checkpoint {prev.name} (epoch {ckpt['epoch']})")
                    self.notes.append("; ".join(errors))
                return ckpt
            except Exception as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                errors.append(f"unreadable checkpoint {candidate.name} ({type(e).__name__}: {reason[:160]})")
        raise CheckpointError(
            f"cannot resume {self.path}: " + "; ".join(errors) + ". It is damaged (truncated or corrupt) and no "
            "earlier good state exists: start the run again without resume= (it goes to a new directory)"
        )

    def clean_temporaries(self) -> list[str]:
        """Remove the temporary files a killed process left half-written (never a finished file)."""
        removed = []
        for p in self.path.glob(".*.tmp"):
            with suppress(OSError):
                p.unlink()
                removed.append(p.name)
        return removed

    # ------------------------------------------------------------------------------------------- the lock
    def acquire(self) -> None:
        """Become the one writer of this directory, or fail with one clear line if a live process is."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / self.LOCK, "a+")  # noqa: SIM115 (held open for the whole run)
        if not _flock(f.fileno()):
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(f"{self.path} is being written by a live ltbench run ({holder}); not touching it")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None
