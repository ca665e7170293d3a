"""The facts the precision policy decides from: what the device can do, what the model holds.

:func:`describe_device` probes a device for bf16/fp16 support (CUDA compute capability, CPU AMX,
MPS bf16), :func:`scan_weights` measures the model's weights against fp16's range, and
:func:`overflow_family` looks the model's family up in :data:`FP16_OVERFLOW_FAMILIES`, a short
table of families with public, cited reports of fp16 overflow. Probing never crashes a run: an
unknown answer is reported as such. The rules that turn these facts into a
:class:`~finitetune.precision.policy.PrecisionPlan` live in :mod:`finitetune.precision.policy`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from finitetune.errors import ConfigError
from finitetune.numerics.constants import FP16_MAX
from finitetune.numerics.foreach import per_tensor_max_abs

__all__ = ["FP16_MAX", "FP16_OVERFLOW_FAMILIES", "NEAR_FP16_MAX", "DeviceInfo", "WeightScan",
           "cpu_features", "describe_device", "model_types", "overflow_family", "scan_weights"]

NEAR_FP16_MAX = FP16_MAX / 10
"""A weight this large leaves less than 10x headroom: one product with an activation above 10
overflows fp16. Reported, not refused."""

# model_type -> evidence. Kept small: only families with public reports of fp16 overflow
# (activations or gradients past 65504) in fine-tuning or inference, each cited. Gemma 1/2 are
# in by mechanism: the same sqrt(hidden_size) embedding scaling that breaks Gemma 3.
_T5 = ("T5's feed-forward activations pass 65504; Google trained it in bf16 "
       "(transformers#5651, #10956, #14189)")
_GEMMA = ("Gemma scales embeddings by sqrt(hidden_size) and its norm weights are large; Gemma 3 "
          "activations pass 65504 (transformers#36822, PR #37226; unsloth forces fp32)")
_QWEN = ("Qwen2/Qwen3 are trained in bf16 and fp16 fine-tuning gives NaN losses "
         "(QwenLM/Qwen3#670, #868)")
_MOE = ("MoE intermediates overflow fp16 (vllm-project/vllm#13232; unsloth forces fp32 for "
        "qwen3_moe and gpt_oss)")
FP16_OVERFLOW_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5),
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n"), _GEMMA),
    **dict.fromkeys(("qwen2", "qwen3"), _QWEN),
    **dict.fromkeys(("qwen2_moe", "qwen3_moe", "deepseek_v2", "gpt_oss"), _MOE),
}


# --------------------------------------------------------------------------- device probing


@dataclass
class DeviceInfo:
    """What a device can do with low-precision dtypes."""

    type: str
    """``cuda``, ``cpu``, ``mps`` or another torch device type."""
    name: str
    """Human name (GPU model, CPU model)."""
    detail: str
    """Compute capability, or the CPU features that matter for bf16."""
    bf16: bool
    """bf16 works at all (possibly emulated)."""
    bf16_native: bool
    """bf16 runs on dedicated hardware, i.e. is not slower than fp32."""
    fp16_training: bool
    """fp16 mixed-precision training is supported (autocast + GradScaler)."""


def cpu_features() -> dict[str, bool]:
    """bf16-relevant x86 CPU features: ``amx_bf16``, ``avx512_bf16``, ``avx512_fp16``.

    Read from ``torch.cpu.get_capabilities()`` (torch's own cpuinfo), else from
    ``/proc/cpuinfo`` flags. Only AMX makes bf16 matmuls faster than fp32: ``avx512_bf16`` alone
    has bf16 dot-product instructions, but bf16 autocast measured 2-3x *slower* than fp32 on such a
    CPU (Sapphire-Rapids-class Xeon under KVM with AMX hidden, torch 2.13).
    """
    keys = ("amx_bf16", "avx512_bf16", "avx512_fp16")
    try:
        caps = torch.cpu.get_capabilities()
        return {k: bool(caps.get(k, False)) for k in keys}
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return {k: k in flags for k in keys}


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "CPU"


def call_or_default(fn: Any, *args: Any, default: Any = None) -> Any:
    """``fn(*args)``, or ``default`` if it raises: a hardware probe answers "unknown", it never
    crashes the run or the environment report."""
    try:
        return fn(*args)
    except Exception:  # probing must never crash the run: an unknown answer is reported as such
        return default


def _mps_bf16_works() -> bool:
    """bf16 on MPS needs macOS 14+; the only reliable test is to make a bf16 tensor there."""
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
        return True
    except Exception:
        return False


def _device_type(device: str | torch.device | None) -> tuple[str, int | None]:
    if device is None:
        if torch.cuda.is_available():
            return "cuda", None
        if call_or_default(torch.backends.mps.is_available, default=False):
            return "mps", None
        return "cpu", None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use cuda, cuda:N, cpu or mps") from exc
    return dev.type, dev.index


def describe_device(device: str | torch.device | None = None) -> DeviceInfo:
    """Probe ``device`` (default: CUDA if available, else MPS, else CPU) for dtype support.

    Raises :class:`ConfigError` when a device is named that this machine does not have.
    """
    kind, index = _device_type(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda}): install a "
                              "CUDA build of torch, check CUDA_VISIBLE_DEVICES, or use cpu")
        idx = index if index is not None else call_or_default(torch.cuda.current_device, default=0)
        name = call_or_default(torch.cuda.get_device_name, idx, default=None) or "CUDA GPU"
        cap = call_or_default(torch.cuda.get_device_capability, idx, default=None)
        detail = f"compute capability {cap[0]}.{cap[1]}" if cap else "compute capability unknown"
        # including_emulation=False: the default (True) answers True on T4/V100, where bf16 is
        # emulated and slow; we want to know about bf16 *hardware*.
        native = bool(call_or_default(lambda: torch.cuda.is_bf16_supported(including_emulation=False),
                            default=False))
        return DeviceInfo("cuda", name, detail, bf16=native, bf16_native=native,
                          fp16_training=True)
    if kind == "mps":
        if not call_or_default(torch.backends.mps.is_available, default=False):
            raise ConfigError("device 'mps' asked for, but torch.backends.mps.is_available() is "
                              "False (needs Apple silicon, macOS 12.3+): use cpu")
        bf16 = _mps_bf16_works()
        return DeviceInfo("mps", "Apple MPS", "bf16 " + ("available" if bf16 else
                          "unavailable (needs macOS 14+)"), bf16=bf16, bf16_native=bf16,
                          fp16_training=True)
    if kind == "cpu":
        feats = cpu_features()
        capability = call_or_default(torch.backends.cpu.get_cpu_capability, default="unknown")
        have = [k for k, v in feats.items() if v] or ["no bf16/fp16 ISA extensions"]
        if not feats.get("amx_bf16"):
            have.append("no AMX")
        detail = f"{capability}; " + ", ".join(have)
        return DeviceInfo("cpu", _cpu_name(), detail, bf16=True,
                          bf16_native=feats.get("amx_bf16", False), fp16_training=False)
    return DeviceInfo(kind, kind, "no finitetune precision rules for this device type",
                      bf16=True, bf16_native=False, fp16_training=True)


# --------------------------------------------------------------------------- the model


@dataclass
class WeightScan:
    """Magnitudes of a model's floating-point parameters, from one pass per dtype group."""

    max_abs: float = float("nan")
    """Largest finite ``|w|`` (NaN when there is no finite parameter)."""
    over_fp16: list[str] = field(default_factory=list)
    """Parameters with finite ``|w|`` above 65504: ``inf`` once cast to fp16."""
    near_fp16: list[str] = field(default_factory=list)
    """Parameters with ``|w|`` in [6550, 65504]: less than 10x headroom in fp16."""
    nonfinite: list[str] = field(default_factory=list)
    """Parameters that already hold NaN or inf."""
    half_trainable: dict[str, int] = field(default_factory=dict)
    """dtype -> count of *trainable* parameters stored in fp16/bf16 (no fp32 master copy)."""
    lora: bool = False
    """The model has LoRA adapter parameters (``lora_`` in a parameter name)."""


def scan_weights(model: Any) -> WeightScan:
    """One pass over the parameters: per-tensor max ``|w|`` via ``torch._foreach_norm(ord=inf)``.

    Runs once at start-up, off the hot path. Parameters are grouped by (device, dtype); each group
    costs one fused kernel and one host sync (``tolist``), so the cost is O(groups) syncs, never
    one ``.item()`` per parameter. Meta, empty and non-float (quantised) tensors are skipped.
    """
    scan = WeightScan()
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]] = (
        defaultdict(list))
    for name, p in model.named_parameters():
        scan.lora = scan.lora or "lora_" in name
        if p.is_meta or not p.is_floating_point() or p.numel() == 0:
            continue
        groups[(p.device, p.dtype)].append((name, p.detach()))
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            key = str(p.dtype).replace("torch.", "")
            scan.half_trainable[key] = scan.half_trainable.get(key, 0) + 1
    best = -1.0
    for items in groups.values():
        values = per_tensor_max_abs([t for _, t in items]).tolist()  # host sync: one per group
        for (name, _), v in zip(items, values):
            if not math.isfinite(v):
                scan.nonfinite.append(name)
                continue
            best = max(best, v)
            if v > FP16_MAX:
                scan.over_fp16.append(name)
            elif v >= NEAR_FP16_MAX:
                scan.near_fp16.append(name)
    scan.max_abs = best if best >= 0 else float("nan")
    return scan


def model_types(model: Any) -> list[str]:
    """``model_type`` of the model's config and of its ``text_config`` (multimodal), if any."""
    cfg = model if hasattr(model, "model_type") and not hasattr(model, "config") else getattr(
        model, "config", None)
    types = []
    for c in (cfg, getattr(cfg, "text_config", None)):
        t = getattr(c, "model_type", None)
        if isinstance(t, str) and t:
            types.append(t)
    return types


def overflow_family(model: Any) -> tuple[str, str] | None:
    """``(model_type, evidence)`` when the model belongs to a family known to overflow fp16."""
    for t in model_types(model):
        if t in FP16_OVERFLOW_FAMILIES:
            return t, FP16_OVERFLOW_FAMILIES[t]
    return None
