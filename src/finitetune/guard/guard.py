"""``Guard``: decide, after the backward passes of an optimizer step, whether to take it.

Plain loop (as short as GradScaler's)::

    guard = Guard(model, optimizer, GuardConfig(max_grad_norm=1.0), scheduler=scheduler)
    for batch in loader:
        out = model(**batch)
        guard.observe_loss(out.loss, num_tokens)   # optional; no host sync
        out.loss.backward()
        guard.step()           # norm + flags, ONE host sync, decide, clip, step or skip
        optimizer.zero_grad()

Order inside ``step``: one fused pass over the gradients (pre-clip norm and
finite flags) plus the loss sums, packed in one small tensor (layout:
:mod:`~finitetune.guard.step_vector`) -> (all-reduce when distributed) -> one host sync -> pure
decision (:func:`~finitetune.guard.policy.decide`) -> clip with the norm already computed, never
before deciding -> ``optimizer.step()`` or nothing at all -> scheduler (not advanced on a skip
by default). A skip leaves parameters and every optimizer-state entry bit-identical: zeroing
the gradients or multiplying the update by 0 is *not* a skip (Adam moves on its momentum,
weight decay still applies, and 0 x NaN = NaN poisons the moments).

Distributed (DDP, FSDP2 ``fully_shard``): call ``step`` / ``decide_and_prepare`` on every rank.
The packed tensor has the same length on every rank, is reduced with one SUM all-reduce, and
only reduced numbers feed the decision, so every rank takes the same one; rank 0 writes the
event (see :mod:`finitetune.guard.distributed`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import torch

from finitetune import distributed
from finitetune.errors import ConfigError, NonFiniteHalt
from finitetune.guard import events, step_vector
from finitetune.guard.clipping import (
    AdaptiveClip,
    PerTensorClip,
    clip_gradients,
    cut_applied,
    reset_moments,
)
from finitetune.guard.counters import REASON_COUNTER, log_view, new_counters
from finitetune.guard.distributed import grad_replicas
from finitetune.guard.hooks import FaultHook
from finitetune.guard.policy import (
    FAULT_REASONS,
    Action,
    PolicyContext,
    Signals,
    StepOutcome,
    StepStats,
)
from finitetune.guard.rank_check import RankCheck
from finitetune.guard.signals import SignalTracker
from finitetune.guard.snapshot import Snapshot, backoff_lr, unwrap_optimizer
from finitetune.guard.stats import GradStats, LossAccumulator
from finitetune.settings.config import GuardConfig

__all__ = ["Guard"]


class Guard:
    """Numerically safe optimizer steps: skip, roll back, lower the LR or halt, never step on NaN.

    Args:
        model: the module being trained; its ``requires_grad`` parameters (in module order, as
            ``clip_grad_norm_(model.parameters())`` sees them) are checked and clipped. ``None``:
            use the optimizer's parameters.
        optimizer: the optimizer ``step`` calls (may be a wrapper such as accelerate's).
        config: :class:`~finitetune.GuardConfig`; ``max_grad_norm`` there enables clipping.
        scheduler: stepped after an applied step (and after a skip only with
            ``scheduler_on_skip``); its base LRs follow LR back-offs.
        scaler: an fp16 ``torch.amp.GradScaler``: ``step`` unscales, reuses its inf check
            (calibration skips are counted apart from faults) and calls ``scaler.update()``.
        output_dir: where ``events.jsonl`` is appended; ``None`` writes no file (warnings only).
        on_fault: called with the :class:`StepOutcome` of every step that is not applied,
            before a rollback changes the parameters; a returned dict is merged into the event.
            A :class:`~finitetune.guard.hooks.FaultHook` (the attribution seam) is bound first.
        max_grad_norm: the clip value; ``None`` takes ``config.max_grad_norm`` (``0``: no
            clipping). The Trainer adapter passes the Trainer's ``args.max_grad_norm`` here.
        start_step: steps already taken (a resumed run): event step numbers continue from it.
    """

    def __init__(self, model: torch.nn.Module | None, optimizer: Any,
                 config: GuardConfig | None = None, scheduler: Any = None, *, scaler: Any = None,
                 output_dir: str | os.PathLike | None = None,
                 on_fault: FaultHook | Callable[[StepOutcome], dict | None] | None = None,
                 max_grad_norm: float | None = None, start_step: int = 0) -> None:
        self.config = config if config is not None else GuardConfig()
        self.model = model
        self.optimizer = optimizer
        self.inner_optimizer = unwrap_optimizer(optimizer)
        self.scheduler = scheduler
        self.scaler = scaler
        self.output_dir = output_dir
        self.on_fault = on_fault
        self._batches: list[tuple[Any, Any]] = []
        if isinstance(on_fault, FaultHook):
            on_fault.bind_guard(self)  # an Attributor reads the step's batches
        elif on_fault is not None and not callable(on_fault):
            raise TypeError(f"on_fault must be callable, got {type(on_fault).__name__}")
        clip = self.config.max_grad_norm if max_grad_norm is None else max_grad_norm
        self._max_grad_norm = float(clip or 0.0)
        self.replicated_grads = True
        """Distributed: gradients are identical on every rank (DDP), not sharded (FSDP2).
        Detected from the parameters by :meth:`refresh_params` (DTensor parameters are
        sharded); set it yourself only for a layout the detection cannot see."""
        self._grad_replicas: int | None = None
        self.work_seconds = 0.0
        """Wall time spent inside ``observe_loss`` and ``decide_and_prepare`` (for benchmarks)."""
        self.last_outcome: StepOutcome | None = None
        self.counters: dict[str, Any] = new_counters()
        self.counters["steps"] = int(start_step)
        self.lr_scale = 1.0
        self.signals = SignalTracker(self.config)
        """The spike windows and low-side runs the next step is judged against."""
        self.clip = AdaptiveClip(self.config, self._max_grad_norm)
        """The clip value of each step: ``max_grad_norm``, or ZClip's adaptive threshold."""
        self._per_tensor = (PerTensorClip(self.config.clip_warmup)
                            if self.config.clip_per_tensor else None)
        self._loss = LossAccumulator()
        self.refresh_params()

    @property
    def max_grad_norm(self) -> float:
        """The clip value in use (0: no clipping); fixed at construction."""
        return self._max_grad_norm

    # ---- parameters -------------------------------------------------------------------------
    def refresh_params(self) -> None:
        """Re-read the trainable parameters (call after freezing/unfreezing or adding groups)."""
        params: list[torch.Tensor]
        if self.model is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            params = [p for g in self.inner_optimizer.param_groups for p in g["params"]]
        self._params = params
        # DDP / one process: None (replicated); fully_shard: ranks per gradient element.
        # Raises ConfigError for layouts the guard cannot add up (FSDP1, mixed).
        self._grad_replicas = grad_replicas(self.model, params)
        self.replicated_grads = self._grad_replicas is None
        self._grad_stats = GradStats(params)
        if self._per_tensor is not None and self._grad_stats.sharded:
            raise ConfigError("clip_per_tensor needs each rank to hold whole gradient tensors; "
                              "under fully_shard they are shards: turn clip_per_tensor off")
        self.rank_check = RankCheck.for_layout(self.config, self.replicated_grads, params)
        in_memory = self.config.needs_snapshots and self.config.rollback_to == "memory"
        self._snapshot = (getattr(self, "snapshot_override", None)  # DiskRollback.attach
                          or (Snapshot(params, self.inner_optimizer) if in_memory else None))
        self._n_opt_params = self._count_opt_params()

    def _count_opt_params(self) -> int:
        return sum(len(g["params"]) for g in self.inner_optimizer.param_groups)  # O(groups)

    # ---- feeding ----------------------------------------------------------------------------
    def observe_loss(
        self, loss: torch.Tensor | float, num_tokens: torch.Tensor | int | None = None, *,
        window_normalized: bool = False,
    ) -> None:
        """Record one micro-batch's loss (and supervised-token count). No host sync.

        ``loss`` is the micro-batch's mean loss per token (what ``model(...).loss`` returns);
        the step's loss is their token-weighted mean when ``num_tokens`` is given, else their
        mean. ``window_normalized=True``: each loss is already a share of the step's loss (e.g.
        divided by the accumulation steps, or a token sum over the window's token count, as the
        Trainer's ``training_step`` returns); the step's loss is then their sum. A micro-batch
        with ``num_tokens == 0`` is counted as empty and its loss ignored; a window whose every
        micro-batch is empty is skipped as ``no_valid_tokens``.
        """
        t0 = time.perf_counter()
        self._loss.add(loss, num_tokens, window_normalized)
        self.work_seconds += time.perf_counter() - t0

    def observe_batch(self, batch: Any) -> Any:
        """Register the micro-batch about to enter the model; return it without ``sample_ids``.

        ``out = model(**guard.observe_batch(batch))``. The collator's ``sample_ids`` (dataset
        indices) are popped so the model never sees them. With an ``on_fault`` hook the batch
        is kept *by reference* (no copy, no sync) until the end of the step, so attribution can
        name and replay the samples of a faulty step; without one nothing is kept.
        """
        ids = batch.pop("sample_ids", None) if isinstance(batch, MutableMapping) else None
        if self.on_fault is not None:
            self._batches.append((batch, ids))
        return batch

    @property
    def batches(self) -> list[tuple[Any, Any]]:
        """(inputs, sample_ids or None) of each micro-batch of the current step."""
        return self._batches

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> StepOutcome:
        """Check, then call ``optimizer.step()`` (and the scheduler) or skip. Raises on halt.

        Raises:
            NonFiniteHalt: the policy decided to halt; ``events.jsonl`` already has the event.
        """
        outcome = self.decide_and_prepare(unscale=True)
        if outcome.applied:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        elif self.scaler is not None:
            self.scaler.update()  # lowers the scale after an overflow; resets its unscale state
        if self.scheduler is not None and (outcome.applied or self.config.scheduler_on_skip):
            self.scheduler.step()
        if outcome.action == Action.HALT:
            raise self.halt_error(outcome)
        return outcome

    def decide_and_prepare(self, step: int | None = None, *, unscale: bool = False
                           ) -> StepOutcome:
        """Measure and decide the step, and do everything but ``optimizer.step()`` itself.

        For integrations that call the optimizer themselves (the Trainer adapter). Besides
        deciding, this *changes state*: on apply it clips the gradients; on rollback it restores
        the last good snapshot; on rollback / reduce_lr it lowers the LR; it writes the event.
        The caller must then call ``optimizer.step()`` iff ``outcome.applied``. ``step``: the
        1-based step index for events; ``unscale``: ``scaler.unscale_`` first (``step`` does).
        """
        t0 = time.perf_counter()
        if self._count_opt_params() != self._n_opt_params:
            self.refresh_params()
        step = self.counters["steps"] + 1 if step is None else int(step)
        if unscale and self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_vec, clip_norm = self._grad_stats.compute()
        device = grad_vec.device
        found_inf = (step_vector.scaler_found_inf(self.scaler, self.inner_optimizer,
                                                  self._grad_stats.dtype, device)
                     if self.scaler is not None else None)
        ws = distributed.world_size()
        # COLLECTIVE (distributed only): the step's one all-reduce; SUM, so counts stay exact
        # and a NaN on any rank reaches every rank. Afterwards all ranks hold the same numbers.
        packed = distributed.all_reduce_sum_(
            step_vector.pack(grad_vec, self._loss.packed(device), found_inf, ws,
                             self.rank_check.slots(grad_vec, step)))
        if not self.replicated_grads:  # shards: the clip norm is the global one, on device
            clip_norm = (packed[0] / self._grad_div()).sqrt().to(clip_norm.dtype)
        values = packed.tolist()  # HOST SYNC: the one read of device values per optimizer step
        values, ranks, rc_values = step_vector.split(values, ws, self.rank_check.width)
        # an inf per-tensor norm (fault path only): one more COLLECTIVE + HOST SYNC in there
        stats, clip_value = step_vector.read_stats(
            values, grad_div=self._grad_div(), replicated_grads=self.replicated_grads,
            has_scaler=self.scaler is not None, inspect_inf=self._grad_stats.inspect_inf)
        signals = self.signals.read(stats, self._max_grad_norm)
        ctx = PolicyContext(self.counters["consecutive_skips"], self.counters["rollbacks"],
                            self._snapshot is not None and self._snapshot.exists)
        decision = self.rank_check.decide(stats, signals, ctx, rc_values, step)
        limit = self.clip.limit(stats.grad_norm)  # host floats: the same on every rank
        outcome = self._outcome(step, decision, stats, clip_value, limit)
        extra = None
        if not outcome.applied and self.on_fault is not None:
            extra = self.on_fault(outcome)  # attribution: gradients and state still as found
        self._enact(outcome, stats, signals, clip_norm, clip_value, limit)
        self._loss.reset()
        self._batches = []
        self._grad_stats.release()
        self.last_outcome = outcome
        if outcome.reason is not None:
            self._emit(outcome, extra, ranks)
        self.work_seconds += time.perf_counter() - t0
        return outcome

    def _emit(self, outcome: StepOutcome, extra: Any, ranks: dict[str, Any] | None) -> None:
        """One ``events.jsonl`` line per event, written by rank 0 for the whole (global) step.

        Distributed: the line carries ``rank`` (the writer), ``world_size`` and which ranks saw
        what locally (``nonfinite_grad_ranks``, ``nonfinite_loss_ranks``, ``empty_ranks``),
        decoded from the per-rank slots of the packed vector. When an ``on_fault`` hook ran,
        every rank's result reaches the line under ``per_rank``: COLLECTIVE (fault path only,
        taken by every rank alike because the decision is global).
        """
        per_rank = None
        if ranks is not None and not outcome.applied and self.on_fault is not None:
            per_rank = distributed.all_gather_objects(extra if isinstance(extra, dict) else None)
        if not distributed.is_main_process():
            return
        record = events.event_record(outcome, self.counters)
        if isinstance(extra, dict):
            record.update(extra)
        if ranks is not None:
            record.update(ranks)
        if per_rank is not None:
            record["per_rank"] = [{"rank": r, **(d or {})} for r, d in enumerate(per_rank)]
        events.write_event(self.output_dir, record, outcome.message)

    def halt_error(self, outcome: StepOutcome) -> NonFiniteHalt:
        """The :class:`NonFiniteHalt` for a halting outcome (with the diagnosis)."""
        return events.halt_error(outcome, self.counters, self.counters["last_applied_step"])

    # ---- internals --------------------------------------------------------------------------
    def _grad_div(self) -> int:
        """Ranks that hold each gradient element: the reduced gradient segment over-counts by
        this (DDP: every rank; fully_shard: 1)."""
        return distributed.world_size() if self.replicated_grads else (self._grad_replicas or 1)

    def _outcome(self, step: int, decision: Any, stats: StepStats, clip_value: float,
                 limit: tuple[float, float | None]) -> StepOutcome:
        applied = decision.action == Action.APPLY
        backoff = decision.action in (Action.ROLLBACK, Action.REDUCE_LR)
        clipped = applied and limit[0] < math.inf and clip_value + 1e-6 > limit[0]
        detail = dict(decision.detail)
        if self.clip.adaptive:
            detail.setdefault("clip_threshold", self.clip.threshold())
        if applied and cut_applied(limit):  # the adaptive threshold cut this step
            detail["adaptive_clip"] = limit[0]
        return StepOutcome(
            step=step, applied=applied, action=decision.action, reason=decision.reason,
            grad_norm=stats.grad_norm, loss=stats.loss, tokens=stats.tokens,
            micro_batches=stats.micro_batches, empty_micro_batches=stats.empty_micro_batches,
            clipped=clipped,
            consecutive_skips=0 if applied else self.counters["consecutive_skips"] + 1,
            lr_scale=self.lr_scale * (self.config.lr_backoff if backoff else 1.0),
            detail=detail,
        )

    def _enact(self, outcome: StepOutcome, stats: StepStats, signals: Signals,
               clip_norm: torch.Tensor, clip_value: float, limit: tuple[float, float | None]
               ) -> None:
        c = self.counters
        c["steps"] = outcome.step
        c["empty_micro_batches"] += stats.empty_micro_batches
        if outcome.reason is not None and outcome.reason in REASON_COUNTER:
            c[REASON_COUNTER[outcome.reason]] += 1
        if outcome.reason in FAULT_REASONS:
            c["nonfinite"] += 1
        if outcome.applied:
            if outcome.reason is not None:
                c["warnings"] += 1
            if self._snapshot is not None and c["applied"] % self.config.snapshot_every == 0:
                self._snapshot.capture(outcome.step)  # this state just proved itself: finite
            clip_gradients(self._grad_stats, self._per_tensor, clip_norm, clip_value, limit)
            c["clipped"] += int(outcome.clipped)
            c["adaptive_clipped"] += int(cut_applied(limit))
            c["applied"] += 1
            c["last_applied_step"] = outcome.step
            c["consecutive_skips"] = 0
            self.signals.accept(stats, signals)
            self.clip.update(stats.grad_norm, limit[1])
            if cut_applied(limit) and self.config.reset_moments_on_spike:
                reset_moments(self.inner_optimizer)  # SPAM: the spike must not live on in them
                c["moment_resets"] += 1
            return
        c["skipped"] += 1
        c["consecutive_skips"] = outcome.consecutive_skips
        if outcome.action == Action.ROLLBACK and self._snapshot is not None:  # decide() knew
            self._snapshot.restore()
            c["rollbacks"] += 1
        elif outcome.action == Action.REDUCE_LR:
            c["lr_reductions"] += 1
        if outcome.action in (Action.ROLLBACK, Action.REDUCE_LR):
            f = self.config.lr_backoff
            self.lr_scale *= backoff_lr(self.inner_optimizer, self.scheduler, f)

    # ---- reporting and checkpointing --------------------------------------------------------
    @property
    def last_good_step(self) -> int | None:
        """Step whose pre-step state the rollback snapshot holds (None: no snapshot)."""
        return self._snapshot.step if self._snapshot is not None else None

    def log_counters(self) -> dict[str, float]:
        """Counters for the Trainer's logs / TensorBoard / W&B, keyed ``guard/<name>``."""
        return log_view(self.counters, self.lr_scale,
                        self.clip.threshold() if self.clip.adaptive else None)

    def state_dict(self) -> dict[str, Any]:
        """Counters, detector windows and the adaptive clip's history, strict-JSON safe (only
        finite numbers are kept); not the rollback snapshot (after a resume, the first clean
        step makes a new one)."""
        state = {"version": 1, "counters": dict(self.counters), "lr_scale": self.lr_scale,
                 **self.signals.state_dict()}
        if self.clip.adaptive:
            state["clip"] = self.clip.state_dict()
        if self._per_tensor is not None:
            state["clip_per_tensor"] = self._per_tensor.state_dict()  # a sync: save time only
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (e.g. on resume from a checkpoint)."""
        for key, value in state.get("counters", {}).items():
            if key in self.counters:
                self.counters[key] = value
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.signals.load_state_dict(state)
        self.clip.load_state_dict(state.get("clip", {}))
        if self._per_tensor is not None:
            self._per_tensor.load_state_dict(state.get("clip_per_tensor", {}),
                                             self._grad_stats.device)
