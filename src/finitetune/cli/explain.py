"""``finitetune explain RUN_DIR``: the timeline of guard events, with their attribution.

One block per event of ``events.jsonl``: step, action and reason, grad norm and loss, the first
module whose output went non-finite, the parameters with non-finite gradients, the verdict
(``precision_overflow``, ``data_or_model``, ``transient``) with its suggestion, the samples (dataset
index and source line) and the saved batch. Reads JSON only: no torch import, instant.

Exit codes: 0 (also for a run without events: every step was applied), 2 when RUN_DIR is not a
run directory or its events cannot be read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from finitetune.errors import ReportInputError
from finitetune.parsing.terminal import printable
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import file_kind

_SHOW = 5


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    """Register the ``explain`` verb."""
    p = subparsers.add_parser("explain", help=help_text, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or its events.jsonl)")
    p.add_argument("--json", action="store_true", help="print the events as a JSON list")
    return p


def load_events(path: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """(run directory, events) of RUN_DIR or of an ``events.jsonl`` path.

    Raises:
        ReportInputError: not a run directory, or an events file with a bad line (named).
    """
    path = Path(path)
    if path.is_file() and path.name.endswith(".jsonl"):
        run_dir, events_file = path.parent, path
    elif path.is_dir():
        run_dir, events_file = path, path / run_files.EVENTS
    elif path.exists():
        kind = "file" if path.is_file() else file_kind(path.resolve())
        raise ReportInputError(f"{path} is a {kind}, not a run directory; give the --output-dir "
                               f"of `finitetune train` or its {run_files.EVENTS}")
    else:
        raise ReportInputError(f"{path} does not exist; give a finitetune run directory "
                               "(the --output-dir of `finitetune train`)")
    if not events_file.is_file() and not run_files.is_run_dir(run_dir):
        raise ReportInputError(f"{run_dir} has no {run_files.EVENTS} and is not a finitetune "
                               f"run directory (no {run_files.METRICS} or {run_files.CONFIG})")
    read = run_files.read_jsonl(events_file, run_files.Tolerance.STRICT)
    for event, line in zip(read.records, read.line_numbers, strict=True):
        check_event(event, f"{events_file}:{line}")
    return run_dir, read.records


_STR, _INT, _NUM = (str,), (int,), (int, float)
_EVENT_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "step": (_INT, "an integer"), "action": (_STR, "a string"), "kind": (_STR, "a string"),
    "reason": (_STR, "a string"), "grad_norm": (_NUM, "a number"), "loss": (_NUM, "a number"),
    "first_nonfinite_module": (_STR, "a string"),
    "first_fp16_overflow_module": (_STR, "a string"),
    "nonfinite_params": ((list,), "a list of parameter names"),
    "nonfinite_param_count": (_INT, "an integer"),
    "nonfinite_weights": ((list,), "a list of parameter names"),
    "top_grad_modules": ((list,), "a list of objects"), "verdict": (_STR, "a string"),
    "suggestion": (_STR, "a string"), "attribution": ((dict,), "an object"),
    "sample_ids": ((list,), "a list"), "sources": ((list,), "a list"),
    "bad_samples": ((list,), "a list of objects"), "batch_file": (_STR, "a string"),
    "attribution_error": (_STR, "a string"),
}
"""The fields ``explain`` shows, with the JSON type each must have (null: absent)."""
_ITEMS = {"nonfinite_params": (str,), "nonfinite_weights": (str,), "top_grad_modules": (dict,),
          "bad_samples": (dict,), "sample_ids": (int, str, type(None)),
          "sources": (str, type(None))}
"""The type of each element of the list fields."""


def check_event(event: dict[str, Any], where: str) -> None:
    """Raise :class:`ReportInputError` naming ``where`` (file:line) and the field whose type is
    wrong, or saying the line is not a guard event at all."""
    if not isinstance(event.get("step"), int) or isinstance(event.get("step"), bool) or not (
            isinstance(event.get("action"), str) or isinstance(event.get("kind"), str)):
        raise ReportInputError(f"{where}: not a guard event (an event has an integer 'step' and "
                               f"an 'action'); is this the run's {run_files.EVENTS}?")
    for key, (types, what) in _EVENT_FIELDS.items():
        value = event.get(key)
        if value is None:
            continue
        bad = not isinstance(value, types) or isinstance(value, bool)
        items = _ITEMS.get(key)
        if not bad and items is not None:
            bad = any(not isinstance(v, items) or isinstance(v, bool) for v in value)
        if not bad and key == "attribution":
            replays = value.get("replays") or []
            if not isinstance(replays, list) or any(not isinstance(r, dict) for r in replays):
                bad, what = True, "an object whose 'replays' is a list of objects"
        if bad:
            raise ReportInputError(f"{where}: field {key!r} is {json.dumps(value)[:80]}, "
                                   f"expected {what}; was the file edited?")


def _num(event: dict[str, Any], key: str) -> str:
    """A number as written (strict JSON keeps NaN/inf as ``null`` + ``<key>_nonfinite``)."""
    value = event.get(key)
    if value is None:
        return event.get(f"{key}_nonfinite") or "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _few(names: list[str], total: int | None = None) -> str:
    total = len(names) if total is None else total
    more = f" (+{total - _SHOW} more)" if total > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _samples(event: dict[str, Any]) -> list[str]:
    ids, sources = event.get("sample_ids") or [], event.get("sources") or []
    bad = {s.get("index") for s in event.get("bad_samples") or []}
    out = []
    for k, sid in enumerate(ids):
        src = sources[k] if k < len(sources) and sources[k] else None
        mark = " <- non-finite" if sid in bad else ""
        out.append(f"{sid}{f' ({src})' if src else ''}{mark}")
    return sorted(out, key=lambda s: not s.endswith("<- non-finite"))  # named ones first


def format_event(event: dict[str, Any], run_dir: Path) -> str:
    """The readable block of one event."""
    if event.get("kind") in ("checkpoint", "resume"):  # saves refused, resumes, rollbacks
        return f"{event.get('message') or event.get('action')}"
    head = (f"step {event.get('step', '?')}: {event.get('action', event.get('kind', 'event'))}"
            f" ({event.get('reason') or 'no reason'})  grad_norm {_num(event, 'grad_norm')}  "
            f"loss {_num(event, 'loss')}")
    lines = [head]
    if event.get("first_nonfinite_module"):
        lines.append(f"  first non-finite module: {event['first_nonfinite_module']}")
    if event.get("first_fp16_overflow_module"):
        lines.append(f"  first output beyond the fp16 range (65504): "
                     f"{event['first_fp16_overflow_module']}")
    if event.get("nonfinite_params"):
        total = event.get("nonfinite_param_count") or len(event["nonfinite_params"])
        lines.append(f"  non-finite gradients: {total} parameters: "
                     f"{_few(event['nonfinite_params'], total)}")
    if event.get("nonfinite_weights"):
        lines.append(f"  non-finite weights: {_few(event['nonfinite_weights'])}")
    top = event.get("top_grad_modules") or []
    if top and not event.get("nonfinite_params"):
        lines.append("  largest gradients: " + ", ".join(
            f"{t.get('module')} {_num(t, 'max_abs')}" for t in top[:_SHOW]))
    if event.get("verdict"):
        lines.append(f"  verdict: {event['verdict']}: {event.get('suggestion') or ''}".rstrip())
    for r in (event.get("attribution") or {}).get("replays") or []:
        fp32 = str(r.get("fp32") or "")
        if len(event["attribution"]["replays"]) > 1 or r.get("backward") or (
                fp32 and not fp32.startswith("same")):
            extra = "".join(f", {k} {r[k]}" for k in ("fp32", "backward", "backward_fp32")
                            if r.get(k))
            lines.append(f"  micro-batch {r.get('micro_batch')}: {r.get('original')} in "
                         f"{r.get('precision')}{extra} -> {r.get('verdict')}")
    samples = _samples(event)
    if samples:
        lines.append(f"  samples: {_few(samples)}")
        others = [s for s in event.get("bad_samples") or []
                  if s.get("index") is not None and s["index"] not in (event.get("sample_ids")
                                                                       or [])]
        lines += [f"    {s['index']} ({s.get('source')}) <- non-finite" for s in others]
    if event.get("batch_file"):
        lines.append(f"  batch: {run_dir / event['batch_file']}")
    if event.get("attribution_error"):
        lines.append(f"  attribution failed: {event['attribution_error']}")
    return "\n".join(lines)


def explain(path: str | Path) -> str:
    """The whole timeline as text (what ``finitetune explain`` prints)."""
    run_dir, events = load_events(path)
    if not events:
        return f"{run_dir}: no guard events: every optimizer step was applied.\n"
    kinds: dict[str, int] = {}
    for e in events:
        kinds[str(e.get("action") or e.get("kind"))] = kinds.get(
            str(e.get("action") or e.get("kind")), 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items())
    blocks = [format_event(e, run_dir) for e in events]
    bad = run_files.read_jsonl(run_dir / run_files.BAD_SAMPLES, run_files.Tolerance.TOLERANT)
    if bad.records:
        from finitetune.report.history import bad_sample_lines

        blocks.append("remembered bad samples (bad_samples.jsonl; left out of later batches "
                      "as guard.skip_bad_samples says):\n" + "\n".join(
            f"  {line}" for line in bad_sample_lines(bad.records)))
    return f"{run_dir}: {len(events)} guard events ({summary})\n\n" + "\n\n".join(blocks) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print the timeline (or the events as JSON); 0 unless the input is unusable."""
    if args.json:
        _, events = load_events(args.run_dir)
        sys.stdout.write(json.dumps(events, indent=2, allow_nan=False) + "\n")
        return 0
    sys.stdout.write(printable(explain(args.run_dir)))
    return 0
