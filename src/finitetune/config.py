"""Configuration dataclasses. Every field has a docstring: it is the reference documentation.

``TrainConfig`` is what ``finitetune train`` resolves from defaults, ``--config FILE.yaml`` and
CLI flags (in that order of precedence, flags last) and writes back as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from finitetune.errors import ConfigError


class LabelPolicy(str, Enum):
    """What the data pipeline does with an example that has nothing (or too little) to learn."""

    DROP = "drop"
    """Leave the example out and count it in ``label_report.json``."""
    ERROR = "error"
    """Stop before training and name the examples."""
    FIX = "fix"
    """Truncate the prompt from the left so the response and EOS survive; drop what cannot be fixed."""


class GuardPolicy(str, Enum):
    """What the guard does when a step is non-finite (``nonfinite_grad``, ``nonfinite_loss``,
    ``norm_overflow``)."""

    SKIP = "skip"
    """Do not take the optimizer step; parameters and optimizer state stay bit-identical."""
    ROLLBACK = "rollback"
    """Restore the last good snapshot, lower the learning rate, skip the batch."""
    HALT = "halt"
    """Stop training at the first fault (after writing the run's files)."""


class SpikeAction(str, Enum):
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


class RollbackSource(str, Enum):
    """Where a ``rollback`` restores the last good state from."""

    MEMORY = "memory"
    """A copy of the trainable parameters and their optimizer state kept next to them (RAM or
    GPU), refreshed after every good step: instant, costs one copy of the trainable state."""
    DISK = "disk"
    """The newest healthy checkpoint the run saved (``save_steps``): no extra memory; costs a
    load, and the steps since that checkpoint are redone with the next data (their batches
    are skipped)."""


class BadSampleSkip(str, Enum):
    """Which remembered samples (``bad_samples.jsonl``) a resumed or restarted run leaves out."""

    OFF = "off"
    """Remember them, skip nothing."""
    CULPRITS = "culprits"
    """The samples attribution's replay found non-finite; the step's samples when it found none."""
    STEP = "step"
    """Every sample of a step skipped or rolled back for a fault."""
    WINDOW = "window"
    """Those, plus the samples of ``bad_sample_window`` steps before and after it."""


@dataclass
class GuardConfig:
    """Settings of :class:`finitetune.Guard` and :class:`finitetune.GuardCallback`.

    The defaults skip non-finite steps, skip upward spikes of 10 robust standard deviations once
    20 clean steps are known, and halt after 5 bad steps in a row: a run never silently skips
    forever, and a single bad batch never ends it.
    """

    policy: GuardPolicy | str = GuardPolicy.SKIP
    """Action on a non-finite step: ``skip``, ``rollback`` or ``halt``."""

    max_grad_norm: float | None = None
    """Clip to this total norm, using the norm the guard already computed (no second pass),
    after the decision (clipping with a NaN norm would turn every gradient into NaN).
    ``None``: plain :class:`~finitetune.Guard` does not clip; ``GuardCallback`` uses the
    Trainer's ``args.max_grad_norm``. ``0`` disables clipping in both."""

    max_consecutive_skips: int = 5
    """Halt with :class:`finitetune.NonFiniteHalt` when more than this many steps in a row are
    not applied (skips, rollbacks, LR reductions, empty windows)."""

    scheduler_on_skip: bool = False
    """Advance the LR scheduler on a step that was not applied too (default: it stays, as the
    Trainer does for fp16 overflow skips, so the schedule counts applied updates)."""

    spike_window: int = 50
    """Number of recent values (of applied steps, never non-finite ones) the spike detector
    keeps for the loss and for the grad norm."""

    spike_warmup: int = 20
    """Values needed in the window before the spike detector may fire (<= ``spike_window``)."""

    spike_threshold: float = 10.0
    """Robust z-score above which a value counts as a spike: distance from the window median in
    units of 1.4826 x MAD (the standard deviation for normal noise). Two-sided: below
    ``-spike_threshold`` gives a warning."""

    spike_min_scale: float = 0.02
    """Smallest spread the detector assumes, as a fraction of the median's magnitude, so a nearly
    constant signal does not turn tiny wiggles into spikes (with the defaults a value must be
    more than 20 % above the median to count)."""

    spike_action: SpikeAction | str = SpikeAction.SKIP
    """Action on an upward loss or grad-norm spike: ``warn``, ``skip``, ``reduce_lr``,
    ``rollback`` or ``halt``."""

    snapshot_every: int = 1
    """Keep a last-good snapshot (trainable parameters + optimizer state, in memory) every this
    many applied steps; only when ``policy`` or ``spike_action`` is ``rollback``. A state is
    snapshotted only after it produced a finite, non-spiking loss and gradient, so a poisoned
    state is never kept as good."""

    lr_backoff: float = 0.5
    """Multiply every param group's LR (and the scheduler's base LRs) by this on ``rollback`` or
    ``reduce_lr``; in (0, 1]."""

    max_rollbacks: int = 3
    """Halt instead of rolling back once this many rollbacks were done."""

    zero_loss_patience: int = 10
    """Warn when the loss is exactly 0.0 for this many consecutive applied steps (nothing is
    supervised, or the model collapsed). 0 disables."""

    pinned_norm_patience: int = 20
    """Warn when the pre-clip grad norm stays constant, or equal to ``max_grad_norm``, for this
    many consecutive applied steps (a sign that something upstream clips or zeroes the
    gradients). 0 disables."""

    rollback_to: RollbackSource | str = RollbackSource.MEMORY
    """Where ``rollback`` restores from: ``memory`` (one in-memory copy of the trainable state)
    or ``disk`` (the newest healthy checkpoint of the run; for full fine-tunes too large to
    copy). Needs checkpoints (``save_steps``); until the first one, a rollback is a skip."""

    skip_bad_samples: BadSampleSkip | str = BadSampleSkip.CULPRITS
    """On resume, on-disk rollback or a later epoch, leave out the remembered samples of steps
    skipped or rolled back for a fault: ``culprits`` (the samples attribution's replay found
    non-finite, else the whole step's), ``step``, ``window`` or ``off``. A step whose every
    sample is left out trains on nothing and is skipped as ``no_valid_tokens``."""

    bad_sample_window: int = 2
    """With ``skip_bad_samples=window``: optimizer steps before and after a faulty one whose
    samples are also remembered and left out."""

    def __post_init__(self) -> None:
        self.policy = _enum(GuardPolicy, self.policy, "guard policy")
        self.spike_action = _enum(SpikeAction, self.spike_action, "guard spike_action")
        self.rollback_to = _enum(RollbackSource, self.rollback_to, "guard rollback_to")
        self.skip_bad_samples = _enum(BadSampleSkip, self.skip_bad_samples,
                                      "guard skip_bad_samples")
        for name in ("max_consecutive_skips", "max_rollbacks", "zero_loss_patience",
                     "pinned_norm_patience", "bad_sample_window"):
            _check(self, name, lambda v: isinstance(v, int) and v >= 0, "an int >= 0")
        for name in ("spike_window", "spike_warmup", "snapshot_every"):
            _check(self, name, lambda v: isinstance(v, int) and v >= 1, "an int >= 1")
        if self.spike_warmup > self.spike_window:
            raise ConfigError(
                f"guard spike_warmup ({self.spike_warmup}) is larger than spike_window "
                f"({self.spike_window}): the detector could never fire; lower spike_warmup or "
                "raise spike_window."
            )
        _check(self, "spike_threshold", lambda v: _num(v) and v > 0, "a number > 0")
        _check(self, "spike_min_scale", lambda v: _num(v) and v >= 0, "a number >= 0")
        _check(self, "lr_backoff", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]")
        _check(self, "max_grad_norm", lambda v: v is None or (_num(v) and v >= 0),
               "None or a number >= 0")

    @property
    def needs_snapshots(self) -> bool:
        """Whether any action can roll back (then the guard keeps last-good snapshots)."""
        return self.policy == GuardPolicy.ROLLBACK or self.spike_action == SpikeAction.ROLLBACK

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (enums as their values); ``GuardConfig(**d)`` rebuilds it."""
        return _plain(dataclasses.asdict(self))


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _check(cfg: Any, name: str, ok: Any, what: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not ok(value):
        raise ConfigError(f"guard {name} must be {what}, got {value!r}")


@dataclass
class DataConfig:
    """Where training data comes from and how it becomes token ids and labels."""

    path: str | None = None
    """JSONL, CSV, Parquet file or a ``datasets.save_to_disk`` folder. ``None``: the model's
    embedded task (BBC topics for ``demo``, the generated task for ``tiny``)."""

    prompt_field: str = "prompt"
    """Column holding the prompt (prompt/response format)."""

    response_field: str = "response"
    """Column holding the response, the only part that is supervised."""

    messages_field: str = "messages"
    """Column holding chat ``[{"role", "content"}, ...]``; used when present instead of
    prompt/response. Only the last assistant turn is supervised."""

    text_field: str = "text"
    """Column holding pre-formatted text, used with ``response_marker``."""

    response_marker: str | None = None
    """For pre-formatted ``text`` rows: the string after which the response starts (e.g.
    ``"### Answer:"``). Found by character position, so it works however it tokenises."""

    max_length: int = 256
    """Tokens per example after truncation. The prompt is truncated from the left first so the
    response survives when it can."""

    template: str = "auto"
    """``auto`` (the tokenizer's chat template when it has one), ``chat`` or ``plain`` text."""

    truncation: str = "prompt_left"
    """``prompt_left``: drop the oldest prompt tokens first so the response survives;
    ``right``: cut the end, as ``tokenizer(truncation=True)`` does."""

    eval_size: int = 200
    """Held-out examples for evaluation (deterministic split by ``seed``)."""

    on_label_problem: LabelPolicy | str = LabelPolicy.DROP
    """``drop``, ``error`` or ``fix`` for examples that keep no supervised token."""

    min_response_tokens: int = 1
    """With ``fix``: response tokens (plus EOS) that must survive prompt truncation."""

    def __post_init__(self) -> None:
        self.on_label_problem = _enum(LabelPolicy, self.on_label_problem, "on_label_problem")
        if self.template not in ("auto", "chat", "plain"):
            raise ConfigError(f"unknown template {self.template!r}; choose auto, chat or plain")
        if self.truncation not in ("prompt_left", "right"):
            raise ConfigError(f"unknown truncation {self.truncation!r}; use prompt_left or right")
        if self.min_response_tokens < 1:
            raise ConfigError("min_response_tokens must be at least 1")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")


@dataclass
class TrainConfig:
    """Everything ``finitetune train`` needs. Unknown YAML keys are an error, not ignored."""

    model: str = "demo"
    """``demo`` (SmolLM2-135M-Instruct), ``tiny`` (built in code), a local model directory or a
    hub id."""

    output_dir: str | None = None
    """Run directory. Default: ``runs/<model>-<timestamp>``."""

    overwrite: bool = False
    """Allow writing into a non-empty ``output_dir`` (its old files are replaced)."""

    resume: bool = False
    """Continue from the newest ``checkpoint-*`` in ``output_dir``."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data source and tokenisation."""

    guard: GuardConfig = field(default_factory=GuardConfig)
    """Gradient guard settings."""

    lora_r: int = 16
    """LoRA rank; ``0`` means full fine-tuning."""

    lora_alpha: int | None = None
    """LoRA alpha (default ``2 * lora_r``)."""

    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""

    lora_targets: list[str] | str = "all-linear"
    """Modules that get adapters: ``all-linear`` or a list such as ``[q_proj, v_proj]``."""

    learning_rate: float = 1e-3
    """Peak learning rate."""

    warmup_ratio: float = 0.0
    """Fraction of steps for linear warm-up."""

    lr_scheduler_type: str = "cosine"
    """Any ``transformers`` scheduler name (linear, cosine, constant, ...)."""

    num_train_epochs: float = 1.0
    """Epochs, used when ``max_steps`` is not set."""

    max_steps: int = -1
    """Optimizer steps; overrides epochs when > 0."""

    per_device_train_batch_size: int = 8
    """Micro-batch size per device."""

    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""

    max_grad_norm: float = 1.0
    """Clip the total gradient norm to this (0 disables). The guard clips with its own
    pre-clip norm."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    logging_steps: int = 5
    """Log (and write a ``metrics.jsonl`` line) every this many optimizer steps."""

    save_steps: int = 0
    """Checkpoint every this many steps (0: only at the end)."""

    save_total_limit: int | None = 2
    """Checkpoints kept."""

    seed: int = 0
    """Seed for data split, shuffling, initialisation and dropout."""

    precision: str = "auto"
    """``auto``, ``bf16``, ``fp16`` or ``fp32``."""

    trust_remote_code: bool = False
    """Allow a model directory's own Python code to run. Off unless asked for."""

    attribution: bool = True
    """After a faulty step (only then), name the parameters, first non-finite module and
    samples, replay the batch in fp32, and save it under ``faults/``."""

    eval_before: bool = True
    """Measure exact-match accuracy before training too (the baseline)."""

    eval_max_new_tokens: int = 8
    """Greedy generation budget per evaluation example."""

    eval_batch_size: int = 32
    """Examples per generation batch in evaluation."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _enum(cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {choices}") from None


def _plain(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
