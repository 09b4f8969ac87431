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


def test_pyproject_lists_every_package_and_config_group():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    code = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ltbench").rglob("__init__.py")}
    groups = {f"ltbench.conf.{d.name}" for d in (REPO / "conf").iterdir() if d.is_dir() and d.name != "__pycache__"}
    assert listed == code | groups | {"ltbench.conf"}, "update [tool.setuptools] packages in pyproject.toml"
