"""The run directory: made once, written as things happen, complete even after a failure.

Rank 0 alone writes here. What goes in it is listed in the README ("The run directory"):
``config.yaml`` and ``label_report.json`` before training, ``metrics.jsonl``/``events.jsonl``
line by line during it, ``final/``, ``eval.json`` and the three reports at the end (also
when training stopped early).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from finitetune import run_files
from finitetune.config import TrainConfig
from finitetune.errors import ConfigError
from finitetune.jsonio import write_json_atomic, write_text_atomic

log = logging.getLogger("finitetune")


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Create the run directory; never silently mix a new run into an old one."""
    out = Path(cfg.output_dir or f"runs/{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        if not cfg.overwrite:
            raise ConfigError(f"{out} is not empty; pass --resume to continue that run or "
                              "--overwrite to replace it")
        if not (out / run_files.CONFIG).exists():
            raise ConfigError(f"refusing to --overwrite {out}: it is not a finitetune run "
                              "directory (no config.yaml); choose another --output-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def trim_after_checkpoint(out: Path, checkpoint: str | Path) -> None:
    """On resume, drop metric and event lines logged after ``checkpoint``: the resumed run
    logs those steps again, so each is in the files once. Torn lines are repaired (noted in
    the log)."""
    step = run_files.checkpoint_step(checkpoint)
    if step is None:
        raise ConfigError(f"{checkpoint}: not a checkpoint-<step> folder")
    for name in (run_files.METRICS, run_files.EVENTS):
        for note in run_files.trim_jsonl(out / name, step).notes:
            log.warning("finitetune: resume: %s", note)


def make_run_dir(cfg: TrainConfig, label_report: Any, label_summary: Any,
                 tokenizer: Any) -> Path:
    """Rank 0 makes and fills the run directory; the others get its path (or its error).

    COLLECTIVE (distributed only): one broadcast, which is also the barrier that keeps the
    other ranks from using the directory before it exists. An error on rank 0 travels in it,
    so every rank raises the same error instead of waiting forever.
    """
    from finitetune import distributed
    from finitetune.errors import FinitetuneError

    found: tuple[str | None, str | None] = (None, None)
    if distributed.is_main_process():
        try:
            out = prepare_output_dir(cfg)
            write_text_atomic(out / run_files.CONFIG,
                              yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            write_json_atomic(out / run_files.LABEL_REPORT, {**label_report.to_dict(),
                                                              "policy": label_summary})
            tokenizer.save_pretrained(out / run_files.TOKENIZER_DIR)
            found = (str(out), None)
        except (FinitetuneError, OSError) as exc:
            if not distributed.is_distributed():
                raise
            found = (None, f"rank 0: {exc}")
    path, error = distributed.broadcast_object(found)
    if error is not None:
        raise ConfigError(error)
    return Path(path)


def save_final(trainer: Any, tokenizer: Any, out: Path) -> None:
    """``final/``: the adapter (LoRA) or the whole model, as safetensors, with its tokenizer."""
    final = out / run_files.FINAL_DIR
    trainer.model.save_pretrained(str(final), safe_serialization=True)
    tokenizer.save_pretrained(str(final))


def write_eval(out: Path, result: Any) -> None:
    """``eval.json`` from a :class:`~finitetune.recipe.RunResult` (keeps an earlier "before")."""
    previous: dict[str, Any] = {}
    if (out / run_files.EVAL).exists():
        previous = json.loads((out / run_files.EVAL).read_text())
    ev = {
        "before": result.eval_before or previous.get("before"),
        "after": result.eval_after,
        "global_step": result.global_step,
        "train_seconds": result.train_seconds,
    }
    write_json_atomic(out / run_files.EVAL, ev)


def write_reports(out: Path) -> None:
    """``report.md``/``.json``/``.html``; a failure here is logged, never raised, because the
    report must not hide the training outcome (e.g. the NonFiniteHalt being raised)."""
    from finitetune import report

    try:
        report.write_reports(out)
    except Exception as exc:
        log.warning("could not write the health report: %s", exc)
