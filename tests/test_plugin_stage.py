"""Adding a stage is one Python file plus one YAML group: a calibration stage after training (temperature scaling,
Guo et al. 2017), registered from this module as a plugin would register it, trains through the one loop, resumes
inside itself after an interrupt to the numbers of an uninterrupted run, and a second run that changes only the new
stage gets the training stage from the stage cache.

The plugin's code is kept in one string (the README's "Adding a method" shows the same file).
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
from conftest import SMOKE, interrupt_at, tiny_cifar
from hydra import compose, initialize_config_module

from ltbench import config
from ltbench.runner import run

PLUGIN = textwrap.dedent(
    '''
    """Temperature scaling as a stage of its own, after the training stage (and after a classifier stage)."""
    from dataclasses import dataclass, field

    import torch
    import torch.nn.functional as F
    from torch import nn

    from ltbench.config import Component, ConfigError, MethodConfig, ScheduleConfig, register_section
    from ltbench.core import autocast
    from ltbench.data.augment import normalize
    from ltbench.methods import METHODS, Method, Streams
    from ltbench.registry import Registry
    from ltbench.samplers import sampler_config
    from ltbench.stages import Stage, StageResult, StageSpec, register_stage, train


    def _schedule() -> ScheduleConfig:
        return ScheduleConfig(epochs=3, batch_size=64, lr=0.05, weight_decay=0.0, warmup=0.0, milestones=[])


    @dataclass
    class CalibrateConfig(Component):
        name: str = "temperature"
        schedule: ScheduleConfig = field(default_factory=_schedule)


    register_section("calibrate", CalibrateConfig)  # ltbench train +calibrate=temperature
    CALIBRATORS = Registry("calibrate", CalibrateConfig)


    class Scaled(nn.Module):
        """logits / T of a frozen network (kept in eval mode: its BatchNorm statistics do not move)."""

        def __init__(self, model: nn.Module, log_t: nn.Parameter) -> None:
            super().__init__()
            self.model, self.log_t = model, log_t

        def train(self, mode: bool = True) -> "Scaled":
            super().train(mode)
            self.model.eval()
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x) / self.log_t.exp()


    @CALIBRATORS.register("temperature", CalibrateConfig)
    class Temperature(Method):
        """The NLL of logits / T on the stage's stream; T = exp(log_t) is the only parameter trained."""

        def __init__(self, cfg, ctx, model, base=None) -> None:
            super().__init__()
            self.log_t = nn.Parameter(torch.zeros(()))

        def wrap(self, model: nn.Module) -> nn.Module:
            return Scaled(model, self.log_t)

        def step(self, net, batch, ep):
            with autocast(batch.x.device, ep.amp):
                logits = net(batch.x)
            loss = F.cross_entropy(logits.float(), batch.y)
            return loss, {"mean_nll": loss.detach().double() * len(batch)}


    @dataclass
    class EntropyMinConfig(MethodConfig):
        name: str = "entmin"
        weight: float = 0.1
        tasks = ("classification",)
        reads = ("images",)

        def check(self, root) -> None:
            if not root.dataset.unlabeled:
                raise ConfigError("method=entmin needs unlabeled data: a dataset like cifar10lt_ssl")


    @METHODS.register("entmin", EntropyMinConfig)
    class EntropyMin(Method):
        """Entropy minimisation (Grandvalet & Bengio 2004) on an unlabeled stream, beside the run's supervised loss."""

        streams = Streams(unlabeled=True)  # each labeled batch comes with an unlabeled one

        def __init__(self, cfg, ctx, model, base) -> None:
            super().__init__()
            self.cfg, self.base, self.mean, self.std = cfg, base, ctx.data.mean, ctx.data.std

        def unlabeled_batch(self, batch_size, num_labeled, num_unlabeled) -> int:
            return batch_size

        def step(self, net, batch, ep):
            loss, sums = self.base.step(net, batch, ep)
            with autocast(batch.x.device, ep.amp):
                p = net(normalize(batch.unlabeled.x, self.mean, self.std)).float().softmax(1)
            entropy = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
            return loss + self.cfg.weight * entropy, {**sums, "mean_entropy": entropy.detach().double() * len(batch)}

        def on_epoch_start(self, ep) -> None:
            self.base.on_epoch_start(ep)

        def param_groups(self):
            return self.base.param_groups()


    @register_stage
    class CalibrationStage(Stage):
        name, title, record_key, stream = "calibrate", "calibration", "calibrate", "calibrate-"
        order, section, sections = 45, "calibrate", ("calibrate",)

        def schedule(self, cfg):
            return cfg.calibrate.schedule

        def run(self, ctx, sctx, model, ckpt):
            for p in model.parameters():
                p.requires_grad_(False)
            method = CALIBRATORS.build(sctx.section, sctx, model, None).to(ctx.device)
            spec = StageSpec(model, method, sctx.section.schedule, sampler_config("instance"), None)
            rows = train(ctx, sctx, self, spec, ckpt)
            return StageResult(method.wrap(model), {"temperature": float(method.log_t.detach().exp())}, rows)
    '''
)

YAML = "defaults:\n  - /schema/calibrate/temperature@_here_\n  - _self_\nname: temperature\n"
METHOD_YAML = "defaults:\n  - /schema/method/entmin@_here_\n  - _self_\nname: entmin\nweight: 0.1\n"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """Import the plugin (it registers its section, option and stage); undo the registration afterwards."""
    from ltbench.stages import STAGES

    root = tmp_path_factory.mktemp("plugin")
    (root / "ltb_calibration.py").write_text(PLUGIN)
    (root / "conf" / "calibrate").mkdir(parents=True)
    (root / "conf" / "calibrate" / "temperature.yaml").write_text(YAML)
    (root / "conf" / "method").mkdir()
    (root / "conf" / "method" / "entmin.yaml").write_text(METHOD_YAML)
    schema = config.root_schema()
    spec = importlib.util.spec_from_file_location("ltb_calibration", root / "ltb_calibration.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ltb_calibration"] = module
    spec.loader.exec_module(module)
    yield root / "conf"
    config._ROOT["schema"] = schema
    config.REGISTERED_SECTIONS.pop("calibrate", None)
    STAGES._entries.pop("calibrate", None)
    from ltbench.methods import METHODS

    METHODS._entries.pop("entmin", None)
    config.register_root()
    sys.modules.pop("ltb_calibration", None)


@pytest.fixture
def compose_cfg(plugin):
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=[*SMOKE, f"hydra.searchpath=[file://{plugin}]", *o])


def test_a_registered_stage_joins_the_plan_trains_resumes_and_reuses_the_stage_before(
    compose_cfg, cifar10_root, tmp_path, monkeypatch
):
    from ltbench.config import to_schema
    from ltbench.identity import config_hash
    from ltbench.stages import plan

    data = tiny_cifar(cifar10_root)
    plain = to_schema(compose_cfg(*data))
    assert [s.name for s in plan(plain)] == ["train"]  # absent unless set, and no identity changes
    args = [*data, "+calibrate=temperature", f"results_dir={tmp_path / 'a'}"]
    cfg = to_schema(compose_cfg(*args))
    assert [s.name for s in plan(cfg)] == ["train", "calibrate"] and config_hash(cfg) != config_hash(plain)
    full = run(compose_cfg(*args), tmp_path / "full")
    assert full["stages"] == ["train", "calibrate"] and full["calibrate"]["temperature"] != 1.0
    assert len((tmp_path / "full" / "calibrate_epochs.csv").read_text().splitlines()) == 1 + 3
    assert full["stage1"]["reused"] is False

    cut = [*data, "+calibrate=temperature", f"results_dir={tmp_path / 'b'}"]
    interrupt_at(monkeypatch, lambda: run(compose_cfg(*cut), tmp_path / "cut"), at=2, stage="calibrate")
    resumed = run(compose_cfg(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_stage"] == ["calibrate"] and resumed["resumed_at_epoch"] == [1]
    assert resumed["calibrate"]["temperature"] == full["calibrate"]["temperature"]
    assert resumed["per_class_acc"] == full["per_class_acc"] and resumed["ece"] == full["ece"]

    other = run(compose_cfg(*args, "calibrate.schedule.epochs=2"), tmp_path / "other")
    assert other["stage1"]["reused"] is True  # the training stage came from the stage cache
    assert other["calibrate"]["temperature"] != full["calibrate"]["temperature"]


def test_a_stage_1_method_with_its_own_stream_trains_from_its_yaml(compose_cfg, tmp_path):
    """A method that declares an unlabeled stream (``streams = Streams(unlabeled=True)``) gets one unlabeled batch
    with every labeled batch from the stage, seeded per epoch, and is refused without unlabeled data."""
    from conftest import make_cifar

    from ltbench.config import to_schema
    from ltbench.errors import ConfigError

    root = make_cifar(tmp_path / "ssl", 10, train_per_class=60, test_per_class=10)
    data = ["dataset=cifar10lt_ssl", f"dataset.root={root}", "dataset.download=false", "dataset.max_labeled=20",
            "dataset.max_unlabeled=30", "dataset.imbalance_ratio=4", "dataset.unlabeled_ratio=4"]  # fmt: skip
    m = run(compose_cfg(*data, "method=entmin", f"results_dir={tmp_path}"), tmp_path / "run")
    assert m["status"] == "completed" and m["stages"] == ["train"] and m["num_unlabeled"] > 0
    head, *rows = (tmp_path / "run" / "epochs.csv").read_text().splitlines()
    col = head.split(",").index("entropy")
    assert rows and all(0 < float(r.split(",")[col]) <= 2.31 for r in rows)  # at most log(10)
    with pytest.raises(ConfigError, match="needs unlabeled data"):
        to_schema(compose_cfg("method=entmin"))
