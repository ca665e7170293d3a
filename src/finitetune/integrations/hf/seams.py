"""The version-aware Trainer adapter: every version-dependent or private part of transformers,
accelerate, PEFT and TRL that the guard, the checkpoint protection and the hidden-state loss
use, listed once in :data:`SEAMS` with the versions that have it, and chosen by checking what
is there (a method, a signature, an attribute), never by comparing version strings.

The guard stands on seams every supported release shares: the Trainer clips with
``self.accelerator.clip_grad_norm_(params, max_norm)`` and then calls ``optimizer.step()`` in
4.51 as in 5.25, so the guard session wraps that ``clip_grad_norm_`` on the Trainer's own
``Accelerator`` instance (the decision, returning the pre-clip norm) and the optimizer's
``step`` (a skip is a skip), for the run only. Where a release differs, the difference is a
:class:`Seam` here with its fallback:

- which tokens ``num_items_in_batch`` counts (:func:`shifts_labels`): shifted labels where the
  Trainer sets ``_loss_shifts_labels`` (5.10.1+), the labels as they are before;
- the keyword ``from_pretrained`` takes for the dtype (:func:`dtype_kwargs`);
- sequential sampling (:func:`sequential_kwargs`, :func:`use_sequential_sampler`);
- FSDP2 detection (:func:`fsdp2`).

:func:`check_environment` (once per process, before anything expensive) and
:func:`check_trainer` (at Trainer construction and again when training starts) verify every
required seam: present, with the signature it was tested with. A missing or re-signed seam
raises :class:`~finitetune.errors.ConfigError` naming it and the versions that have it, so a
release that changes one fails before step 1 instead of applying unchecked steps. A release
newer than the newest tested is tried, not refused: when every seam checks out, training
proceeds with one line saying so. DeepSpeed's private names are listed in
:data:`finitetune.integrations.deepspeed.engine.SEAMS`, torch's in
:data:`finitetune.numerics.torch_seams.TORCH_SEAMS`.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any

from finitetune.errors import ConfigError

__all__ = ["SEAMS", "TESTED", "Seam", "capabilities",
           "check_environment", "check_trainer", "dtype_kwargs", "fsdp2",
           "missing_decision_error", "sequential_kwargs", "shifts_labels",
           "use_sequential_sampler", "versions_note"]

TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("4.51.3", "5.25.0"),
    "accelerate": ("1.3.0", "1.16.0"),
    "peft": ("0.17.0", "0.21.2"),
    "trl": ("0.18.2", "1.16.0"),
}
"""The oldest and newest release of each library the CI matrix runs (``.ci/run``); the lower
bounds in ``pyproject.toml`` are the oldest ones."""


@dataclass(frozen=True)
class Seam:
    """One part of a library the integration relies on."""

    owner: str
    """Where it lives: ``transformers.Trainer``, ``accelerate.Accelerator``..."""
    name: str
    params: tuple[str, ...] | None
    """The parameter names of the tested signature; None for an attribute or a keyword."""
    applies: str
    """The releases that have it (as tested)."""
    role: str
    """What finitetune does with it."""
    absent: str
    """What happens on a release without it: the fallback, or why training is refused."""
    required: bool = True
    """Checked at start-up: without it the guard refuses to train."""


SEAMS: tuple[Seam, ...] = (
    Seam("accelerate.Accelerator", "clip_grad_norm_", ("self", "parameters", "max_norm",
                                                       "norm_type"),
         "accelerate 1.3 to 1.16", "wrapped on the Trainer's own Accelerator for the run: the "
         "guard's decision, where every Trainer release clips", "refused"),
    Seam("transformers.Trainer", "_loss_shifts_labels", None, "transformers 5.10.1 and later",
         "read: count supervised tokens as the Trainer counts num_items_in_batch",
         "the labels are counted as they are, the older releases' convention", required=False),
    Seam("transformers.Trainer", "_save_checkpoint", ("self", "model", "trial"),
         "transformers 4.51.3 to 5.25", "wrapped per instance: the one door of every save "
         "(no poisoned checkpoint)", "refused"),
    Seam("transformers.Trainer", "_load_from_checkpoint", ("self", "resume_from_checkpoint",
                                                           "model"),
         "transformers 4.51.3 to 5.25", "called: the on-disk rollback reloads a checkpoint's "
         "weights", "refused"),
    Seam("transformers.Trainer", "_get_output_dir", ("self", "trial"),
         "transformers 4.51.3 to 5.25", "called: where a save goes", "the run's output_dir",
         required=False),
    Seam("transformers.TrainerState", "best_model_checkpoint", None,
         "transformers 4.51.3 to 5.25", "the checkpoint rotation keeps: set only while a "
         "save's rotation runs, to keep the last healthy checkpoint (when no "
         "metric_for_best_model uses it)", "refused"),
    Seam("transformers.TrainerState", "save_to_json", ("self", "json_path"),
         "transformers 4.51.3 to 5.25", "wrapped per save: every release writes the "
         "checkpoint's trainer_state.json and then rotates, so the pin is set in between",
         "refused"),
    Seam("transformers.Trainer", "_save_optimizer_and_scheduler", ("self", "output_dir"),
         "transformers 4.51.3 to 5.25", "wrapped by the crash tests' kill points only",
         "not used outside the tests", required=False),
    Seam("transformers.Trainer", "_get_train_sampler", None, "transformers 4.51.3 to 5.25",
         "replaced per instance for sequential sampling where TrainingArguments has no "
         "train_sampling_strategy (before 5.2)", "not needed from 5.2", required=False),
    Seam("transformers.TrainingArguments", "train_sampling_strategy", None,
         "transformers 5.2 and later", "sequential sampling (verify, tests)",
         "_get_train_sampler replaced per instance", required=False),
    Seam("transformers.PreTrainedModel", "from_pretrained(dtype=...)", None,
         "transformers 4.56 and later", "the load dtype", "torch_dtype=...", required=False),
    Seam("accelerate.Accelerator", "is_fsdp2", None, "accelerate 1.6 and later",
         "FSDP2 (sharded gradients the guard adds up) told from FSDP1",
         "the FSDP plugin's fsdp_version", required=False),
    Seam("accelerate (prepared model)", "_original_forward", None, "accelerate 1.3 to 1.16",
         "attribution replays the model's forward without accelerate's autocast wrapper",
         "the forward as prepared", required=False),
    Seam("peft.tuners.lora.Linear", "lora_variant", None, "peft 0.16 and later",
         "a DoRA (or other variant) head is not read as plain LoRA by the hidden-state loss",
         "the loss falls back to full logits", required=False),
)
"""Every part of transformers, accelerate and PEFT the Trainer integration depends on beyond
their documented public API (``tests/test_architecture.py`` fails when the code uses a private
name that no list holds)."""

_CHECKED: dict[int, None] = {}


def _seam(owner: str, name: str) -> Seam:
    return next(s for s in SEAMS if s.owner == owner and s.name == name)


def _signature(obj: Any) -> tuple[str, ...] | None:
    return tuple(inspect.signature(obj).parameters) if callable(obj) else None


def _missing(seam: Seam, found: tuple[str, ...] | None) -> ConfigError:
    what = "nothing" if found is None else f"({', '.join(found)})"
    return ConfigError(
        f"the gradient guard needs {seam.owner}.{seam.name}({', '.join(seam.params or ())}) "
        f"({seam.role}); {seam.applies} have it, the installed release has {what}. "
        f"{versions_note()}")


def check_environment() -> None:
    """The class-level seams, once per process (cheap), before any data or model is loaded.

    Raises:
        ConfigError: a required seam is missing or has another signature (message: which one,
            what it is for, the releases that have it).
    """
    if _CHECKED:
        return
    from accelerate import Accelerator
    from transformers import Trainer, TrainerState

    owners = {"accelerate.Accelerator": Accelerator, "transformers.Trainer": Trainer,
              "transformers.TrainerState": TrainerState}
    for seam in SEAMS:
        cls = owners.get(seam.owner)
        if cls is None or seam.params is None:
            continue
        found = _signature(getattr(cls, seam.name, None))
        if found is None and not seam.required:
            continue
        # a seam may grow trailing parameters with defaults; the tested ones must lead
        if found is None or found[:len(seam.params)] != seam.params:
            raise _missing(seam, found)
    if "best_model_checkpoint" not in _state_fields():
        raise _missing(_seam("transformers.TrainerState", "best_model_checkpoint"), None)
    _note_newer_releases()
    _CHECKED[0] = None


def check_trainer(trainer: Any) -> None:
    """Everything the guard needs of this Trainer, before its first step: the class-level
    seams, its own Accelerator's ``clip_grad_norm_``, the label-count flag, and a parallel
    set-up the guard can make safe."""
    check_environment()
    accelerator = getattr(trainer, "accelerator", None)
    if not callable(getattr(accelerator, "clip_grad_norm_", None)):
        raise _missing(_seam("accelerate.Accelerator", "clip_grad_norm_"), None)
    flag = getattr(trainer, "_loss_shifts_labels", None)
    if flag is not None and not isinstance(flag, bool):
        raise ConfigError(f"transformers.Trainer._loss_shifts_labels is {flag!r}, not the bool "
                          f"the guard reads to count tokens. {versions_note()}")
    check_parallelism(trainer)



def shifts_labels(trainer: Any) -> bool:
    """Whether this Trainer counts ``num_items_in_batch`` over shifted labels (5.10.1 and
    later, for a causal-LM loss) or over the labels as they are (older releases): the guard's
    token count follows the Trainer's, so the loss is normalised consistently."""
    return bool(getattr(trainer, "_loss_shifts_labels", False))


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``from_pretrained``'s keyword for the load dtype: ``dtype`` from transformers 4.56,
    ``torch_dtype`` before (only the release tells: both are read from ``**kwargs``)."""
    import transformers
    from packaging.version import Version

    newer = Version(transformers.__version__).release >= (4, 56)
    return {"dtype": dtype} if newer else {"torch_dtype": dtype}


def sequential_kwargs() -> dict[str, Any]:
    """``TrainingArguments`` keywords for in-order sampling, where the release has them."""
    return {"train_sampling_strategy": "sequential"} if _has_sampling_strategy() else {}


def use_sequential_sampler(trainer: Any) -> None:
    """In-order sampling on a release whose ``TrainingArguments`` cannot ask for it (before
    5.2): this Trainer instance's ``_get_train_sampler`` returns a ``SequentialSampler``."""
    if _has_sampling_strategy():
        return
    from torch.utils.data import SequentialSampler

    def sequential(*args: Any, **kwargs: Any) -> Any:
        dataset = args[0] if args else kwargs.get("train_dataset", trainer.train_dataset)
        return SequentialSampler(dataset)

    trainer._get_train_sampler = sequential


def fsdp2(accelerator: Any) -> bool:
    """Whether accelerate runs FSDP2 (``is_fsdp2`` from accelerate 1.6; the plugin's
    ``fsdp_version`` before, where FSDP2 does not exist and this is False)."""
    flag = getattr(accelerator, "is_fsdp2", None)
    if flag is not None:
        return bool(flag)
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", 1) == 2


def capabilities() -> list[tuple[str, bool, str]]:
    """(capability, available, how) with the installed releases, for ``finitetune env``."""
    rows: list[tuple[str, bool, str]] = []
    try:
        check_environment()
        guard, why = True, "clipping and optimizer step wrapped on the Trainer's Accelerator"
    except ConfigError as exc:
        guard, why = False, str(exc).split(". ")[0]
    rows.append(("gradient guard", guard, why))
    rows.append(("checkpoint protection", guard, "save and resume wrapped per Trainer"
                 if guard else why))
    rows.append(("attribution", guard, "replay of a faulty step's micro-batches"
                 if guard else why))
    rows.append(("token count", True, "shifted labels, as the Trainer counts them"
                 if _trainer_sets_shift_flag() else "labels as they are, as this release "
                 "counts them"))
    peft = _version("peft")
    rows.append(("hidden-state loss", True, "LM head at supervised positions; LoRA heads "
                 + ("with their variant checked" if peft else "(PEFT not installed)")))
    return rows


def missing_decision_error(max_grad_norm: float) -> ConfigError:
    """The optimizer was stepped without the guard deciding first although the Trainer clips:
    it clipped some other way (a subclass's own clipping, SageMaker MP, mixed-mesh tensor
    parallelism), possibly a NaN or overflowing norm the guard never checked."""
    clipped = (f"it may already have clipped the gradients to {max_grad_norm:g} with a norm "
               "the guard never checked" if max_grad_norm > 0 else "nothing was checked")
    return ConfigError("the Trainer stepped the optimizer without asking the gradient guard "
                       f"(its Accelerator's clip_grad_norm_ was not called this step): "
                       f"{clipped}. No step was applied. {versions_note()}")


def check_parallelism(trainer: Any) -> None:
    """Refuse, at start-up, the set-ups the guard cannot make safe (each message names a fix).

    Supported: one device, DDP (``torchrun`` / ``accelerate launch``; gradients replicated),
    FSDP2 (gradients are DTensor shards; the guard adds up the squared shard norms), and
    DeepSpeed ZeRO-1/2/3 (its own checks: :mod:`finitetune.integrations.deepspeed.engine`).
    FSDP1's flat shards are not read by the guard; and on CPU accelerate silently drops the
    Trainer's FSDP option and trains with DDP, which would leave a user believing the model is
    sharded.
    """
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False):
        return  # ZeRO-1/2/3: checked by finitetune.integrations.deepspeed.engine.check
    fsdp_requested = bool(getattr(args, "fsdp", None)) or (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
    if getattr(trainer, "is_fsdp_enabled", False):
        if not fsdp2(trainer.accelerator):
            raise ConfigError("GuardCallback supports FSDP2 only (FSDP1 keeps flat-parameter "
                              "shards the guard does not read): set fsdp_config="
                              "{'fsdp_version': 2} (accelerate 1.6 or later: --fsdp_version 2).")
    elif fsdp_requested:
        raise ConfigError("FSDP was requested but accelerate runs this Trainer without it (on "
                          "CPU it falls back to DDP without a word): remove the fsdp option to "
                          "train with DDP, or run on GPUs. For sharding on CPU/gloo, use "
                          "torch.distributed.fsdp.fully_shard with finitetune.Guard in a plain "
                          "loop.")


def versions_note() -> str:
    """Installed vs tested releases and what to do: the tail of every seam error."""
    installed = ", ".join(f"{name} {v}" for name in TESTED if (v := _version(name)))
    tested = ", ".join(f"{name} {lo} to {hi}" for name, (lo, hi) in TESTED.items())
    return (f"finitetune's Trainer integration is tested with {tested}; installed: "
            f"{installed}. Install a tested release, upgrade finitetune, or train without "
            "the guard.")


def _note_newer_releases() -> None:
    """One line per library newer than the newest tested release: tried, not refused."""
    from packaging.version import Version

    for name, (_, newest) in TESTED.items():
        installed = _version(name)
        if installed and Version(installed).release > Version(newest).release:
            print(f"finitetune: {name} {installed} is newer than the newest tested release "
                  f"({newest}); every seam the guard uses is present with the tested "
                  "signature, so training goes on", file=sys.stderr, flush=True)


def _state_fields() -> set[str]:
    import dataclasses

    from transformers import TrainerState

    return {f.name for f in dataclasses.fields(TrainerState)}


def _has_sampling_strategy() -> bool:
    import dataclasses

    from transformers import TrainingArguments

    return "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}


def _trainer_sets_shift_flag() -> bool:
    """Whether ``Trainer.__init__`` assigns ``_loss_shifts_labels`` (the names an attribute
    assignment stores are in its code object's ``co_names``)."""
    from transformers import Trainer

    return "_loss_shifts_labels" in inspect.unwrap(Trainer.__init__).__code__.co_names


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
