"""Extra loggers, beside the epoch logs that every run writes: ``logger=tensorboard``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
