"""``train()``: the main job from Python, with the settings ``finitetune train`` takes.

The same resolution as the command line (preset < ``config=`` file < keyword settings), the
same checks, the same run directory; it returns the :class:`~finitetune.train.recipe.RunResult`.
"""

from __future__ import annotations

from typing import Any

from finitetune.settings.resolve import flatten, resolve_run_config
from finitetune.train.recipe import RunResult, run_training

__all__ = ["train"]


def train(**settings: Any) -> RunResult:
    """Python entry point: ``finitetune.train.train(model="tiny", max_steps=20)``.

    Takes the same settings as the YAML file (nested ``data={...}``/``guard={...}`` or dotted
    keys such as ``**{"data.max_length": 64}``) and returns the :class:`RunResult`.
    """
    config_file = settings.pop("config", None)
    flat = flatten(settings)
    return run_training(resolve_run_config(config_file, flat,
                                       {k: f"train({k}=...)" for k in flat}))
