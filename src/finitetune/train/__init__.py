"""The main job, ``finitetune train``: data -> model -> Trainer -> evaluation -> run directory.

``finitetune.train.train(model="tiny", max_steps=20)`` runs it from Python.
"""

from __future__ import annotations

from finitetune._lazy import lazy_getattr

_EXPORTS = {
    "train": "finitetune.train.api",
    "RunResult": "finitetune.train.recipe",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("finitetune.train", _EXPORTS, globals())
