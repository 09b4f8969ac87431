"""The declared contracts: capabilities checked once at compose time, methods' declared inputs and streams, the stage
plan read from the stage registry."""

from __future__ import annotations

import pytest

from ltbench.config import TASKS, Component, to_schema
from ltbench.errors import ConfigError
from ltbench.registry import load_components


@pytest.mark.parametrize(
    "overrides, needle",
    [
        # a new user's first regression run: the model that reads features is named (it was not)
        (["task=regression", "dataset=synthetic_dir"], "model=resnet32 reads images; dataset=synthetic_dir gives "
         "features; model options that fit: mlp"),
        (["experiment=diamonds_dir", "loss=focal"], "loss=focal needs task=classification"),
        (["experiment=agedb_dir", "classifier=crt"], "classifier=crt needs task=classification"),
        (["loss=mse"], "loss=mse needs task=regression"),
        (["experiment=stsb_dir", "synth=mixup"], "synth=mixup reads images|features; dataset=stsb_dir gives text"),
    ],
)
def test_a_capability_mismatch_is_one_line_naming_what_fits(compose_cfg, overrides, needle):
    with pytest.raises(ConfigError) as e:
        to_schema(compose_cfg(*overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_option_declares_its_capabilities_as_class_attributes():
    """Every registered option's schema is a Component: its capabilities are declared (defaults: every task and
    every input kind), so the compose-time check never probes for an attribute."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from ltbench.config import REGISTERED_SECTIONS

    load_components()
    cs = ConfigStore.instance()
    for family in set(REGISTERED_SECTIONS.values()):
        for entry in cs.list(f"schema/{family}"):
            schema = OmegaConf.get_type(cs.load(f"schema/{family}/{entry}").node)
            assert isinstance(schema, type) and issubclass(schema, Component), (family, entry)
            assert set(schema.tasks) <= set(TASKS) and schema.tasks, (family, entry)


def test_methods_declare_their_inputs_and_streams():
    load_components()
    from ltbench.methods import METHODS, PRETRAIN, SEMI, Method
    from ltbench.methods.semi import PseudoLabelConfig

    assert PRETRAIN.get("simsiam").builder.inputs == "raw" and METHODS.get("bcl").builder.inputs == "raw"
    assert SEMI.get("fixmatch").builder.streams.unlabeled and SEMI.get("pseudo_label").builder.streams.unlabeled
    assert METHODS.get("mwn").builder.streams.validation and not Method.streams.unlabeled
    assert PseudoLabelConfig.base_stage and not METHODS.get("fds").builder.streams.unlabeled


def test_the_plan_is_the_registered_stages_a_config_enables_in_order(compose_cfg):
    from ltbench.stages import STAGES, plan

    load_components()
    assert {"pretrain", "base", "train", "classifier"} <= set(STAGES.names())
    assert [s.name for s in plan(to_schema(compose_cfg()))] == ["train"]
    cfg = to_schema(compose_cfg("pretrain=rotation", "classifier=crt"))
    assert [(s.name, s.record_key) for s in plan(cfg)] == [
        ("pretrain", "pretrain"), ("train", "stage1"), ("classifier", "stage2")]  # fmt: skip
    assert [s.name for s in plan(to_schema(compose_cfg("dataset=cifar10lt_ssl", "semi=pseudo_label")))] == [
        "base", "train"]  # fmt: skip


def test_after_backward_sees_the_gradients_before_the_step():
    """The after_backward hook runs between backward and the optimiser step: a hook that clips the gradient to zero
    leaves the weights where they were."""
    import torch
    from test_fit import tiny_trainer

    from ltbench.core import Hook
    from ltbench.fit import fit

    class Zero(Hook):
        calls = 0

        def after_backward(self, ep, model) -> None:
            Zero.calls += 1
            assert all(p.grad is not None for p in model.parameters())
            for p in model.parameters():
                p.grad.zero_()

    tr, _, _ = tiny_trainer()
    for g in tr.optimizer.param_groups:
        g["weight_decay"] = 0.0  # (weight decay would move them without a gradient)
    before = [p.detach().clone() for p in tr.model.parameters()]
    fit(tr, [Zero()])
    assert Zero.calls == 6 and all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_stage_hooks_run_in_declared_order():
    from ltbench.core import Hook
    from ltbench.hooks import CheckpointHook, EpochLogHook, ProgressHook

    assert ProgressHook.order < EpochLogHook.order < CheckpointHook.order < Hook.order
