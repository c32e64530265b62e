"""Benchmark-only hooks in the workers' processes (``bench/lisa_answer.py``, ``bench/model_clock.py``).

``sitecustomize`` writes a module that every Python process started with its folder on ``PYTHONPATH``
runs at start; it registers each hook to run right after the module it patches is first imported,
so nothing imports torch before a worker pins its GPU.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from bench import lisa_answer, model_clock

# module -> what runs once it is imported (each hook takes the module's name)
HOOKS: dict[str, list[Callable[[str], None]]] = {module: [model_clock.install] for module in model_clock.CLOCKED}
HOOKS["amodal.models.lisa"].append(lambda module: lisa_answer.install())


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``hook`` once ``module`` has been executed on its first import."""

    def __init__(self, module: str, hook: Callable[[str], None]) -> None:
        self.module, self.hook = module, hook

    def find_spec(self, name, path, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module, hook = spec.loader.exec_module, self.hook

        def exec_and_hook(module):
            exec_module(module)
            hook(module.__name__)

        spec.loader.exec_module = exec_and_hook
        return spec


def register() -> None:
    for module, targets in HOOKS.items():
        sys.meta_path.insert(0, AfterImport(module, lambda name, hooks=targets: [hook(name) for hook in hooks]))


def sitecustomize(folder: Path) -> Path:
    """Write ``folder/sitecustomize.py`` that registers the hooks; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("from bench.site_hooks import register\nregister()\n")
    return folder
