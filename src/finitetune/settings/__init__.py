"""Every setting of a run: the config dataclasses, their closed choices, and the rules that
check each value where it enters (flag, YAML file or Python), naming where it came from.
"""

from __future__ import annotations

from finitetune._lazy import lazy_getattr

_EXPORTS = {
    "DataConfig": "finitetune.settings.config",
    "GuardConfig": "finitetune.settings.config",
    "TrainConfig": "finitetune.settings.config",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("finitetune.settings", _EXPORTS, globals())
