"""Remembered bad samples found again in data that changed since they were recorded.

Each ``bad_samples.jsonl`` entry names its samples by dataset index *and* by the fingerprint of
their content, with the fingerprint of the data it was recorded on
(:mod:`finitetune.data.fingerprint`). When a resumed run reads other data (lines inserted,
removed, reordered), the indices no longer name those rows: :func:`remap` finds each
remembered row by its fingerprint among the current training rows (a row that now appears
twice is found twice) and says which it could not find (edited, removed, or now held out for
evaluation). Entries without fingerprints (written before they were recorded) keep their
indices. Pure Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finitetune.data.fingerprint import RowFingerprints

__all__ = ["Remap", "remap"]


@dataclass
class Remap:
    """What :func:`remap` did."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    """The entries with ``sample_ids`` (and ``culprits``) in today's indices."""
    moved: list[dict[str, Any]] = field(default_factory=list)
    """``{sample_id, was, now, source, fingerprint}`` of each row found at another index."""
    missing: list[dict[str, Any]] = field(default_factory=list)
    """``{sample_id, was, fingerprint}`` of each row not among today's training rows."""
    found: int = 0
    """Remembered rows found by content (moved or not)."""

    def record(self, data: str) -> dict[str, Any] | None:
        """The ``bad_samples.jsonl`` line that says what moved (None when nothing did)."""
        if not (self.moved or self.missing):
            return None
        return {"kind": "remap", "data": data, "moved": self.moved, "missing": self.missing}

    def message(self) -> str:
        """One sentence for the console at start-up ('' when the data did not change)."""
        if not (self.moved or self.missing or self.found):
            return ""
        text = ("the data changed since samples were remembered as bad (bad_samples.jsonl); "
                f"found by content: {self.found}")
        if self.moved:
            text += " (" + ", ".join(f"{m['sample_id']} ({m['was']}) is now {m['now']} "
                                     f"({m['source']})" for m in self.moved[:5])
            text += f", +{len(self.moved) - 5} more)" if len(self.moved) > 5 else ")"
        if self.missing:
            text += ("; NOT found among today's training rows (edited, removed or now held "
                     "out), so nothing is left out for them: " + ", ".join(
                         f"{m['sample_id']} ({m['was']})" for m in self.missing[:5]))
        return text


def remap(entries: list[dict[str, Any]], current: RowFingerprints,
          source: Callable[[int], str | None]) -> Remap:
    """Translate the entries recorded on other data to ``current``'s indices."""
    out = Remap()
    by_fp = current.indices()
    seen: set[str] = set()
    for entry in entries:
        fps = entry.get("fingerprints")
        ids = entry.get("sample_ids")
        if (entry.get("data") in (None, current.data) or not isinstance(fps, list)
                or not isinstance(ids, list) or len(fps) != len(ids)):
            out.entries.append(entry)
            continue
        now: dict[Any, list[int]] = {}
        sources = entry.get("sources") or []
        for k, (old, fp) in enumerate(zip(ids, fps, strict=True)):
            now[old] = list(by_fp.get(fp, [])) if isinstance(fp, str) else []
            if not isinstance(fp, str) or fp in seen:
                continue
            seen.add(fp)
            was = sources[k] if k < len(sources) else None
            if not now[old]:
                out.missing.append({"sample_id": old, "was": was, "fingerprint": fp})
                continue
            out.found += 1
            out.moved += [{"sample_id": old, "was": was, "now": i, "source": source(i),
                           "fingerprint": fp} for i in now[old] if i != old]
        translated = dict(entry, sample_ids=[i for old in ids for i in now.get(old, [])])
        if isinstance(entry.get("culprits"), list):
            translated["culprits"] = [i for old in entry["culprits"] for i in now.get(old, [])]
        out.entries.append(translated)
    return out
