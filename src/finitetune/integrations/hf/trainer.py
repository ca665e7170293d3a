"""``build_trainer``: the one place where a ``transformers.Trainer`` gets finitetune's wiring.

``finitetune train`` and ``finitetune verify`` both build their Trainers here, so ``verify``
proves the exact wiring users run: the safe loss as ``compute_loss_func`` (fp32, token-mean
over the accumulation window, 0 on an empty window instead of NaN), the collator that carries
sample ids (leaving out the samples of earlier faulty steps), ``GuardCallback`` with
attribution, ``CheckpointCallback`` (no poisoned checkpoint, healthy resume, on-disk
rollback), and the ``metrics.jsonl`` writer fed by the loss tracker summed over ranks. The
callback order matters: the guard's counters must be in a log dict before the metrics line is
written from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finitetune.rundir import files as run_files
from finitetune.settings.config import GuardConfig


def build_trainer(
    model: Any, args: Any, train_dataset: Any, *, pad_token_id: int,
    guard: GuardConfig | None = None, safe_loss: bool = True, attribution: bool = True,
    sources: Mapping[int, str] | None = None, trainer_cls: Any = None, loss: Any = None,
    fingerprints: Any = None,
) -> tuple[Any, Any]:
    """A Trainer on ``model`` with finitetune's loss, guard and metrics.

    Args:
        model: the model to train (already wrapped with PEFT if LoRA is wanted).
        args: ``TrainingArguments``; ``args.output_dir`` is the run directory.
        train_dataset: tokenised rows (``input_ids``, ``labels``, optional ``index``).
        pad_token_id: for the collator's padding (padding is masked by position).
        guard: the guard's settings; ``None`` builds a Trainer without the guard and without
            the ``metrics.jsonl`` writer (``verify``'s unguarded arm).
        safe_loss: use finitetune's safe loss (implied by ``guard``); False keeps the
            model's own loss.
        attribution: with the guard, name the layer and samples of a faulty step (costs
            nothing on healthy steps).
        sources: dataset index -> ``file:line``, for the attribution's sample names.
        trainer_cls: the Trainer class (default ``transformers.Trainer``).
        fingerprints: the rows' content fingerprints
            (:class:`~finitetune.data.fingerprint.RowFingerprints`): remembered bad samples
            are recorded with them and found again by content when the data changed.
        loss: the safe-loss tracker to use (e.g. from
            :func:`~finitetune.integrations.hf.hidden_loss.choose_loss`); default a new
            ``SafeCausalLMLoss`` when ``safe_loss`` or ``guard``.

    Returns:
        (trainer, loss tracker or None).
    """
    from transformers import Trainer

    from finitetune.data.collate import CausalLMCollator
    from finitetune.loss.causal import SafeCausalLMLoss

    tracker = loss if loss is not None else (
        SafeCausalLMLoss() if (safe_loss or guard is not None) else None)
    # sample ids ride in each batch only when the guard is there to pop them
    collator: Any = CausalLMCollator(pad_token_id, sample_ids=guard is not None)
    callbacks: list[Any] = []
    if guard is not None:
        collator, callbacks = _guarded_parts(model, args, guard, collator, tracker,
                                             attribution, sources, fingerprints)
    trainer = (trainer_cls or Trainer)(
        model=model, args=args, train_dataset=train_dataset, data_collator=collator,
        compute_loss_func=tracker, callbacks=callbacks,
    )
    return trainer, tracker


def _guarded_parts(model: Any, args: Any, guard: GuardConfig, collator: Any, tracker: Any,
                   attribution: bool, sources: Mapping[int, str] | None,
                   fingerprints: Any = None) -> tuple[Any, list[Any]]:
    """The collator (leaving out remembered bad samples) and the callbacks, in order."""
    from finitetune.distributed import AllRanksWindow
    from finitetune.guard.attribution import Attributor
    from finitetune.guard.bad_batches import BadSampleMemory, BadSampleRecorder
    from finitetune.integrations.hf.callback import GuardCallback
    from finitetune.integrations.hf.checkpoint_callback import CheckpointCallback
    from finitetune.integrations.hf.metrics import MetricsCallback
    from finitetune.testing import kill_points

    out = Path(args.output_dir)
    attributor = Attributor(model, out, sources=sources) if attribution else None
    # bad samples remembered (bad_samples.jsonl) and left out of later batches
    memory = BadSampleMemory(out, mode=guard.skip_bad_samples, window=guard.bad_sample_window,
                             accumulation=args.gradient_accumulation_steps, sources=sources,
                             fingerprints=fingerprints)
    callbacks = [GuardCallback(guard, output_dir=str(out), attribution=attribution,
                               on_fault=BadSampleRecorder(memory, attributor)),
                 CheckpointCallback(out, config=guard, memory=memory),
                 MetricsCallback(out / run_files.METRICS, tracker=AllRanksWindow(tracker)),
                 *kill_points.from_env()]
    return memory.wrap(collator), callbacks
