"""The precision policy: bf16, fp16 or fp32 chosen from the hardware and the model, with reasons.

``policy`` decides (``choose_precision`` -> ``PrecisionPlan``); ``probe`` reads the facts it
decides from (device capabilities, the weight scan).
"""

from __future__ import annotations

from finitetune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "finitetune.precision.policy": "PrecisionPlan choose_precision",
    "finitetune.precision.probe":
        "DeviceInfo WeightScan cpu_features describe_device overflow_family scan_weights "
        "FP16_OVERFLOW_FAMILIES",
}, globals())
