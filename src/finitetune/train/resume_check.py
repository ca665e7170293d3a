"""``--resume`` decided before anything is written: the checkpoint, the settings, the files.

Everything a resume could refuse is read and judged here, while the run directory is still
exactly as the last run left it: a refusal (exit 2) changes no byte of it. Only then does the
main job write: the settings the resume changed in ``config.resume-N.yaml`` (``config.yaml``
stays the file that repeats the first run), the checkpoints set aside, the logs trimmed
(:mod:`finitetune.rundir.resume`), and training from the chosen checkpoint.

What is refused, each naming the cause:

- a file the run would replace, append to or write inside that is a symbolic link or a
  special file (:func:`finitetune.rundir.paths.check_run_files`);
- an ended run without a healthy checkpoint (a run killed before its first save, whose
  ``status.json`` still says running, starts again from step 0 instead);
- a setting a resume cannot honour (:mod:`finitetune.settings.recorded`: the learning rate,
  LoRA, the model, the data...), or a checkpoint whose weights are not what the settings
  describe (a full model where LoRA is asked for, or the reverse);
- a total of steps that does not go past the checkpoint (``--max-steps 10`` on a run at step
  20), and, for a run that completed, a resume that adds no step;
- a run log that cannot be read as text (it would fail while being repaired).

A killed run whose last checkpoint is its last step (status running or failed) is finished
without training: nothing is trained, and the console says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finitetune.errors import ConfigError, SettingError
from finitetune.rundir import files as run_files
from finitetune.rundir.checkpoints import CheckpointHealth, select_checkpoint
from finitetune.rundir.paths import check_run_files
from finitetune.settings.config import TrainConfig
from finitetune.settings.recorded import (
    Recorded,
    changed_settings,
    check_resume_changes,
    read_recorded,
)

__all__ = ["ResumeDecision", "decide_resume"]


@dataclass
class ResumeDecision:
    """What ``--resume`` will do, decided before the run directory is touched."""

    checkpoint: CheckpointHealth | None
    """The newest healthy checkpoint; None: the run starts again from step 0."""
    total: int
    """Optimizer steps the continued run ends at."""
    recorded: Recorded | None = None
    """The run's recorded settings (None: it wrote none before it was killed)."""
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Settings this resume changes: ``{dotted name: (old, new)}``."""

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0

    @property
    def restart(self) -> bool:
        """No healthy checkpoint: training starts again from step 0 (settings are free)."""
        return self.checkpoint is None


def decide_resume(cfg: TrainConfig, total: int) -> ResumeDecision | None:
    """Judge ``cfg``'s resume of ``cfg.output_dir``, reading only (see the module docstring).

    ``total``: the optimizer steps ``cfg`` plans. None when ``cfg`` does not resume.

    Raises:
        ConfigError, SettingError, OutputError, ReportInputError: the resume is refused.
    """
    if not cfg.resume:
        return None
    out = Path(str(cfg.output_dir))
    if not out.is_dir():
        return None  # no run there: the output-directory check says so (exit 2)
    check_run_files(out)
    chosen, rejected = select_checkpoint(out)  # reads (and scans) only
    state = run_files.read_status(out)
    if chosen is None and state != run_files.RunState.RUNNING:
        why = "; ".join(h.describe() for h in rejected)
        raise ConfigError(f"--resume: no checkpoint-* folder in {out}" if not why else
                          f"--resume: no healthy checkpoint in {out} ({why}); --overwrite "
                          "starts the run again")
    recorded = read_recorded(out)
    decision = ResumeDecision(chosen, total, recorded)
    if chosen is None:
        return decision  # a restart from step 0: a new trajectory, any settings
    if recorded is None:
        raise ConfigError(f"--resume: {out} holds {chosen.name} but no {run_files.CONFIG}: the "
                          "settings it was trained with are unknown, so it cannot be continued "
                          "with certainty; --overwrite starts the run again")
    decision.changes = changed_settings(recorded, cfg)
    check_resume_changes(decision.changes, " + ".join(str(f) for f in recorded.files))
    _check_layout(chosen, cfg)
    _check_steps(decision, cfg, state)
    for name in (run_files.METRICS, run_files.EVENTS, run_files.BAD_SAMPLES):
        run_files.read_jsonl(out / name, run_files.Tolerance.TOLERANT)  # decodable, or refused
    return decision


def _check_layout(chosen: CheckpointHealth, cfg: TrainConfig) -> None:
    """The checkpoint's weights are what ``cfg`` trains: an adapter with LoRA, else the model."""
    adapter = any((chosen.path / n).is_file() for n in ("adapter_model.safetensors",
                                                        "adapter_model.bin"))
    if adapter != (cfg.lora_r > 0):
        holds = "a LoRA adapter" if adapter else "a full model's weights"
        wants = f"LoRA rank {cfg.lora_r}" if cfg.lora_r > 0 else "a full fine-tune (lora_r 0)"
        raise SettingError("lora_r", cfg.lora_r,
                           f"the setting {chosen.name} was trained with: it holds {holds}, "
                           f"and these settings ask for {wants}")


def _check_steps(decision: ResumeDecision, cfg: TrainConfig,
                 state: run_files.RunState | None) -> None:
    step, total = decision.step, decision.total
    name = "max_steps" if cfg.max_steps > 0 else "num_train_epochs"
    value = cfg.max_steps if cfg.max_steps > 0 else cfg.num_train_epochs
    if total < step:
        raise SettingError(name, value, f"at least the {step} steps the run already trained "
                           f"({decision.checkpoint.name if decision.checkpoint else ''} is step "
                           f"{step}; {name} {value} means {total} steps): a resume can only "
                           "add steps, give a larger value or leave it out")
    if total == step and state == run_files.RunState.COMPLETED:
        raise ConfigError(f"--resume: the run completed all {step} steps; there is nothing "
                          f"to resume. Give {'--max-steps' if cfg.max_steps > 0 else '--num-train-epochs'} "
                          "a larger value to train on from its last checkpoint")


def resumed_settings_callback() -> Any:
    """A Trainer callback that makes a resumed run follow the settings of *this* run.

    The Trainer restores ``logging_steps`` and ``save_steps`` from the checkpoint's
    ``trainer_state.json`` (and only warns that they differ), so a changed ``--logging-steps``
    or ``--save-steps`` (or the end-of-run save of a longer run) would otherwise not apply;
    they are set again from the arguments. The learning-rate schedule is rebuilt for the new
    total and only its position restored (transformers' schedules are ``functools.partial``
    functions that carry the total steps, which ``LambdaLR``'s state does not hold): that is
    checked, and a schedule that kept the old total stops the run rather than log a learning
    rate the recorded settings do not give."""
    from transformers import TrainerCallback

    class ResumedSettings(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any,
                           lr_scheduler: Any = None, **kwargs: Any) -> None:
            state.compute_steps(args, state.max_steps)
            for fn in getattr(lr_scheduler, "lr_lambdas", None) or []:
                total = (getattr(fn, "keywords", None) or {}).get("num_training_steps")
                if total is not None and total != state.max_steps:
                    raise ConfigError(
                        f"--resume: the restored learning-rate schedule ends at step {total}, "
                        f"not at {state.max_steps}: this transformers restores the schedule's "
                        "length from the checkpoint, so a longer run cannot be honoured here")

    return ResumedSettings()
