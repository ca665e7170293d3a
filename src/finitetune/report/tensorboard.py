"""TensorBoard event files, read with TensorBoard's own loader (the ``logs`` extra).

The Trainer's ``report_to="tensorboard"`` writes ``output_dir/runs/<date>_<host>/
events.out.tfevents.*``; PyTorch Lightning, torchtitan and many scripts write the same format.
The file format (length-prefixed, CRC-checked protobuf records, appended while training) is
TensorBoard's, so it is read with ``tensorboard``'s ``EventFileLoader``: it resumes where it
stopped, which makes :class:`EventReader` incremental for ``finitetune watch``, and it tolerates
a record cut off mid-write. Scalars are float32 in these files: values match the run's
``trainer_state.json`` to float32 precision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finitetune.errors import ReportInputError

__all__ = ["EVENT_GLOB", "EventReader", "event_dirs", "has_events"]

EVENT_GLOB = "events.out.tfevents.*"
_MAX_DEPTH = 3
INSTALL_HINT = ("reading TensorBoard event files needs the `tensorboard` package: "
                "pip install 'finitetune[logs]'")


def has_events(path: Path) -> bool:
    """Whether ``path`` is an event file or a folder with event files at most 3 levels down."""
    if path.is_file():
        return path.name.startswith("events.out.tfevents.")
    return bool(event_dirs(path))


def event_dirs(path: Path) -> list[Path]:
    """Folders holding event files, ``path`` itself first, then below it (newest last)."""
    found: set[Path] = set()
    for root, dirs, files in os.walk(path):
        depth = len(Path(root).relative_to(path).parts)
        if depth >= _MAX_DEPTH:
            dirs[:] = []
        if any(f.startswith("events.out.tfevents.") for f in files):
            found.add(Path(root))
    return sorted(found, key=lambda d: max(f.stat().st_mtime for f in d.glob(EVENT_GLOB)))


class EventReader:
    """Scalars of one run folder, read incrementally: each :meth:`poll` returns what is new.

    Every event file in the folder is followed (a restarted writer starts a new file).
    """

    def __init__(self, run_dir: Path) -> None:
        try:
            from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
            from tensorboard.util import tensor_util
        except ImportError as exc:
            raise ReportInputError(f"{run_dir}: {INSTALL_HINT}") from exc
        self._loader_cls, self._tensor_util = EventFileLoader, tensor_util
        self.run_dir = run_dir
        self._loaders: dict[Path, Any] = {}

    def poll(self) -> dict[float, dict[str, float]]:
        """New scalar values since the last call: ``{step: {tag: value}}``."""
        rows: dict[float, dict[str, float]] = {}
        files = self.run_dir.glob(EVENT_GLOB) if self.run_dir.is_dir() else [self.run_dir]
        for path in sorted(files):
            loader = self._loaders.get(path)
            if loader is None:
                loader = self._loaders[path] = self._loader_cls(str(path))
            for event in loader.Load():
                for value in event.summary.value:
                    x = self._scalar(value)
                    if x is not None:
                        rows.setdefault(float(event.step), {})[value.tag] = x
        return rows

    def _scalar(self, value: Any) -> float | None:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            return float(value.simple_value)
        if kind != "tensor" or value.metadata.plugin_data.plugin_name not in ("scalars", ""):
            return None
        try:
            array = self._tensor_util.make_ndarray(value.tensor)
        except Exception:  # a tensor TensorBoard itself cannot decode: not a scalar
            return None
        if array.size != 1 or array.dtype.kind not in "fiu":
            return None
        return float(array.reshape(()).item())
