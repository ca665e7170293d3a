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
    out += [bad_sample_line(e) for e in guard.get("bad_samples") or []]
    return out


def samples_text(ids: list[Any], sources: list[Any] | None) -> str:
    """``12 (d.jsonl:13), 40 (d.jsonl:41)`` (the first few, then a count)."""
    sources = sources or []
    parts = [f"{i} ({sources[k]})" if k < len(sources) and sources[k] else str(i)
             for k, i in enumerate(ids)]
    more = f" (+{len(parts) - _SHOW} more)" if len(parts) > _SHOW else ""
    return ", ".join(parts[:_SHOW]) + more if parts else "no sample ids (no index in the rows)"


def bad_sample_line(entry: dict[str, Any]) -> str:
    """One ``bad_samples.jsonl`` entry as a sentence."""
    step = entry.get("step", "?")
    ids, sources = entry.get("sample_ids") or [], entry.get("sources")
    if entry.get("kind") == "window":
        return (f"step {step}: window {entry.get('side', '')} the faulty step, also skipped: "
                f"{samples_text(ids, sources)}")
    head = f"step {step} ({entry.get('reason')}, {entry.get('action')}): "
    if entry.get("cause") == "nonfinite_state":
        return (head + "samples " + samples_text(ids, sources) + " NOT left out later: the "
                "weights were already non-finite, any batch would have failed")
    culprits = [i for i in entry.get("culprits") or [] if i in ids]
    if not culprits:
        return head + "samples " + samples_text(ids, sources)
    where = dict(zip(ids, sources or [], strict=False))
    others = [i for i in ids if i not in culprits]
    return (head + "non-finite in the replay: " + samples_text(culprits, [where.get(i) for i in
                                                                             culprits])
            + ("; the step's other samples: " + samples_text(others, [where.get(i) for i in
                                                                      others]) if others else ""))
