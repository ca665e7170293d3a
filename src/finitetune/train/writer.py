"""The run directory: made once, written as things happen, complete even after a failure.

Rank 0 alone writes here. What goes in it is listed in the README ("The run directory"):
the owner marker first (only a directory carrying it is ever replaced or resumed; see
:mod:`finitetune.rundir.paths`), ``status.json``, ``config.yaml`` and ``label_report.json``
before training, ``metrics.jsonl``/``events.jsonl`` line by line during it, ``final/`` (only
from a model that trained), ``eval.json``, the final ``status.json`` and the three reports at
the end (also when training stopped early).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from finitetune.errors import ConfigError, NonFiniteHalt
from finitetune.parsing.nesting import json_loads
from finitetune.rundir import files as run_files
from finitetune.rundir import paths as output_paths
from finitetune.rundir.jsonio import write_json_atomic, write_text_atomic
from finitetune.settings.config import TrainConfig
from finitetune.settings.recorded import resume_record
from finitetune.train.resume_check import ResumeDecision

log = logging.getLogger("finitetune")


def default_output_dir(cfg: TrainConfig) -> Path:
    """``cfg.output_dir``, or ``runs/<model>-<timestamp>`` when it is not set."""
    return Path(cfg.output_dir or f"runs/{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_output_dir(cfg: TrainConfig) -> None:
    """Raise :class:`~finitetune.errors.OutputError` unless ``cfg.output_dir`` may be used:
    new, empty, or a run directory finitetune created (replaced only with ``--overwrite``,
    continued only with ``--resume``). Reads only: run it before anything is written."""
    output_paths.check_output_dir(default_output_dir(cfg), "--output-dir", resume=cfg.resume,
                                  replace=cfg.overwrite, busy_hint=_BUSY)


_BUSY = "pass --resume to continue it or --overwrite to replace it"


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Create the run directory (with its owner marker); never silently mix a new run into an
    old one, never write into or delete a folder finitetune did not create."""
    return output_paths.prepare_output_dir(default_output_dir(cfg), "--output-dir",
                                           "finitetune train", resume=cfg.resume,
                                           replace=cfg.overwrite, busy_hint=_BUSY)


@contextlib.contextmanager
def record_outcome(out: Path, result: Any, write: bool = True) -> Iterator[None]:
    """Around training: afterwards (also after an exception, which is re-raised) write
    ``eval.json``, ``status.json`` (completed / halted / failed, the step, the error) and the
    reports, so a run that stopped says so. ``write``: False on ranks other than 0."""
    state, error = run_files.RunState.FAILED, None
    try:
        yield
        state = run_files.RunState.COMPLETED
    except NonFiniteHalt as exc:
        state, error = run_files.RunState.HALTED, str(exc)
        raise
    except BaseException as exc:  # recorded, then re-raised: the status must say it failed
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise
    finally:
        if write:
            write_eval(out, result)
            write_status(out, state, result.global_step, error)
            write_reports(out)


def write_status(out: Path, state: run_files.RunState, step: int = 0,
                 error: str | None = None) -> None:
    """``status.json``: running / completed / halted / failed, the last step, the error."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    started = now
    if state != run_files.RunState.RUNNING and (out / run_files.STATUS).is_file():
        with contextlib.suppress(ValueError, AttributeError):  # a broken file: start anew
            started = json_loads((out / run_files.STATUS).read_text(),
                                 str(out / run_files.STATUS)).get("started", now)
    write_json_atomic(out / run_files.STATUS, {"state": state.value, "step": step,
                                                "error": error, "started": started,
                                                "updated": now})


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


@contextlib.contextmanager
def make_run_dir(cfg: TrainConfig, label_report: Any, label_summary: Any,
                 tokenizer: Any, resume: ResumeDecision | None = None) -> Iterator[Path]:
    """Rank 0 makes and fills the run directory and holds its
    :class:`~finitetune.rundir.paths.RunLock` until the block ends (a second ``--resume`` or
    ``--overwrite`` meanwhile is refused); the others get its path (or its error).

    ``resume`` (decided beforehand, :func:`~finitetune.train.resume_check.decide_resume`):
    ``config.yaml`` is kept as the first run wrote it, the settings this resume changes go to
    ``config.resume-N.yaml``, and the tokenizer already saved is kept. A restart from step 0
    writes ``config.yaml`` anew, as a new run does.

    COLLECTIVE (distributed only): one broadcast, which is also the barrier that keeps the
    other ranks from using the directory before it exists. An error on rank 0 travels in it,
    so every rank raises the same error instead of waiting forever.
    """
    from finitetune import distributed
    from finitetune.errors import FinitetuneError

    found: tuple[str | None, str | None] = (None, None)
    with contextlib.ExitStack() as held:
        if distributed.is_main_process():
            try:
                out = prepare_output_dir(cfg)
                held.enter_context(output_paths.RunLock(out, "finitetune train"))
                write_status(out, run_files.RunState.RUNNING)
                _write_settings(out, cfg, resume)
                write_json_atomic(out / run_files.LABEL_REPORT, {**label_report.to_dict(),
                                                                  "policy": label_summary})
                if resume is None or resume.restart or not (
                        out / run_files.TOKENIZER_DIR).is_dir():
                    tokenizer.save_pretrained(out / run_files.TOKENIZER_DIR)
                found = (str(out), None)
            except (FinitetuneError, OSError) as exc:
                if not distributed.is_distributed():
                    raise
                found = (None, f"rank 0: {exc}")
        path, error = distributed.broadcast_object(found)
        if error is not None:
            raise ConfigError(error)
        yield Path(path)


def _write_settings(out: Path, cfg: TrainConfig, resume: ResumeDecision | None) -> None:
    """``config.yaml`` for a new run (or a restart from step 0); for a resume, what it changed
    in ``config.resume-N.yaml`` beside the untouched ``config.yaml``."""
    if resume is None or resume.restart or resume.recorded is None:
        write_text_atomic(out / run_files.CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    if not resume.changes:
        return
    index = resume.recorded.next_index
    name = f"config.resume-{index}.yaml"
    write_text_atomic(out / name, resume_record(
        resume.changes, index, checkpoint=resume.checkpoint.name if resume.checkpoint else None,
        step=resume.step, when=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    changed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in resume.changes.items())
    print(f"finitetune: resume changes {changed} (recorded in {name}; {run_files.CONFIG} keeps "
          "the first run's settings)", flush=True)


def save_final(trainer: Any, tokenizer: Any, out: Path) -> None:
    """``final/``: the adapter (LoRA) or the whole model, as safetensors, with its tokenizer."""
    final = out / run_files.FINAL_DIR
    trainer.model.save_pretrained(str(final), safe_serialization=True)
    tokenizer.save_pretrained(str(final))


def write_eval(out: Path, result: Any) -> None:
    """``eval.json`` from a :class:`~finitetune.train.recipe.RunResult` (keeps an earlier "before")."""
    previous: dict[str, Any] = {}
    if (out / run_files.EVAL).exists():
        with contextlib.suppress(OSError, ValueError):  # unreadable: keep no earlier "before"
            previous = json_loads((out / run_files.EVAL).read_text(), str(out / run_files.EVAL))
    if not isinstance(previous, dict):
        previous = {}
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
