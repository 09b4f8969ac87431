"""Extra loggers, beside the epoch logs that every run writes: ``logger=tensorboard``, and the experiment trackers
``logger=wandb`` (Weights & Biases, offline by default) and ``logger=mlflow`` (any MLflow tracking store).

Loggers are hooks (ltbench.core.Hook) built on the writing rank only; ``final`` gets the record's metric columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ltbench.config import LoggerConfig
from ltbench.core import Epoch, Hook
from ltbench.errors import ConfigError
from ltbench.registry import Registry

LOGGERS: Registry[Any] = Registry("logger", LoggerConfig)


@dataclass
class TensorBoardConfig(LoggerConfig):
    name: str = "tensorboard"
    subdir: str = "tensorboard"  # inside the run directory

    def check(self, root: Any) -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from e


@LOGGERS.register("tensorboard", TensorBoardConfig)
class TensorBoardLogger(Hook):
    """TensorBoard scalars per stage and epoch (loss, training metric, lr, speed), and the final test metrics."""

    def __init__(self, cfg: TensorBoardConfig, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / cfg.subdir))

    def on_epoch_end(self, ep: Epoch) -> None:
        for key, value in ep.row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{ep.stage}/{key}", value, ep.index + 1)
        self.writer.flush()

    def final(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"test/{key}", value, 0)
        self.writer.close()


# ------------------------------------------------------------------------------------------ experiment trackers


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``schedule.lr``), the form a tracker's parameter table takes."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@dataclass
class RunInfo:
    """What a tracker needs of a run, read from its directory (config.yaml and the running metrics.json are
    written before the loggers start): the resolved config, the run's name and its group."""

    config: dict[str, Any]
    name: str
    group: str
    record: dict[str, Any]

    @classmethod
    def of(cls, run_dir: Path, group: str | None) -> RunInfo:
        import json

        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
        record = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        ratio = record.get("imbalance_ratio")
        base = f"{record.get('dataset', 'run')}" + (f"_ir{ratio:g}" if isinstance(ratio, (int, float)) else "")
        name = f"{base}/{record.get('label', 'run')}/seed{record.get('seed', 0)}"
        return cls(config, name, group or _sweep_group() or f"{base}/{record.get('label', 'run')}", record)  # type: ignore[arg-type]


def _sweep_group() -> str | None:
    """Inside a Hydra multirun, the sweep's directory name: every job of one sweep lands in one group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    return Path(str(hc.sweep.dir)).name if hc.mode == RunMode.MULTIRUN else None


def report_plots(run_dir: Path, out: Path) -> list[Path]:
    """The report's plots of this one run (``ltbench report <run dir>``: per-class, groups, confusion), in ``out``."""
    import io

    from rich.console import Console

    from ltbench.report import report

    report(run_dir, out, plots=True, console=Console(file=io.StringIO()))
    return sorted(out.glob("*.png"))


class Tracker(Hook):
    """An experiment tracker as a logger: per-stage epoch scalars, the config as parameters, the final metrics as
    summary and the report's plots as artifacts. A tracker that fails (cannot start, a full disk, a server gone)
    logs one warning and stops tracking; it never stops the training run. The tracker's run id is kept in the run
    directory (``<name>_run_id.txt``) so a resumed run (``resume=``, a requeued SLURM job) continues the same run."""

    order: ClassVar[int] = 40
    kind = "tracker"

    def __init__(self, cfg: LoggerConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir, self.live = cfg, Path(run_dir), False
        self.id_file = self.run_dir / f"{self.kind}_run_id.txt"
        self._safely("start", lambda: self.start(RunInfo.of(self.run_dir, getattr(cfg, "group", None))))

    def _safely(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            if what == "start":
                self.live = True
        except Exception as e:  # a tracker never stops a run
            if self.live or what == "start":
                msg = (str(e).strip().splitlines() or [""])[0][:300]
                warnings.warn(f"logger={self.kind}: {what} failed ({type(e).__name__}: {msg}); tracking stops here",
                              RuntimeWarning, stacklevel=2)  # fmt: skip
            self.live = False

    def on_epoch_end(self, ep: Epoch) -> None:
        if self.live:
            row = {k: v for k, v in _scalars(ep.row).items() if k != "epoch"}
            self._safely("logging an epoch", lambda: self.log_epoch(ep.stage, ep.index + 1, row))

    def on_stage_end(self, stage: str, ok: bool) -> None:
        if self.live and not ok:  # interrupted or failed: the run may resume into the same tracker run
            self._safely("closing", lambda: self.close(completed=False))
            self.live = False

    def final(self, metrics: dict[str, Any]) -> None:
        if not self.live:
            return
        import tempfile

        def finish() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                plots = report_plots(self.run_dir, Path(tmp))
                self.log_final(_scalars(metrics), plots)
            self.close(completed=True)

        self._safely("the final metrics", finish)
        self.live = False

    def previous_id(self) -> str | None:
        return self.id_file.read_text().strip() or None if self.id_file.exists() else None

    # what each tracker implements
    def start(self, info: RunInfo) -> None: ...
    def log_epoch(self, stage: str, epoch: int, row: dict[str, float]) -> None: ...
    def log_final(self, metrics: dict[str, float], plots: list[Path]) -> None: ...
    def close(self, completed: bool) -> None: ...


@dataclass
class TrackerConfig(LoggerConfig):
    """Base of the experiment trackers' schemas: the run group, and the library the tracker needs (``package``),
    checked when the config is composed."""

    package: ClassVar[str] = ""
    group: str | None = None  # default: the sweep's directory name in a multirun, else <dataset>/<label>

    def check(self, root: Any) -> None:
        import importlib

        try:
            importlib.import_module(self.package)
        except ImportError as e:
            raise ConfigError(
                f"logger={self.name} needs the {self.package} package: pip install -e '.[trackers]'"
            ) from e


@dataclass
class WandbConfig(TrackerConfig):
    name: str = "wandb"
    project: str = "ltbench"
    entity: str | None = None
    mode: str = "offline"  # offline (written under <run dir>/wandb; `wandb sync` uploads) | online | disabled
    package = "wandb"

    def check(self, root: Any) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.mode={self.mode}: expected offline, online or disabled")
        super().check(root)


@LOGGERS.register("wandb", WandbConfig)
class WandbLogger(Tracker):
    """Weights & Biases (wandb.init / log / summary / Artifact), offline by default: ``wandb sync <run dir>/wandb``."""

    kind = "wandb"

    def start(self, info: RunInfo) -> None:
        import wandb

        cfg: WandbConfig = self.cfg  # type: ignore[assignment]
        prev = self.previous_id()
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=info.group, name=info.name, config=info.config,
            dir=str(self.run_dir), mode=cfg.mode, id=prev, resume="allow" if prev else None, reinit="create_new",  # type: ignore[arg-type]
            settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip
        self.id_file.write_text(self.run.id)

    def log_epoch(self, stage: str, epoch: int, row: dict[str, float]) -> None:
        self.run.log({f"{stage}/{k}": v for k, v in row.items()} | {f"{stage}/epoch": epoch})

    def log_final(self, metrics: dict[str, float], plots: list[Path]) -> None:
        import wandb

        for k, v in metrics.items():
            self.run.summary[k] = v
        if plots:
            art = wandb.Artifact(f"plots-{self.run.id}", type="report")
            for p in plots:
                art.add_file(str(p))
            self.run.log_artifact(art)

    def close(self, completed: bool) -> None:
        self.run.finish(exit_code=0 if completed else 1)


@dataclass
class MlflowConfig(TrackerConfig):
    name: str = "mlflow"
    # null: $MLFLOW_TRACKING_URI, else the SQLite store <results_dir>/mlflow.db; or sqlite:///path.db, http://host:5000
    tracking_uri: str | None = None
    experiment: str = "ltbench"  # (the group is a tag of the run)
    package = "mlflow"


@LOGGERS.register("mlflow", MlflowConfig)
class MlflowLogger(Tracker):
    """MLflow (MlflowClient: create_run / log_batch / log_artifact / set_terminated) on any tracking store."""

    kind = "mlflow"

    def start(self, info: RunInfo) -> None:
        import os

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        cfg: MlflowConfig = self.cfg  # type: ignore[assignment]
        results = Path(str(info.config.get("results_dir", "results"))).resolve()
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        # a new experiment keeps its artifacts beside the default store, not in ./mlruns of whatever the cwd is
        where = (results / "mlflow_artifacts").as_uri() if uri.startswith("sqlite:") else None
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.experiment, where)
        prev = self.previous_id()
        if prev:
            self.run_id = prev
            self.client.update_run(prev, status="RUNNING")
            return
        rec = info.record
        tags = {"group": info.group, "ltbench.label": str(rec.get("label")),
                "ltbench.config_hash": str(rec.get("config_hash")), "ltbench.run_dir": str(self.run_dir)}  # fmt: skip
        self.run_id = self.client.create_run(exp_id, run_name=info.name, tags=tags).info.run_id
        self.id_file.write_text(self.run_id)
        params = [Param(k, str(v)[:6000]) for k, v in _flat(info.config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters at a time
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_epoch(self, stage: str, epoch: int, row: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{stage}/{k}", v, ms, epoch) for k, v in row.items()])

    def log_final(self, metrics: dict[str, float], plots: list[Path]) -> None:
        import time

        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, 0) for k, v in metrics.items()])
        for p in plots:
            self.client.log_artifact(self.run_id, str(p), "plots")
        self.client.log_artifact(self.run_id, str(self.run_dir / "metrics.json"))

    def close(self, completed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if completed else "KILLED")
