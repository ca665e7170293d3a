"""Every setting of a run: the config dataclasses, their closed choices, and the rules that
check each value where it enters (flag, YAML file or Python), naming where it came from.
"""

from __future__ import annotations

from finitetune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "finitetune.settings.config": "DataConfig GuardConfig TrainConfig",
}, globals())
