"""The main job: data -> model -> Trainer (+ guard) -> evaluation -> run directory.

Everything that can fail because of the user's input (settings, output directory, data file,
model directory, LoRA targets, what transformers accepts) is checked *before* the run
directory is touched, so a bad input leaves nothing behind. Once training starts, every file is
written as it happens (metrics/events line by line, checkpoints by the Trainer, JSON
atomically), and ``finally`` records how the run ended in ``status.json`` (completed, halted,
failed, with the step and error) and writes the evaluation and report, also when training
stops early. ``final/`` is written only from a model that trained.

Launched as several processes (``torchrun --nproc_per_node N``, ``accelerate launch
--num_processes N``), every rank trains and only rank 0 writes: it makes the run directory
(the others wait for it in a broadcast that also carries rank 0's error, if any, so no rank is
left waiting), evaluates and writes the reports; metrics and guard events are global numbers
that rank 0 writes once. The process group is torn down at the end so every rank exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finitetune.data.fingerprint import RowFingerprints
from finitetune.errors import ConfigError, NonFiniteHalt, SettingError
from finitetune.numerics.constants import IGNORE_INDEX
from finitetune.parsing.terminal import printable
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import write_json_atomic
from finitetune.settings.config import TrainConfig
from finitetune.train.resume_check import decide_resume, resumed_settings_callback
from finitetune.train.writer import (
    check_output_dir,
    default_output_dir,
    make_run_dir,
    record_outcome,
    save_final,
)

log = logging.getLogger("finitetune")


@dataclass
class RunResult:
    """What a finished (or stopped) run produced."""

    output_dir: Path
    eval_before: dict | None = None
    eval_after: dict | None = None
    global_step: int = 0
    train_seconds: float = 0.0
    stopped: str | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- preparation


def split_records(records: list[dict], eval_size: int, seed: int) -> tuple[list, list]:
    """Deterministic held-out split: the same seed gives the same eval set on every machine."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(eval_size, len(records) // 5) if len(records) < 5 * eval_size else eval_size
    eval_idx, train_idx = set(order[:n_eval]), order[n_eval:]
    return [records[i] for i in sorted(train_idx)], [records[i] for i in sorted(eval_idx)]


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_targets
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                      lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {targets!r} do not fit this model: {exc}") from exc


def training_arguments(cfg: TrainConfig, out: Path, steps: int, plan: Any = None) -> Any:
    """``plan``: a :class:`~finitetune.precision.policy.PrecisionPlan`; its ``bf16``/``fp16`` apply."""
    from transformers import TrainingArguments

    save_steps = cfg.save_steps if cfg.save_steps > 0 else max(1, steps)
    return TrainingArguments(
        output_dir=str(out),
        learning_rate=cfg.learning_rate,
        warmup_steps=int(cfg.warmup_ratio * steps),
        lr_scheduler_type=cfg.lr_scheduler_type,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not _cuda_available(),
        average_tokens_across_devices=True,
        deepspeed=cfg.deepspeed or None,
        **(plan.training_arguments() if plan is not None else {}),
    )


def _train_device() -> str:
    """Where the Trainer will run: CUDA when present, else CPU (``use_cpu`` also covers MPS)."""
    return "cuda" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def planned_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    from finitetune import distributed

    per_step = (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                * distributed.world_size())  # each rank reads its own share of an epoch
    return max(1, math.ceil(cfg.num_train_epochs * math.ceil(n_train / per_step)))


# --------------------------------------------------------------------------- the job


def run_training(cfg: TrainConfig) -> RunResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and leave a complete run directory.

    Under a multi-process launcher this joins the process group first and destroys it at the
    end (also after an error), so ``torchrun`` sees every rank exit.
    """
    from finitetune import distributed

    joined = _init_distributed()
    try:
        return _run_training(cfg)
    finally:
        if joined:
            distributed.destroy()


def _init_distributed() -> bool:
    """Join the launcher's process group now (True if this call created it).

    Done before the run directory exists so that rank 0 alone can make it. It is the group
    ``TrainingArguments`` would create (accelerate's ``PartialState``: gloo on CPU, NCCL on
    GPUs), which the Trainer then finds and reuses.
    """
    import torch

    from finitetune import distributed

    if not distributed.launched_distributed() or torch.distributed.is_initialized():
        return False
    from accelerate import PartialState

    PartialState(cpu=not _cuda_available())  # COLLECTIVE: rendezvous of all ranks
    return torch.distributed.is_initialized()


def _run_training(cfg: TrainConfig) -> RunResult:
    # long: the checks before the run directory is touched read top to bottom, in the order
    # of what each needs (settings, paths, data, tokenizer, resume, model), then the writes
    from finitetune import distributed
    from finitetune.data.pipeline import describe, load_data_records, prepare_rows, tokenize_with
    from finitetune.integrations.hf.hidden_loss import choose_loss
    from finitetune.integrations.hf.seams import check_environment
    from finitetune.models import load_model, load_tokenizer, resolve_model
    from finitetune.precision.policy import choose_precision

    # 1. everything that can be wrong with the input, before writing anything: first the
    # installed transformers / accelerate (cheap), before any data, model or evaluation
    check_environment()
    cfg = dataclasses.replace(cfg, output_dir=str(default_output_dir(cfg)))
    if not distributed.is_distributed():  # else rank 0 checks it in make_run_dir, and says so
        check_output_dir(cfg)
    records = load_data_records(cfg.data, cfg.model, cfg.seed)
    train_recs, eval_recs = split_records(records, cfg.data.eval_size, cfg.seed)
    if cfg.deepspeed:  # a missing or unusable DeepSpeed config fails before anything is written
        from finitetune.integrations.deepspeed.engine import load_config

        load_config(cfg.deepspeed, cuda=_cuda_available())
    # a precision the hardware cannot honour fails here, before the model loads
    choose_precision(None, device=_train_device(), requested=cfg.precision)
    with distributed.main_process_first():  # rank 0 fills the model cache, then the others
        model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code,
                               remote_code_flag=_REMOTE_CODE_FLAG)
    rows, label_report, label_summary = prepare_rows(train_recs, tokenizer, cfg.data)
    fingerprints = RowFingerprints.of(records, train_recs)  # remembered samples, by content
    # --resume: the checkpoint, the settings it changes, the files it writes, judged while the
    # run directory is untouched (a refusal changes nothing)
    resume = decide_resume(cfg, planned_steps(cfg, len(rows)))
    if distributed.is_main_process():
        print(printable(f"finitetune: {describe(label_summary, label_report)}"), flush=True)
    eval_rows = [r for r in tokenize_with(eval_recs, tokenizer, cfg.data)
                 if any(t != IGNORE_INDEX for t in r["labels"])]
    eval_recs = [eval_recs[r["index"]] for r in eval_rows]
    model = load_model(model_path, trust_remote_code=cfg.trust_remote_code,
                       remote_code_flag=_REMOTE_CODE_FLAG)
    # LoRA targets the model lacks stop here. The baseline evaluation runs on the wrapped
    # model: a fresh adapter's B matrix is zero, so its outputs are the base model's exactly.
    model = apply_lora(model, cfg)
    # the device the Trainer will use: use_cpu=True unless CUDA (MPS is never picked here)
    plan = choose_precision(model, device=_train_device(), requested=cfg.precision)
    args = _checked_training_arguments(cfg, planned_steps(cfg, len(rows)), plan)
    # fp32, token-mean over the window, 0 (not NaN) when empty; the LM head only where a label
    # is, where the model is understood (`--loss supervised` on one that is not stops here)
    loss, loss_line = choose_loss(model, cfg.loss, args=args)

    # 2. the run directory, held by rank 0 (its RunLock) until the reports are written
    with make_run_dir(cfg, label_report, label_summary, tokenizer, resume) as out:
        main = distributed.is_main_process()
        if main:
            print(f"finitetune: precision: {plan}", flush=True)
            print(f"finitetune: loss: {loss_line}", flush=True)
            write_json_atomic(out / run_files.PRECISION, plan.to_dict())
        result = RunResult(output_dir=out)
        eval_kwargs = dict(max_length=cfg.data.max_length - cfg.eval_max_new_tokens,
                           max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size,
                           template=cfg.data.template)
        with record_outcome(out, result, write=main):  # status, eval and reports, also on failure
            _train_and_evaluate(cfg, out, model, tokenizer, rows, eval_recs, eval_rows,
                                eval_kwargs, result, args, loss,
                                resume.changes if resume is not None else None, fingerprints)
    return result


_REMOTE_CODE_FLAG = "--trust-remote-code"
"""How a user of ``finitetune train`` allows a model's own code (named in the error)."""


def _checked_training_arguments(cfg: TrainConfig, steps: int, plan: Any) -> Any:
    """``TrainingArguments`` built before the run directory exists, so a setting transformers
    refuses (an unknown scheduler name, ...) stops before anything is written."""
    from transformers.trainer_utils import SchedulerType

    if cfg.lr_scheduler_type not in {s.value for s in SchedulerType}:
        raise SettingError("lr_scheduler_type", cfg.lr_scheduler_type,
                           "one of: " + ", ".join(s.value for s in SchedulerType))
    try:
        return training_arguments(cfg, Path(cfg.output_dir or "."), steps, plan)
    except ValueError as exc:
        raise ConfigError(f"transformers refuses these settings: {exc}") from None


def _train_and_evaluate(cfg, out, model, tokenizer, rows, eval_recs, eval_rows, eval_kwargs,
                        result: RunResult, args: Any, loss: Any = None,
                        changes: dict | None = None, fingerprints: Any = None) -> RunResult:
    from finitetune import distributed
    from finitetune.integrations.hf.checkpoint_callback import load_checkpoint_weights
    from finitetune.integrations.hf.trainer import build_trainer
    from finitetune.train.evaluation import eval_loss, exact_match

    main = distributed.is_main_process()  # rank 0 writes and evaluates; every rank trains
    resume = _resume_plan(out, main, changes) if cfg.resume else None
    resume_from = resume.path if resume is not None else None
    if resume_from is None and cfg.eval_before and main and not (out / run_files.EVAL).exists():
        # the other ranks wait in the Trainer's first collective meanwhile
        result.eval_before = exact_match(model, tokenizer, eval_recs, **eval_kwargs)
        result.eval_before["eval_loss"] = eval_loss(model, eval_rows, tokenizer.pad_token_id)
        _print_eval("before", result.eval_before)

    trainer, _loss = build_trainer(
        model, args, rows,
        pad_token_id=tokenizer.pad_token_id, guard=cfg.guard, attribution=cfg.attribution,
        sources={r["index"]: r["source"] for r in rows if r.get("source")}, loss=loss,
        fingerprints=fingerprints)
    checkpoint = resume.checkpoint if resume is not None else None
    first = checkpoint.step if checkpoint is not None else 0
    # killed after its last checkpoint: train nothing more (its total is the checkpoint's step)
    untrained = checkpoint is not None and first >= args.max_steps
    if resume_from is not None:
        trainer.add_callback(resumed_settings_callback())  # logging/saving as now configured
    start = time.perf_counter()
    try:
        if checkpoint is not None and untrained:
            # killed after its last checkpoint: train nothing more (not one step past the end)
            load_checkpoint_weights(trainer, checkpoint.path)
            trainer.state.global_step = first
        else:
            trainer.train(resume_from_checkpoint=resume_from)
    finally:
        result.train_seconds = round(time.perf_counter() - start, 2)
        result.global_step = trainer.state.global_step
    if main:  # only after training finished: a halted or failed run leaves no final/
        _save_final_if_finite(trainer, tokenizer, out)
    if not main:
        return result  # evaluation (generation) runs on rank 0 only
    if checkpoint is not None and untrained:
        print(f"finitetune: nothing left to train: {checkpoint.name} is step {first} of "
              f"{args.max_steps}; final/, the evaluation and the report come from it", flush=True)
    else:
        done = (f"steps {first + 1}-{result.global_step} ({result.global_step - first} steps, "
                f"resumed from {checkpoint.name})" if checkpoint is not None
                else f"{result.global_step} steps")
        print(f"finitetune: trained {done} in {result.train_seconds:.1f} s", flush=True)
    result.eval_after = exact_match(model, tokenizer, eval_recs, **eval_kwargs)
    result.eval_after["eval_loss"] = eval_loss(model, eval_rows, tokenizer.pad_token_id)
    _print_eval("after", result.eval_after)
    return result


def _resume_plan(out: Path, main: bool, changes: dict | None = None) -> Any:
    """``--resume``: rank 0 picks the newest healthy checkpoint (sets aside the others, repairs
    and trims the logs); every rank gets its choice (COLLECTIVE when distributed)."""
    from finitetune import distributed
    from finitetune.rundir.checkpoints import inspect_checkpoint
    from finitetune.rundir.resume import ResumePlan, prepare_resume

    # logs what it chose and why; ``changes``: the settings this resume changed, for its event
    plan = prepare_resume(out, changes=changes) if main else ResumePlan(None)
    path = distributed.broadcast_object(plan.path)  # the others wait for rank 0's renames
    if not main and path is not None:
        plan.checkpoint = inspect_checkpoint(path, scan=False)
    return plan


def _save_final_if_finite(trainer: Any, tokenizer: Any, out: Path) -> None:
    """``final/`` only from a finite model (a NaN model is never handed on as the result)."""
    from finitetune.guard.state_check import check_state

    check = check_state(trainer.model, collective=False)  # rank 0 only; replicated weights
    if not check.finite:
        raise NonFiniteHalt(f"training ended with NaN/inf in {', '.join(check.nonfinite[:3])}: "
                            "final/ was NOT written; the healthy checkpoints remain: start "
                            "again with a lower learning rate (--overwrite), or continue from "
                            "the last healthy one with the guard's rollback (--resume "
                            "--guard-policy rollback)",
                            {"nonfinite_weights": check.nonfinite[:20]})
    save_final(trainer, tokenizer, out)


def _print_eval(when: str, ev: dict) -> None:
    print(f"finitetune: exact match {when} training: {ev['exact_match']:.1%} "
          f"({ev['correct']}/{ev['total']}), eval loss {ev['eval_loss']:.4f}", flush=True)


def configure_runtime() -> None:
    """Quiet, full-speed defaults for a CLI run (a library user's process is left alone).

    Uses every core of small CPU machines (torch's default can leave one idle), and silences
    the per-file progress bars of weight loading/saving, so the console shows the training log
    and our own lines. Warning filters are not touched here (they are process-wide):
    ``finitetune train`` scopes its own around the run (:func:`quiet_third_party_warnings`).
    """
    import torch

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # ranks launched on one machine share its cores (torchrun sets OMP_NUM_THREADS=1 for them)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    n = max(1, (os.cpu_count() or 1) // local_ranks)
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def quiet_third_party_warnings() -> Iterator[None]:
    """For the CLI's run only: hide a deprecation warning that peft 0.21 triggers in
    transformers 5.24 on every LoRA model (not ours to fix, and noise in the training log).
    Scoped with ``catch_warnings``, so no filter outlives the run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")
        yield
