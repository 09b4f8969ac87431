"""The strategy presets shipped in conf/strategy, with the summary and reference from their header comments."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass
class Preset:
    name: str
    summary: str
    reference: str


def list_strategies() -> list[Preset]:
    out = []
    folder = resources.files("ltbench.conf") / "strategy"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        fields = {"summary": "", "reference": ""}
        for line in entry.read_text().splitlines():
            for key in fields:
                if line.startswith(f"# {key}:"):
                    fields[key] = line.split(":", 1)[1].strip()
        out.append(Preset(entry.name[: -len(".yaml")], fields["summary"], fields["reference"]))
    return out
