"""The main job, ``finitetune train``: data -> model -> Trainer -> evaluation -> run directory.

``finitetune.train.train(model="tiny", max_steps=20)`` runs it from Python.
"""

from __future__ import annotations

from finitetune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "finitetune.train.api": "train",
    "finitetune.train.recipe": "RunResult",
}, globals())
