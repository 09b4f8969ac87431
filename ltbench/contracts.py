"""What a stage hands the components it builds: :class:`StageContext`, typed.

Builders of methods (:data:`ltbench.methods.Builder`) and classifier methods receive a ``StageContext``: the run's
config and the stage's own section of it, the data and its label statistics, the task, the device and the process
group, the data feed, and the declared outputs of the stages before this one (``outputs["base"]["pseudo_labels"]``,
read-only). They never see the run record, the run directory or the console: one stage's output reaches the next
only through what that stage declared in its result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ltbench.config import Component, TrainConfig
from ltbench.data import LTData
from ltbench.dist import DistInfo
from ltbench.feed import DataFeed
from ltbench.tasks import LabelStats, Task


@dataclass(frozen=True)
class StageContext:
    """The typed view of one stage of a run that its components are built from.

    Invariants: ``section`` is ``getattr(cfg, <the stage's section>)`` (None for a stage without one);
    ``outputs`` holds exactly the records of the stages before this one in the plan, keyed by record key;
    ``predict(model, split, features)`` gives the outputs (or features) of a whole split on every rank.
    """

    cfg: TrainConfig
    section: Component | None
    data: LTData
    task: Task
    stats: LabelStats
    device: torch.device
    info: DistInfo
    feed: DataFeed
    predict: Callable[..., torch.Tensor]
    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def features(self, model: nn.Module, split: str) -> torch.Tensor:
        """The features of a whole split (``model.features``), evaluated once, in order."""
        return self.predict(model, split, features=True)

    def output(self, stage: str, key: str) -> Any:
        """A declared output of an earlier stage; a clear error when the plan has no such stage or output."""
        if stage not in self.outputs or key not in self.outputs[stage]:
            raise KeyError(f"no output {key!r} of stage {stage!r} before this one (have: {sorted(self.outputs)})")
        return self.outputs[stage][key]
