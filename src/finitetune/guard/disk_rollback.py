"""Restart-rollback: roll back to the newest healthy checkpoint on disk, inside the same process.

The in-memory rollback (:class:`~finitetune.guard.snapshot.Snapshot`) keeps one copy of the
trainable parameters and their optimizer state: a few MB for LoRA, but for a full fine-tune
with AdamW it is three more copies of the model's size (weights, two moments) held for the
whole run. :class:`DiskRollback` plays the same role (``exists``, ``step``, ``capture``,
``restore``) from the checkpoints the run saves anyway (``save_steps``):

- ``capture`` costs nothing: the target is the newest checkpoint finitetune checked finite when
  it saved it *and whose state then gave a clean step* (the checkpoint saved just before a
  spike holds the state that produced it), reported by the Trainer integration
  (:func:`finitetune.rundir.checkpoints.newest_healthy_marked` after a resume);
- ``restore`` reads it back into the live objects: weights copied tensor by tensor from the
  safetensors file (one tensor in memory at a time; a loader can be passed for other formats,
  e.g. the Trainer's own), the optimizer state loaded *after* the old one was dropped (so the
  peak stays at one optimizer state), the scheduler state, and the learning rate re-scaled by
  every back-off taken since that checkpoint was saved (the guard then applies this one's).

The data is not replayed: the Trainer goes on with the batch after the faulty step, so the
steps between the checkpoint and the fault are redone with new data and their batches are
skipped (what PaLM did by hand: restart earlier, skip the batches around the spike). The
number of rollbacks is capped by ``GuardConfig.max_rollbacks`` as for the in-memory policy.

Pure torch + safetensors; the Trainer wiring is in
:mod:`finitetune.integrations.hf.checkpoint_callback`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finitetune.guard.snapshot import backoff_lr
from finitetune.parsing.nesting import json_loads
from finitetune.rundir.checkpoints import (
    INDEX_FILES,
    OPTIMIZER,
    SCHEDULER,
    CheckpointHealth,
    newest_healthy_marked,
)

__all__ = ["DiskRollback", "load_safetensors_weights"]


class DiskRollback:
    """The guard's rollback target, read from the run's newest healthy checkpoint.

    Args:
        model: the live model (weights are copied into its tensors in place).
        optimizer: the live optimizer (a wrapper such as accelerate's is fine).
        scheduler: the live LR scheduler, or None.
        run_dir: where the ``checkpoint-<step>`` folders are.
        load_weights: ``load_weights(path) -> None`` for checkpoints whose weights are not a
            plain safetensors state dict of ``model`` (adapters, sharded formats); by default
            :func:`load_safetensors_weights`, falling back to this when it returns False.
        on_restore: called with a dict describing each restore (for the run's events).
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 run_dir: str | os.PathLike, *,
                 load_weights: Callable[[Path], None] | None = None,
                 on_restore: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.run_dir = Path(run_dir)
        self.load_weights = load_weights
        self.on_restore = on_restore
        self.guard: Any = None
        self.restores = 0
        self.target: CheckpointHealth | None = newest_healthy_marked(self.run_dir, proven=True)

    def attach(self, guard: Any) -> DiskRollback:
        """Make ``guard`` roll back to this instead of an in-memory copy (it sets the guard's
        ``snapshot_override``, which the guard prefers; its LR scale is read at restore)."""
        self.guard = guard
        guard.snapshot_override = self
        if guard.config.needs_snapshots:
            guard._snapshot = self
        return self

    # ---- the snapshot interface ------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return self.target is not None

    @property
    def step(self) -> int | None:
        """Guard step whose pre-step state this is: the checkpoint's step + 1."""
        return self.target.step + 1 if self.target is not None else None

    def capture(self, step: int) -> None:
        """Nothing to copy: the checkpoints are the snapshots (see :meth:`use`)."""

    def use(self, health: CheckpointHealth) -> None:
        """A checkpoint saved finite whose state then gave a clean step: the new target."""
        self.target = health

    @torch.no_grad()
    def restore(self) -> None:
        """Load weights, optimizer and scheduler state of the target checkpoint (in place)."""
        if self.target is None:
            raise RuntimeError("no healthy checkpoint on disk to roll back to")
        t0 = time.perf_counter()
        path = self.target.path
        if not load_safetensors_weights(self.model, path):
            if self.load_weights is None:
                raise RuntimeError(f"{path}: weights are not a safetensors state dict of the "
                                   "model; pass load_weights= to DiskRollback")
            self.load_weights(path)
        inner = _inner(self.optimizer)
        device = next((p.device for g in inner.param_groups for p in g["params"]),
                      torch.device("cpu"))
        inner.state.clear()  # drop the old moments first: the peak stays at one state
        inner.load_state_dict(torch.load(path / OPTIMIZER, map_location=device,
                                         weights_only=True))
        if self.scheduler is not None and (path / SCHEDULER).is_file():
            self.scheduler.load_state_dict(torch.load(path / SCHEDULER, weights_only=True))
        saved_scale = float((self.target.marker or {}).get("lr_scale", 1.0) or 1.0)
        now = float(getattr(self.guard, "lr_scale", 1.0))
        if now != saved_scale:  # back-offs taken since that save; the guard adds this one's
            backoff_lr(inner, self.scheduler, now / saved_scale)
        self.restores += 1
        if self.on_restore is not None:
            self.on_restore({"checkpoint": path.name, "checkpoint_step": self.target.step,
                             "seconds": round(time.perf_counter() - t0, 3)})


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner


@torch.no_grad()
def load_safetensors_weights(model: torch.nn.Module, path: Path) -> bool:
    """Copy ``path``'s safetensors weights into ``model`` tensor by tensor; False (nothing
    changed) when they are not a plain state dict of it (other names, adapters, no file)."""
    from safetensors import safe_open

    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    index = path / INDEX_FILES[0]
    if not files and index.is_file():
        files = [path / f for f in sorted(set(json_loads(index.read_text(), str(index))
                                              ["weight_map"].values()))]
    if not files:
        return False
    live = model.state_dict()  # detached views of the parameters: copy_ writes through
    keys: dict[Path, list[str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys[f] = list(st.keys())
    names = [k for ks in keys.values() for k in ks]
    if any(k not in live for k in names):
        return False
    covered = {live[k].untyped_storage().data_ptr() for k in names}
    if any(p.requires_grad and p.untyped_storage().data_ptr() not in covered
           for p in model.parameters()):
        return False  # a trainable tensor the file does not hold (tied differently, ...)
    for f, ks in keys.items():
        with safe_open(str(f), framework="pt") as st:
            for k in ks:
                live[k].copy_(st.get_tensor(k))
    return True
