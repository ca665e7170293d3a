"""The guard under DeepSpeed ZeRO-1/2/3: the decision inside the ZeRO optimizer's own step
(``engine``) over this rank's gradient partition (``zero_guard``).
"""

from __future__ import annotations

from finitetune._lazy import lazy_getattr

_EXPORTS = {
    "SEAMS": "finitetune.integrations.deepspeed.engine",
    "TESTED": "finitetune.integrations.deepspeed.engine",
    "ZeroSession": "finitetune.integrations.deepspeed.engine",
    "check": "finitetune.integrations.deepspeed.engine",
    "load_config": "finitetune.integrations.deepspeed.engine",
    "make_guard": "finitetune.integrations.deepspeed.engine",
    "ZeroGuard": "finitetune.integrations.deepspeed.zero_guard",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("finitetune.integrations.deepspeed", _EXPORTS, globals())
