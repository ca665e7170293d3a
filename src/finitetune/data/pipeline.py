"""Records -> validated training rows, with the label policy applied and explained.

Shared by ``finitetune train`` and ``finitetune check`` (loading included) so both judge data
identically.
"""

from __future__ import annotations

from typing import Any

from finitetune.data.labels import ERRORS, LabelReport, validate_labels
from finitetune.data.tokenize import tokenize_records
from finitetune.errors import ConfigError, LabelError
from finitetune.settings.config import DataConfig, LabelPolicy


def load_data_records(data: DataConfig, model: str = "tiny", seed: int = 0) -> list[dict]:
    """The records ``train`` and ``check`` read: ``data.path`` with its field names, else the
    embedded task that goes with a built-in ``model``.

    Raises:
        DataError: the file cannot be read (names file and line).
        ConfigError: no ``data.path`` and ``model`` has no embedded task.
    """
    from finitetune.data.sources import load_records

    if data.path:
        return load_records(data.path, prompt_field=data.prompt_field,
                            response_field=data.response_field,
                            messages_field=data.messages_field,
                            text_field=data.text_field if data.response_marker else None)
    from finitetune.builtin import tasks as demo

    if model == "tiny":
        return demo.tiny_task(1400, seed=seed)
    if model == "demo":
        return demo.bbc_topics()
    raise ConfigError(f"--model {model} has no embedded task: pass --data FILE")


def tokenize_with(records: list[dict], tokenizer: Any, data: DataConfig,
                  truncation: str | None = None) -> list[dict]:
    return tokenize_records(records, tokenizer, max_length=data.max_length,
                            template=data.template, truncation=truncation or data.truncation,
                            response_marker=data.response_marker,
                            min_response_tokens=data.min_response_tokens)


def validate_rows(rows: list[dict], tokenizer: Any, data: DataConfig) -> LabelReport:
    return validate_labels(rows, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                           min_supervised=data.min_response_tokens, tokenizer=tokenizer)


def prepare_rows(records: list[dict], tokenizer: Any,
                 data: DataConfig) -> tuple[list[dict], LabelReport, dict]:
    """Tokenise, validate and apply ``data.on_label_problem``.

    Returns the usable rows, the report of the data *as given* (before any fix), and a summary
    of what the policy did. Raises :class:`LabelError` when the policy is ``error`` and an
    example is unusable, or when nothing usable remains.
    """
    rows = tokenize_with(records, tokenizer, data)
    report = validate_rows(rows, tokenizer, data)
    bad = report.unusable_indices()
    summary: dict[str, Any] = {"policy": LabelPolicy(data.on_label_problem).value, "total": report.total,
                               "unusable": len(bad), "fixed": 0, "dropped": 0}
    if bad and data.on_label_problem is LabelPolicy.ERROR:
        where = ", ".join(_where(report, i) for i in bad[:5])
        raise LabelError(f"{report.explain()} (examples {where}{' ...' if len(bad) > 5 else ''}); "
                         "use on_label_problem=drop or fix to continue without them")
    if bad and data.on_label_problem is LabelPolicy.FIX:
        repaired = tokenize_with([records[i] for i in bad], tokenizer, data, truncation="fix")
        recheck = validate_rows(repaired, tokenizer, data)
        still_bad = set(recheck.unusable_indices())
        for k, i in enumerate(bad):
            if k not in still_bad:
                rows[i] = {**repaired[k], "index": i}
                summary["fixed"] += 1
        bad = [i for k, i in enumerate(bad) if k in still_bad]
    if report.usable == 0 and summary["fixed"] == 0:
        raise LabelError(f"no usable training example: {report.explain()}")
    drop = set(bad)
    summary["dropped"] = len(drop)
    kept = [r for i, r in enumerate(rows) if i not in drop]
    summary["usable"] = len(kept)
    return kept, report, summary


def _where(report: LabelReport, i: int) -> str:
    for reason in ERRORS:
        idx = report.indices.get(reason, [])
        if i in idx and reason in report.sources:
            return report.sources[reason][idx.index(i)]
    return f"#{i}"


def describe(summary: dict, report: LabelReport) -> str:
    """One line for the console: totals and what the policy did."""
    text = f"label validation: {summary['total']} examples, {report.usable} usable"
    if summary["unusable"]:
        text += f"; {report.explain()}"
        if summary["fixed"]:
            text += f"; fixed {summary['fixed']}"
        if summary["dropped"]:
            text += f"; dropped {summary['dropped']}"
    warn = {r: report.counts[r] for r in ("eos_not_supervised", "few_supervised")
            if report.counts.get(r)}
    if warn:
        text += "; warnings: " + ", ".join(f"{r} {n}" for r, n in warn.items())
    return text
