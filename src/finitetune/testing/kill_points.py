"""Test hook: SIGKILL the training process at a named, deterministic point.

Crash-safety tests need a process that dies *exactly* mid-save or mid-log, which a timer-based
kill hits only by luck. With ``FINITETUNE_TEST_KILL=<point>[:<step>]`` in the environment,
:func:`~finitetune.integrations.hf.trainer.build_trainer` adds this callback, which kills its own
process (SIGKILL: no ``finally``, no flush, no atexit, as a scheduler's kill or an OOM kill) at:

- ``step:N``: inside optimizer step N, after the backward passes, before the update;
- ``save:N``: inside the checkpoint save of step N, after the weights were written and in the
  middle of writing ``optimizer.pt`` (half of its bytes are on disk);
- ``log:N``: after the metrics line of step N, in the middle of writing the next line;
- ``end``: right after the last checkpoint was saved (before ``final/`` and the evaluation).

Unset (always, outside tests) nothing is added.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

ENV = "FINITETUNE_TEST_KILL"


def from_env(trainer: Any = None) -> list[TrainerCallback]:
    """``[KillPoint]`` when ``FINITETUNE_TEST_KILL`` is set, else ``[]``."""
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return []
    point, _, step = spec.partition(":")
    if point not in ("step", "save", "log", "end") or (point != "end" and not step.isdigit()):
        raise ValueError(f"{ENV}={spec!r}: use step:N, save:N, log:N or end")
    return [KillPoint(point, int(step or 0))]


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillPoint(TrainerCallback):
    """Kills the process at one point (see the module docstring)."""

    def __init__(self, point: str, step: int) -> None:
        self.point, self.step = point, step
        self.trainer: Any = None

    def set_trainer(self, trainer: Any) -> None:
        """Bound by the construction hook (:mod:`finitetune.integrations.hf.mixin`)."""
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.point != "save":
            return
        trainer = self.trainer
        write = trainer._save_optimizer_and_scheduler

        def half_written(output_dir: str) -> Any:
            if trainer.state.global_step != self.step:
                return write(output_dir)
            tmp = Path(output_dir) / ".kill-probe"
            tmp.mkdir(parents=True, exist_ok=True)
            write(str(tmp))  # the real bytes, then half of them where they belong
            data = (tmp / "optimizer.pt").read_bytes()
            with open(Path(output_dir) / "optimizer.pt", "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
            _die()

        trainer._save_optimizer_and_scheduler = half_written

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.point == "step" and state.global_step + 1 == self.step:
            _die()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               **kwargs: Any) -> None:
        if self.point == "log" and state.global_step == self.step and logs and "loss" in logs:
            with open(Path(args.output_dir) / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(f'{{"step": {self.step + 1}, "loss": 0.')
                fh.flush()
            _die()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.point == "end" and state.global_step >= state.max_steps:
            _die()
