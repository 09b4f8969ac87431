"""Clusters and sweeps: signals of a scheduler (time limits, preemption, requeue) and the objective of a sweep.

Signals (:func:`sigterm_interrupts`, entered by ``runner.run`` around a run):

- SIGTERM (``scancel``, a time limit without a warning signal, preemption, ``scontrol requeue``) raises
  :class:`Terminated`: the run is recorded as ``interrupted`` (its last epoch checkpoint stays) and the process
  exits 143. When SLURM itself requeues the job (preemption with ``PreemptMode=REQUEUE``, ``scontrol requeue``), the
  job runs again with the same overrides, hence the same run directory, and resumes from that checkpoint.
- Inside a submitit job (``hydra/launcher=submitit_slurm`` or ``slurm``), submitit's warning signal (USR2, or
  ``$SUBMITIT_PREEMPT_SIGNAL``; SLURM sends it ``signal_delay_s`` before the time limit, submitit's
  ``Job._interrupt`` on preemption) raises :class:`Terminated` too; once the record says ``interrupted``, submitit's
  own handler runs: it pickles the launcher's ``checkpoint()`` (hydra-submitit-launcher's
  ``BaseSubmititLauncher.checkpoint``, a ``DelayedSubmission`` of the same job: submitit's checkpointing protocol,
  submitit/docs/checkpointing.md) and requeues the job (``scontrol requeue``), at most ``max_num_timeout`` times
  for time limits. Only the first signal interrupts; later ones (SIGTERM then USR2 on preemption) are remembered.

Sweep objective (:func:`sweep_result`, the return value of ``ltbench train``'s Hydra task function): under
``hydra/sweeper=optuna`` (hydra-optuna-sweeper) a metric of the validation split, never of the test split
(``LTBENCH_OBJECTIVE=val.<metric>``, default the task's first column: ``val.top1``, ``val.mae``); every trial's
validation value and test result go to ``<sweep dir>/trials/<n>.json``, and the last trial writes ``best.json`` (the
configuration with the best validation value and its test result) and prints it once. Other sweeps get test top-1,
as before (Hydra's basic launcher ignores it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ltbench.errors import ConfigError

log = logging.getLogger("ltbench")

OBJECTIVE_ENV = "LTBENCH_OBJECTIVE"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, preemption) or submitit's warning signal: handled like Ctrl-C, so the run
    can be resumed. ``signum`` is the signal that interrupted."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self) -> tuple[type, tuple[int]]:  # pickles (joblib workers) with its signal number
        return (Terminated, (self.signum,))


def submitit_signal() -> signal.Signals | None:
    """The signal submitit asks SLURM to send before a time limit (submitit.JobEnvironment.USR_SIG), inside a
    submitit job (``$SUBMITIT_EXECUTOR`` set by submitit's sbatch script); None elsewhere."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM (and, in a submitit job, submitit's signal) into :class:`Terminated` while a run trains (main
    thread only; the previous handlers are restored afterwards). After a submitit signal, submitit's handler
    checkpoints the submission and requeues the job once the run has been recorded as interrupted."""
    usr = submitit_signal()
    signals = [signal.SIGTERM, *([usr] if usr is not None else [])]
    seen: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        if len(seen) == 1:
            raise Terminated(signum)
        log.warning("%s while stopping: remembered", signal.Signals(signum).name)

    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if seen:
            names = ", ".join(signal.Signals(s).name for s in seen)
            log.warning("%s: the run stopped, recorded as interrupted; it resumes from its last checkpoint", names)
        if usr is not None and usr in seen and callable(previous[usr]):
            log.warning("%s from SLURM: submitit checkpoints the job and requeues it", usr.name)
            previous[usr](usr, None)  # submitit: checkpoint(), scontrol requeue, exit


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


# ------------------------------------------------------------------------------------------------ sweep objective


def objective_key(key: str | None, record: dict[str, Any]) -> str:
    """The validation metric a sweep optimises: ``val.<metric>`` (``<metric>`` alone means the same); a test metric
    is refused (selecting on the test set makes its numbers optimistic). Default: the task's first column."""
    if not key:
        return f"val.{record['columns'][0]['key']}"
    split, _, metric = key.rpartition(".")
    if split in ("", "val", "validation"):
        return f"val.{metric}"
    if split == "test":
        raise ConfigError(
            f"{OBJECTIVE_ENV}={key}: a sweep's objective must be a validation metric (val.{metric}), never a test one"
        )
    raise ConfigError(f"{OBJECTIVE_ENV}={key}: expected val.<metric>, e.g. val.top1 or val.mae")


def objective_value(record: dict[str, Any], key: str | None = None) -> float:
    """The value of the validation metric ``key`` (see :func:`objective_key`) in a run's metrics.json record."""
    name = objective_key(key, record).split(".", 1)[1]
    val = record.get("val")
    if not val:
        raise ConfigError("a sweep on validation needs a validation split: dataset.val_per_class must be > 0")
    if val.get(name) is None:
        raise ConfigError(f"val.{name} is not a validation metric of this run; there are: {', '.join(sorted(val))}")
    return float(val[name])


def _direction(sweeper: Any) -> str | None:
    d = sweeper.get("direction") if sweeper is not None else None
    if isinstance(d, (list, tuple)) or (d is not None and not isinstance(d, str) and hasattr(d, "__len__")):
        return None  # several objectives: not ltbench's
    return None if d is None else str(getattr(d, "name", d)).lower()


def check_direction(record: dict[str, Any], key: str, direction: str | None) -> None:
    """Refuse an optimisation direction that is the wrong way round for the metric (maximize an MAE)."""
    name = key.split(".", 1)[1]
    higher = next((c["higher_is_better"] for c in record["columns"] if c["key"] == name), None)
    if direction is None or higher is None:
        return
    want = "maximize" if higher else "minimize"
    if direction != want:
        raise ConfigError(f"{key} is {'higher' if higher else 'lower'} is better: set hydra.sweeper.direction={want}")


def sweep_result(metrics: dict[str, Any]) -> float | None:
    """What ``ltbench train``'s task function returns: under the Optuna sweeper the validation objective (and the
    trial is recorded, see the module doc); otherwise test top-1 (unused by Hydra's basic launcher)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return metrics.get("top1")
    target = str(hc.sweeper.get("_target_", ""))
    if "optuna" not in target or metrics.get("status") != "completed":
        return metrics.get("top1")
    key = objective_key(os.environ.get(OBJECTIVE_ENV), metrics)
    value = objective_value(metrics, key)
    check_direction(metrics, key, _direction(hc.sweeper))
    record_trial(Path(hc.sweep.dir), int(hc.job.num), list(hc.overrides.task), key, value, metrics)
    n_trials = hc.sweeper.get("n_trials")
    if n_trials is not None and int(hc.job.num) + 1 >= int(n_trials):
        report_best(Path(hc.sweep.dir), _direction(hc.sweeper) or "maximize")
    return value


def record_trial(sweep_dir: Path, num: int, overrides: list[str], key: str, value: float, record: dict) -> Path:
    """``<sweep dir>/trials/<num>.json``: the trial's overrides, its objective value and its test columns."""
    test = {c["key"]: record.get(c["key"]) for c in record["columns"]}
    row = {"trial": num, "overrides": overrides, "objective": key, "value": value, "test": test,
           "label": record.get("label"), "config_hash": record.get("config_hash")}  # fmt: skip
    path = sweep_dir / "trials" / f"{num}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, path)
    return path


def report_best(sweep_dir: Path, direction: str) -> dict[str, Any]:
    """The trial with the best validation value (ties: the earliest), written to ``best.json`` and printed once:
    its configuration and its test result. The test numbers are reported, never used to choose."""
    rows = [json.loads(p.read_text()) for p in sorted((sweep_dir / "trials").glob("*.json"))]
    if not rows:
        raise ConfigError(f"no trials recorded under {sweep_dir / 'trials'}")
    sign = 1.0 if direction == "maximize" else -1.0
    best = max(rows, key=lambda r: (sign * r["value"], -r["trial"]))
    out = {"direction": direction, "n_trials": len(rows), **best}
    tmp = sweep_dir / "best.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, sweep_dir / "best.json")
    tests = ", ".join(f"{k} {v:.2f}" for k, v in best["test"].items() if isinstance(v, (int, float)))
    print(
        f"best of {len(rows)} trials (on validation): trial {best['trial']} {' '.join(best['overrides'])}\n"
        f"  {best['objective']} {best['value']:.4f}; its test result: {tests}",
        flush=True,
    )
    return out
