"""Keep the README true: its strategy tables are the ones generated from conf/strategy."""

import importlib.util

from conftest import REPO


def test_readme_strategy_table_matches_presets():
    spec = importlib.util.spec_from_file_location("strategies_table", REPO / "scripts" / "strategies_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (REPO / "README.md").read_text()
    for task in mod.TASKS:
        assert mod.table(task) in readme, f"run scripts/strategies_table.py {task} and update the README"
    assert mod.methods_table() in readme, "run scripts/strategies_table.py methods and update the README"


def test_readme_mentions_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text


def test_pyproject_lists_every_package_and_config_group():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    code = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ltbench").rglob("__init__.py")}
    conf = REPO / "conf"
    groups = {  # every folder of conf/, nested ones (hydra/launcher) too
        ".".join(("ltbench.conf", *d.relative_to(conf).parts))
        for d in conf.rglob("*")
        if d.is_dir() and "__pycache__" not in d.parts
    }
    assert listed == code | groups | {"ltbench.conf"}, "update [tool.setuptools] packages in pyproject.toml"


def test_readme_adding_a_method_example_works(tmp_path):
    """The README's new-loss example, taken from the README itself: it registers, composes and computes a loss."""
    import re

    import torch
    from hydra import compose, initialize_config_module

    from ltbench.config import to_schema
    from ltbench.losses import build_loss

    text = (REPO / "README.md").read_text().split("## Adding a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    yaml = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "squared_hinge.yaml").write_text(yaml)
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = to_schema(compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "loss=squared_hinge"]))
    loss = build_loss(cfg.loss, [50, 10, 5])
    value = loss(torch.randn(8, 3), torch.randint(0, 3, (8,)), torch.tensor([0.2, 1.0, 2.0]))
    value.backward()
    assert value.item() > 0 and loss.scale.grad is not None


def test_readme_configuration_table_lists_every_option_of_every_group():
    """Each row of the README's group table names every option of its group (``conf/<group>/``), and no other."""
    import re

    from ltbench.presets import group_options

    readme = (REPO / "README.md").read_text().split("## Configuration", 1)[1].split("Top-level keys", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w/]+)` \| (.*?) \|", readme, re.M)}
    groups = {g: o for g, o in group_options().items() if o and g != "strategy"}  # strategies: their own tables
    groups |= {f"hydra/{g}": group_options_of(f"hydra/{g}") for g in ("launcher", "sweeper")}
    for g, options in groups.items():
        named = set(re.findall(r"`(\w+)`", rows.get(g, "")))
        missing, extra = set(options) - named, named - set(options)
        assert not missing and not extra, f"README group table, {g}: missing {missing}, extra {extra}"


def group_options_of(path: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / path).glob("*.yaml"))
