"""The one table of metric names: every logger's spelling of a metric, mapped to one name.

The Trainer writes ``loss`` and ``grad_norm``; its TensorBoard, W&B and trackio callbacks write
``train/loss``; Megatron prints ``lm loss`` and ``grad norm``; LLaMA-Factory writes ``lr`` and
``current_steps``; fairseq ``gnorm`` and ``num_updates``. The analysis knows only the names on
the right-hand side of :data:`ALIASES`; every reader (files, console text, trackers) maps keys
through :func:`norm_key`, so adding a spelling is one line here.
"""

from __future__ import annotations

import re

__all__ = ["ALIASES", "PHRASES", "SUMMARY_KEYS", "is_alias", "norm_key", "phrase_pattern"]

ALIASES: dict[str, str] = {
    # the training loss
    "loss": "loss", "train_loss": "loss", "lm_loss": "loss", "total_loss": "loss",
    "training_loss": "loss", "loss_avg": "loss", "avg_loss": "loss", "mean_loss": "loss",
    "loss_mean": "loss", "average_loss": "loss", "running_loss": "loss",
    "train_loss_avg": "loss", "avg_train_loss": "loss", "smoothed_loss": "loss",
    # the pre-clip gradient norm
    "grad_norm": "grad_norm", "gnorm": "grad_norm", "gradnorm": "grad_norm",
    "total_norm": "grad_norm", "grad_l2_norm": "grad_norm", "gradient_norm": "grad_norm",
    # the learning rate
    "learning_rate": "learning_rate", "lr": "learning_rate", "learningrate": "learning_rate",
    # the optimizer step
    "step": "step", "global_step": "step", "iteration": "step", "iter": "step",
    "current_steps": "step", "num_updates": "step", "trainer/global_step": "step",
    "global_step/max_steps": "step",
    # evaluation
    "eval_loss": "eval_loss", "val_loss": "eval_loss", "valid_loss": "eval_loss",
    "validation_loss": "eval_loss", "eval_lm_loss": "eval_loss",
    # fp16 loss scaling and skipped steps
    "loss_scale": "loss_scale", "fp16_grad_scale": "loss_scale", "grad_scale": "loss_scale",
    "number_of_skipped_iterations": "skipped_iterations",
    "number_of_nan_iterations": "nan_iterations",
}
"""Normalised key (lower case, spaces and dashes as ``_``, logger prefix removed) -> name."""

AVERAGES = frozenset(("train_loss", "loss_avg", "avg_loss", "mean_loss", "loss_mean",
                      "average_loss", "running_loss", "train_loss_avg", "avg_train_loss",
                      "smoothed_loss"))
"""Spellings of the loss that are averages over many steps: in an entry that also has the
step's own ``loss``, that one is kept (:func:`is_alias`); alone, they are the loss."""

PREFIXES = (("train/", ""), ("training/", ""), ("eval/", "eval_"), ("val/", "eval_"),
            ("valid/", "eval_"), ("validation/", "eval_"))
"""Logger prefixes: ``train/loss`` is ``loss``, ``eval/loss`` is ``eval_loss``."""

SUMMARY_KEYS = frozenset(("train_runtime", "train_samples_per_second", "train_steps_per_second",
                          "total_flos", "train_loss"))
"""The Trainer's end-of-training keys. Trackers log them at the last step beside that step's
loss: readers that group by step must take them out first (``train_loss`` there is the mean of
the run, not a step's loss)."""

IGNORED = frozenset(("_runtime", "_timestamp", "_step", "percentage", "total_steps"))
"""Bookkeeping columns of trackers (W&B's ``_step`` counts log calls, not optimizer steps)."""

PHRASES = ("lm loss", "train loss", "val loss", "valid loss", "eval loss", "grad norm",
           "learning rate", "loss scale", "global step", "fp16 grad scale",
           "number of skipped iterations", "number of nan iterations")
"""Multi-word keys printed by console loggers (Megatron, nanoGPT, insightface...)."""

_CACHE: dict[str, str] = {}


def _spelling(key: str) -> str:
    norm = key.strip().lower().replace(" ", "_").replace("-", "_")
    for prefix, repl in PREFIXES:
        if norm.startswith(prefix):
            return repl + norm[len(prefix):]
    return norm


def norm_key(key: str) -> str:
    """The one name of ``key`` (unknown keys keep their normalised spelling)."""
    norm = _CACHE.get(key)
    if norm is None:
        spelling = _spelling(key)
        norm = _CACHE[key] = ALIASES.get(spelling, spelling)
    return norm


def is_alias(key: str) -> bool:
    """Whether ``key`` is an average standing in for the loss (:data:`AVERAGES`): in an entry
    that also holds ``loss``, the step's own value is kept, whatever the key order."""
    return _spelling(key) in AVERAGES


def phrase_pattern() -> str:
    """Regex alternation of :data:`PHRASES`, longest first (flexible inner whitespace)."""
    return "|".join(r"\s+".join(map(re.escape, p.split()))
                    for p in sorted(PHRASES, key=len, reverse=True))
