"""Print the README's strategy table (markdown) from the presets in conf/strategy.

python scripts/strategies_table.py
"""

from __future__ import annotations

import re
from importlib import resources

from ltbench.presets import list_strategies


def preset_diff(name: str) -> str:
    text = (resources.files("ltbench.conf") / "strategy" / f"{name}.yaml").read_text()
    overrides = re.findall(r"override /(\w+): (\w+)", text)
    return ", ".join(f"`{g}={v}`" for g, v in overrides) or "(the defaults)"


def table() -> str:
    rows = ["| strategy | what it does | groups it sets | reference |", "|---|---|---|---|"]
    for p in list_strategies():
        rows.append(f"| `{p.name}` | {p.summary} | {preset_diff(p.name)} | {p.reference} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
