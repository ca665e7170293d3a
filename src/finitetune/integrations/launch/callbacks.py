"""The Trainer callbacks ``finitetune run`` adds besides the guard: faults and the manifest.

:class:`FaultInjector` writes the ``--inject`` faults (:mod:`~finitetune.integrations.launch.faults`
has the spec grammar): each is armed for its optimizer step only, with hooks like those of
:mod:`finitetune.testing`, and removed when training ends. :class:`RunRecorder` appends each
Trainer's ``train()`` to the run's manifest (:mod:`~finitetune.integrations.launch.manifest`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from finitetune import distributed
from finitetune.errors import ConfigError
from finitetune.integrations.launch.faults import FaultSpec
from finitetune.integrations.launch.manifest import begin_record, end_record
from finitetune.numerics.constants import IGNORE_INDEX

__all__ = ["FaultInjector", "RunRecorder", "pick_parameter"]

_GRAD_VALUES = {"nan_grad": math.nan, "inf_grad": math.inf}
"""The gradient faults and the value each writes into one gradient element."""


def pick_parameter(model: torch.nn.Module) -> tuple[str, torch.nn.Parameter]:
    """The trainable parameter a ``nan_grad`` / ``inf_grad`` fault hits: the first one inside a
    decoder layer
    (``layers`` / ``h`` / ``block`` in its name), else the first trainable one."""
    named = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and p.is_floating_point()]
    if not named:
        raise ConfigError("--inject nan_grad: the model has no trainable parameter")
    inside = [(n, p) for n, p in named if re.search(r"\.(layers|h|block|layer)\.\d+\.", n)]
    return (inside or named)[0]


class FaultInjector(TrainerCallback):
    """Arms each :class:`FaultSpec` for its step (``on_step_begin``) and disarms it after."""

    def __init__(self, specs: Iterable[FaultSpec | str]) -> None:
        self.specs = [s if isinstance(s, FaultSpec) else FaultSpec.parse(s) for s in specs]
        self.fired: list[tuple[str, int]] = []
        """(kind, step) of every fault actually written, on this rank."""
        self._armed: set[str] = set()
        self._handles: list[Any] = []
        self._loader: Any = None
        self._collate: Any = None

    def _mine(self) -> list[FaultSpec]:
        r = distributed.rank()
        return [s for s in self.specs if s.rank is None or s.rank == r]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        kinds = {s.kind for s in self._mine()}
        if kinds & set(_GRAD_VALUES):
            name, param = pick_parameter(model)
            self.param_name = name
            self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook))
        if "inf_loss" in kinds:
            self._handles.append(model.register_forward_hook(self._forward_hook))
        if "empty_batch" in kinds:
            self._wrap_collate(args, state, train_dataloader)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step + 1
        self._armed = {s.kind for s in self._mine() if s.step == step and s.kind != "empty_batch"}
        self._step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._armed = set()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and restore the data loader's collate function."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._loader is not None:
            self._loader.collate_fn = self._collate
            self._loader = None

    # ---- the faults ---------------------------------------------------------------------------
    def _grad_hook(self, param: torch.Tensor) -> None:
        for kind, value in _GRAD_VALUES.items():
            if kind in self._armed and param.grad is not None:
                with torch.no_grad():
                    param.grad.view(-1)[0] = value
                self._armed.discard(kind)  # once: it stays in the window's accumulated gradient
                self.fired.append((kind, self._step))

    def _forward_hook(self, module: Any, args: Any, out: Any) -> Any:
        if "inf_loss" not in self._armed or not (module.training and torch.is_grad_enabled()):
            return None
        loss = getattr(out, "loss", None)
        if loss is not None:  # +inf added to the value: the gradients stay finite
            out["loss"] = loss + torch.full((), math.inf, dtype=loss.dtype, device=loss.device)
        elif getattr(out, "logits", None) is not None:
            logits = out.logits
            mask = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
            mask[0] = True
            out["logits"] = logits.masked_fill(mask.view(logits.shape), math.inf)
        else:
            raise ConfigError(f"--inject inf_loss: the model returned {type(out).__name__} "
                              "without a loss or logits")
        if ("inf_loss", self._step) not in self.fired:
            self.fired.append(("inf_loss", self._step))
        return out

    def _wrap_collate(self, args: Any, state: Any, loader: Any) -> None:
        if loader is None or args.dataloader_num_workers:
            raise ConfigError("--inject empty_batch needs the Trainer's own train data loader "
                              "with dataloader_num_workers=0")
        base = getattr(loader, "base_dataloader", loader)  # accelerate's DataLoaderShard
        steps = {s.step for s in self._mine() if s.kind == "empty_batch"}
        self._loader, self._collate = base, base.collate_fn
        base.collate_fn = _EmptyingCollate(base.collate_fn, steps, state.global_step,
                                           args.gradient_accumulation_steps, self.fired)


class _EmptyingCollate:
    """The loader's collate function; micro-batches of the chosen steps get labels all -100.

    Micro-batch ``m`` (counted from the start of ``train()``, in the order the loader yields
    them) belongs to step ``start + ceil(m / accumulation)``.
    """

    def __init__(self, collate: Callable[[Any], Any], steps: set[int], start: int, ga: int,
                 fired: list[tuple[str, int]]) -> None:
        self.collate, self.steps, self.start, self.ga = collate, steps, start, max(1, ga)
        self.fired = fired
        self.calls = 0

    def __call__(self, rows: Any) -> Any:
        batch = self.collate(rows)
        self.calls += 1
        step = self.start + (self.calls - 1) // self.ga + 1
        if step in self.steps:
            keys = [k for k in ("labels", "shift_labels")
                    if hasattr(batch, "get") and isinstance(batch.get(k), torch.Tensor)]
            if not keys:
                raise ConfigError("--inject empty_batch: the batches have no 'labels' tensor "
                                  "to empty (use nan_grad or inf_loss for this trainer)")
            for key in keys:
                batch[key] = torch.full_like(batch[key], IGNORE_INDEX)
            if ("empty_batch", step) not in self.fired:
                self.fired.append(("empty_batch", step))
        return batch


class RunRecorder(TrainerCallback):
    """Appends ``begin`` and ``end`` records of a Trainer's ``train()`` to the manifest."""

    def __init__(self, manifest: str | os.PathLike, events_dir: Path,
                 injector: Any = None) -> None:
        self.manifest, self.events_dir = manifest, Path(events_dir)
        self.injector = injector
        self.trainer: Any = None

    def set_trainer(self, trainer: Any) -> RunRecorder:
        """Bound by the construction hook: the guard is looked up on the Trainer when training
        ends, so a GuardCallback the Trainer rebuilt from a checkpoint
        (``restore_callback_states_from_checkpoint``) is the one whose counters count."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.events_dir.mkdir(parents=True, exist_ok=True)
            begin_record(self.manifest, self.events_dir, str(args.output_dir), state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     **kwargs: Any) -> None:
        from finitetune.guard.policy import Action
        from finitetune.integrations.hf.mixin import guard_of

        guard = guard_of(self.trainer) if self.trainer is not None else None
        last = guard.last_outcome if guard is not None else None
        fired = [f"{k}@{s}" for k, s in self.injector.fired] if self.injector else []
        # COLLECTIVE (distributed, once per train()): every rank's parameter checksum and
        # injected faults, so the summary can say whether all ranks ended on the same weights
        per_rank = distributed.all_gather_objects((_checksum(model), fired))
        if state.is_world_process_zero:
            end_record(self.manifest, self.events_dir, global_step=state.global_step,
                       halted=bool(last is not None and last.action == Action.HALT),
                       counters=dict(guard.counters) if guard is not None else None,
                       injected=sorted({f for _, done in per_rank for f in done}),
                       rank_checksums=[c for c, _ in per_rank])


def _checksum(model: Any) -> float | None:
    """Sum of every parameter in float64 (NaN if any is non-finite); None for sharded ones."""
    params = list(model.parameters()) if model is not None else []
    if not params or any(hasattr(p, "to_local") for p in params):
        return None
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in params)
    return float(total)  # HOST SYNC, once per train()
