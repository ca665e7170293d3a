"""The module paths of the previous release, kept importable for one release.

The package was reorganised by concept (``loss/``, ``settings/``, ``rundir/``, ...). A program
written against the old layout (``from finitetune.config import GuardConfig``) keeps working:
importing an old path gives the module at its new home (the same module object, so
``isinstance`` checks and monkeypatches agree) and a ``DeprecationWarning`` naming the new
path. Installed by ``finitetune/__init__.py``; the table is the whole mechanism.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "finitetune.chunked_cross_entropy": "finitetune.loss.chunked_cross_entropy",
    "finitetune.loss_hidden": "finitetune.loss.hidden",
    "finitetune.chunked_head": "finitetune.loss.chunked_head",
    "finitetune.config": "finitetune.settings.config",
    "finitetune.choices": "finitetune.settings.choices",
    "finitetune.validation": "finitetune.settings.validation",
    "finitetune.precision_probe": "finitetune.precision.probe",
    "finitetune.foreach": "finitetune.numerics.foreach",
    "finitetune.robust_stats": "finitetune.numerics.robust_stats",
    "finitetune.run_files": "finitetune.rundir.files",
    "finitetune.jsonio": "finitetune.rundir.jsonio",
    "finitetune.output_paths": "finitetune.rundir.paths",
    "finitetune.checkpoints": "finitetune.rundir.checkpoints",
    "finitetune.resume": "finitetune.rundir.resume",
    "finitetune.run_writer": "finitetune.train.writer",
    "finitetune.recipe": "finitetune.train.recipe",
    "finitetune.evaluation": "finitetune.train.evaluation",
    "finitetune.data.demo": "finitetune.builtin.tasks",
    "finitetune.integrations.guarded": "finitetune.integrations.hf.callback",
    "finitetune.integrations.trainer_seams": "finitetune.integrations.hf.seams",
    "finitetune.integrations.trainer_session": "finitetune.integrations.hf.session",
    "finitetune.integrations.checkpoint_callback": "finitetune.integrations.hf.checkpoint_callback",
    "finitetune.integrations.metrics": "finitetune.integrations.hf.metrics",
    "finitetune.integrations.trainer": "finitetune.integrations.hf.trainer",
    "finitetune.integrations.lm_head": "finitetune.integrations.hf.lm_head",
    "finitetune.integrations.hidden_loss": "finitetune.integrations.hf.hidden_loss",
    "finitetune.integrations.deepspeed_guard": "finitetune.integrations.deepspeed.zero_guard",
    "finitetune.integrations.autoguard": "finitetune.integrations.launch.autoguard",
    "finitetune.integrations.faults": "finitetune.integrations.launch.faults",
    "finitetune.integrations.run_callbacks": "finitetune.integrations.launch.callbacks",
    "finitetune.integrations.run_manifest": "finitetune.integrations.launch.manifest",
    "finitetune.integrations.kill_points": "finitetune.testing.kill_points",
}
"""Old dotted module path -> new one."""


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; the old path goes away in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """The module is already executed at its new home."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent: re-imports do not stack it)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
