import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ConfigKeyError, ValidationError

from ltbench.config import TrainConfig, to_schema
from ltbench.errors import ConfigError
from ltbench.presets import list_strategies

STRATEGIES = [p.name for p in list_strategies()]


@pytest.fixture(scope="module")
def cfg_of():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=list(o))


def test_required_presets_exist():
    required = {
        "ce",
        "focal",
        "weighted_ce",
        "cb_ce",
        "cb_focal",
        "ldam",
        "ldam_drw",
        "balanced_softmax",
        "logit_adjust",
        "class_balanced_sampling",
        "sqrt_sampling",
        "progressive_sampling",
        "oversampling",
        "undersampling",
        "class_reorg",
        "drs",
        "mixup",
        "remix",
        "smote",
    }
    assert required <= set(STRATEGIES)
    assert all(p.summary and p.reference for p in list_strategies())


def test_every_semi_and_method_option_is_listed_with_its_paper():
    """``ltbench strategies`` lists the strategies, every ``semi=`` option and every ``method=`` option no strategy
    preset names (each must then carry its own summary and reference, as a strategy does)."""
    from importlib import resources

    from ltbench.presets import list_methods, list_presets

    conf = resources.files("ltbench.conf")
    named = {ln.split(":", 1)[1].strip() for e in (conf / "strategy").iterdir() if e.name.endswith(".yaml")
             for ln in e.read_text().splitlines() if ln.strip().startswith("- override /method:")}  # fmt: skip
    listed = {(m.group, m.name) for m in list_methods() if m.summary and m.reference}
    assert {("semi", p.name) for p in list_presets("semi")} <= listed
    unnamed = {p.name for p in list_presets("method")} - named
    assert unnamed and {("method", n) for n in unnamed} <= listed, unnamed


def test_defaults_are_the_reference_recipe(cfg_of):
    c = to_schema(cfg_of())
    assert isinstance(c, TrainConfig)
    assert c.strategy == "ce" and c.dataset.name == "cifar10lt" and c.dataset.imbalance_ratio == 100
    s = c.schedule
    assert (s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, s.warmup_epochs) == (
        200,
        128,
        0.1,
        0.9,
        2e-4,
        5,
    )
    # milestones are fractions of the epochs: the reference's 160 and 180 of 200
    assert s.milestones == [0.8, 0.9] and s.milestone_epochs == [160, 180] and s.gamma == 0.01
    assert c.model.name == "resnet32" and c.model.depth == 32 and c.model.head == "linear"


@pytest.mark.parametrize("preset", list_strategies(), ids=lambda p: p.name)
def test_every_strategy_composes_for_its_tasks_and_names_itself(cfg_of, preset):
    assert preset.tasks and set(preset.tasks) <= {"classification", "regression"}
    for task in preset.tasks:
        data = [] if task == "classification" else ["experiment=synthetic_dir"]
        c = to_schema(cfg_of(*data, f"strategy={preset.name}"))
        assert c.strategy == preset.name and c.task.name == task


def test_preset_is_a_diff(cfg_of):
    from ltbench.reweight import Reweighting

    c = to_schema(cfg_of("strategy=ldam_drw"))
    assert c.loss.name == "ldam" and c.model.head == "cosine" and c.reweight.name == "effective_number"
    assert Reweighting(c.reweight, [10, 1], c.schedule.epochs).start_epoch == 160  # the first lr decay
    assert c.sampler.name == "instance"  # untouched groups keep their defaults
    short = to_schema(cfg_of("strategy=ldam_drw", "schedule=short"))
    assert Reweighting(short.reweight, [10, 1], short.schedule.epochs).start_epoch == 24  # DRW follows the schedule


def test_command_line_beats_preset(cfg_of):
    c = to_schema(cfg_of("strategy=focal", "loss.gamma=2.0"))
    assert c.loss.name == "focal" and c.loss.gamma == 2.0
    c = to_schema(cfg_of("strategy=focal", "loss=ce"))
    assert c.loss.name == "ce"


def test_group_swaps(cfg_of):
    c = to_schema(cfg_of("dataset=cifar100lt", "dataset.imbalance_ratio=50", "sampler=sqrt", "reweight=inverse"))
    assert c.dataset.num_classes == 100 and c.dataset.groups.rule == "counts"
    assert c.sampler.name == "sqrt" and c.reweight.name == "inverse"


def test_misspelt_key_rejected_at_compose(cfg_of):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, HydraException)):
        cfg_of("schedule.epoch=3")


def test_wrong_type_rejected_at_compose(cfg_of):
    with pytest.raises((ConfigCompositionException, ValidationError, HydraException)):
        cfg_of("schedule.epochs=many")


def test_unknown_strategy_rejected(cfg_of):
    with pytest.raises((ConfigCompositionException, HydraException), match="strategy"):
        cfg_of("strategy=nope")


@pytest.mark.parametrize(
    "override,match",
    [
        ("dataset.imbalance_ratio=0.5", "imbalance_ratio"),
        ("dataset.profile=linear", "profile"),
        ("loss=ldam", "cosine"),
        ("device=tpu", "device"),
        ("schedule.milestones=[0.9,0.8]", "milestones"),
        ("schedule.milestones=[160,180]", "fractions"),
    ],
)
def test_cross_field_checks(cfg_of, override, match):
    with pytest.raises(ConfigError, match=match):
        to_schema(cfg_of(override))
