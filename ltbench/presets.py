"""What conf/ ships: the strategy presets (with the summary and reference from their header comments), and the
text of ``ltbench train --help``, generated from the config groups so it lists every option and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from omegaconf import OmegaConf


@dataclass
class Preset:
    """A preset of a config group (``strategy``, ``semi``, ``method``) with the ``# summary:`` and ``# reference:``
    lines of its header; ``tasks`` from its ``# task:`` line (default: classification)."""

    name: str
    summary: str
    reference: str
    tasks: tuple[str, ...] = ("classification",)
    group: str = "strategy"


def list_presets(group: str = "strategy", described: bool = False) -> list[Preset]:
    """The options of ``conf/<group>`` in name order; ``described``: only those with a ``# summary:`` line."""
    out = []
    folder = resources.files("ltbench.conf") / group
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        fields = {"summary": "", "reference": "", "task": "classification"}
        for line in entry.read_text().splitlines():
            for key in fields:
                if line.startswith(f"# {key}:"):
                    fields[key] = line.split(":", 1)[1].strip()
        if described and not fields["summary"]:
            continue
        tasks = tuple(t.strip() for t in fields["task"].split(","))
        out.append(Preset(entry.name[: -len(".yaml")], fields["summary"], fields["reference"], tasks, group))
    return out


def list_strategies() -> list[Preset]:
    return list_presets("strategy")


def list_methods() -> list[Preset]:
    """What ``ltbench strategies`` lists beside the strategies: every ``semi=`` option (on a strategy's supervised
    loss) and the ``method=`` options that no strategy preset names but that carry a summary (RankSim, ConR: on a
    strategy's loss and re-weighting)."""
    return list_presets("semi") + list_presets("method", described=True)


def group_options() -> dict[str, list[str]]:
    """Every config group of conf/ with its options (the hidden schema group excluded)."""
    root = resources.files("ltbench.conf")
    out = {}
    for d in sorted(root.iterdir(), key=lambda e: e.name):
        if d.is_dir() and not d.name.startswith(("_", ".")):
            out[d.name] = sorted(e.name[: -len(".yaml")] for e in d.iterdir() if e.name.endswith(".yaml"))
    return out


def help_text() -> str:
    lines = [
        "ltbench train: train and evaluate one configuration (a Hydra app; see the README).",
        "",
        "  ltbench train strategy=ldam_drw dataset=cifar100lt seed=1",
        "  ltbench train --multirun strategy=ce,focal,ldam_drw seed=0,1,2",
        "  ltbench train resume=<run directory>",
        "",
        "Config groups (group=option):",
    ]
    lines += [f"  {g}: {', '.join(opts)}" for g, opts in group_options().items()]
    lines += ["", "Any key can be overridden: schedule.epochs=30 loss.gamma=2 dataset.imbalance_ratio=50", ""]
    lines += ["== Config ==", "$CONFIG", "== Flags ==", "$FLAGS_HELP"]
    return "\n".join(lines)


OmegaConf.register_new_resolver("ltbench_help", help_text, replace=True)
