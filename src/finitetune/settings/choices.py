"""The closed sets of choices of the settings (string enums), apart from the dataclasses that use
them (:mod:`finitetune.settings.config`, which re-exports every name here).

Each is a :class:`StrChoice`: it prints, formats and hashes as its value, so YAML, JSON, flags and
``{"bf16": ...}[x]`` all see the plain string. Members are documented: the docstrings are the
reference of what each choice does.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["PRECISION_ALIASES", "BadSampleSkip", "ClipMode", "GuardPolicy", "LabelPolicy",
           "LossMode", "Precision", "RankMismatchAction", "RollbackSource", "SpikeAction", "StrChoice",
           "Template", "Truncation"]


class StrChoice(str, Enum):
    """A string enum that prints, formats and hashes as its value (like Python 3.11's
    ``StrEnum``), so ``f"{x}"``, ``{"bf16": ...}[x]`` and YAML/JSON see ``"bf16"``."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __hash__(self) -> int:
        return hash(str(self.value))


class LabelPolicy(StrChoice):
    """What the data pipeline does with an example that has nothing (or too little) to learn."""

    DROP = "drop"
    """Leave the example out and count it in ``label_report.json``."""
    ERROR = "error"
    """Stop before training and name the examples."""
    FIX = "fix"
    """Truncate the prompt from the left so the response and EOS survive; drop what cannot be fixed."""


class LossMode(StrChoice):
    """Where ``finitetune train`` applies the LM head (always the safe loss: fp32, token-mean
    over the window, 0 and never NaN when nothing is supervised)."""

    AUTO = "auto"
    """Only at supervised positions where the model is understood, else at every position (the
    start-up line says which, and why)."""
    SUPERVISED = "supervised"
    """Only at supervised positions; stop with an error if the model is not understood."""
    FULL = "full"
    """At every position: the model computes all logits, the loss reads them."""


class GuardPolicy(StrChoice):
    """What the guard does when a step is non-finite (``nonfinite_grad``, ``nonfinite_loss``,
    ``norm_overflow``)."""

    SKIP = "skip"
    """Do not take the optimizer step; parameters and optimizer state stay bit-identical."""
    ROLLBACK = "rollback"
    """Restore the last good snapshot, lower the learning rate, skip the batch."""
    HALT = "halt"
    """Stop training at the first fault (after writing the run's files)."""


class SpikeAction(StrChoice):
    """What the guard does when the loss or the grad norm jumps far *above* its recent level.

    A jump below it (the loss suddenly near zero, a collapsed grad norm) is only warned about:
    skipping a step because it looks too good would hide the problem, not fix it.
    """

    WARN = "warn"
    """Take the step anyway; write an event and a warning."""
    SKIP = "skip"
    """Do not take the step (the batch is dropped), as for a non-finite step."""
    REDUCE_LR = "reduce_lr"
    """Drop the batch and multiply the learning rate by ``lr_backoff`` from now on."""
    ROLLBACK = "rollback"
    """Restore the last good snapshot, multiply the learning rate by ``lr_backoff``, drop the batch."""
    HALT = "halt"
    """Stop training."""


class ClipMode(StrChoice):
    """How the guard chooses the norm it clips the gradients to."""

    FIXED = "fixed"
    """``max_grad_norm`` on every step, exactly as ``clip_grad_norm_`` (the Trainer's own)."""
    ADAPTIVE = "adaptive"
    """ZClip: a threshold that follows the EMA mean and spread of the recent norms and cuts
    outliers (``clip_z`` standard deviations above the mean); never above ``max_grad_norm``."""


class RollbackSource(StrChoice):
    """Where a ``rollback`` restores the last good state from."""

    MEMORY = "memory"
    """A copy of the trainable parameters and their optimizer state kept next to them (RAM or
    GPU), refreshed after every good step: instant, costs one copy of the trainable state."""
    DISK = "disk"
    """The newest proven checkpoint the run saved (``save_steps``): no extra memory; costs a
    load, and the steps since that checkpoint are redone with the next data (their batches
    are skipped)."""


class BadSampleSkip(StrChoice):
    """Which remembered samples (``bad_samples.jsonl``) later batches leave out."""

    OFF = "off"
    """Remember them, skip nothing."""
    CULPRITS = "culprits"
    """The samples attribution's replay found non-finite; the step's samples when it found none."""
    STEP = "step"
    """Every sample of a step skipped or rolled back for a fault."""
    WINDOW = "window"
    """Those, plus the samples of ``bad_sample_window`` steps before and after it."""


class Template(StrChoice):
    """How a prompt/response record becomes text before tokenisation."""

    AUTO = "auto"
    """The tokenizer's chat template when it has one, else plain text."""
    CHAT = "chat"
    """The tokenizer's chat template (plain text when it has none)."""
    PLAIN = "plain"
    """The prompt and the response as they are."""


class Truncation(StrChoice):
    """Which tokens an over-long example loses."""

    PROMPT_LEFT = "prompt_left"
    """The oldest prompt tokens first, so the response survives when it fits."""
    RIGHT = "right"
    """The end, as ``tokenizer(truncation=True)`` does (can cut the response away)."""


PRECISION_ALIASES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                     "float16": "fp16", "half": "fp16", "fp32": "fp32", "float32": "fp32",
                     "no": "fp32"}
"""Spellings of a precision accepted everywhere (``--precision``, YAML, ``choose_precision``)."""


class Precision(StrChoice):
    """The training precision asked for; ``auto`` lets the policy choose (see ``precision``)."""

    AUTO = "auto"
    """bf16 where the hardware has it natively, fp16 + GradScaler on older GPUs, else fp32."""
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @classmethod
    def _missing_(cls, value: object) -> Precision | None:
        canonical = PRECISION_ALIASES.get(str(value).strip().lower())
        return cls(canonical) if canonical else None


class RankMismatchAction(StrChoice):
    """What the guard does when ranks that should hold the same values do not (``rank_mismatch``)."""

    HALT = "halt"
    """Stop training: a replica that drifted away cannot be repaired by skipping a step."""
    SKIP = "skip"
    """Do not take this step (a one-off disagreement, e.g. in one step's gradients)."""
    WARN = "warn"
    """Take the step anyway; write an event and a warning."""
