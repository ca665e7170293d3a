"""Precision policy: bf16, fp16 or fp32, chosen from the hardware and the model, with reasons.

The trap this exists for: ``--fp16`` on a GPU without bf16 gives NaNs in models whose
activations pass fp16's maximum (65504), and on a CPU ``fp16=True`` is silently ignored (the
Trainer trains in fp32 and says nothing). :func:`choose_precision` decides *before* the run and
says why, so the user learns about the risk from a sentence instead of from ``grad_norm: nan``.

The rules (``requested="auto"`` unless stated):

====================================  =========  ===============================================
condition                             dtype      why
====================================  =========  ===============================================
CUDA with native bf16 (sm >= 8.0)     bf16       fp32's exponent range, no loss scaling needed
CUDA without native bf16              fp16       + GradScaler; warns (and recommends fp32) for
                                                 model families known to overflow fp16
  ... and weights beyond 65504        fp32       they would be inf in fp16
CPU with AMX bf16 units               bf16       native bf16 matmuls are faster than fp32
CPU without AMX                       fp32       bf16 is emulated there and 2-3x slower
Apple MPS                             fp32       fp16/bf16 NaNs on MPS that vanish in fp32
explicit request the device cannot    error      :class:`~finitetune.errors.ConfigError` naming
honour (fp16 on CPU, bf16 on sm < 8)             the flag that works
====================================  =========  ===============================================

Master weights and optimizer state stay fp32 in every mixed-precision plan (the Trainer's
autocast casts per op); norms compute in fp32 and finitetune's loss upcasts logits to fp32.

The facts these rules read (device probe, weight scan, fp16-overflow families with their
citations) come from :mod:`finitetune.precision.probe`; its public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from finitetune.errors import ConfigError
from finitetune.precision.probe import (  # re-exported: the public names of the policy's inputs
    FP16_MAX,
    FP16_OVERFLOW_FAMILIES,
    DeviceInfo,
    WeightScan,
    cpu_features,
    describe_device,
    model_types,
    overflow_family,
    scan_weights,
)
from finitetune.settings.config import PRECISION_ALIASES as _ALIASES

__all__ = ["FP16_MAX", "FP16_OVERFLOW_FAMILIES", "DeviceInfo", "PrecisionPlan", "WeightScan",
           "choose_precision", "cpu_features", "describe_device", "overflow_family",
           "scan_weights"]

log = logging.getLogger("finitetune.precision.policy")

_FP32_ONLY = ["all"]
_MIXED_FP32 = ["master_weights", "optimizer_state", "norms", "logits/loss", "lora_adapters"]


# --------------------------------------------------------------------------- the plan


@dataclass
class PrecisionPlan:
    """What precision a run trains in, and why. ``str(plan)`` is one line for a log."""

    requested: str
    """What was asked for: ``auto``, ``bf16``, ``fp16`` or ``fp32``."""
    dtype: str
    """Compute dtype of matmuls: ``bf16``, ``fp16`` or ``fp32``."""
    autocast: bool
    """Mixed precision by autocast (fp32 master weights, low-precision matmuls)."""
    grad_scaler: bool
    """Dynamic loss scaling (``torch.amp.GradScaler``): on with fp16 only, whose small range
    underflows small gradients to 0 without it."""
    fp32_modules: list[str]
    """What stays fp32 under this plan (``["all"]`` for fp32)."""
    device: str
    """Device type the plan is for: ``cuda``, ``cpu``, ``mps`` or another torch device type."""
    reasons: list[str]
    """Why this dtype, first reason first; ready to show users."""
    warnings: list[str] = field(default_factory=list)
    """Risks the user should know before the run (overflow-prone family, slow emulation, ...)."""
    model_type: str | None = None
    """``model.config.model_type`` when a model was given."""
    max_abs_weight: float | None = None
    """Largest finite ``|w|`` of the model's floating-point parameters (NaN if none finite)."""

    def training_arguments(self) -> dict[str, bool]:
        """The ``TrainingArguments`` keywords that apply this plan (``bf16``/``fp16``)."""
        return {"bf16": self.dtype == "bf16", "fp16": self.dtype == "fp16"}

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype as a ``torch.dtype`` (for autocast in a plain loop)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, including the ``TrainingArguments`` keywords."""
        out = dataclasses.asdict(self)
        out["training_arguments"] = self.training_arguments()
        return out

    def __str__(self) -> str:
        return f"{self.dtype} ({self.reasons[0]})" if self.reasons else self.dtype


# --------------------------------------------------------------------------- the rules


def choose_precision(
    model: Any = None, device: str | torch.device | None = None, requested: str = "auto",
) -> PrecisionPlan:
    """Choose bf16, fp16 or fp32 for training ``model`` on ``device``, and say why.

    Args:
        model: the model to train (``nn.Module`` with ``.config``, a PEFT model, or just a
            transformers config). Used for its ``model_type`` (families known to overflow fp16)
            and its weights (magnitudes at or near fp16's max, NaN/inf already present, trainable
            parameters stored in half precision). ``None``: hardware rules only.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"mps"`` or a ``torch.device``; default
            CUDA if available, else MPS, else CPU.
        requested: ``auto`` (the rules) or ``bf16`` / ``fp16`` / ``fp32`` (checked against the
            device; aliases ``bfloat16``, ``float16``, ``float32`` are accepted).

    Raises:
        ConfigError: an explicit request the device cannot honour (fp16 on a CPU, bf16 on a GPU
            older than Ampere, fp16 with weights beyond 65504), or an unknown request/device.
            The message names the setting that works.
    """
    req = _ALIASES.get(str(requested).strip().lower())
    if req is None:
        raise ConfigError(f"unknown precision {requested!r}: choose auto, bf16, fp16 or fp32")
    info = describe_device(device)
    family = overflow_family(model) if model is not None else None
    types = model_types(model) if model is not None else []
    scan = scan_weights(model) if hasattr(model, "named_parameters") else None

    if info.type == "cuda":
        dtype, reasons, warns = _cuda_rule(req, info, scan)
    elif info.type == "cpu":
        dtype, reasons, warns = _cpu_rule(req, info)
    elif info.type == "mps":
        dtype, reasons, warns = _mps_rule(req, info)
    else:
        dtype = "fp32" if req == "auto" else req
        reasons = [f"device type {info.type}: finitetune has no precision rules for it; "
                   + ("fp32 is the safe default" if req == "auto" else f"requested {req}")]
        warns = [] if dtype == "fp32" else [f"{req} on {info.type} is not checked by finitetune"]

    if dtype == "fp16" and family is not None:
        warns.append(_family_warning(family, info))
    if scan is not None:
        _weight_notes(scan, dtype, reasons, warns)

    mixed = dtype != "fp32"
    fp32_modules = list(_MIXED_FP32) if mixed else list(_FP32_ONLY)
    if mixed and scan is not None and not scan.lora:
        fp32_modules.remove("lora_adapters")
    plan = PrecisionPlan(
        requested=req, dtype=dtype, autocast=mixed, grad_scaler=dtype == "fp16",
        fp32_modules=fp32_modules, device=info.type, reasons=reasons, warnings=warns,
        model_type=types[0] if types else None,
        max_abs_weight=None if scan is None else scan.max_abs,
    )
    for w in plan.warnings:
        log.warning("finitetune: precision warning: %s", w)
    return plan


Rule = tuple[str, list[str], list[str]]


def _names(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _family_warning(family: tuple[str, str], info: DeviceInfo) -> str:
    model_type, evidence = family
    better = ("use --precision bf16 (this GPU has it)" if info.bf16_native
              else "train with --precision fp32, or on a GPU with bf16 (Ampere or newer)")
    return (f"model_type {model_type!r} is known to overflow fp16: {evidence}. If the guard "
            f"reports non-finite steps or the loss turns NaN, {better}")


def _cuda_rule(req: str, info: DeviceInfo, scan: WeightScan | None) -> Rule:
    gpu = f"{info.name} ({info.detail})"
    too_big = scan is not None and bool(scan.over_fp16)
    if req == "fp32":
        return "fp32", ["requested fp32: full precision, no overflow risk, slowest"], []
    if req == "bf16" or (req == "auto" and info.bf16_native):
        if not info.bf16_native:
            raise ConfigError(
                f"bf16 requested, but {gpu} has no bf16 hardware (it needs compute capability "
                "8.0+: A100, H100, L4, RTX 30xx/40xx; older GPUs emulate it slowly). Use "
                "--precision fp16 (loss-scaled) or --precision fp32.")
        why = "requested bf16" if req == "bf16" else f"{gpu} computes bf16 natively"
        return "bf16", [f"{why}: bf16 autocast with fp32 master weights; bf16 has fp32's "
                        "exponent range, so no loss scaling is needed"], []
    if req == "fp16" and scan is not None and too_big:
        raise ConfigError(
            f"fp16 requested, but weights reach |w| = {scan.max_abs:.4g} > 65504 (fp16's max) "
            f"in {_names(scan.over_fp16)}: they become inf in fp16. Use --precision "
            + ("bf16" if info.bf16_native else "fp32") + ".")
    if req == "auto" and scan is not None and too_big:
        return "fp32", [f"{gpu} has no bf16 hardware and weights reach |w| = "
                        f"{scan.max_abs:.4g} > 65504, which is inf in fp16: fp32"], []
    warns: list[str] = []
    if req == "fp16":
        reasons = ["requested fp16: fp16 autocast with dynamic loss scaling (GradScaler), fp32 "
                   "master weights; fp16's range ends at 65504"]
        if info.bf16_native:
            warns.append(f"{gpu} supports bf16, which has fp32's range and needs no loss "
                         "scaling: --precision bf16 (or auto) is safer than fp16")
    else:
        reasons = [f"{gpu} has no bf16 hardware (needs compute capability 8.0+): fp16 autocast "
                   "with dynamic loss scaling (GradScaler), fp32 master weights; fp16's range "
                   "ends at 65504"]
    return "fp16", reasons, warns


def _cpu_rule(req: str, info: DeviceInfo) -> Rule:
    if req == "fp16":
        raise ConfigError(
            "fp16 needs a CUDA GPU; use bf16 or fp32 on CPU (--precision bf16 or --precision "
            "fp32). On a CPU the Trainer would silently ignore fp16 and train in fp32.")
    if req == "fp32":
        return "fp32", ["requested fp32: full precision"], []
    if req == "auto" and not info.bf16_native:
        return "fp32", [f"CPU without native bf16 ({info.detail}): bf16 autocast is "
                        "emulated and slower; fp32"], []
    if info.bf16_native:
        why = "requested bf16" if req == "bf16" else "CPU has AMX bf16 units"
        return "bf16", [f"{why}: bf16 autocast on CPU with fp32 master weights ({info.detail})"], []
    return "bf16", ["requested bf16: bf16 autocast on CPU with fp32 master weights"], [
        f"bf16 on this CPU is emulated ({info.detail}): expect steps 2-3x slower than "
        "fp32. Use --precision fp32 (or auto) for speed."]


def _mps_rule(req: str, info: DeviceInfo) -> Rule:
    mps_nan = ("fp16/bf16 on MPS often gives NaNs that vanish on CPU or in fp32 (kernel "
               "precision, not your data)")
    if req in ("auto", "fp32"):
        why = "requested fp32" if req == "fp32" else "Apple MPS"
        return "fp32", [f"{why}: {mps_nan}; fp32"], []
    if req == "bf16" and not info.bf16:
        raise ConfigError("bf16 requested, but this MPS device cannot make bf16 tensors (needs "
                          "macOS 14+ and torch >= 2.6): use --precision fp32.")
    return req, [f"requested {req}: {req} autocast on MPS"
                 + (" with dynamic loss scaling (GradScaler)" if req == "fp16" else "")], [
        f"{mps_nan}: if the guard reports non-finite steps, use --precision fp32"]


def _weight_notes(scan: WeightScan, dtype: str, reasons: list[str], warns: list[str]) -> None:
    if scan.nonfinite:
        warns.append(f"weights already hold NaN/inf before training in "
                     f"{_names(scan.nonfinite)}: every step will be non-finite; reload a clean "
                     "checkpoint")
    if scan.over_fp16 or scan.near_fp16:
        worst = scan.over_fp16 or scan.near_fp16
        size = "exceed" if scan.over_fp16 else "are within 10x of"
        note = (f"weights {size} fp16's max 65504 (largest |w| = {scan.max_abs:.4g}, in "
                f"{_names(worst)})")
        if dtype == "fp16":
            warns.append(f"{note}: activations will overflow fp16; prefer bf16 or fp32")
        else:
            reasons.append(f"{note}: fine in {dtype}, would overflow in fp16")
    for half, count in scan.half_trainable.items():
        warns.append(f"{count} trainable parameters are stored in {half}: there is no fp32 "
                     "master copy, so small updates are rounded away whatever the plan says; "
                     "load the model in float32 (dtype=torch.float32) and let autocast cast")
