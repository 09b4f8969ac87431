"""Keep the README true: its strategy table is the one generated from conf/strategy."""

import importlib.util

from conftest import REPO


def test_readme_strategy_table_matches_presets():
    spec = importlib.util.spec_from_file_location("strategies_table", REPO / "scripts" / "strategies_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.table() in (REPO / "README.md").read_text(), "run scripts/strategies_table.py and update the README"


def test_readme_mentions_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
