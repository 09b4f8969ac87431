"""Print the README's strategy tables (markdown, one per task) from the presets in conf/strategy, and the table of
the semi-supervised methods and feature regularisers (conf/semi, conf/method) that `ltbench strategies` lists too.

python scripts/strategies_table.py                 # all three tables
python scripts/strategies_table.py regression      # one (classification | regression | methods)
"""

from __future__ import annotations

import re
from importlib import resources

from ltbench.presets import list_methods, list_strategies


def preset_diff(name: str) -> str:
    text = (resources.files("ltbench.conf") / "strategy" / f"{name}.yaml").read_text()
    overrides = re.findall(r"override /(\w+): (\w+)", text)
    return ", ".join(f"`{g}={v}`" for g, v in overrides) or "(the defaults)"


TASKS = ("classification", "regression")


def table(task: str = "classification") -> str:
    rows = ["| strategy | what it does | groups it sets | reference |", "|---|---|---|---|"]
    for p in list_strategies():
        if task in p.tasks:
            rows.append(f"| `{p.name}` | {p.summary} | {preset_diff(p.name)} | {p.reference} |")
    return "\n".join(rows)


def methods_table() -> str:
    rows = ["| option | task | what it does | reference |", "|---|---|---|---|"]
    for p in list_methods():
        rows.append(f"| `{p.group}={p.name}` | {', '.join(p.tasks)} | {p.summary} | {p.reference} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    for t in sys.argv[1:] or (*TASKS, "methods"):
        print(f"{t}:\n\n{methods_table() if t == 'methods' else table(t)}\n")
