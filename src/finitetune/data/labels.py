"""Label validation: every example keeps at least one supervised token, and we say why not.

When every label of a batch is ``ignore_index`` the mean cross-entropy is 0/0 = NaN, the
Trainer's logging filter prints it as 0.0, and nothing is learned. The causes are few (empty
response, a response marker that is not found, truncation that cuts the response away,
pad = eos masking the EOS), so each example gets named reasons, and the report names the
dominant cause with its fix.

The checks are vectorised: all labels of the data set are concatenated into one numpy array
(straight from Arrow buffers for a ``datasets.Dataset``) and per-example counts come from
``np.add.reduceat`` over the row offsets, so there is no per-token Python loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finitetune.errors import LabelError
from finitetune.numerics.constants import IGNORE_INDEX

# reasons that make an example unusable, reasons that only warn, and the "why" of all_masked
ERRORS = ("all_masked", "length_mismatch", "label_out_of_range")
WARNINGS = ("eos_not_supervised", "few_supervised")
CAUSES = ("empty_response", "template_marker_not_found", "truncated_away")
REASONS = ERRORS + WARNINGS + CAUSES

FIXES = {
    "empty_response": "remove these rows or fill in their responses",
    "template_marker_not_found": "check the response marker: it must appear verbatim in the "
                                 "text of every example",
    "truncated_away": "raise max_length, shorten prompts, or use truncation='prompt_left' / "
                      "on_label_problem='fix' so the prompt is cut instead of the response",
    "all_masked": "make sure the response part of each example is not set to ignore_index",
    "length_mismatch": "input_ids and labels must have the same length in every example",
    "label_out_of_range": "labels must be token ids below the vocabulary size or ignore_index; "
                          "check that the tokenizer matches the model",
    "eos_not_supervised": "keep the EOS that ends each response as a label; with pad = eos, mask "
                          "padding by position (attention mask), not by token id",
    "few_supervised": "these examples teach little; check their responses",
}

_META = ("source", "prompt_len", "response_len", "prompt_cut", "response_cut", "marker_found",
         "max_length")


@dataclass
class LabelReport:
    """What :func:`validate_labels` found. ``indices[reason]`` are example positions."""

    total: int
    usable: int
    counts: dict[str, int] = field(default_factory=dict)
    indices: dict[str, list[int]] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    previews: list[dict] = field(default_factory=list)
    supervised_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no example has an error-level reason."""
        return not any(self.counts.get(r) for r in ERRORS)

    def unusable_indices(self) -> list[int]:
        bad: set[int] = set()
        for reason in ERRORS:
            bad.update(self.indices.get(reason, ()))
        return sorted(bad)

    def dominant_cause(self) -> str | None:
        """The most frequent specific cause of unusable examples (or the error itself)."""
        ranked = [r for r in CAUSES if self.counts.get(r)] or [r for r in ERRORS
                                                                if self.counts.get(r)]
        return max(ranked, key=lambda r: self.counts[r]) if ranked else None

    def explain(self) -> str:
        """One sentence: how many examples fail, why, and what to do."""
        cause = self.dominant_cause()
        if cause is None:
            return f"all {self.total} examples keep at least one supervised token"
        n = self.counts[cause]
        text = f"{n} of {self.total} examples {_PHRASES[cause]}"
        if cause == "truncated_away" and self.details.get("median_prompt_len") is not None:
            text += (f" at max_length={self.details.get('max_length')}; the median prompt is "
                     f"{self.details['median_prompt_len']} tokens")
        return f"{text}: {FIXES[cause]}"

    def raise_if_unusable(self, max_bad_fraction: float = 1.0) -> None:
        """Raise :class:`LabelError` when nothing usable remains (or too much is bad)."""
        bad = self.total - self.usable
        if self.total == 0:
            raise LabelError("the data set is empty: there is nothing to train on")
        if self.usable == 0 or bad / self.total > max_bad_fraction:
            raise LabelError(self.explain())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "usable": self.usable, "ok": self.ok,
                "supervised_tokens": self.supervised_tokens,
                "counts": {r: self.counts.get(r, 0) for r in REASONS},
                "indices": self.indices, "sources": self.sources,
                "explanation": self.explain(), "details": self.details,
                "previews": self.previews}


_PHRASES = {
    "empty_response": "have an empty response",
    "template_marker_not_found": "do not contain the response marker",
    "truncated_away": "lose their response to truncation",
    "all_masked": "have every label masked",
    "length_mismatch": "have input_ids and labels of different lengths",
    "label_out_of_range": "have labels outside the vocabulary",
}


def _columns(data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """(label values, label offsets, label lengths, input_ids lengths, metadata columns)."""
    try:
        import datasets

        is_ds = isinstance(data, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a dependency
        is_ds = False
    if is_ds:
        table = data.with_format(None).data.table
        labels = table.column("labels").combine_chunks()
        values = labels.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        offsets = labels.offsets.to_numpy()
        in_lens = np.asarray(
            table.column("input_ids").combine_chunks().value_lengths().to_numpy(
                zero_copy_only=False), dtype=np.int64)
        meta = {k: table.column(k).to_pylist() for k in _META if k in table.column_names}
        return values, offsets, np.diff(offsets), in_lens, meta
    rows = list(data)
    lab_lens = np.fromiter((len(r["labels"]) for r in rows), dtype=np.int64, count=len(rows))
    in_lens = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))
    values = (np.concatenate([np.asarray(r["labels"], dtype=np.int64) for r in rows])
              if rows and lab_lens.sum() else np.zeros(0, dtype=np.int64))
    offsets = np.concatenate([[0], np.cumsum(lab_lens)])
    meta = {k: [r.get(k) for r in rows] for k in _META if rows and k in rows[0]}
    return values, offsets, lab_lens, in_lens, meta


def _per_row_sum(mask: np.ndarray, offsets: np.ndarray, lens: np.ndarray) -> np.ndarray:
    if len(lens) == 0:
        return np.zeros(0, dtype=np.int64)
    # a trailing 0 makes every offset (also those of empty rows at the end) a valid index
    padded = np.append(mask.astype(np.int64), 0)
    sums = np.add.reduceat(padded, offsets[:-1])
    return np.where(lens > 0, sums, 0)  # reduceat gives the next row's value for empty rows


def validate_labels(
    data: Iterable[dict] | Any,
    *,
    ignore_index: int = IGNORE_INDEX,
    vocab_size: int | None = None,
    eos_token_id: int | None = None,
    min_supervised: int = 1,
    tokenizer: Any = None,
    max_previews: int = 3,
) -> LabelReport:
    """Check every example's labels; see the module docstring for the reasons.

    ``data`` is a ``datasets.Dataset`` or an iterable of dicts with ``input_ids`` and
    ``labels``; rows made by finitetune's own pipeline also carry the lengths that explain
    *why* an example is fully masked. Pass ``tokenizer`` for decoded previews of offenders.
    """
    values, offsets, lens, in_lens, meta = _columns(data)
    n = len(lens)
    supervised = values != ignore_index
    n_sup = _per_row_sum(supervised, offsets, lens)
    flags: dict[str, np.ndarray] = {
        "length_mismatch": lens != in_lens,
        "all_masked": n_sup == 0,
    }
    bad_value = (values < 0) & supervised
    if vocab_size is not None:
        bad_value |= values >= vocab_size
    flags["label_out_of_range"] = _per_row_sum(bad_value, offsets, lens) > 0
    if eos_token_id is not None:
        has_eos = _per_row_sum(values == eos_token_id, offsets, lens) > 0
        flags["eos_not_supervised"] = (n_sup > 0) & ~has_eos
    if min_supervised > 1:
        flags["few_supervised"] = (n_sup > 0) & (n_sup < min_supervised)
    flags.update(_causes(meta, flags["all_masked"]))

    report = LabelReport(total=n, usable=0, supervised_tokens=int(n_sup.sum()))
    unusable = np.zeros(n, dtype=bool)
    for reason in REASONS:
        if reason not in flags:
            continue
        idx = np.flatnonzero(flags[reason])
        if reason in ERRORS:
            unusable[idx] = True
        if idx.size:
            report.counts[reason] = int(idx.size)
            report.indices[reason] = idx.tolist()
            if "source" in meta:
                report.sources[reason] = [str(meta["source"][i]) for i in idx[:1000]]
    report.usable = int(n - unusable.sum())
    report.details = _details(meta, flags)
    if tokenizer is not None:
        report.previews = _previews(data, report, tokenizer, ignore_index, max_previews)
    return report


def _causes(meta: dict, all_masked: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    found = np.ones(len(all_masked), dtype=bool)
    if "marker_found" in meta:
        found = np.asarray([x is not False for x in meta["marker_found"]], dtype=bool)
        out["template_marker_not_found"] = all_masked & ~found
    if "response_len" in meta:
        r_len = np.asarray([x or 0 for x in meta["response_len"]], dtype=np.int64)
        out["empty_response"] = all_masked & found & (r_len == 0)
        if "response_cut" in meta:
            r_cut = np.asarray([x or 0 for x in meta["response_cut"]], dtype=np.int64)
            out["truncated_away"] = all_masked & (r_len > 0) & (r_cut >= r_len)
    return out


def _details(meta: dict, flags: dict[str, np.ndarray]) -> dict[str, Any]:
    details: dict[str, Any] = {}
    if meta.get("max_length"):
        details["max_length"] = meta["max_length"][0]
    trunc = flags.get("truncated_away")
    if trunc is not None and trunc.any() and "prompt_len" in meta:
        p_len = np.asarray(meta["prompt_len"], dtype=np.int64)[trunc]
        r_len = np.asarray(meta["response_len"], dtype=np.int64)[trunc]
        details["median_prompt_len"] = int(np.median(p_len))
        details["median_response_len"] = int(np.median(r_len))
    return details


def _previews(data: Any, report: LabelReport, tokenizer: Any, ignore_index: int,
              limit: int) -> list[dict]:
    """Decode a few offenders with the supervised span shown as [[...]]."""
    out = []
    for reason in REASONS:
        for i in report.indices.get(reason, [])[:limit]:
            row = data[i]
            ids, labels = list(row["input_ids"]), list(row["labels"])
            text, open_ = [], False
            for tok, lab in zip(ids, labels):
                sup = lab != ignore_index
                if sup != open_:
                    text.append("[[" if sup else "]]")
                    open_ = sup
                text.append(tokenizer.decode([tok]))
            if open_:
                text.append("]]")
            out.append({"reason": reason, "index": i, "source": row.get("source"),
                        "text": "".join(text)[-300:]})
    return out
