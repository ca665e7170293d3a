"""The guard's view of a DeepSpeed ZeRO run: gradients are this rank's partition, the optimizer is
DeepSpeed's, the model's weights are replicas only under ZeRO-1/2.

:class:`ZeroGuard` is the :class:`~finitetune.Guard` that
:mod:`finitetune.integrations.deepspeed.engine` drives from inside the ZeRO optimizer's ``step``;
:class:`ZeroGradStats` reads ZeRO's ``averaged_gradients`` instead of ``p.grad`` (the pieces of
the ranks are disjoint, so the squared norms add up across ranks in the guard's one
all-reduce). Nothing here imports DeepSpeed: it reads the attributes listed in
``finitetune.integrations.deepspeed.engine.SEAMS``, which are checked at start-up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from finitetune import distributed
from finitetune.guard.guard import Guard
from finitetune.guard.policy import Reason, StepOutcome
from finitetune.guard.rank_check import RankCheck
from finitetune.guard.snapshot import Snapshot
from finitetune.guard.stats import GRAD_FIELDS, GradStats, acc_dtype
from finitetune.settings.config import GuardConfig

__all__ = ["ZeroGradStats", "ZeroGuard"]


class ZeroGradStats(GradStats):
    """:class:`GradStats` over this rank's ZeRO gradient partitions instead of ``p.grad``.

    ZeRO keeps the reduced (averaged) gradients of the elements this rank owns in
    ``averaged_gradients`` (a list of tensors per group, ZeRO-1/2/3 alike); the ranks' pieces
    are disjoint, so the guard adds the squared norms up across ranks. The tensors change
    every step, so they are grouped by (device, dtype) on each call. Under fp16 the gradients
    are scaled by DeepSpeed's loss scale: the norms are divided by it.
    """

    def __init__(self, zero_optimizer: Any) -> None:  # no super().__init__: no fixed params
        self.zero = zero_optimizer
        self.params = []
        self.device = distributed.collective_device()
        self.dtype = acc_dtype(self.device)
        self.sharded = False
        self.groups = []
        self._grads: list[tuple[torch.device, list[torch.Tensor]]] = []
        self.found = torch.zeros((), dtype=self.dtype, device=self.device)
        """Non-finite partition norms of the last :meth:`compute` (device tensor)."""

    def partition_grads(self) -> list[tuple[Any, torch.Tensor]]:
        """(group key, gradient tensor) of this rank's partition, in DeepSpeed's order."""
        ag = self.zero.averaged_gradients
        items = ag.items() if isinstance(ag, dict) else enumerate(ag or [])
        return [(i, g) for i, gs in items if gs for g in gs if g is not None]

    def named_partition_grads(self, names: dict[Any, str]) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, this rank's piece of its gradient): ZeRO-1/2 keep the pieces aligned
        with ``params_in_partition``, ZeRO-3 with ``fp16_groups``."""
        owners = getattr(self.zero, "params_in_partition", None) or self.zero.fp16_groups
        ag = self.zero.averaged_gradients
        items = ag.items() if isinstance(ag, dict) else enumerate(ag or [])
        return [(names.get(p, "?"), g) for i, gs in items if gs
                for p, g in zip(owners[i], gs) if g is not None]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._grads = []
        grads = [g for _, g in self.partition_grads()]
        norms: list[torch.Tensor] = []
        grouped = _group_tensors_by_device_and_dtype([list(grads)])
        for (device, dtype), ([found], _) in grouped.items():
            tensors = [t for t in found if t is not None]
            wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
            norms.append(torch.stack(torch._foreach_norm(tensors, 2.0, dtype=wide))
                         .to(self.device))
            self._grads.append((device, tensors))
        if not norms:  # this rank owns no gradient element this step
            self.found = torch.zeros((), dtype=self.dtype, device=self.device)
            return (torch.zeros(len(GRAD_FIELDS), dtype=self.dtype, device=self.device),
                    torch.zeros((), device=self.device))
        vec = (norms[0] if len(norms) == 1 else torch.cat(norms)).float()
        scale = float(self.zero.loss_scale)
        if scale != 1.0:  # fp16: true norms (a device multiply, no sync)
            vec = vec / scale
        clip_norm = torch.linalg.vector_norm(vec, 2.0)
        v = vec.to(self.dtype)
        packed = torch.stack([(v * v).sum(), v.isnan().sum().to(self.dtype),
                              v.isinf().sum().to(self.dtype), clip_norm.to(self.dtype)])
        self.found = packed[1] + packed[2]
        return packed, clip_norm

    def inspect_inf(self) -> torch.Tensor:
        probe = super().inspect_inf()
        scale = float(self.zero.loss_scale)
        return probe / torch.tensor([1.0, scale * scale], dtype=probe.dtype, device=probe.device)

    def clip_(self, max_norm: float, clip_norm: torch.Tensor) -> None:
        """Nothing: DeepSpeed clips inside its step (``gradient_clipping``), after the guard
        decided to apply it, with the same global norm."""



class _LossScaleOverflow:
    """Stands in for a GradScaler so that, under DeepSpeed's fp16 dynamic loss scale, an
    overflow counts as calibration (``scaler_overflow``), not as a fault. The guard asks it only
    for this step's found-inf count, through the GradScaler method it reuses; the count is the
    non-finite partition norms :meth:`ZeroGradStats.compute` already took (no extra pass)."""

    def __init__(self, stats: ZeroGradStats) -> None:
        self.stats = stats

    def _found_inf_per_device(self, optimizer: Any) -> dict[torch.device, torch.Tensor]:
        return {self.stats.device: self.stats.found}


class ZeroGuard(Guard):
    """A :class:`Guard` whose gradients are ZeRO partitions and whose optimizer is DeepSpeed's.

    The parameters it snapshots (rollback, ZeRO-1/2) are the fp32 master partitions of the
    optimizer DeepSpeed wraps, with that optimizer's state; the replicated parameters it
    checksums across ranks are the model's (ZeRO-1/2; none under ZeRO-3).
    """

    def __init__(self, engine: Any, model: torch.nn.Module, config: GuardConfig,
                 scheduler: Any = None, *, output_dir: Any = None, on_fault: Any = None,
                 start_step: int = 0) -> None:
        self.engine = engine
        self.zero = engine.optimizer
        self.stage = int(engine.zero_optimization_stage())
        self.replicas = [p for p in model.parameters()] if self.stage < 3 else None
        fp16 = getattr(self.zero, "dynamic_loss_scale", False)
        self._zero_stats = ZeroGradStats(self.zero)
        scaler = _LossScaleOverflow(self._zero_stats) if fp16 else None
        # DeepSpeed clips (gradient_clipping); the guard knows the value for its pinned-norm
        # warning and the event's "clipped", and never clips itself (ZeroGradStats.clip_)
        super().__init__(None, self.zero, config, scheduler, scaler=scaler,
                         output_dir=output_dir, on_fault=on_fault, start_step=start_step,
                         max_grad_norm=float(engine.gradient_clipping() or 0.0))
        self._user_hook = self.on_fault
        self.on_fault = self._attribute  # every non-applied step: the hook, then the partition

    def _attribute(self, outcome: StepOutcome) -> dict[str, Any]:
        """The user's fault hook (e.g. an ``Attributor``), plus what only ZeRO's partitions can
        tell: the parameters whose gradient piece on this rank is NaN/inf (the model's own
        ``.grad`` is empty under ZeRO, so a hook reading it finds nothing). Fault path only:
        one max-abs pass and one HOST SYNC; every rank's answer reaches the event (``per_rank``)."""
        from finitetune.numerics.foreach import per_tensor_max_abs

        hook = self._user_hook
        record = hook(outcome) if hook is not None else None
        record = dict(record) if isinstance(record, dict) else {}
        if outcome.reason in (Reason.NONFINITE_GRAD, Reason.NORM_OVERFLOW):
            named = self._zero_stats.named_partition_grads(self.engine.param_names)
            bad: list[str] = []
            if named:
                vals = per_tensor_max_abs([g for _, g in named]).tolist()  # HOST SYNC
                bad = [n for (n, _), v in zip(named, vals) if not math.isfinite(v)]
            if bad or not record.get("nonfinite_params"):
                record.update(nonfinite_params=bad[:20], nonfinite_param_count=len(bad),
                              gradients_read="this rank's ZeRO gradient partition")
        return record

    def refresh_params(self) -> None:
        """The ZeRO layout instead of the detected one: gradients are disjoint partitions (the
        squares add up across ranks), the snapshot (rollback, ZeRO-1/2) holds the fp32 master
        partitions with their optimizer state, the replicated model parameters are checksummed
        across ranks (ZeRO-1/2; under ZeRO-3 nothing is replicated)."""
        if self.stage == 3:  # its torch optimizer holds the partition only inside its step
            params = list(self.zero.fp32_partitioned_groups_flat)
        else:
            params = [p for g in self.inner_optimizer.param_groups for p in g["params"]]
        self._params = params
        self.replicated_grads = False
        self._grad_replicas = 1
        self._grad_stats = self._zero_stats
        self._snapshot = (Snapshot(params, self.inner_optimizer)
                          if self.config.needs_snapshots else None)
        self._n_opt_params = self._count_opt_params()
        self.rank_check = RankCheck(self.config)
        self.rank_check.configure(False, self.replicas)
