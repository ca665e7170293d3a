"""A run's recorded settings, and what a resume may change in them.

``config.yaml`` is written once, when a run starts: ``finitetune train --config RUN/config.yaml``
repeats that run. A resume never rewrites it. The settings a resume may change are applied for
real and written beside it, one file per resume that changed something:
``config.resume-1.yaml``, ``config.resume-2.yaml``... each a settings file holding only what
that resume changed (``--resume --config RUN/config.resume-1.yaml`` repeats that resume). The
run's current settings are ``config.yaml`` with every ``config.resume-N.yaml`` laid over it, in
order (:func:`read_recorded`).

A resume continues a trajectory: the weights, the optimizer state, the data order and the
learning-rate schedule of the steps already taken. A setting that would change them, or the
shape of the saved state, cannot be honoured from a checkpoint and is refused, naming it
(:data:`FIXED`): the model, the data and how it becomes rows, LoRA, the optimizer's and the
schedule's settings, batch shape, clipping, seed, precision, DeepSpeed. What only decides how
far the run goes, what it logs, saves and evaluates, or how the guard reacts to a fault may
change (:data:`MAY_CHANGE`, and every ``guard.*`` setting); a longer run's schedule is the one a
run of the new length has, from the resumed step on. A shorter one is refused (the steps are
taken: the main job refuses a total that does not go past the checkpoint). ``output_dir``, ``overwrite`` and ``resume`` say where and how to run, not what.

A test fails for a setting that is in neither list: adding a setting means deciding this.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finitetune.errors import ConfigError
from finitetune.rundir.files import CONFIG
from finitetune.settings.config import TrainConfig
from finitetune.settings.files import read_settings
from finitetune.settings.validation import check_values, flatten, merge

__all__ = ["FIXED", "MAY_CHANGE", "NOT_SETTINGS", "Recorded", "changed_settings",
           "check_resume_changes", "read_recorded", "resume_record"]

RESUME_PATTERN = re.compile(r"^config\.resume-(\d+)\.yaml$")
"""``config.resume-N.yaml``: what resume N changed."""

FIXED = frozenset({
    "model", "data.path", "data.prompt_field", "data.response_field", "data.messages_field",
    "data.text_field", "data.response_marker", "data.max_length", "data.template",
    "data.truncation", "data.eval_size", "data.on_label_problem", "data.min_response_tokens",
    "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "learning_rate", "warmup_ratio",
    "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_grad_norm", "weight_decay", "seed", "precision", "deepspeed",
})
"""Settings a resume cannot honour: they shape the trajectory or the saved state."""
MAY_CHANGE = frozenset({
    "max_steps", "num_train_epochs", "logging_steps", "save_steps", "save_total_limit",
    "eval_before", "eval_max_new_tokens", "eval_batch_size", "attribution",
    "trust_remote_code", "loss",
})
"""Settings a resume applies (``guard.*`` too): how far, what is logged, saved, evaluated."""
NOT_SETTINGS = frozenset({"output_dir", "overwrite", "resume"})
"""Where and how to run, not what: never compared."""

_WHY = {
    "model": "the checkpoint holds this model's weights",
    "lora_r": "the saved weights and optimizer state have the old adapter's shapes",
    "lora_alpha": "it scales the saved adapter's updates", "lora_targets": "the saved weights "
    "and optimizer state hold adapters for the old modules", "learning_rate": "the restored "
    "schedule keeps the learning rate it was built with", "lr_scheduler_type": "the restored "
    "schedule is of the old kind", "warmup_ratio": "the warm-up is part of the restored schedule",
    "seed": "it decides the data split, order and dropout of the steps already taken",
    "deepspeed": "the optimizer state is saved in the old engine's layout",
}


@dataclass
class Recorded:
    """What a run directory recorded about its settings."""

    values: dict[str, Any]
    """The current settings: ``config.yaml`` with each ``config.resume-N.yaml`` over it."""
    files: list[Path] = field(default_factory=list)
    """The files read, ``config.yaml`` first."""

    @property
    def next_index(self) -> int:
        """N of the next ``config.resume-N.yaml``."""
        return len(self.files)


def read_recorded(run_dir: str | os.PathLike) -> Recorded | None:
    """The run's current settings, or None when it has no ``config.yaml`` (a run killed before
    it wrote one). Each file is checked like a ``--config`` file.

    Raises:
        ConfigError, SettingError: a file cannot be read, or holds a setting that is not one.
    """
    run_dir = Path(run_dir)
    first = run_dir / CONFIG
    if not first.exists():
        return None
    resumes = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                     if (m := RESUME_PATTERN.match(p.name)))
    recorded = Recorded({})
    for path in [first, *(p for _, p in resumes)]:
        values, _lines = read_settings(path)
        try:
            check_values(TrainConfig, values)
        except ConfigError as exc:
            raise ConfigError(f"--resume: {path} records a setting this finitetune does not "
                              f"read ({exc}); the run cannot be continued with certainty") from None
        recorded.values = merge(recorded.values, values)
        recorded.files.append(path)
    return recorded


def changed_settings(recorded: Recorded, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted setting: (recorded value, new value)}`` for every setting ``cfg`` changes
    (settings the record does not hold, e.g. added in a later version, compare with their
    default)."""
    default = flatten(TrainConfig().to_dict())
    old = {**default, **flatten(recorded.values)}
    new = flatten(cfg.to_dict())
    return {k: (old.get(k), v) for k, v in new.items()
            if k not in NOT_SETTINGS and old.get(k) != v}


def may_change(setting: str) -> bool:
    """Whether a resume may change ``setting`` (dotted)."""
    return setting in MAY_CHANGE or setting.startswith("guard.")


def check_resume_changes(changes: dict[str, tuple[Any, Any]], where: str,
                         sources: dict[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` naming every change a resume cannot honour (``where``: the
    file the old values come from; ``sources``: where each new value came from)."""
    refused = []
    for name, (old, new) in changes.items():
        if not may_change(name):
            why = _WHY.get(name, "the steps already taken were trained with the old value")
            src = f" ({sources[name]})" if sources and name in sources else ""
            refused.append(f"{name} = {new!r}{src}, trained with {old!r} ({why})")
    if refused:
        raise ConfigError(
            "--resume cannot honour " + "; ".join(refused) + f". The run's settings are in "
            f"{where}: give only the settings a resume may change (max_steps, logging, saving, "
            "evaluation, guard.*), or start a new run (--overwrite, or another --output-dir)")


def resume_record(changes: dict[str, tuple[Any, Any]], index: int, *, checkpoint: str | None,
                  step: int, when: str) -> str:
    """The text of ``config.resume-<index>.yaml``: a settings file of what changed, with the
    old values in comments."""
    import yaml

    from finitetune.settings.validation import set_dotted

    tree: dict[str, Any] = {}
    for name, (_old, new) in sorted(changes.items()):
        set_dotted(tree, name, new)
    head = [f"# resume {index} of this run ({when}), from {checkpoint or 'step 0'} (step {step})",
            "# the settings it changed; the others are config.yaml's (and earlier resumes')"]
    head += [f"#   {name}: {old!r} -> {new!r}" for name, (old, new) in sorted(changes.items())]
    return "\n".join(head) + "\n" + yaml.safe_dump(tree, sort_keys=False)
