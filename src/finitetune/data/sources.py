"""Read training examples from JSONL, CSV, Parquet or a ``datasets.save_to_disk`` folder.

Every record keeps where it came from (``source``: ``file:line`` for text formats, ``file#row``
otherwise) so that a later error, a label report or a fault attribution can point at the line a
person has to fix. Every problem is a :class:`DataError` that names file, line and the fix.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from finitetune.errors import DataError, NestingError
from finitetune.parsing.nesting import json_loads

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf_disk"
        raise DataError(
            f"{path} is a directory but not a saved dataset (no dataset_info.json); give a "
            "JSONL/CSV/Parquet file or a folder written by Dataset.save_to_disk"
        )
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"unknown data format {path.suffix!r} for {path}; use .jsonl, .csv, .parquet or a "
            "datasets.save_to_disk folder"
        )
    return fmt


def load_records(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str = "messages",
    text_field: str | None = None,
) -> list[dict[str, Any]]:
    """Load and check every record; returns ``{"prompt", "response"}`` or ``{"messages"}`` dicts.

    Checking happens here, before tokenisation, so a bad line 7,000 of a file fails in a
    second with its line number instead of minutes into training. With ``text_field`` (used
    with a response marker) rows are ``{"text"}`` instead.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not (path.is_file() or path.is_dir()):  # reading a FIFO or a device would never end
        raise DataError(f"data path {path} is not a regular file or a directory (a FIFO or a "
                        "device?); give a JSONL, CSV or Parquet file or a saved dataset folder")
    fmt = detect_format(path)
    reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet,
              "hf_disk": _read_hf_disk}[fmt]
    records = []
    for where, row in reader(path):
        if text_field:
            records.append(_check_text_row(row, where, text_field))
        else:
            records.append(_check_row(row, where, prompt_field, response_field,
                                      messages_field))
    if not records:
        raise DataError(f"{path} holds no examples (empty data set); nothing to train on")
    return records


def _read_jsonl(path: Path):
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json_loads(line, where)
            except NestingError as exc:
                raise DataError(str(exc)) from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _read_csv(path: Path):
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                # line_num is the physical line the row ended on (quoted fields may span lines)
                yield f"{path}:{reader.line_num}", dict(row)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 near byte {exc.start}; re-encode as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as Parquet ({exc})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}#row{i}", row


def _read_hf_disk(path: Path):
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load the saved dataset ({exc})") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: saved DatasetDict has no 'train' split ({list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{path}#row{i}", row


def _check_row(row: dict, where: str, prompt_f: str, response_f: str, messages_f: str) -> dict:
    if messages_f in row and row[messages_f] is not None:
        messages = row[messages_f]
        if isinstance(messages, str):
            try:
                messages = json_loads(messages, f"{where}: field {messages_f!r}")  # CSV cells
            except NestingError as exc:
                raise DataError(str(exc)) from None
            except json.JSONDecodeError:
                raise DataError(f"{where}: field {messages_f!r} is a string, not a list of "
                                "messages") from None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field {messages_f!r} must be a non-empty list of "
                            "{'role': ..., 'content': ...}")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {j} must have string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message; nothing to learn from this example")
        return {"messages": messages, "source": where}
    missing = [f for f in (prompt_f, response_f) if f not in row]
    if missing:
        raise DataError(
            f"{where}: missing field {missing[0]!r} (found: {', '.join(map(str, row)) or 'none'}); "
            f"each example needs {prompt_f!r} and {response_f!r}, or {messages_f!r}"
        )
    for f in (prompt_f, response_f):
        if not isinstance(row[f], str):
            raise DataError(f"{where}: field {f!r} is {type(row[f]).__name__}, expected a string")
    return {"prompt": row[prompt_f], "response": row[response_f], "source": where}


def _check_text_row(row: dict, where: str, text_f: str) -> dict:
    if text_f not in row:
        raise DataError(f"{where}: missing field {text_f!r} (found: {', '.join(map(str, row))})")
    if not isinstance(row[text_f], str):
        raise DataError(f"{where}: field {text_f!r} is {type(row[text_f]).__name__}, "
                        "expected a string")
    return {"text": row[text_f], "source": where}
