"""Fault injectors and a host-sync counter, shipped so users can test their own guarded loops.

Each injector states *what* it breaks and *when*, and returns a handle with ``remove()`` (also
usable as a context manager)::

    from finitetune.testing import GradFault, count_host_syncs

    with GradFault(model, "model.layers.0.mlp.up_proj.weight", float("nan"), at={3}):
        train(...)                        # the 3rd backward pass leaves a NaN in that gradient

    with count_host_syncs() as syncs:
        guard.step()
    assert syncs.count <= 1

They work in plain loops and under ``transformers.Trainer`` alike (they hook the model, not the
loop). Nothing here is imported by finitetune itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "GradFault", "HostSyncCounter", "LossScale", "OutputFault", "StateMismatch",
    "assert_same_state",
    "count_host_syncs", "free_port", "inject_nonfinite_grad", "run_distributed",
]


def _param(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    params = dict(model.named_parameters())
    if name not in params:
        close = [n for n in params if name.split(".")[-1] in n][:5]
        raise KeyError(f"no parameter {name!r} in the model; similar names: {close}")
    return params[name]


def _write(tensor: torch.Tensor, value: float, index: int | tuple[int, ...]) -> None:
    """Set one element (flat index into the logical shape, or a full index tuple) in place."""
    if isinstance(index, int):
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), tensor.shape))
    with torch.no_grad():
        tensor[index] = value


def inject_nonfinite_grad(
    model: torch.nn.Module, param_name: str, value: float = float("nan"),
    index: int | tuple[int, ...] = 0,
) -> None:
    """Put ``value`` (NaN, +-inf or any huge number) into one element of a parameter's ``.grad``.

    Call between ``backward()`` and ``guard.step()``. ``index`` is a flat index into the
    gradient's logical shape (works for non-contiguous gradients) or a full index tuple.
    """
    grad = _param(model, param_name).grad
    if grad is None:
        raise ValueError(f"{param_name} has no gradient yet: call backward() first")
    _write(grad, value, index)


class _Handle:
    def __init__(self) -> None:
        self.calls = 0
        self._handles: list[Any] = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class GradFault(_Handle):
    """After the gradient of ``param_name`` is accumulated in backward pass number ``n`` (1-based,
    counted over every backward that reaches the parameter, i.e. micro-batches) for ``n`` in
    ``at``, write ``value`` into element ``index`` of ``.grad``. ``at=None``: every pass.

    Under gradient accumulation the value stays in the accumulated gradient for the rest of the
    window (NaN + x = NaN), exactly as a real overflow in one micro-batch would. A list of values
    (same length as ``index`` list) writes several elements.
    """

    def __init__(
        self, model: torch.nn.Module, param_name: str, value: float | list[float] = float("nan"),
        index: int | tuple[int, ...] | list = 0, at: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self.param = _param(model, param_name)
        self.at = None if at is None else set(at)
        indices = index if isinstance(index, list) else [index]
        values = value if isinstance(value, list) else [value] * len(indices)
        self.writes = list(zip(values, indices, strict=True))
        self.fired: list[int] = []
        self._handles.append(self.param.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, param: torch.Tensor) -> None:
        self.calls += 1
        if self.at is None or self.calls in self.at:
            grad = param.grad
            if grad is None:  # the hook runs after accumulation: a grad exists by then
                raise RuntimeError("GradFault: the hooked parameter has no gradient to write into")
            for value, index in self.writes:
                _write(grad, value, index)
            self.fired.append(self.calls)


class OutputFault(_Handle):
    """Make ``module``'s output (a tensor, or the first tensor of a tuple / ``.logits``) contain
    ``value`` at flat ``index`` on forward calls ``at`` (1-based, training-mode calls only).

    The fault then flows through the loss into the gradients, as an overflow in that layer
    would: the loss and the gradients upstream of the module become non-finite.
    """

    def __init__(
        self, module: torch.nn.Module, value: float = float("inf"), index: int = 0,
        at: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self.value, self.index = value, index
        self.at = None if at is None else set(at)
        self._handles.append(module.register_forward_hook(self._hook))

    def _poison(self, out: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(out.numel(), dtype=torch.bool, device=out.device)
        flat[self.index] = True
        return out.masked_fill(flat.view(out.shape), self.value)

    def _hook(self, module: torch.nn.Module, args: Any, out: Any) -> Any:
        if not module.training:
            return None
        self.calls += 1
        if self.at is not None and self.calls not in self.at:
            return None
        if isinstance(out, torch.Tensor):
            return self._poison(out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (self._poison(out[0]), *out[1:])
        if getattr(out, "logits", None) is not None:
            out["logits"] = self._poison(out.logits)
            return out
        raise TypeError(f"OutputFault cannot poison an output of type {type(out).__name__}")


class LossScale(_Handle):
    """Multiply the model's returned ``loss`` by ``factor`` on forward calls ``at`` (1-based,
    training mode): a loss spike whose gradients are ``factor`` times larger too. The model must
    compute its loss itself (``labels`` passed to ``forward``)."""

    def __init__(self, model: torch.nn.Module, factor: float, at: Iterable[int]) -> None:
        super().__init__()
        self.factor = factor
        self.at = set(at)
        self._handles.append(model.register_forward_hook(self._hook))

    def _hook(self, module: torch.nn.Module, args: Any, out: Any) -> Any:
        if not module.training:
            return None
        self.calls += 1
        if self.calls in self.at:
            if getattr(out, "loss", None) is None:
                raise ValueError("LossScale: the model output has no loss (pass labels)")
            out["loss"] = out.loss * self.factor
            return out
        return None


class HostSyncCounter(TorchDispatchMode):
    """Counts reads of tensor values on the host: ``.item()``, ``bool()``, ``float()``, ``int()``
    (all ``aten._local_scalar_dense``), ``.tolist()``, ``.numpy()`` and copies from an
    accelerator to the CPU. Each one is a device sync on an accelerator; on CPU they are what
    would be one, which is what the guard's "one sync per step" contract is about."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.where: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("aten._local_scalar_dense"):
            self._hit(name)
        elif name.startswith(("aten._to_copy", "aten.copy_")):
            src = args[1] if name.startswith("aten.copy_") else args[0]
            if name.startswith("aten._to_copy"):
                device = kwargs.get("device")
                dst_cpu = device is not None and torch.device(device).type == "cpu"
            else:
                dst_cpu = args[0].device.type == "cpu"
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_cpu:
                self._hit(name)
        return func(*args, **kwargs)

    def _hit(self, name: str) -> None:
        self.count += 1
        self.where.append(name)


class count_host_syncs:
    """Context manager counting host syncs in its block (see :class:`HostSyncCounter`)."""

    def __init__(self) -> None:
        self.mode = HostSyncCounter()
        self._saved: dict[str, Any] = {}

    @property
    def count(self) -> int:
        return self.mode.count

    @property
    def where(self) -> list[str]:
        return self.mode.where

    def __enter__(self) -> count_host_syncs:
        mode = self.mode
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t: torch.Tensor, *a: Any, _orig: Any = original, _n: str = name,
                        **k: Any) -> Any:
                mode._hit(f"Tensor.{_n}")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def assert_same_state(
    model_a: torch.nn.Module, model_b: torch.nn.Module, optimizer_a: Any = None,
    optimizer_b: Any = None, scheduler_a: Any = None, scheduler_b: Any = None,
) -> None:
    """Check bit-identity (``torch.equal``) of two training states, naming the first difference.

    Compares every parameter and buffer, every optimizer-state entry of every parameter
    (moments, ``step``, ...), the param groups' hyper-parameters (lr, ...) and the schedulers'
    ``state_dict``. This is what "a skipped step leaves no trace" means: compare a guarded run
    with a control run that simply never saw the bad batch.

    Raises:
        StateMismatch: the first difference, named (raised explicitly, so ``python -O``,
            which strips ``assert`` statements, cannot turn the check off).
    """
    sa, sb = model_a.state_dict(), model_b.state_dict()
    _require(sa.keys() == sb.keys(), "models have different parameter names")
    for name, ta in sa.items():
        tb = sb[name]
        _require(ta.dtype == tb.dtype and torch.equal(ta, tb), f"parameter/buffer {name} differs")
    if optimizer_a is not None or optimizer_b is not None:
        oa, ob = optimizer_a.state_dict(), optimizer_b.state_dict()
        _require(oa["state"].keys() == ob["state"].keys(),
                 f"optimizer state covers different parameters: {sorted(oa['state'])} vs "
                 f"{sorted(ob['state'])}")
        for idx, entries in oa["state"].items():
            other = ob["state"][idx]
            _require(entries.keys() == other.keys(), f"optimizer state {idx}: keys differ")
            for key, va in entries.items():
                vb = other[key]
                same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
                _require(same, f"optimizer state of parameter #{idx}, key {key!r} differs")
        for i, (ga, gb) in enumerate(zip(oa["param_groups"], ob["param_groups"], strict=True)):
            _require(ga == gb, f"param group {i} differs: {ga} vs {gb}")
    if scheduler_a is not None or scheduler_b is not None:
        da, db = scheduler_a.state_dict(), scheduler_b.state_dict()
        _require(da == db, f"scheduler state differs: {da} vs {db}")


class StateMismatch(AssertionError):
    """Two training states that should be bit-identical differ (see :func:`assert_same_state`).

    An ``AssertionError`` so test runners report it as a failed check, not as a crash."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise StateMismatch(message)


from finitetune.testing.distributed import free_port, run_distributed  # noqa: E402
