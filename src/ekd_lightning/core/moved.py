"""Old module paths of modules that moved into the layer packages (issue 25).

Checkpoints and configs written before the move name their classes by ``_target_`` paths such as
``ekd_lightning.losses.ForceLoss``, and users' scripts import ``ekd_lightning.evaluate`` or run
``python -m ekd_lightning.md``. :func:`install` puts a finder on :data:`sys.meta_path` that
answers an old path with the module at its new place (the same module object, so patches and
``isinstance`` checks agree), imported only when the old name is first asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED: dict[str, str] = {
    "ekd_lightning.errors": "ekd_lightning.core.errors",
    "ekd_lightning.units": "ekd_lightning.core.units",
    "ekd_lightning.instantiate": "ekd_lightning.core.instantiate",
    "ekd_lightning.labels": "ekd_lightning.data.labels",
    "ekd_lightning.losses": "ekd_lightning.models.losses",
    "ekd_lightning.module": "ekd_lightning.task.module",
    "ekd_lightning.checkpoint": "ekd_lightning.task.checkpoint",
    "ekd_lightning.calculator": "ekd_lightning.inference.calculator",
    "ekd_lightning.export": "ekd_lightning.inference.export",
    "ekd_lightning.predict": "ekd_lightning.inference.predict",
    "ekd_lightning.distill.teachers": "ekd_lightning.inference.teachers",
    "ekd_lightning.evaluate": "ekd_lightning.analysis.evaluate",
    "ekd_lightning.plots": "ekd_lightning.analysis.plots",
    "ekd_lightning.md": "ekd_lightning.analysis.md",
    "ekd_lightning.batched_md": "ekd_lightning.analysis.batched_md",
    "ekd_lightning.survival": "ekd_lightning.analysis.survival",
    "ekd_lightning.training": "ekd_lightning.train.training",
    "ekd_lightning.callbacks": "ekd_lightning.train.callbacks",
    "ekd_lightning.compose": "ekd_lightning.workflow.compose",
    "ekd_lightning.pipeline": "ekd_lightning.workflow.pipeline",
    "ekd_lightning.progress": "ekd_lightning.workflow.progress",
}
"""``{old module path: new module path}``."""


class MovedModuleLoader(importlib.abc.Loader):
    """Loads an old module path as the module at its new path."""

    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.own_spec  # importlib gave it the old path's spec: give its own back

    def get_code(self, fullname: str):
        """Code that runs the new module as ``__main__``, for ``python -m <old path>`` (its own
        code would resolve its relative imports against the old path's package)."""
        source = f"import runpy\nrunpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{fullname}: moved to {self.new}>", "exec")


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED`."""

    def find_spec(self, fullname: str, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, MovedModuleLoader(new))


def install() -> None:
    """Put one :class:`MovedModuleFinder` on :data:`sys.meta_path` (idempotent)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def old_path(dotted: str) -> str:
    """``dotted`` (a module or ``module.Name``) as it was named before the move:
    ``ekd_lightning.models.losses.ForceLoss`` -> ``ekd_lightning.losses.ForceLoss``; other paths
    unchanged."""
    for old, new in MOVED.items():
        if dotted == new or dotted.startswith(new + "."):
            return old + dotted[len(new):]
    return dotted


def with_old_targets(tree):
    """``tree`` (JSON data) with every ``_target_`` value named by :func:`old_path`: run hashes
    (:func:`~ekd_lightning.train.training.config_sha256`) name run folders, and a module move is
    no change of what a run computes, so they hash the names a config had before the move."""
    if isinstance(tree, dict):
        return {k: old_path(v) if k == "_target_" and isinstance(v, str) else with_old_targets(v)
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [with_old_targets(v) for v in tree]
    return tree
