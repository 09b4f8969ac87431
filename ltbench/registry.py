"""Registries: a short, stable name -> (builder, config schema), one registry per family of components.

A component registers itself where it is defined::

    @dataclass
    class FocalConfig(LossConfig):
        gamma: float = 1.0

    @LOSSES.register("focal", FocalConfig)
    class Focal(LTLoss): ...

and ships one YAML, ``conf/loss/focal.yaml``, whose defaults list starts with ``/schema/loss/focal@_here_``: Hydra then
types the group option with its own schema, so a misspelt key or a wrong type fails when the config is composed.
The schemas live in a hidden ``schema/<family>`` config group, so they never show up as options of the real groups.

Saved configs name components by these strings, so moving code never breaks an old run's config.yaml.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ltbench.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    builder: T
    schema: type | None
    summary: str


class Registry(Generic[T]):
    """Name -> builder (a class or a function) and its config schema, for one family (``loss``, ``sampler``...)."""

    def __init__(self, family: str, base: type | None = None) -> None:
        self.family, self.base = family, base
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, schema: type | None = None) -> Callable[[T], T]:
        if schema is not None and self.base is not None and not issubclass(schema, self.base):
            raise TypeError(f"{self.family} {name!r}: schema {schema.__name__} must subclass {self.base.__name__}")

        def deco(obj: T) -> T:
            doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._entries[name] = Entry(name, obj, schema, doc[0] if doc else "")
            if schema is not None:
                from hydra.core.config_store import ConfigStore

                ConfigStore.instance().store(group=f"schema/{self.family}", name=name, node=schema)
            return obj

        return deco

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.family} {name!r}; choose one of {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def schema(self, name: str) -> type | None:
        return self.get(name).schema

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the builder registered under ``cfg.name`` with ``cfg`` and the rest of the arguments."""
        builder: Callable[..., Any] = self.get(cfg.name).builder  # type: ignore[assignment]
        return builder(cfg, *args, **kwargs)


# Every module that registers components; imported once by load_components() so the registries and the schema
# group are complete before a config is composed. A new component file inside these packages is found by itself.
_COMPONENT_PACKAGES = ("ltbench.tasks", "ltbench.losses", "ltbench.models", "ltbench.data", "ltbench.methods")
_COMPONENT_MODULES = (
    "ltbench.samplers",
    "ltbench.reweight",
    "ltbench.synth",
    "ltbench.classifier",
    "ltbench.decoupled",
    "ltbench.loggers",
)
_loaded = {"done": False}


def _import_package(name: str) -> None:
    pkg = importlib.import_module(name)
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{name}."):
        importlib.import_module(info.name)


def load_components() -> None:
    """Import every built-in component module and the modules named in ``$LTBENCH_PLUGINS`` (comma-separated).

    Plugins register their own components the same way; their YAML files join through Hydra's search path
    (``ltbench train --config-dir my/conf ...`` or ``hydra.searchpath=[pkg://my_pkg.conf]``).
    """
    if _loaded["done"]:
        return
    _loaded["done"] = True
    for name in _COMPONENT_PACKAGES:
        _import_package(name)
    for name in _COMPONENT_MODULES:
        importlib.import_module(name)
    for name in filter(None, (p.strip() for p in os.environ.get("LTBENCH_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"LTBENCH_PLUGINS names {name!r}, which cannot be imported: {e}") from e
