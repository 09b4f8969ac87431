"""The hooks every training stage runs with: a rich progress bar, the epoch log, the checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from rich.progress import Progress, TaskID

from ltbench.core import Epoch, Hook, Totals
from ltbench.rundir import RunDir

log = logging.getLogger("ltbench")

SYNC_EVERY = 25  # steps between progress-bar loss readings (each is one host sync)


class ProgressHook(Hook):
    """A bar over the stage's epochs and one over the current epoch's samples, with loss, lr and speed."""

    order = 10

    def __init__(self, progress: Progress, stage: str, epochs: int, start: int) -> None:
        self.progress = progress
        self.stage_task = progress.add_task(stage, total=epochs, completed=start, info="")
        self.batch_task: TaskID | None = None

    def on_epoch_start(self, ep: Epoch) -> None:
        self.batch_task = self.progress.add_task(f"  epoch {ep.index + 1}", total=ep.size or None, info="")
        self._lr = ep.lr

    def after_step(self, ep: Epoch, totals: Totals) -> None:
        assert self.batch_task is not None
        if totals.steps % SYNC_EVERY == 1:
            info = f"loss {totals.mean('loss'):.3f} lr {self._lr:.4g}"
            self.progress.update(self.batch_task, advance=totals.last, info=info)
        else:
            self.progress.update(self.batch_task, advance=totals.last)

    def on_epoch_end(self, ep: Epoch) -> None:
        if self.batch_task is not None:
            self.progress.remove_task(self.batch_task)
        s = ep.stats
        speed = s["images"] / max(s["seconds"], 1e-9)
        self.progress.update(self.stage_task, advance=1, info=f"loss {s['loss']:.3f} {speed:,.0f} img/s")


class EpochLogHook(Hook):
    """The stage's epoch log (``epochs.csv``, or ``<stage>_epochs.csv``), rewritten atomically every epoch."""

    order = 20

    def __init__(self, rundir: RunDir, stage: str, rows: list[dict]) -> None:
        self.rundir, self.name, self.rows = rundir, RunDir.epoch_log_name(stage), rows

    def on_epoch_end(self, ep: Epoch) -> None:
        self.rundir.write_csv(self.name, self.rows)
        r = ep.row
        log.info(
            "%s epoch %d/%d lr %.4g loss %.4f %.0f img/s",
            ep.stage,
            ep.index + 1,
            ep.epochs,
            ep.lr,
            r["train_loss"],
            r["images_per_s"],
        )


class CheckpointHook(Hook):
    """After every epoch, the stage's state (``state()`` gives it) goes to its checkpoint file."""

    order = 30

    def __init__(self, rundir: RunDir, stage: str, state: Callable[[Epoch], dict[str, Any]]) -> None:
        self.rundir, self.stage, self.state = rundir, stage, state

    def on_epoch_end(self, ep: Epoch) -> None:
        self.rundir.save_checkpoint(self.stage, self.state(ep))
