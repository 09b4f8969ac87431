"""ltbench's Hydra configs, shipped as the package ``ltbench.conf``.

Importing this package (Hydra does, to read the configs) registers every ltbench component and its config schema,
so the configs compose with their schemas from the CLI, the compose API and tests alike.
"""

from ltbench.registry import load_components

load_components()
import ltbench.identity  # noqa: E402,F401  (resolvers: run-directory names)
import ltbench.presets  # noqa: E402,F401  (resolver: the --help text)
