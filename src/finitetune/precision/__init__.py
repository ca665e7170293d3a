"""The precision policy: bf16, fp16 or fp32 chosen from the hardware and the model, with reasons.

``policy`` decides (``choose_precision`` -> ``PrecisionPlan``); ``probe`` reads the facts it
decides from (device capabilities, the weight scan).
"""

from __future__ import annotations

from finitetune._lazy import lazy_getattr

_EXPORTS = {
    "PrecisionPlan": "finitetune.precision.policy",
    "choose_precision": "finitetune.precision.policy",
    "DeviceInfo": "finitetune.precision.probe",
    "WeightScan": "finitetune.precision.probe",
    "cpu_features": "finitetune.precision.probe",
    "describe_device": "finitetune.precision.probe",
    "overflow_family": "finitetune.precision.probe",
    "scan_weights": "finitetune.precision.probe",
    "FP16_OVERFLOW_FAMILIES": "finitetune.precision.probe",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("finitetune.precision", _EXPORTS, globals())
