"""Replaying a faulty step's micro-batches, and saving them so anyone can replay them again.

Used only on the fault path by :mod:`finitetune.guard.attribution`: a forward replay with a
hook on every module (the *first* module whose output is non-finite or beyond the fp16 range),
the same with autocast off (fp32), a backward replay, per-row checks, and the batch written to
``faults/step_<N>.safetensors`` (``load_fault_batch`` reads it back). Replays run under
``no_grad`` with the RNG forked, so the training random stream is untouched.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finitetune.numerics.constants import FP16_MAX
from finitetune.numerics.foreach import per_tensor_max_abs

__all__ = ["FP16_MAX", "ForwardTrace", "load_fault_batch", "max_abs", "nonfinite_input_rows",
           "replay_backward", "replay_forward", "row_of", "rows_of", "save_fault_batch"]



@dataclass
class ForwardTrace:
    """What one forward replay saw."""

    nonfinite: bool = False  # the model's logits or loss hold NaN/inf
    first_nonfinite: str | None = None  # first module (completion order) with NaN/inf output
    first_value: str | None = None  # "nan" or "inf" in that output (inf: an overflow)
    first_over_fp16: str | None = None  # first module whose finite output exceeds 65504
    compute_dtype: str = "float32"  # lowest float dtype among module outputs (autocast's)
    loss: float | None = None
    bad_rows: list[int] | None = None  # rows whose logits hold NaN/inf
    logits_finite: bool = True


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _rng_fork(device: torch.device) -> Any:
    """Replays must not move the training RNG stream (dropout of later steps)."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def _precision(device: torch.device, fp32: bool, autocast_dtype: torch.dtype | None) -> Any:
    if fp32:
        return torch.autocast(device.type, enabled=False)
    if autocast_dtype is not None:
        return torch.autocast(device.type, dtype=autocast_dtype)
    return contextlib.nullcontext()


def _forward(model: torch.nn.Module, batch: dict[str, Any], fp32: bool) -> Any:
    # accelerate wraps model.forward in autocast when the Trainer runs in bf16/fp16 and keeps
    # the unwrapped one: an fp32 replay must call that, or the inner autocast wins.
    original = getattr(model, "_original_forward", None) if fp32 else None
    return original(**batch) if original is not None else model(**batch)


def _float_tensors(out: Any) -> list[torch.Tensor]:
    items = ([out] if isinstance(out, torch.Tensor) else list(out.values())  # ModelOutput too
             if isinstance(out, Mapping) else list(out) if isinstance(out, (tuple, list)) else [])
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.numel() > 0]


def _get(out: Any, key: str, position: int | None) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    if isinstance(out, (tuple, list)) and position is not None and len(out) > position:
        return out[position]
    return out if key == "logits" and isinstance(out, torch.Tensor) else None


def replay_forward(model: torch.nn.Module, inputs: Mapping[str, Any], *, fp32: bool = False,
                   autocast_dtype: torch.dtype | None = None, trace: bool = True) -> ForwardTrace:
    """Run the model on ``inputs`` again under ``no_grad`` and report where values went bad.

    ``trace``: hook every module (removed before returning) and record, without a sync per
    module, its output's max-abs; NaN/inf max-abs means a non-finite output. ``fp32``: autocast
    off (the model's own weights keep their dtype). One host sync at the end.
    """
    device = _device(model)
    batch = _to(inputs, device)
    records: list[tuple[str, torch.Tensor, torch.dtype]] = []
    handles = []
    if trace:
        for name, module in model.named_modules():
            def hook(mod: Any, args: Any, out: Any, _name: str = name or "<model>") -> None:
                ts = _float_tensors(out)
                if ts:
                    amax = torch.stack([t.detach().abs().amax().float() for t in ts]).amax()
                    records.append((_name, amax, min((t.dtype for t in ts),
                                                     key=lambda d: torch.finfo(d).bits)))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), _rng_fork(device), _precision(device, fp32, autocast_dtype):
            out = _forward(model, batch, fp32)
    finally:
        for h in handles:
            h.remove()
    logits, loss = _get(out, "logits", 0), _get(out, "loss", None)
    tr = ForwardTrace()
    probes = [r[1] for r in records]
    rows = None
    if isinstance(logits, torch.Tensor) and logits.dim() >= 2:
        rows = (~logits.detach().isfinite()).flatten(1).any(1)
        probes.append(rows.any().float())
    if isinstance(loss, torch.Tensor):
        probes.append(loss.detach().float().reshape(()))
    values = torch.stack([p.to(device) for p in probes]).tolist() if probes else []  # HOST SYNC
    n = len(records)
    for (name, _, dtype), v in zip(records, values[:n]):
        if torch.finfo(dtype).bits < torch.finfo(torch.float32).bits:
            tr.compute_dtype = str(dtype).replace("torch.", "")
        if tr.first_nonfinite is None and not math.isfinite(v):
            tr.first_nonfinite, tr.first_value = name, "nan" if math.isnan(v) else "inf"
        if tr.first_over_fp16 is None and math.isfinite(v) and v > FP16_MAX:
            tr.first_over_fp16 = name
    rest = values[n:]
    if rows is not None:
        tr.logits_finite = rest.pop(0) == 0.0
        tr.bad_rows = rows.nonzero().flatten().tolist() if not tr.logits_finite else []
    if isinstance(loss, torch.Tensor):
        tr.loss = rest.pop(0)
    tr.nonfinite = not tr.logits_finite or (tr.loss is not None and not math.isfinite(tr.loss))
    return tr


def replay_backward(model: torch.nn.Module, inputs: Mapping[str, Any],
                    params: Sequence[torch.Tensor], *, fp32: bool = False,
                    autocast_dtype: torch.dtype | None = None) -> bool | None:
    """Forward + backward of one micro-batch; whether the gradients of ``params`` are finite.

    ``torch.autograd.grad`` leaves every ``.grad`` as found and allocates only these gradients.
    None when the model returns no differentiable loss (no ``labels`` in the batch).
    """
    device = _device(model)
    batch = _to(inputs, device)
    with _rng_fork(device):
        with torch.enable_grad(), _precision(device, fp32, autocast_dtype):
            loss = _get(_forward(model, batch, fp32), "loss", None)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    vals = [g.detach().abs().amax().float() for g in grads if g is not None]
    return bool(torch.stack(vals).isfinite().all()) if vals else None  # HOST SYNC


def max_abs(tensors: list[torch.Tensor]) -> list[float]:
    """Per-tensor max-abs as host floats (one fused pass per group, one sync; fault path)."""
    return per_tensor_max_abs(tensors).tolist() if tensors else []  # HOST SYNC


def rows_of(inputs: Mapping[str, Any]) -> int:
    t = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    return int(t.shape[0]) if t is not None else 0


def nonfinite_input_rows(inputs: Mapping[str, Any], n: int) -> list[int]:
    """Rows whose float inputs (``inputs_embeds``, pixel values, ...) hold NaN/inf. Token ids
    cannot: a bad token-id sample shows as a row whose own logits are non-finite."""
    bad = None
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() and v.shape[0] == n:
            rows = (~v.isfinite()).reshape(n, -1).any(1)
            bad = rows if bad is None else bad | rows.to(bad.device)
    return [] if bad is None else bad.nonzero().flatten().tolist()  # HOST SYNC


def row_of(inputs: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    return {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in inputs.items()}


def save_fault_batch(path: Path, batches: list[tuple[Mapping[str, Any], Any]], step: int) -> None:
    """``<micro_batch>.<key>`` tensors (1-based micro-batch, ``sample_ids`` put back), atomic."""
    from safetensors.torch import save_file

    tensors = {}
    for m, (inputs, ids) in enumerate(batches, start=1):
        items = dict(inputs)
        if ids is not None:
            items["sample_ids"] = ids
        for key, v in items.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{m}.{key}"] = v.detach().to("cpu", copy=True).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "micro_batches": str(len(batches)),
                                           "format": "finitetune-fault-batch-1"})
    os.replace(tmp, path)


def load_fault_batch(path: str | os.PathLike) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of a saved faulty step, in order, each a dict ready for
    ``model(**{k: v for k, v in mb.items() if k != "sample_ids"})``."""
    from safetensors.torch import load_file

    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        m, _, name = key.partition(".")
        out.setdefault(int(m), {})[name] = value
    return [out[m] for m in sorted(out)]
