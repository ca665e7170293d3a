"""Checkpoints on disk: is a ``checkpoint-<step>`` folder complete and finite, and which to use.

A run killed mid-save leaves a ``checkpoint-N/`` that looks like any other: empty, or with the
weights but no optimizer state, or with a ``trainer_state.json`` cut off mid-line. The
Trainer's ``get_last_checkpoint`` picks it by its name alone and every ``--resume`` then dies.
And a checkpoint written by a run whose weights had gone NaN resumes into NaN. So, newest
first, each folder is judged:

- **partial**: a file the Trainer always writes is missing or cut short (safetensors header
  and size, the zip directory of ``*.pt``, ``trainer_state.json`` parsed and naming this
  step); for DeepSpeed and FSDP layouts (the engine's own optimizer files) only
  ``trainer_state.json``, written after them, is read;
- **nonfinite**: a weight or optimizer tensor holds NaN/inf;
- **healthy**: neither. A folder carrying finitetune's marker
  (:data:`~finitetune.rundir.files.CHECKPOINT_MARKER`, written after the state was checked finite
  at save time) is trusted when its file sizes still match, so a resume reads no tensor; other
  folders (a plain Trainer's, one whose marker the crash prevented, or one whose files changed
  after the save: re-sharded, converted, copied) are judged by their content, tensor by
  tensor, one tensor in memory at a time; a change since the save is a note, never a refusal.

Unusable folders are set aside by renaming (``partial-checkpoint-N``, ``nonfinite-checkpoint-N``),
never deleted: the Trainer's resume and ``save_total_limit`` rotation no longer see them (a
half-written folder with the highest step would otherwise be "the most recent checkpoint" that
rotation protects, while it deletes the healthy ones).

Pure torch + safetensors (no transformers): the report-side readers only need the names.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from finitetune.parsing.nesting import json_loads
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import write_json_atomic

WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin",
                "adapter_model.bin")
"""One of these, or a sharded index below, holds the weights of a Trainer checkpoint."""
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
REQUIRED = (OPTIMIZER, SCHEDULER)
"""Written by every Trainer save that can be resumed from (not ``save_only_model``)."""


class Health(str, Enum):
    """The verdict on one checkpoint folder."""

    HEALTHY = "healthy"
    PARTIAL = "partial"
    """Incomplete or cut short: the save was interrupted (or the folder was half deleted)."""
    NONFINITE = "nonfinite"
    """Complete, but a weight or optimizer tensor is NaN or inf."""


@dataclass
class CheckpointHealth:
    """What :func:`inspect_checkpoint` found."""

    path: Path
    step: int
    health: Health
    reason: str = ""
    """Why it is not healthy (one sentence), or how it was checked."""
    marker: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.health == Health.HEALTHY

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        return f"{self.name}: {self.health.value} ({self.reason})"


# --------------------------------------------------------------------------- inspection


def inspect_checkpoint(path: str | os.PathLike, *, scan: bool = True) -> CheckpointHealth:
    """Judge one ``checkpoint-<step>`` folder (see the module docstring).

    ``scan=False`` skips the tensor scan of folders without a valid marker (completeness is
    still checked).
    """
    path = Path(path)
    step = run_files.checkpoint_step(path)
    if not path.is_dir():
        return CheckpointHealth(path, -1 if step is None else step, Health.PARTIAL,
                                "no such folder")
    if step is None:
        return CheckpointHealth(path, -1, Health.PARTIAL, "not a checkpoint-<step> folder")
    marker = read_marker(path)
    changed = _changed_files(path, marker) if marker is not None else ""
    if marker is not None and not changed:
        return CheckpointHealth(path, step, Health.HEALTHY, "checked finite when saved", marker)
    # No marker, or files changed since the save (re-sharded, converted, copied: what users do
    # to checkpoints): the content decides, never the save-time file list
    note = f"; changed since saved ({changed})" if changed else ""
    missing = _incomplete(path, step)
    if missing:
        return CheckpointHealth(path, step, Health.PARTIAL, missing + note, marker)
    if not scan:
        return CheckpointHealth(path, step, Health.HEALTHY, "complete (not scanned)" + note,
                                marker)
    bad = scan_nonfinite(path)
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        return CheckpointHealth(path, step, Health.NONFINITE,
                                f"NaN/inf in {', '.join(bad[:3])}{more}{note}", marker)
    return CheckpointHealth(path, step, Health.HEALTHY, "complete, scanned finite" + note,
                            marker)


def read_marker(path: Path) -> dict[str, Any] | None:
    """finitetune's marker in a checkpoint folder, None if absent or unreadable."""
    try:
        marker = path / run_files.CHECKPOINT_MARKER
        data = json_loads(marker.read_text(encoding="utf-8"), str(marker))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("finite") is True else None


def _changed_files(path: Path, marker: dict[str, Any]) -> str:
    for rel, size in (marker.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing (written when saved)"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size} bytes, {size} when saved (cut short?)"
    return ""


def _incomplete(path: Path, step: int) -> str:
    """Why the folder is not a complete Trainer checkpoint of ``step`` ('' when it is)."""
    if not any(path.iterdir()):
        return "empty folder (the process died as the save began)"
    state = path / run_files.TRAINER_STATE
    try:
        saved = json_loads(state.read_text(encoding="utf-8"), str(state)).get("global_step")
    except FileNotFoundError:
        return f"no {run_files.TRAINER_STATE} (the Trainer writes it last: the save was cut off)"
    except (OSError, ValueError, AttributeError):
        return f"{run_files.TRAINER_STATE} is not valid JSON (cut off mid-write)"
    if saved != step:
        return f"{run_files.TRAINER_STATE} says step {saved}, the folder name {step}"
    if _engine_layout(path):
        return ""  # DeepSpeed / FSDP write their own files; trainer_state.json comes after them
    weights = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
    for index in (path / n for n in INDEX_FILES if (path / n).is_file()):
        try:
            shards = set(json_loads(index.read_text(encoding="utf-8"), str(index))
                         ["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a valid weight index"
        weights += [path / s for s in sorted(shards)]
    if not weights:
        return "no weights file (model.safetensors, adapter_model.safetensors, ...)"
    for f in [*weights, *(path / n for n in REQUIRED)]:
        why = _file_ok(f)
        if why:
            return why
    return ""


def _engine_layout(path: Path) -> str | None:
    """``DeepSpeed`` or ``FSDP`` when the optimizer state is in the engine's own layout (no
    ``optimizer.pt``: ``global_stepN/`` + ``latest``, or ``optimizer_0`` shards)."""
    for p in path.iterdir():
        if p.name == "latest" or p.name.startswith("global_step"):
            return "DeepSpeed"
        if p.name.startswith(("optimizer_0", "pytorch_model_fsdp")):
            return "FSDP"
    return None


def _file_ok(f: Path) -> str:
    if not f.is_file():
        return f"no {f.name} (a resumable checkpoint has it)"
    if f.suffix == ".safetensors":
        return _safetensors_ok(f)
    try:  # torch.save files are zip archives: a cut-off file has no central directory
        with zipfile.ZipFile(f):
            return ""
    except (OSError, zipfile.BadZipFile):
        return f"{f.name} is cut short (not a complete torch.save archive)"


def _safetensors_ok(f: Path) -> str:
    """Header readable and the file as long as the header says (8-byte length + JSON + data)."""
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json_loads(fh.read(n), str(f))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return f"{f.name} has no valid safetensors header (cut short?)"
    if f.stat().st_size < 8 + n + end:
        return f"{f.name} is cut short ({f.stat().st_size} of {8 + n + end} bytes)"
    return ""


def scan_nonfinite(path: Path) -> list[str]:
    """Names of weight and optimizer tensors holding NaN/inf (one tensor in memory at a time
    for safetensors; ``*.pt`` files are memory-mapped). Resume-time only."""
    import torch
    from safetensors import safe_open

    bad: list[str] = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = st.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(key)
    weights_bin = [*path.glob("pytorch_model*.bin"), *path.glob("adapter_model*.bin")]
    for f in sorted([*weights_bin, path / OPTIMIZER]):  # not training_args.bin (a pickle)
        if f.is_file():
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            bad += [f"{f.name}:{k}" for k, t in _tensors(obj)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return bad


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix or "tensor", obj)]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _tensors(v, f"{prefix}.{k}" if prefix
                                                            else str(k))]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _tensors(v, f"{prefix}[{i}]")]
    return []


# --------------------------------------------------------------------------- marker


def write_marker(path: str | os.PathLike, step: int, **extra: Any) -> None:
    """Record that the state saved in ``path`` was checked finite, with its files' sizes.

    Written atomically and last, so its presence means "complete and finite when saved".
    """
    path = Path(path)
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != run_files.CHECKPOINT_MARKER
             and not f.name.startswith(".")}
    write_json_atomic(path / run_files.CHECKPOINT_MARKER,
                      {"step": step, "finite": True, "files": files, **extra})


# --------------------------------------------------------------------------- selection


def select_checkpoint(run_dir: str | os.PathLike, *, scan: bool = True
                      ) -> tuple[CheckpointHealth | None, list[CheckpointHealth]]:
    """The newest healthy checkpoint of ``run_dir`` (None if none) and the newer ones that were
    rejected, newest first. Older checkpoints than the chosen one are not read."""
    rejected: list[CheckpointHealth] = []
    for path in reversed(run_files.checkpoints(run_dir)):
        health = inspect_checkpoint(path, scan=scan)
        if health.ok:
            return health, rejected
        rejected.append(health)
    return None, rejected


def set_aside(health: CheckpointHealth) -> Path:
    """Rename an unusable checkpoint out of the Trainer's sight; returns the new path.

    An older set-aside copy of the same step (an earlier crash at the same point) is replaced.
    """
    import shutil

    prefix = (run_files.NONFINITE_PREFIX if health.health == Health.NONFINITE
              else run_files.PARTIAL_PREFIX)
    target = health.path.with_name(prefix + health.path.name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(health.path, target)
    return target


def newest_healthy_marked(run_dir: str | os.PathLike, *, proven: bool = False
                          ) -> CheckpointHealth | None:
    """The newest checkpoint carrying a valid finitetune marker (no tensor is read); with
    ``proven``, one whose state then gave a clean step (``proven_by_step``): the target of an
    on-disk rollback inside a running job."""
    for path in reversed(run_files.checkpoints(run_dir)):
        health = inspect_checkpoint(path, scan=False)
        if health.ok and health.marker is not None and (
                not proven or health.marker.get("proven_by_step") is not None):
            return health
    return None
