"""Configuration dataclasses. Every field has a docstring: it is the reference documentation.

``TrainConfig`` is what ``finitetune train`` resolves from defaults, ``--config FILE.yaml`` and
CLI flags (in that order of precedence, flags last) and writes back as ``config.yaml``.

Every field is declared with its type and range (:mod:`finitetune.settings.validation`), checked in
``__post_init__``, so a bad value stops when the config is built, before any file is touched,
whether it came from a flag, a YAML file or Python. **Adding a setting is one line** plus its
docstring, e.g.::

    max_steps: int = integer(-1, ge=1, special=(-1,), meaning="train num_train_epochs epochs")
    loss: LossMode | str = choice(LossMode.FULL)          # a closed set: a StrChoice enum
    deepspeed: str | None = text(None, optional=True)     # a path or None

(``real`` for floats, ``flag`` for booleans, ``section`` for a nested config). A test fails for
a field declared without a rule. Rules that tie two fields together go in ``__post_init__``
after :func:`~finitetune.settings.validation.validate` and raise :class:`~finitetune.errors.SettingError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from finitetune.errors import SettingError
from finitetune.settings.choices import PRECISION_ALIASES as PRECISION_ALIASES
from finitetune.settings.choices import BadSampleSkip as BadSampleSkip
from finitetune.settings.choices import ClipMode as ClipMode
from finitetune.settings.choices import GuardPolicy as GuardPolicy
from finitetune.settings.choices import LabelPolicy as LabelPolicy
from finitetune.settings.choices import LossMode as LossMode
from finitetune.settings.choices import Precision as Precision
from finitetune.settings.choices import RankMismatchAction as RankMismatchAction
from finitetune.settings.choices import RollbackSource as RollbackSource
from finitetune.settings.choices import SpikeAction as SpikeAction
from finitetune.settings.choices import StrChoice as StrChoice
from finitetune.settings.choices import Template as Template
from finitetune.settings.choices import Truncation as Truncation
from finitetune.settings.validation import (
    choice,
    flag,
    integer,
    names,
    real,
    section,
    text,
    validate,
)

__all__ = [
    "PRECISION_ALIASES", "BadSampleSkip", "ClipMode", "DataConfig", "GuardConfig", "GuardPolicy",
    "LabelPolicy", "LossMode", "Precision", "RankMismatchAction", "RollbackSource", "SpikeAction",
    "StrChoice", "Template", "TrainConfig", "Truncation",
]
"""The settings and (re-exported from :mod:`finitetune.settings.choices`) their closed choices."""


@dataclass
class GuardConfig:
    """Settings of :class:`finitetune.Guard` and :class:`finitetune.GuardCallback`.

    The defaults skip non-finite steps, skip upward spikes of 10 robust standard deviations once
    20 clean steps are known, and halt after 5 bad steps in a row: a run never silently skips
    forever, and a single bad batch never ends it.
    """

    policy: GuardPolicy | str = choice(GuardPolicy.SKIP)
    """Action on a non-finite step: ``skip``, ``rollback`` or ``halt``."""

    max_grad_norm: float | None = real(None, ge=0, special=(None,),
                                       meaning="Trainer's args.max_grad_norm / no clipping")
    """Clip to this total norm, using the norm the guard already computed (no second pass),
    after the decision (clipping with a NaN norm would turn every gradient into NaN).
    ``None``: plain :class:`~finitetune.Guard` does not clip; ``GuardCallback`` uses the
    Trainer's ``args.max_grad_norm``. ``0`` disables clipping in both."""

    clip: ClipMode | str = choice(ClipMode.FIXED)
    """``fixed``: clip to ``max_grad_norm`` (the Trainer's own behaviour, bit for bit).
    ``adaptive``: ZClip, a threshold following the EMA mean and spread of the recent pre-clip
    norms (below); never above ``max_grad_norm`` when that is set."""

    clip_z: float = real(2.5, gt=0)
    """Adaptive clipping: a norm more than this many standard deviations above the EMA mean is
    cut (ZClip's ``z_thresh``)."""

    clip_alpha: float = real(0.97, gt=0, lt=1)
    """Adaptive clipping: EMA factor of the norm's mean and variance (ZClip's ``alpha``)."""

    clip_warmup: int = integer(25, ge=2)
    """Adaptive clipping: applied steps whose norms start the EMA; until then only
    ``max_grad_norm`` clips (ZClip's ``warmup_steps``)."""

    clip_per_tensor: bool = flag(False)
    """Adaptive clipping: also cut each parameter tensor to 1.05x the EMA of its own norm
    (AdaGC), on the device. Off by default: on ``bench/bench_stability.py``'s tiny grid it
    moved single cells by at most 3 points of exact match, both ways, and rescued no learning
    rate. Refused under FSDP2 (its gradients are shards)."""

    reset_moments_on_spike: bool = flag(False)
    """Adaptive clipping: after a step the threshold cut, zero the optimizer's moments and
    restart its step count (SPAM). Off by default: it acts only after a cut, and on
    ``bench/bench_stability.py``'s tiny grid the threshold cut no step, so it has no measured
    benefit."""

    max_consecutive_skips: int = integer(5, ge=0)
    """Halt with :class:`finitetune.NonFiniteHalt` when more than this many steps in a row are
    not applied (skips, rollbacks, LR reductions, empty windows)."""

    scheduler_on_skip: bool = flag(False)
    """Advance the LR scheduler on a step that was not applied too (default: it stays, as the
    Trainer does for fp16 overflow skips, so the schedule counts applied updates)."""

    spike_window: int = integer(50, ge=1)
    """Number of recent values (of applied steps, never non-finite ones) the spike detector
    keeps for the loss and for the grad norm."""

    spike_warmup: int = integer(20, ge=1)
    """Values needed in the window before the spike detector may fire (<= ``spike_window``)."""

    spike_threshold: float = real(10.0, gt=0)
    """Robust z-score above which a value counts as a spike: distance from the window median in
    units of 1.4826 x MAD (the standard deviation for normal noise). Two-sided: below
    ``-spike_threshold`` gives a warning."""

    spike_min_scale: float = real(0.02, ge=0)
    """Smallest spread the detector assumes, as a fraction of the median's magnitude, so a nearly
    constant signal does not turn tiny wiggles into spikes (with the defaults a value must be
    more than 20 % above the median to count)."""

    spike_confirm: bool = flag(True)
    """Act on an upward spike (``spike_action``) only when a second signal confirms it: a
    grad-norm spike when the loss of the same step is also more than 3 robust standard
    deviations above its level (or no loss is observed); a loss spike when the loss is also
    above the run's starting level (the highest of its first ``spike_warmup`` losses).
    Otherwise the spike is a warning: healthy runs have norm spikes with a flat loss, and
    batches far harder than the median (a few examples the model still gets wrong) but no worse
    than where the run started (measured: ``bench/bench_stability.py --healthy``); a corrupt
    batch or a diverging run moves both signals. False acts on every spike."""

    spike_action: SpikeAction | str = choice(SpikeAction.SKIP)
    """Action on an upward loss or grad-norm spike: ``warn``, ``skip``, ``reduce_lr``,
    ``rollback`` or ``halt``."""

    snapshot_every: int = integer(1, ge=1)
    """Keep a last-good snapshot (trainable parameters + optimizer state, in memory) every this
    many applied steps; only when ``policy`` or ``spike_action`` is ``rollback``. A state is
    snapshotted only after it produced a finite, non-spiking loss and gradient, so a poisoned
    state is never kept as good."""

    lr_backoff: float = real(0.5, gt=0, le=1)
    """Multiply every param group's LR (and the scheduler's base LRs) by this on ``rollback`` or
    ``reduce_lr``; in (0, 1]."""

    max_rollbacks: int = integer(3, ge=0)
    """Halt instead of rolling back once this many rollbacks were done."""

    zero_loss_patience: int = integer(10, ge=0)
    """Warn when the loss is exactly 0.0 for this many consecutive applied steps (nothing is
    supervised, or the model collapsed). 0 disables."""

    pinned_norm_patience: int = integer(20, ge=0)
    """Warn when the pre-clip grad norm stays constant, or equal to ``max_grad_norm``, for this
    many consecutive applied steps (a sign that something upstream clips or zeroes the
    gradients). 0 disables."""

    rank_check_every: int = integer(50, ge=0)
    """Distributed: every this many steps, each rank's checksum of its replicated parameters
    (DDP; DeepSpeed ZeRO-1/2) rides in the guard's one all-reduce and ranks that disagree make
    a ``rank_mismatch`` event. Each rank's local gradient norm is compared on every step where
    gradients are replicated (DDP), at no cost. 0 turns both checks off. The default keeps the
    checksum pass under 1 % of a step (``bench/bench_rank_check.py``)."""

    rank_tolerance: float = real(0.0, ge=0, lt=1)
    """Relative difference allowed between ranks' values. Replicas compute the same kernels on
    bit-identical inputs, so 0 (exact) is right unless the ranks run on different hardware."""

    rank_mismatch_action: RankMismatchAction | str = choice(RankMismatchAction.HALT)
    """On ``rank_mismatch``: ``halt`` (default: a drifted replica does not heal), ``skip``
    or ``warn``."""

    rollback_to: RollbackSource | str = choice(RollbackSource.MEMORY)
    """Where ``rollback`` restores from: ``memory`` (one in-memory copy of the trainable state)
    or ``disk`` (the newest proven checkpoint of the run; for full fine-tunes too large to
    copy). Needs checkpoints (``save_steps``); until the first one, a rollback is a skip."""

    skip_bad_samples: BadSampleSkip | str = choice(BadSampleSkip.CULPRITS)
    """On resume, on-disk rollback or a later epoch, leave out the remembered samples of steps
    skipped or rolled back for a fault: ``culprits`` (the samples attribution's replay found
    non-finite, else the whole step's), ``step``, ``window`` or ``off``. A step whose every
    sample is left out trains on nothing and is skipped as ``no_valid_tokens``."""

    bad_sample_window: int = integer(2, ge=0)
    """With ``skip_bad_samples=window``: optimizer steps before and after a faulty one whose
    samples are also remembered and left out."""

    def __post_init__(self) -> None:
        validate(self)
        if self.clip != ClipMode.ADAPTIVE:
            for name in ("clip_per_tensor", "reset_moments_on_spike"):
                if getattr(self, name):
                    raise SettingError(name, True, "false unless clip is 'adaptive' (it is a "
                                       "part of adaptive clipping); set clip: adaptive")
        if self.spike_warmup > self.spike_window:
            raise SettingError(
                "spike_warmup", self.spike_warmup,
                f"an integer <= spike_window ({self.spike_window}), else the spike detector "
                "could never fire; lower spike_warmup or raise spike_window")

    @property
    def needs_snapshots(self) -> bool:
        """Whether any action can roll back (then the guard keeps last-good snapshots)."""
        return self.policy == GuardPolicy.ROLLBACK or self.spike_action == SpikeAction.ROLLBACK

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (enums as their values); ``GuardConfig(**d)`` rebuilds it."""
        return _plain(dataclasses.asdict(self))


@dataclass
class DataConfig:
    """Where training data comes from and how it becomes token ids and labels."""

    path: str | None = text(None, optional=True)
    """JSONL, CSV, Parquet file or a ``datasets.save_to_disk`` folder. ``None``: the model's
    embedded task (BBC topics for ``demo``, the generated task for ``tiny``)."""

    prompt_field: str = text("prompt")
    """Column holding the prompt (prompt/response format)."""

    response_field: str = text("response")
    """Column holding the response, the only part that is supervised."""

    messages_field: str = text("messages")
    """Column holding chat ``[{"role", "content"}, ...]``; used when present instead of
    prompt/response. Only the last assistant turn is supervised."""

    text_field: str = text("text")
    """Column holding pre-formatted text, used with ``response_marker``."""

    response_marker: str | None = text(None, optional=True)
    """For pre-formatted ``text`` rows: the string after which the response starts (e.g.
    ``"### Answer:"``). Found by character position, so it works however it tokenises."""

    max_length: int = integer(256, ge=2)
    """Tokens per example after truncation. The prompt is truncated from the left first so the
    response survives when it can."""

    template: Template | str = choice(Template.AUTO)
    """``auto`` (the tokenizer's chat template when it has one), ``chat`` or ``plain`` text."""

    truncation: Truncation | str = choice(Truncation.PROMPT_LEFT)
    """``prompt_left``: drop the oldest prompt tokens first so the response survives;
    ``right``: cut the end, as ``tokenizer(truncation=True)`` does."""

    eval_size: int = integer(200, ge=1)
    """Held-out examples for evaluation (deterministic split by ``seed``)."""

    on_label_problem: LabelPolicy | str = choice(LabelPolicy.DROP)
    """``drop``, ``error`` or ``fix`` for examples that keep no supervised token."""

    min_response_tokens: int = integer(1, ge=1)
    """With ``fix``: response tokens (plus EOS) that must survive prompt truncation."""

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (enums as their values); ``DataConfig(**d)`` rebuilds it."""
        return _plain(dataclasses.asdict(self))


@dataclass
class TrainConfig:
    """Everything ``finitetune train`` needs. Unknown YAML keys are an error, not ignored."""

    model: str = text("demo")
    """``demo`` (SmolLM2-135M-Instruct), ``tiny`` (built in code), a local model directory or a
    hub id."""

    output_dir: str | None = text(None, optional=True)
    """Run directory. Default: ``runs/<model>-<timestamp>``."""

    overwrite: bool = flag(False)
    """Replace ``output_dir`` if it is a run directory finitetune created (it carries the
    marker file); a folder finitetune did not create is never deleted."""

    resume: bool = flag(False)
    """Continue from the newest ``checkpoint-*`` in ``output_dir`` (a run directory)."""

    data: DataConfig = section(DataConfig)
    """Data source and tokenisation."""

    guard: GuardConfig = section(GuardConfig)
    """Gradient guard settings."""

    lora_r: int = integer(16, ge=0)
    """LoRA rank; ``0`` means full fine-tuning."""

    lora_alpha: int | None = integer(None, ge=1, special=(None,), meaning="2 * lora_r")
    """LoRA alpha (default ``2 * lora_r``)."""

    lora_dropout: float = real(0.0, ge=0, lt=1)
    """Dropout on the LoRA path."""

    lora_targets: list[str] | str = names("all-linear")
    """Modules that get adapters: ``all-linear`` or a list such as ``[q_proj, v_proj]``."""

    learning_rate: float = real(1e-3, gt=0)
    """Peak learning rate."""

    warmup_ratio: float = real(0.0, ge=0, le=1)
    """Fraction of steps for linear warm-up."""

    lr_scheduler_type: str = text("cosine")
    """Any ``transformers`` scheduler name (linear, cosine, constant, ...)."""

    num_train_epochs: float = real(1.0, gt=0)
    """Epochs, used when ``max_steps`` is not set."""

    max_steps: int = integer(-1, ge=1, special=(-1,), meaning="train num_train_epochs epochs")
    """Optimizer steps; overrides epochs when > 0."""

    per_device_train_batch_size: int = integer(8, ge=1)
    """Micro-batch size per device."""

    gradient_accumulation_steps: int = integer(1, ge=1)
    """Micro-batches per optimizer step."""

    max_grad_norm: float = real(1.0, ge=0)
    """Clip the total gradient norm to this (0 disables). The guard clips with its own
    pre-clip norm."""

    weight_decay: float = real(0.0, ge=0)
    """AdamW weight decay."""

    logging_steps: int = integer(5, ge=1)
    """Log (and write a ``metrics.jsonl`` line) every this many optimizer steps."""

    save_steps: int = integer(0, ge=0)
    """Checkpoint every this many steps (0: only at the end)."""

    save_total_limit: int | None = integer(2, ge=1, special=(None,), meaning="keep all")
    """Checkpoints kept."""

    seed: int = integer(0, ge=0, le=2**32 - 1)
    """Seed for data split, shuffling, initialisation and dropout."""

    precision: Precision | str = choice(Precision.AUTO)
    """``auto``, ``bf16``, ``fp16`` or ``fp32``."""

    trust_remote_code: bool = flag(False)
    """Allow a model directory's own Python code to run. Off unless asked for."""

    attribution: bool = flag(True)
    """After a faulty step (only then), name the parameters, first non-finite module and
    samples, replay the batch in fp32, and save it under ``faults/``."""

    eval_before: bool = flag(True)
    """Measure exact-match accuracy before training too (the baseline)."""

    eval_max_new_tokens: int = integer(8, ge=1)
    """Greedy generation budget per evaluation example (< ``data.max_length``)."""

    eval_batch_size: int = integer(32, ge=1)
    """Examples per generation batch in evaluation."""

    loss: LossMode | str = choice(LossMode.AUTO)
    """``auto``, ``supervised`` or ``full``: where the LM head runs in training (see
    :class:`~finitetune.settings.choices.LossMode`). The same safe loss either way."""

    deepspeed: str | None = text(None, optional=True)
    """A DeepSpeed JSON config file (ZeRO stage 1, 2 or 3), passed to the Trainer as
    ``TrainingArguments(deepspeed=...)``; launch with ``torchrun``, ``deepspeed`` or
    ``accelerate launch``. The guard decides inside DeepSpeed's optimizer step."""

    def __post_init__(self) -> None:
        validate(self)
        if self.resume and self.overwrite:
            raise SettingError("overwrite", True, "false when resume is true: --resume "
                               "continues a run, --overwrite replaces it; choose one")
        if self.eval_max_new_tokens >= self.data.max_length:
            raise SettingError("eval_max_new_tokens", self.eval_max_new_tokens,
                               f"an integer < data.max_length ({self.data.max_length}): the "
                               "prompt and the generated answer share max_length")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
