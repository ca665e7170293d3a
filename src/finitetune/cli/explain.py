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

from finitetune import run_files
from finitetune.errors import ReportInputError

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
        raise ReportInputError(f"{path} is a file, not a run directory; give the --output-dir "
                               f"of `finitetune train` or its {run_files.EVENTS}")
    else:
        raise ReportInputError(f"{path} does not exist; give a finitetune run directory "
                               "(the --output-dir of `finitetune train`)")
    if not events_file.is_file() and not run_files.is_run_dir(run_dir):
        raise ReportInputError(f"{run_dir} has no {run_files.EVENTS} and is not a finitetune "
                               f"run directory (no {run_files.METRICS} or {run_files.CONFIG})")
    return run_dir, run_files.read_jsonl(events_file, run_files.Tolerance.STRICT).records


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
        from finitetune.report.history import bad_sample_line

        blocks.append("remembered bad samples (bad_samples.jsonl; left out of later batches "
                      "as guard.skip_bad_samples says):\n" + "\n".join(
            f"  {bad_sample_line(e)}" for e in bad.records))
    return f"{run_dir}: {len(events)} guard events ({summary})\n\n" + "\n\n".join(blocks) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print the timeline (or the events as JSON); 0 unless the input is unusable."""
    if args.json:
        _, events = load_events(args.run_dir)
        sys.stdout.write(json.dumps(events, indent=2, allow_nan=False) + "\n")
        return 0
    sys.stdout.write(explain(args.run_dir))
    return 0
