"""Fingerprints of training rows and of a data set: samples named by what they hold.

The guard remembers the samples of faulty steps (``bad_samples.jsonl``) so that a resumed run
never feeds them again. A row index names a sample only while the file stays as it was: five
lines inserted at the top and index 49 is another row, the poisoned one has moved to 54, and a
resume keyed by index would drop a healthy row and train on the poisoned one. So each
remembered sample also carries the fingerprint of its content, and each record the
fingerprint of the whole data set: when the data changed, a resume finds the remembered rows
by content (:func:`finitetune.guard.sample_remap.remap`), and says which it
could not find.

A row's fingerprint is the SHA-256 of the canonical JSON of the record as read (its fields,
keys sorted, without where it came from), cut to :data:`DIGITS` hex digits; the data set's is
the SHA-256 of its rows' fingerprints in file order. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DIGITS", "RowFingerprints", "data_fingerprint", "row_fingerprint"]

DIGITS = 16
"""Hex digits kept (64 bits: no two rows of any real data set collide)."""
_NOT_CONTENT = ("source", "index")
"""Keys that say where a record is, not what it holds."""


def row_fingerprint(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no source), :data:`DIGITS` digits."""
    content = {k: v for k, v in record.items() if k not in _NOT_CONTENT}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGITS]


def data_fingerprint(row_fingerprints: Sequence[str]) -> str:
    """The data set's fingerprint: its rows' fingerprints, in order."""
    return hashlib.sha256("\n".join(row_fingerprints).encode("ascii")).hexdigest()[:DIGITS]


@dataclass
class RowFingerprints:
    """The fingerprints of a run's training rows: by dataset index, and of the whole file."""

    data: str
    """:func:`data_fingerprint` of every record of the data (training and held out)."""
    rows: Mapping[int, str] = field(default_factory=dict)
    """Dataset index (the rows' ``index``) -> :func:`row_fingerprint`."""

    @classmethod
    def of(cls, records: Sequence[Mapping[str, Any]],
           train_records: Sequence[Mapping[str, Any]]) -> RowFingerprints:
        """Of the data's ``records`` (file order) and its training rows (by index)."""
        return cls(data_fingerprint([row_fingerprint(r) for r in records]),
                   {i: row_fingerprint(r) for i, r in enumerate(train_records)})

    def indices(self) -> dict[str, list[int]]:
        """Fingerprint -> the indices of the rows that hold it (duplicates share one)."""
        out: dict[str, list[int]] = {}
        for i, fp in self.rows.items():
            out.setdefault(fp, []).append(i)
        return out
