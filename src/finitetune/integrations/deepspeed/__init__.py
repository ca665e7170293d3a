"""The guard under DeepSpeed ZeRO-1/2/3: the decision inside the ZeRO optimizer's own step
(``engine``) over this rank's gradient partition (``zero_guard``).
"""

from __future__ import annotations

from finitetune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "finitetune.integrations.deepspeed.engine":
        "SEAMS TESTED ZeroSession check load_config make_guard",
    "finitetune.integrations.deepspeed.zero_guard": "ZeroGuard",
}, globals())
