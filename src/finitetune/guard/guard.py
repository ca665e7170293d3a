"""``Guard``: decide, after the backward passes of an optimizer step, whether to take it.

Plain loop (as short as GradScaler's)::

    guard = Guard(model, optimizer, GuardConfig(max_grad_norm=1.0), scheduler=scheduler)
    for batch in loader:
        out = model(**batch)
        guard.observe_loss(out.loss, num_tokens)   # optional; no host sync
        out.loss.backward()
        guard.step()           # norm + flags, ONE host sync, decide, clip, step or skip
        optimizer.zero_grad()

Order inside ``step`` (DESIGN.md §2): one fused pass over the gradients (pre-clip norm and
finite flags) plus the loss sums, packed in one small tensor -> (all-reduce when distributed) ->
one host sync -> pure decision (:func:`~finitetune.guard.policy.decide`) -> clip with the norm
already computed, never before deciding -> ``optimizer.step()`` or nothing at all -> scheduler
(not advanced on a skip by default). A skip leaves parameters and every optimizer-state entry
bit-identical: zeroing the gradients or multiplying the update by 0 is *not* a skip (Adam moves
on its momentum, weight decay still applies, and 0 x NaN = NaN poisons the moments).

Distributed (DDP, FSDP2 ``fully_shard``): call ``step``/``check`` on every rank. The packed
tensor has the same length on every rank whatever gradients exist, is reduced with one SUM
all-reduce, and only reduced numbers feed the decision, so every rank takes the same one; rank
0 writes the event (see :mod:`finitetune.guard.distributed`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import torch

from finitetune.config import GuardConfig
from finitetune.errors import NonFiniteHalt
from finitetune.guard import distributed, events
from finitetune.guard.policy import (
    FAULT_REASONS,
    FP32_MAX,
    Action,
    PolicyContext,
    Reason,
    Signals,
    SpikeDetector,
    StepOutcome,
    StepStats,
    decide,
)
from finitetune.guard.snapshot import Snapshot, backoff_lr
from finitetune.guard.stats import GRAD_FIELDS, LOSS_FIELDS, GradStats, LossAccumulator

__all__ = ["Guard"]

_COUNTERS = (
    "steps", "applied", "skipped", "nonfinite", "nonfinite_grad", "nonfinite_loss",
    "norm_overflow", "no_valid_tokens", "loss_spikes", "grad_spikes", "warnings", "rollbacks",
    "lr_reductions", "scaler_overflows", "clipped", "empty_micro_batches", "consecutive_skips",
    "last_applied_step",
)
_REASON_COUNTER = {
    Reason.NONFINITE_GRAD: "nonfinite_grad", Reason.NONFINITE_LOSS: "nonfinite_loss",
    Reason.NORM_OVERFLOW: "norm_overflow", Reason.NO_VALID_TOKENS: "no_valid_tokens",
    Reason.LOSS_SPIKE: "loss_spikes", Reason.GRAD_SPIKE: "grad_spikes",
    Reason.SCALER_OVERFLOW: "scaler_overflows",
}
_LOG_KEYS = ("skipped", "nonfinite", "no_valid_tokens", "empty_micro_batches", "rollbacks",
             "consecutive_skips")


_RANK_FLAGS = {1: "nonfinite_grad_ranks", 2: "nonfinite_loss_ranks", 4: "empty_ranks"}


def _rank_flags(grad_vec: torch.Tensor, loss_vec: torch.Tensor) -> torch.Tensor:
    """This rank's local findings as a bitmask (1 grad NaN/inf, 2 loss NaN/inf, 4 no tokens).

    Device-side, no sync; distributed runs only. Rides in the packed vector so the event can
    say which rank had the NaN, although the decision itself is global.
    """
    at = {name: i for i, name in enumerate(LOSS_FIELDS)}
    grad_bad = (grad_vec[GRAD_FIELDS.index("nan_norms")]
                + grad_vec[GRAD_FIELDS.index("inf_norms")]) > 0
    loss_bad = loss_vec[at["loss_nonfinite"]] > 0
    known, micro = loss_vec[at["tokens_known"]], loss_vec[at["micro_batches"]]
    empty = (micro > 0) & (known == micro) & (loss_vec[at["tokens"]] == 0)
    dtype = grad_vec.dtype
    return grad_bad.to(dtype) + 2 * loss_bad.to(dtype) + 4 * empty.to(dtype)


def _rank_lists(slots: list[float]) -> dict[str, Any]:
    """Decode the reduced per-rank slots into the event's rank lists."""
    codes = [round(v) if math.isfinite(v) else 0 for v in slots]
    out: dict[str, Any] = {"rank": distributed.rank(), "world_size": len(codes)}
    for bit, key in _RANK_FLAGS.items():
        out[key] = [r for r, c in enumerate(codes) if c & bit]
    return out


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers such as accelerate's ``AcceleratedOptimizer``."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner


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
            before a rollback changes the parameters; a returned dict is merged into the event
            (the hook for attribution).
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: Any,
        config: GuardConfig | None = None,
        scheduler: Any = None,
        *,
        scaler: Any = None,
        output_dir: str | os.PathLike | None = None,
        on_fault: Callable[[StepOutcome], dict | None] | None = None,
    ) -> None:
        self.config = config if config is not None else GuardConfig()
        self.model = model
        self.optimizer = optimizer
        self.inner_optimizer = _unwrap(optimizer)
        self.scheduler = scheduler
        self.scaler = scaler
        self.output_dir = output_dir
        self.on_fault = on_fault
        self._batches: list[tuple[Any, Any]] = []
        bind = getattr(on_fault, "bind_guard", None)  # an Attributor reads the step's batches
        if callable(bind):
            bind(self)
        self.max_grad_norm = float(self.config.max_grad_norm or 0.0)
        """Clip value in use (``GuardCallback`` sets it from the Trainer's arguments)."""
        self.replicated_grads = True
        """Distributed: gradients are identical on every rank (DDP), not sharded (FSDP2).
        Detected from the parameters by :meth:`refresh_params` (DTensor parameters are
        sharded); set it yourself only for a layout the detection cannot see."""
        self._grad_replicas: int | None = None
        self.work_seconds = 0.0
        """Wall time spent inside ``observe_loss`` and ``check`` (for the overhead benchmark)."""
        self.last_outcome: StepOutcome | None = None
        self.counters: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
        self.counters["last_applied_step"] = None
        self.lr_scale = 1.0
        cfg = self.config
        self._loss_detector = SpikeDetector(cfg.spike_window, cfg.spike_warmup, cfg.spike_min_scale)
        self._grad_detector = SpikeDetector(cfg.spike_window, cfg.spike_warmup, cfg.spike_min_scale)
        self._zero_loss_run = 0
        self._pinned_run = 0
        self._last_norm: float | None = None
        self._loss = LossAccumulator()
        self.refresh_params()

    # ---- parameters -------------------------------------------------------------------------
    def refresh_params(self) -> None:
        """Re-read the trainable parameters (call after freezing/unfreezing or adding groups)."""
        if self.model is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            params = [p for g in self.inner_optimizer.param_groups for p in g["params"]]
        self._params = params
        # DDP / one process: None (replicated); fully_shard: ranks per gradient element.
        # Raises ConfigError for layouts the guard cannot add up (FSDP1, mixed).
        self._grad_replicas = distributed.grad_replicas(self.model, params)
        self.replicated_grads = self._grad_replicas is None
        self._grad_stats = GradStats(params)
        self._snapshot = (Snapshot(params, self.inner_optimizer)
                          if self.config.needs_snapshots else None)
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
        outcome = self.check(unscale=True)
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

    def check(self, step: int | None = None, *, unscale: bool = False) -> StepOutcome:
        """Measure, decide and prepare the step, without calling ``optimizer.step()``.

        For integrations that call the optimizer themselves (``GuardCallback``): clipping,
        rollback and LR back-off are done here; the caller must call ``optimizer.step()`` iff
        ``outcome.applied``. ``step`` overrides the 1-based step index used in events.
        ``unscale``: call ``scaler.unscale_`` first (``Guard.step`` does).
        """
        t0 = time.perf_counter()
        if self._count_opt_params() != self._n_opt_params:
            self.refresh_params()
        step = self.counters["steps"] + 1 if step is None else int(step)
        if unscale and self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_vec, clip_norm = self._grad_stats.compute()
        device = grad_vec.device
        loss_vec = self._loss.packed(device)
        # Packed layout (float64, same length on every rank whatever grads/losses exist):
        # GRAD_FIELDS | LOSS_FIELDS | [scaler found_inf] | [one fault-flag slot per rank]
        parts = [grad_vec, loss_vec]
        if self.scaler is not None:
            parts.append(self._found_inf(device))
        ws = distributed.world_size()
        if ws > 1:
            parts.append(distributed.rank_slots(_rank_flags(grad_vec, loss_vec)))
        # COLLECTIVE (distributed only): the step's one all-reduce; SUM, so counts stay exact
        # and a NaN on any rank reaches every rank. Afterwards all ranks hold the same numbers.
        packed = distributed.all_reduce_sum_(torch.cat(parts))
        if not self.replicated_grads:  # shards: the clip norm is the global one, on device
            clip_norm = (packed[0] / self._grad_div()).sqrt().to(clip_norm.dtype)
        values = packed.tolist()  # HOST SYNC: the one read of device values per optimizer step
        stats, clip_value = self._read(values[:len(values) - (ws if ws > 1 else 0)])
        ranks = _rank_lists(values[len(values) - ws:]) if ws > 1 else None
        signals = self._signals(stats)
        ctx = PolicyContext(self.counters["consecutive_skips"], self.counters["rollbacks"],
                            self._snapshot is not None and self._snapshot.exists)
        decision = decide(stats, signals, ctx, self.config)
        outcome = self._outcome(step, decision, stats, clip_value)
        extra = None
        if not outcome.applied and self.on_fault is not None:
            extra = self.on_fault(outcome)  # attribution: gradients and state still as found
        self._enact(outcome, stats, signals, clip_norm, clip_value)
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
    def _found_inf(self, device: torch.device) -> torch.Tensor:
        """GradScaler's own inf/NaN check of this step, reused (no second pass)."""
        found = self.scaler._found_inf_per_device(self.inner_optimizer)  # private torch API
        total = torch.zeros(1, dtype=self._grad_stats.dtype, device=device)
        for value in found.values():
            total = total + value.to(device=device, dtype=total.dtype)
        return total

    def _grad_div(self) -> int:
        """Ranks that hold each gradient element: the reduced gradient segment over-counts by
        this (DDP: every rank; fully_shard: 1)."""
        return distributed.world_size() if self.replicated_grads else (self._grad_replicas or 1)

    def _read(self, values: list[float]) -> tuple[StepStats, float]:
        """Turn the reduced vector (identical on every rank) into this step's ``StepStats``.

        Only reduced numbers are read here, never a rank-local count, so every rank builds the
        same stats and :func:`decide` takes the same decision everywhere.
        """
        g = dict(zip(GRAD_FIELDS, values, strict=False))
        lo = dict(zip(LOSS_FIELDS, values[len(GRAD_FIELDS):], strict=False))
        div = self._grad_div()
        if div > 1:  # counts / div stay > 0 iff some rank counted one: the flags survive
            g = {k: v / div for k, v in g.items()}
        if not self.replicated_grads:  # summed shard norms mean nothing; the total does
            g["clip_norm"] = math.sqrt(g["grad_sq"]) if g["grad_sq"] >= 0 else g["grad_sq"]
        nonfinite = g["nan_norms"] > 0
        overflow = False
        grad_norm = math.sqrt(g["grad_sq"]) if math.isfinite(g["grad_sq"]) else g["grad_sq"]
        if nonfinite:
            grad_norm = math.nan
        elif g["inf_norms"] > 0:
            # Fault path only: an inf per-tensor norm is an inf element or an fp32 overflow.
            # COLLECTIVE + HOST SYNC (second ones, on this fault path only, on every rank
            # alike: the branch was taken on reduced numbers)
            probe = distributed.all_reduce_sum_(self._grad_stats.inspect_inf())
            inf_elems, sq64 = probe.tolist()
            sq64 /= div
            nonfinite = inf_elems > 0
            overflow = not nonfinite
            grad_norm = math.inf if nonfinite or sq64 <= 0 else math.sqrt(sq64)
        else:
            overflow = g["grad_sq"] > FP32_MAX or not math.isfinite(g["clip_norm"])
            if not overflow:  # report the fp32 norm clip_grad_norm_ itself would return
                grad_norm = g["clip_norm"]
        # micro-batch counts over all ranks (reduced, so a rank that observed nothing agrees)
        micro = round(lo["micro_batches"])
        weight, raw = lo["loss_weight"], lo["loss_raw_sum"]
        loss = None
        if micro and weight > 0:
            # Window-normalized shares add up to each rank's step loss; ranks are averaged, as
            # the Trainer's logged loss is (the Trainer multiplies each share by the world size
            # when num_items_in_batch is global, so this is the token mean of all ranks' batch).
            # Per-token means are weighted by their tokens.
            ws = distributed.world_size()
            loss = raw / ws if lo["window_normalized"] > 0 else raw / weight
        tokens = None
        if micro and round(lo["tokens_known"]) == micro:
            tokens = round(lo["tokens"])
        scaler_overflow = self.scaler is not None and values[-1] > 0
        stats = StepStats(
            grad_norm=grad_norm, grad_nonfinite=nonfinite, norm_overflow=overflow, loss=loss,
            loss_nonfinite=lo["loss_nonfinite"] > 0, tokens=tokens, micro_batches=micro,
            empty_micro_batches=round(lo["empty"]), scaler_overflow=scaler_overflow,
        )
        return stats, g["clip_norm"]

    def _signals(self, stats: StepStats) -> Signals:
        norm_ok = not (stats.grad_nonfinite or stats.norm_overflow)
        loss_ok = stats.loss is not None and not stats.loss_nonfinite
        norm = stats.grad_norm
        pinned = norm_ok and (
            (self._last_norm is not None and abs(norm - self._last_norm)
             <= 1e-6 * max(abs(self._last_norm), 1e-30))
            or (self.max_grad_norm > 0 and abs(norm - self.max_grad_norm)
                <= 1e-6 * self.max_grad_norm)
        )
        return Signals(
            loss_z=self._loss_detector.score(stats.loss) if loss_ok else None,
            grad_z=self._grad_detector.score(norm) if norm_ok else None,
            zero_loss_run=self._zero_loss_run + 1 if loss_ok and stats.loss == 0.0 else 0,
            pinned_run=self._pinned_run + 1 if pinned else 0,
        )

    def _outcome(self, step: int, decision: Any, stats: StepStats, clip_value: float
                 ) -> StepOutcome:
        applied = decision.action == Action.APPLY
        backoff = decision.action in (Action.ROLLBACK, Action.REDUCE_LR)
        clipped = applied and self.max_grad_norm > 0 and clip_value + 1e-6 > self.max_grad_norm
        return StepOutcome(
            step=step, applied=applied, action=decision.action, reason=decision.reason,
            grad_norm=stats.grad_norm, loss=stats.loss, tokens=stats.tokens,
            micro_batches=stats.micro_batches, empty_micro_batches=stats.empty_micro_batches,
            clipped=clipped,
            consecutive_skips=0 if applied else self.counters["consecutive_skips"] + 1,
            lr_scale=self.lr_scale * (self.config.lr_backoff if backoff else 1.0),
            detail=dict(decision.detail),
        )

    def _enact(self, outcome: StepOutcome, stats: StepStats, signals: Signals,
               clip_norm: torch.Tensor, clip_value: float) -> None:
        c = self.counters
        c["steps"] = outcome.step
        c["empty_micro_batches"] += stats.empty_micro_batches
        if outcome.reason is not None and outcome.reason in _REASON_COUNTER:
            c[_REASON_COUNTER[outcome.reason]] += 1
        if outcome.reason in FAULT_REASONS:
            c["nonfinite"] += 1
        if outcome.applied:
            if outcome.reason is not None:
                c["warnings"] += 1
            if self._snapshot is not None and c["applied"] % self.config.snapshot_every == 0:
                self._snapshot.capture(outcome.step)  # this state just proved itself: finite
            # Multiply only when the coefficient may be < 1 (x1.0 is exact, so skipping it
            # changes nothing but saves a pass over the gradients); clip_value came with the sync.
            if 0 < self.max_grad_norm < math.inf and (
                clip_value + 1e-6 >= self.max_grad_norm * (1 - 1e-5)
            ):
                self._grad_stats.clip_(self.max_grad_norm, clip_norm)
            c["clipped"] += int(outcome.clipped)
            c["applied"] += 1
            c["last_applied_step"] = outcome.step
            c["consecutive_skips"] = 0
            self._loss_detector.push(stats.loss)
            self._grad_detector.push(stats.grad_norm)
            self._zero_loss_run, self._pinned_run = signals.zero_loss_run, signals.pinned_run
            self._last_norm = stats.grad_norm
            return
        c["skipped"] += 1
        c["consecutive_skips"] = outcome.consecutive_skips
        if outcome.action == Action.ROLLBACK:
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
        c = self.counters
        out = {f"guard/{k}": float(c[k]) for k in _LOG_KEYS}
        out["guard/spikes"] = float(c["loss_spikes"] + c["grad_spikes"])
        out["guard/lr_scale"] = float(self.lr_scale)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Counters and detector windows, strict-JSON safe (only finite numbers are kept).

        The rollback snapshot is not included: after a resume, the first clean step makes a new
        one.
        """
        return {
            "version": 1, "counters": dict(self.counters), "lr_scale": self.lr_scale,
            "loss_window": self._loss_detector.state_dict(),
            "grad_window": self._grad_detector.state_dict(),
            "zero_loss_run": self._zero_loss_run, "pinned_run": self._pinned_run,
            "last_norm": self._last_norm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (e.g. on resume from a checkpoint)."""
        for key, value in state.get("counters", {}).items():
            if key in self.counters:
                self.counters[key] = value
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self._loss_detector.load_state_dict(state.get("loss_window", []))
        self._grad_detector.load_state_dict(state.get("grad_window", []))
        self._zero_loss_run = int(state.get("zero_loss_run", 0))
        self._pinned_run = int(state.get("pinned_run", 0))
        self._last_norm = state.get("last_norm")
