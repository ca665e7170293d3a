"""A long run's history in words: refused checkpoint saves, the pinned checkpoint, resumes and
on-disk rollbacks (from ``events.jsonl``), and the remembered bad samples with their source
lines (from ``bad_samples.jsonl``). Shared by the health report and ``finitetune explain``.

Pure Python over the JSON records.
"""

from __future__ import annotations

from typing import Any

_SHOW = 8


def history_items(guard: dict[str, Any]) -> list[str]:
    """One line per checkpoint/resume event and per remembered faulty step (its samples are
    left out of later batches as ``guard.skip_bad_samples`` says)."""
    out = [str(e.get("message") or f"step {e.get('step')}: {e.get('action')}")
           for e in guard.get("checkpoint_events") or []]
    out += bad_sample_lines(guard.get("bad_samples") or [])
    return out


def bad_sample_lines(entries: list[dict[str, Any]]) -> list[str]:
    """One line per ``bad_samples.jsonl`` entry. When a resume found remembered samples at
    other rows of changed data (its ``remap`` line), each names its current row too."""
    where: dict[str, str] = {}  # fingerprint -> where the row is now, as of the last resume
    for e in entries:
        if e.get("kind") == "remap":
            for m in e.get("moved") or []:
                where[str(m.get("fingerprint"))] = f"now {m.get('now')} at {m.get('source')}"
            for m in e.get("missing") or []:
                where[str(m.get("fingerprint"))] = "not among the training rows any more"
    return [bad_sample_line(e, where) for e in entries]


def samples_text(ids: list[Any], sources: list[Any] | None,
                 now: list[str | None] | None = None) -> str:
    """``12 (d.jsonl:13), 40 (d.jsonl:41; now 45 at d.jsonl:46)`` (the first few, then a
    count); ``now``: where each sample is today, when the data changed."""
    sources, now = sources or [], now or []
    parts = []
    for k, i in enumerate(ids):
        notes = [str(x) for x in (sources[k] if k < len(sources) else None,
                                  now[k] if k < len(now) else None) if x]
        parts.append(f"{i} ({'; '.join(notes)})" if notes else str(i))
    more = f" (+{len(parts) - _SHOW} more)" if len(parts) > _SHOW else ""
    return ", ".join(parts[:_SHOW]) + more if parts else "no sample ids (no index in the rows)"


def _remap_line(entry: dict[str, Any]) -> str:
    moved = [f"{m.get('sample_id')} ({m.get('was')}) is now {m.get('now')} ({m.get('source')})"
             for m in entry.get("moved") or []]
    missing = [f"{m.get('sample_id')} ({m.get('was')})" for m in entry.get("missing") or []]
    text = "resume on changed data: remembered samples found by content"
    text += (": " + ", ".join(moved[:_SHOW])) if moved else ""
    if missing:
        text += "; not found among the training rows: " + ", ".join(missing[:_SHOW])
    return text


def bad_sample_line(entry: dict[str, Any], where: dict[str, str] | None = None) -> str:
    """One ``bad_samples.jsonl`` entry as a sentence; ``where``: fingerprint -> where that row
    is now (:func:`bad_sample_lines`)."""
    if entry.get("kind") == "remap":
        return _remap_line(entry)
    step = entry.get("step", "?")
    ids, sources = entry.get("sample_ids") or [], entry.get("sources")
    fps = entry.get("fingerprints") or []
    now_of = {i: (where or {}).get(str(fps[k])) if k < len(fps) else None
              for k, i in enumerate(ids)}
    def text(chosen: list[Any]) -> str:
        src = dict(zip(ids, sources or [], strict=False))
        return samples_text(chosen, [src.get(i) for i in chosen], [now_of.get(i) for i in chosen])
    if entry.get("kind") == "window":
        return (f"step {step}: window {entry.get('side', '')} the faulty step, also skipped: "
                f"{text(ids)}")
    head = f"step {step} ({entry.get('reason')}, {entry.get('action')}): "
    if entry.get("cause") == "nonfinite_state":
        return (head + "samples " + text(ids) + " NOT left out later: the weights were "
                "already non-finite, any batch would have failed")
    culprits = [i for i in entry.get("culprits") or [] if i in ids]
    if not culprits:
        return head + "samples " + text(ids)
    others = [i for i in ids if i not in culprits]
    return (head + "non-finite in the replay: " + text(culprits)
            + ("; the step's other samples: " + text(others) if others else ""))
