"""Every private part of ``transformers.Trainer`` the guard relies on, listed once and checked.

The guard reaches the Trainer through public seams where they exist: a callback, the optimizer's
``step`` (an instance-level wrapper the guard owns, the way accelerate wraps optimizers), the LR
scheduler's ``step``, and the public ``train`` / ``training_step`` / ``log`` methods a subclass
may override. Two things only a private Trainer method gives: the gradient norm *before*
clipping, and clipping itself (the Trainer clips before any callback runs; with a NaN norm that
multiplies every gradient by NaN, with an overflowing one it zeroes them, and a zero-gradient
step would then be applied). Those methods, and one private attribute read, are
:data:`PRIVATE_TRAINER_SEAMS`. :func:`check_trainer` verifies each one when training starts:
it exists, its signature is the one we tested, and no class between the guard's mixin and
``transformers.Trainer`` overrides it (its override would silently stop running). Anything else
stops with a :class:`~finitetune.errors.ConfigError` naming the versions we test, so a
transformers release that renames a method fails loudly instead of applying unchecked steps.
The runtime check that the Trainer did not clip behind the guard's back is
:func:`missing_decision_error`, raised by the optimizer-step wrapper.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from finitetune.errors import ConfigError

__all__ = ["CHECKPOINT_SEAMS", "PRIVATE_TRAINER_SEAMS", "TESTED_TRANSFORMERS", "TESTED_TRL",
           "check_checkpoint_seams", "check_trainer", "missing_decision_error", "versions_note"]

TESTED_TRANSFORMERS = "5.24"
"""The transformers release line the Trainer integration is tested with (pyproject pins it)."""
TESTED_TRL = "1.16"
"""The TRL release line the TRL trainers are tested with."""

PRIVATE_TRAINER_SEAMS: dict[str, tuple[str, ...] | None] = {
    # name -> the parameter names of the tested signature (None: an attribute, not a method)
    "_clip_grad_norm": ("self", "model"),
    "_get_grad_norm": ("self", "model", "grad_norm"),
    "_loss_shifts_labels": None,  # read: count supervised tokens the way the Trainer does
}
"""The private Trainer methods the guard overrides (in ``GuardedTrainerMixin``) and the private
attribute it reads: the ONE list, checked by :func:`check_trainer` at the start of training."""

CHECKPOINT_SEAMS: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("self", "model", "trial"),  # wrapped: the one door of every save
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),  # called: rollback
}
"""The private Trainer methods :class:`~finitetune.integrations.hf.checkpoint_callback.
CheckpointCallback` wraps or calls (no poisoned checkpoint, on-disk rollback), checked by
:func:`check_checkpoint_seams` when it binds."""


def check_checkpoint_seams(trainer: Any) -> None:
    """Refuse a Trainer whose checkpoint methods are not the tested ones: a save wrapper that
    never runs would let a poisoned state reach the disk."""
    from transformers import Trainer

    for name, params in CHECKPOINT_SEAMS.items():
        base = Trainer.__dict__.get(name)
        got = tuple(inspect.signature(base).parameters) if base is not None else None
        if got != params:
            raise ConfigError(f"CheckpointCallback needs transformers.Trainer.{name}"
                              f"({', '.join(params)}), found "
                              f"{'nothing' if got is None else '(' + ', '.join(got) + ')'}. "
                              f"{versions_note()}")


def versions_note() -> str:
    """Installed vs tested versions and what to do: the tail of every seam error."""
    import transformers

    trl = _installed("trl")
    return (f"finitetune's Trainer integration is tested with transformers {TESTED_TRANSFORMERS}"
            f".x and TRL {TESTED_TRL}.x; installed: transformers {transformers.__version__}"
            f"{f', TRL {trl}' if trl else ''}. Install the tested versions (pip install "
            f"'transformers>={TESTED_TRANSFORMERS},<{_next_minor(TESTED_TRANSFORMERS)}' "
            f"'trl>={TESTED_TRL},<{_next_minor(TESTED_TRL)}'), or "
            "upgrade finitetune, or train without the guard.")


def _next_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}"


def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_trainer(trainer: Any, mixin: type) -> None:
    """Refuse, before the first step, a Trainer whose seams are not the ones we tested.

    ``mixin``: the class whose overrides replace the private methods (it must come first in the
    Trainer's MRO). Raises :class:`ConfigError` for a missing or changed seam, a class that
    overrides one below the mixin, or a parallel set-up the guard cannot make safe.
    """
    from transformers import Trainer

    cls = type(trainer)
    if not isinstance(trainer, mixin):
        raise ConfigError(f"{cls.__name__} is not guarded: use finitetune.integrations.hf.callback."
                          f"guarded({cls.__name__}) or pass a GuardCallback to its constructor.")
    for name, params in PRIVATE_TRAINER_SEAMS.items():
        if params is None:
            if not isinstance(getattr(trainer, name, None), bool):
                raise ConfigError(f"transformers.Trainer no longer sets the attribute {name} "
                                  f"that the gradient guard reads. {versions_note()}")
            continue
        base = Trainer.__dict__.get(name)
        if base is None:
            raise ConfigError(f"transformers.Trainer has no method {name}, which the gradient "
                              f"guard overrides to take clipping over. {versions_note()}")
        got = tuple(inspect.signature(base).parameters)
        if got != params:
            raise ConfigError(f"transformers.Trainer.{name} takes ({', '.join(got)}), not the "
                              f"({', '.join(params)}) the guard was tested with. "
                              f"{versions_note()}")
        others = [k.__qualname__ for k in cls.__mro__
                  if k not in (mixin, Trainer) and name in k.__dict__]
        if others:
            raise ConfigError(f"{others[0]} overrides {name}; the guard takes clipping over and "
                              "would silently bypass that override. Move that logic into "
                              "training_step or an optimizer wrapper, or train without the guard.")
    check_parallelism(trainer)


def missing_decision_error(max_grad_norm: float) -> ConfigError:
    """The optimizer was stepped without the guard deciding first: the Trainer no longer calls
    the seams above (so it may have clipped a NaN or overflowing norm already)."""
    clipped = (f"it may already have clipped the gradients to {max_grad_norm:g} with a norm "
               "the guard never checked" if max_grad_norm > 0 else "nothing was checked")
    return ConfigError("the Trainer stepped the optimizer without asking the gradient guard "
                       f"(neither _clip_grad_norm nor _get_grad_norm ran this step): {clipped}. "
                       f"No step was applied. {versions_note()}")


def check_parallelism(trainer: Any) -> None:
    """Refuse, at start-up, the set-ups the guard cannot make safe (each message names a fix).

    Supported: one device, DDP (``torchrun`` / ``accelerate launch``; gradients replicated) and
    FSDP2 (gradients are DTensor shards; the guard adds up the squared shard norms), and
    DeepSpeed ZeRO-1/2/3 (its own checks: :mod:`finitetune.integrations.deepspeed.engine`). FSDP1's
    flat shards are not read by the guard; and on CPU accelerate silently drops the Trainer's
    FSDP option and trains with DDP, which would leave a user believing the model is sharded.
    """
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False):
        return  # ZeRO-1/2/3: checked by finitetune.integrations.deepspeed.engine.check
    fsdp_requested = bool(getattr(args, "fsdp", None)) or (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
    if getattr(trainer, "is_fsdp_enabled", False):
        if not getattr(trainer.accelerator, "is_fsdp2", False):
            raise ConfigError("GuardCallback supports FSDP2 only (FSDP1 keeps flat-parameter "
                              "shards the guard does not read): set fsdp_config="
                              "{'fsdp_version': 2} (accelerate: --fsdp_version 2).")
    elif fsdp_requested:
        raise ConfigError("FSDP was requested but accelerate runs this Trainer without it (on "
                          "CPU it falls back to DDP without a word): remove the fsdp option to "
                          "train with DDP, or run on GPUs. For sharding on CPU/gloo, use "
                          "torch.distributed.fsdp.fully_shard with finitetune.Guard in a plain "
                          "loop.")
