"""The pack launcher's resolver is registered with the config package: ``hydra/launcher=pack`` composes after only
``import ltbench.conf`` (issue 16), in a fresh interpreter where no other ltbench module was imported first."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
from hydra import compose, initialize_config_module
import ltbench.conf  # noqa: F401  (the only ltbench import; a component may import the loop: CReST's stage)
assert "ltbench.launcher" in sys.modules and "ltbench.runner" not in sys.modules
with initialize_config_module("ltbench.conf", version_base="1.3"):
    cfg = compose("train", overrides=["hydra/launcher=pack"], return_hydra_config=True)
    print("n_jobs", int(cfg.hydra.launcher.n_jobs))
"""


def test_pack_composes_after_importing_only_the_config_package():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install hydra-joblib-launcher")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    n = int(r.stdout.split("n_jobs")[-1])
    assert n >= 1  # a number, not UnsupportedInterpolationType: ltbench_pack


def test_every_resolver_the_configs_name_is_registered_by_the_config_package():
    """Each ``${ltbench_...:`` interpolation in conf/ names a resolver that importing ltbench.conf registers."""
    import re
    from importlib import resources

    import ltbench.conf  # noqa: F401
    from omegaconf import OmegaConf

    names = set()
    for f in _yaml_files(resources.files("ltbench.conf")):
        names |= set(re.findall(r"\$\{(ltbench_\w+):", f.read_text()))
    assert "ltbench_pack" in names
    missing = sorted(n for n in names if not OmegaConf.has_resolver(n))
    assert not missing, missing


def _yaml_files(folder):
    for f in folder.iterdir():
        if f.is_dir():
            yield from _yaml_files(f)
        elif f.name.endswith(".yaml"):
            yield f
