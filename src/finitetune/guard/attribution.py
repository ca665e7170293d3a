"""Attribution: when the guard does not apply a step, say where and why it went bad.

Nothing here runs on a healthy step: :class:`Attributor` is the guard's ``on_fault`` hook (after
a non-apply decision, before any rollback, gradients as found). Only then does it pay for what a
debugger would do: a foreach pass over gradients and weights, a replay of the step's
micro-batches with a forward hook on every module (the *first* module whose output is non-finite
or beyond the fp16 range), a replay with autocast off, a per-row check naming the samples, and
the batch saved to ``faults/step_<N>.safetensors``. Verdicts: ``precision_overflow`` (non-finite
in the run's reduced precision, finite in fp32), ``data_or_model`` (non-finite in fp32 too),
``transient`` (an identical replay is finite), ``not_replayed``. Replays run in the model's
current mode under ``no_grad`` with the RNG forked (the training stream is untouched), bounded by
:class:`AttributionConfig`; an error in them becomes a field, never an exception in training.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finitetune import distributed
from finitetune.guard.policy import Reason
from finitetune.guard.replay import (
    load_fault_batch,
    max_abs,
    nonfinite_input_rows,
    replay_backward,
    replay_forward,
    row_of,
    rows_of,
    save_fault_batch,
)
from finitetune.loss.targets import supervised_tokens

__all__ = ["AttributionConfig", "Attributor", "load_fault_batch", "replay_backward",
           "replay_forward"]

logger = logging.getLogger("finitetune.guard")
FAULTS_DIR = "faults"
_REPLAY_REASONS = {Reason.NONFINITE_GRAD, Reason.NONFINITE_LOSS, Reason.NORM_OVERFLOW}
_LIST_CAP = 20


@dataclass
class AttributionConfig:
    """Bounds of what :class:`Attributor` does on a faulty step (nothing on a healthy one)."""

    enabled: bool = True
    """Attribute faults at all. ``False``: the hook returns nothing."""
    replay: bool = True
    """Replay the micro-batches. ``False``: gradient pass, sample ids and saved batch only."""
    max_replay_seconds: float = 30.0
    """Budget for all replays of one step, checked between replays (the first always runs)."""
    max_replay_samples: int = 16
    """Rows replayed one by one when every row of a batch replay is non-finite (one poisoning
    sample, or a model that fails on everything?)."""
    max_micro_batches: int = 8
    """Micro-batches of an accumulation window that are replayed and saved."""
    replay_backward: bool = True
    """Gradient fault with a finite forward replay: replay the backward too, for the gradients
    of two non-finite parameters only (their memory, not the model's)."""
    top_k: int = 5
    """Modules listed by largest gradient max-abs."""
    save_batches: bool = True
    """Write the micro-batches to ``<output_dir>/faults/step_<N>.safetensors``."""
    max_events: int = 20
    """Faulty steps attributed in full per run; later ones get sample ids only."""


class Attributor:
    """The ``on_fault`` hook of :class:`~finitetune.Guard` / :class:`~finitetune.GuardCallback`.

    Args:
        model: the module being trained (the Trainer's ``model``; a PEFT model is fine).
        output_dir: run directory for ``faults/``; default the guard's ``output_dir``.
        sources: sample id -> where it came from (``"train.jsonl:413"``): a mapping, a sequence
            indexed by id, or a callable.
        config: :class:`AttributionConfig`.
        autocast_dtype: the autocast dtype of a plain loop (``torch.autocast(..., dtype=...)``
            around the forward), so the replay reproduces it. Not needed under the Trainer:
            accelerate's autocast lives in ``model.forward`` and is replayed with it.

    The guard holds the step's micro-batches by reference (``Guard.observe_batch``, which
    ``GuardCallback`` calls in ``training_step``); they are read only after a fault.
    """

    def __init__(self, model: torch.nn.Module, output_dir: str | os.PathLike | None = None, *,
                 sources: Mapping[int, str] | Sequence[str] | Callable[[int], str] | None = None,
                 config: AttributionConfig | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.output_dir = output_dir
        self.sources = sources
        self.config = config if config is not None else AttributionConfig()
        self.autocast_dtype = autocast_dtype
        self.guard: Any = None
        self.attributed = 0
        self.last: dict[str, Any] | None = None
        """The last record returned (for callers and tests)."""

    def bind_guard(self, guard: Any) -> None:
        """Called by ``Guard.__init__``: where the step's micro-batches are found."""
        self.guard = guard

    def source(self, sample_id: int) -> str | None:
        """Where sample ``sample_id`` came from, if ``sources`` knows."""
        s = self.sources
        try:
            return (s(sample_id) if callable(s) else s.get(sample_id) if isinstance(s, Mapping)
                    else s[sample_id] if s is not None else None)
        except (IndexError, KeyError):
            return None

    def __call__(self, outcome: Any) -> dict[str, Any] | None:
        if not self.config.enabled:
            return None
        try:
            record = self.attribute(outcome)
        except Exception as exc:  # attribution must never take the training run down with it
            logger.warning("finitetune attribution failed: %s: %s", type(exc).__name__, exc)
            record = {"attribution_error": f"{type(exc).__name__}: {exc}"}
        self.last = record
        return record

    def attribute(self, outcome: Any) -> dict[str, Any]:
        """Everything the event line gets for this step (see the module docstring)."""
        t0 = time.perf_counter()
        cfg = self.config
        reason = outcome.reason
        batches = list(getattr(self.guard, "batches", []) or [])
        ids = [[int(i) for i in b[1].tolist()] if b[1] is not None else [] for b in batches]
        rec: dict[str, Any] = {"sample_ids": [i for mb in ids for i in mb]}
        if self.sources is not None:
            rec["sources"] = [self.source(i) for i in rec["sample_ids"]]
        if reason == Reason.SCALER_OVERFLOW:  # GradScaler calibration is normal early on
            return rec
        self.attributed += 1
        if self.attributed > cfg.max_events:
            rec.update(verdict="not_replayed", suggestion=f"attribution stopped after "
                       f"{cfg.max_events} faulty steps (AttributionConfig.max_events)")
            return rec
        rec.update(self._grads())
        batches = [b for b in batches if isinstance(b[0], Mapping)][:cfg.max_micro_batches]
        replays: list[dict[str, Any]] = []
        note: str | None
        if not batches:
            note = ("no batch (dict of model inputs) was registered: call "
                    "guard.observe_batch(batch) in plain loops")
        elif reason not in _REPLAY_REASONS:
            note = f"not replayed: {reason} is not a non-finite fault"
        elif not cfg.replay:
            note = "replay is off (AttributionConfig.replay=False)"
        elif self._sharded:  # each rank's forward all-gathers: a replay on one rank would hang
            note = ("not replayed: the model is sharded (FSDP, ZeRO-3); replays need every "
                    "rank in step")
        else:
            try:
                note = self._replay_all(batches, ids, reason, rec, replays, t0)
            except Exception as exc:  # the gradients' facts above stand without a replay
                replays.clear()
                note = (f"not replayed: the model does not take this batch as it is "
                        f"({type(exc).__name__}: {exc}); trainers whose batches are not the "
                        "model's own inputs (TRL's preference trainers) replay nothing")
        if cfg.save_batches and batches:
            out = self.output_dir or getattr(self.guard, "output_dir", None)
            if out is not None:
                rank = distributed.rank()
                rel = f"{FAULTS_DIR}/step_{outcome.step}{f'_rank{rank}' if rank else ''}" \
                      ".safetensors"  # every rank saves its own micro-batches
                save_fault_batch(Path(out) / rel, batches, outcome.step)
                rec["batch_file"] = rel
        self._conclude(rec, replays, note, reason)
        rec["attribution"] = {"replays": replays, "note": note,
                              "seconds": round(time.perf_counter() - t0, 4)}
        logger.warning("finitetune attribution, step %s: %s: %s", outcome.step,
                       rec["verdict"], rec["suggestion"])
        return rec

    def _grads(self) -> dict[str, Any]:
        """Non-finite gradients (layer order), top modules, non-finite weights; local shards
        of sharded (DTensor) parameters, so no collective runs here."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.is_floating_point()]
        # FSDP2 DTensors, DeepSpeed ZeRO-3 partitions (ds_id): forwards gather across ranks
        self._sharded = any(hasattr(p, "to_local") or hasattr(p, "ds_id") for _, p in named)
        named_l = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in named]
        with_grad = [(n, g.to_local() if hasattr(g, "to_local") else g) for n, g in
                     ((n, p.grad) for n, p in named) if g is not None and not g.is_sparse]
        gmax = max_abs([g for _, g in with_grad])
        bad = [n for (n, _), v in zip(with_grad, gmax) if not math.isfinite(v)]
        per_module: dict[str, float] = {}
        for (n, _), v in zip(with_grad, gmax):
            if math.isfinite(v):
                mod = n.rsplit(".", 1)[0]
                per_module[mod] = max(per_module.get(mod, 0.0), v)
        top = sorted(per_module.items(), key=lambda kv: -kv[1])[: self.config.top_k]
        wmax = max_abs([p.detach() for _, p in named_l])
        bad_w = [n for (n, _), v in zip(named_l, wmax) if not math.isfinite(v)]
        self._bad_params = [dict(self.model.named_parameters())[n] for n in (bad[:1] + bad[-1:])]
        self._fp32_ok = not any(p.dtype in (torch.float16, torch.bfloat16) for _, p in named)
        return {"nonfinite_params": bad[:_LIST_CAP], "nonfinite_param_count": len(bad),
                "top_grad_modules": [{"module": m, "max_abs": v} for m, v in top],
                "nonfinite_weights": bad_w[:_LIST_CAP]}

    def _replay_all(self, batches: list, ids: list[list[int]], reason: str,
                    rec: dict[str, Any], replays: list[dict], t0: float) -> str | None:
        """Forward-replay each micro-batch (bounded); if none reproduces a gradient fault,
        replay the backward of each too."""
        cfg = self.config
        for m, (inputs, _) in enumerate(batches):
            if replays and time.perf_counter() - t0 > cfg.max_replay_seconds:
                return f"replay budget of {cfg.max_replay_seconds:g} s used up"
            replays.append(self._replay(m, inputs, ids[m], rec, t0))
        if (reason == Reason.NONFINITE_GRAD and cfg.replay_backward and self._bad_params
                and all(r["verdict"] == "finite" for r in replays)):
            for m, (inputs, _) in enumerate(batches[:len(replays)]):
                if m and time.perf_counter() - t0 > cfg.max_replay_seconds:
                    return f"replay budget of {cfg.max_replay_seconds:g} s used up"
                if self._replay_bwd(inputs, replays[m]):
                    break
        return None

    def _replay(self, m: int, inputs: Mapping[str, Any], ids: list[int], rec: dict[str, Any],
                t0: float) -> dict[str, Any]:
        t = time.perf_counter()
        n = len(ids) or rows_of(inputs)
        res: dict[str, Any] = {"micro_batch": m + 1, "rows": n}
        blame = [(r, "nonfinite_input") for r in nonfinite_input_rows(inputs, n)]
        orig = replay_forward(self.model, inputs, autocast_dtype=self.autocast_dtype)
        res.update(precision=orig.compute_dtype, original="nonfinite" if orig.nonfinite
                   else "finite", first_nonfinite_module=orig.first_nonfinite,
                   first_nonfinite_value=orig.first_value,
                   first_fp16_overflow_module=orig.first_over_fp16, verdict="finite")
        if orig.nonfinite:
            res["verdict"] = "data_or_model"
            if orig.compute_dtype == "float32":
                res["fp32"] = "same as original (the run computes in float32)"
            elif not self._fp32_ok:
                res["fp32"] = ("not possible: the weights are reduced precision and an fp32 copy "
                               "would exceed the memory bound")
                if orig.compute_dtype == "float16" and orig.first_value == "inf":
                    res["verdict"] = "precision_overflow"  # inf out of finite fp16: overflow
            else:
                fp = replay_forward(self.model, inputs, fp32=True)
                res["fp32"] = "nonfinite" if fp.nonfinite else "finite"
                res["verdict"] = "data_or_model" if fp.nonfinite else "precision_overflow"
            rows = [r for r in (orig.bad_rows or []) if r not in {b[0] for b in blame}]
            tokens = supervised_tokens(inputs) if orig.logits_finite else None
            if tokens is not None:
                res["no_supervised_tokens"] = bool(tokens == 0)  # HOST SYNC (fault path)
            if n > 1 and len(rows) == n:
                blame += [(r, "nonfinite_alone") for r in self._alone(inputs, n, t0, res)]
            else:
                blame += [(r, "nonfinite_output") for r in rows]
        res["seconds"] = round(time.perf_counter() - t, 4)
        bad = rec.setdefault("bad_samples", [])
        for r, why in sorted(blame)[:_LIST_CAP]:
            sid = ids[r] if r < len(ids) else None
            bad.append({"index": sid, "source": self.source(sid) if sid is not None else None,
                        "micro_batch": m + 1, "row": r, "why": why})
        return res

    def _replay_bwd(self, inputs: Mapping[str, Any], res: dict[str, Any]) -> bool:
        """Backward replay of one micro-batch; True when it reproduces the non-finite grads."""
        t = time.perf_counter()
        ok = replay_backward(self.model, inputs, self._bad_params,
                             autocast_dtype=self.autocast_dtype)
        res["backward"] = {None: "no loss", True: "finite", False: "nonfinite"}[ok]
        if ok is False:
            res["verdict"] = "data_or_model"
            if res["precision"] != "float32" and self._fp32_ok:
                ok32 = replay_backward(self.model, inputs, self._bad_params, fp32=True)
                res["backward_fp32"] = "finite" if ok32 else "nonfinite"
                res["verdict"] = "precision_overflow" if ok32 else "data_or_model"
        res["seconds"] = round(res["seconds"] + time.perf_counter() - t, 4)
        return ok is False

    def _alone(self, inputs: Mapping[str, Any], n: int, t0: float, res: dict) -> list[int]:
        """Every row of the batch replay is non-finite: replay rows one by one (bounded) to
        tell one poisoning sample (cross-row mixing) from a model that fails on everything."""
        cfg, bad, done = self.config, [], 0
        for r in range(min(n, cfg.max_replay_samples)):
            if time.perf_counter() - t0 > cfg.max_replay_seconds:
                break
            tr = replay_forward(self.model, row_of(inputs, r, n),
                                autocast_dtype=self.autocast_dtype, trace=False)
            done += 1
            if tr.nonfinite:
                bad.append(r)
        res["samples_replayed"] = done
        res["samples_nonfinite_alone"] = len(bad)
        return bad if len(bad) < done else list(range(n))

    def _conclude(self, rec: dict[str, Any], replays: list[dict], note: str | None,
                  reason: str | None) -> None:
        found = {r["verdict"] for r in replays}
        verdict = next((v for v in ("data_or_model", "precision_overflow") if v in found),
                       "not_replayed" if not replays else "transient")
        if verdict == "transient" and reason == Reason.NORM_OVERFLOW:
            verdict = "data_or_model"  # finite gradients whose squared norm overflows fp32
        first = next((r for r in replays if r.get("first_nonfinite_module")), None)
        over = next((r for r in replays if r.get("first_fp16_overflow_module")), None)
        rec["verdict"] = verdict
        rec["first_nonfinite_module"] = first["first_nonfinite_module"] if first else None
        if over:
            rec["first_fp16_overflow_module"] = over["first_fp16_overflow_module"]
        rec["suggestion"] = _suggest(rec, replays, note, first)


def _named(samples: list[dict]) -> str:
    seen = []
    for s in samples:
        label = f"sample {s['index'] if s['index'] is not None else 'row ' + str(s['row'])}"
        label += f" ({s['source']})" if s.get("source") else ""
        if label not in seen:
            seen.append(label)
    return ", ".join(seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")


def _suggest(rec: dict[str, Any], replays: list[dict], note: str | None,
             first: dict | None) -> str:
    """One sentence tied to the verdict: what to do next."""
    verdict, bad = rec["verdict"], rec.get("bad_samples", [])
    where = f" (first at {first['first_nonfinite_module']})" if first else ""
    if verdict == "precision_overflow":
        mod = rec.get("first_nonfinite_module") or rec.get("first_fp16_overflow_module")
        dtype = next((r["precision"] for r in replays if r["precision"] != "float32"), "fp16")
        return (f"{mod or 'a module'} overflows in {dtype} but is finite in fp32: switch to "
                "bf16 or fp32 (or keep that module in fp32)")
    if verdict == "not_replayed":
        return note or "not replayed"
    if verdict == "transient":
        return ("an identical replay of this batch is finite: a transient fault (non-determinism "
                "or hardware); if it recurs, replay the saved batch and check the device")
    inputs = [s for s in bad if s["why"] == "nonfinite_input"]
    if inputs:
        return f"{_named(inputs)} has NaN/inf in its inputs: fix or drop it"
    weights = rec.get("nonfinite_weights")
    alone = [s for s in bad if s["why"] in ("nonfinite_output", "nonfinite_alone")]
    rows = sum(r["rows"] for r in replays)
    if alone and len(alone) < rows:
        also = f"; the weights {weights[0]} hold NaN/inf and it reaches them" if weights else ""
        return f"{_named(alone)} produces NaN/inf{where}: inspect or drop it{also}"
    if weights:
        return (f"the weights already hold NaN/inf ({weights[0]}): restore them from a good "
                "checkpoint; this batch only exposed them")
    if any(r.get("no_supervised_tokens") for r in replays):
        return "the batch has no supervised token, so the mean loss is 0/0: check the labels " \
               "(`finitetune check`) or use finitetune's safe loss"
    if alone:
        return (f"every sample of the batch is non-finite{where}: the model or that layer "
                "fails on any input; check its weights and activation scale")
    return f"the loss is non-finite although the outputs are finite{where}: check the labels " \
           "and the loss function"
