"""Makes `lm_eval run --model pretrain` work with lm-eval releases that do not read plugins.

pretrain declares its backend the way lm-eval's plugin mechanism (merged upstream after 0.4.13)
discovers backends: an entry point `pretrain = pretrain.eval.backend:PretrainLM` in the group
`lm_eval.models`. Released lm-eval (<= 0.4.13) does not read that group, so every install (a
wheel, or `pip install -e .`: setup.py puts it at the root of both) also puts
`pretrain-lm-eval.pth` in site-packages, which imports this module at interpreter start. `install()`
only puts a finder on `sys.meta_path` (nothing is imported): when `lm_eval.models` is first
imported, the entry points of that group not yet in lm-eval's model registry are registered,
lazily (the backend and torch load only if the model is used).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

GROUP = "lm_eval.models"
TARGET = "lm_eval.models"


def register_entry_points() -> None:
    """Register every `lm_eval.models` entry point that lm-eval's model registry lacks."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import model_registry

    for entry in entry_points(group=GROUP):
        if entry.name not in model_registry:
            model_registry.register(entry.name, target=entry)


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register_entry_points()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once: the real finder answers, its loader is wrapped
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Register the entry points when lm-eval's model registry is built (module docstring)."""
    if TARGET in sys.modules:
        register_entry_points()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
