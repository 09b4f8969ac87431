"""ltbench's Hydra configs, shipped as the package ``ltbench.conf``.

Importing this package (Hydra does, to read the configs) registers every ltbench component and its config schema,
so the configs compose with their schemas from the CLI, the compose API and tests alike; and it registers every
OmegaConf resolver the configs use (``ltbench_pack`` of hydra/launcher=pack, the run-directory names, the --help
text), so no config needs another ltbench module imported first.
"""

from ltbench.registry import load_components

load_components()
import ltbench.identity  # noqa: E402  (resolvers: run-directory names)
import ltbench.launcher  # noqa: E402  (resolver: ltbench_pack, hydra/launcher=pack's n_jobs)
import ltbench.presets  # noqa: E402,F401  (resolver: the --help text)
