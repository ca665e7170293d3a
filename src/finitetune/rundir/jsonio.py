"""Strict JSON in and out.

Python's ``json`` writes ``NaN`` and ``Infinity`` tokens that strict readers (jq, JavaScript,
most log shippers) reject. Everything finitetune writes goes through :func:`dumps_strict`, which
stores a non-finite float as ``null`` and records what it was under ``"<key>_nonfinite"``.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def nonfinite_name(x: float) -> str:
    """``"nan"``, ``"inf"`` or ``"-inf"`` for a non-finite float."""
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def to_jsonable(obj: Any) -> Any:
    """Turn ``obj`` into something ``json.dumps(allow_nan=False)`` accepts.

    In a dict, a non-finite float value ``v`` under key ``k`` becomes ``k: null`` plus
    ``k_nonfinite: "nan"|"inf"|"-inf"`` so the information survives. Elsewhere (lists, bare
    values) it becomes ``null``. Tensors and numpy scalars are converted to Python numbers.
    """
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            value = _scalar(value)
            if isinstance(value, float) and not math.isfinite(value):
                out[str(key)] = None
                out[f"{key}_nonfinite"] = nonfinite_name(value)
            else:
                out[str(key)] = to_jsonable(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    obj = _scalar(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _scalar(value: Any) -> Any:
    # numpy scalars and 0-d tensors expose .item(); this is called off the hot path only.
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def decode_nonfinite(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`to_jsonable` for one dict: ``k: null, k_nonfinite: "nan"`` -> ``k: nan``."""
    out = dict(entry)
    for key, value in entry.items():
        if key.endswith("_nonfinite") and isinstance(value, str):
            base = key[: -len("_nonfinite")]
            if out.get(base) is None:
                try:
                    out[base] = float(value)
                except ValueError:  # not one of ours ("nan"/"inf"/"-inf"): leave it as is
                    continue
            del out[key]
    return out


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never emits ``NaN``/``Infinity`` (see :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kwargs)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one strict-JSON line and flush it, so a crash loses at most the current line."""
    line = dumps_strict(record)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write strict JSON to ``path`` via a temp file + rename: readers never see half a file."""
    write_text_atomic(path, dumps_strict(obj, indent=indent) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Atomically replace ``path`` with ``text``.

    Only a regular file (or nothing) is replaced: the rename would go through anything, so a
    device, a FIFO, a directory or a symbolic link at ``path`` raises
    :class:`~finitetune.errors.OutputError` and stays as it was.
    """
    path = Path(path)
    _refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        _refuse_special(path)  # again, just before the rename: it may have appeared meanwhile
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_kind(path: str | os.PathLike) -> str | None:
    """What is at ``path`` without following a symlink: ``"regular file"``, ``"directory"``,
    ``"symbolic link"``, ``"FIFO (named pipe)"``, ``"character device"``, ``"block device"``,
    ``"socket"``; None when nothing is there."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _refuse_special(path: Path) -> None:
    kind = file_kind(path)
    if kind not in (None, "regular file"):
        from finitetune.errors import OutputError

        raise OutputError(f"{path} is a {kind}, not a regular file: refusing to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
