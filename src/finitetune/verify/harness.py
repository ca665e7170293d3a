"""The machinery behind ``finitetune verify``: one real ``transformers.Trainer`` per arm.

Every arm of every scenario trains a deep copy of the same base model on the same rows, in the
same order (``train_sampling_strategy="sequential"``), with the same seed and hyper-parameters.
The arms differ only in what finitetune adds:

- **unguarded**: plain transformers defaults: the model's own loss, the Trainer's own clipping
  (``max_grad_norm=1.0``), ``logging_nan_inf_filter`` on, no finitetune callback. Its directory
  holds the Trainer's ``trainer_state.json``, which is what a user would have.
- **guarded**: :class:`~finitetune.loss.causal.SafeCausalLMLoss` as ``compute_loss_func``,
  :class:`~finitetune.GuardCallback` and the ``metrics.jsonl`` writer, as ``finitetune train``
  wires them. Its directory is a finitetune run directory (``metrics.jsonl``, ``events.jsonl``).

Each arm is judged by :func:`finitetune.health_report` of its own directory, so the verdicts
are the ones ``finitetune report`` would give, plus direct checks of the model (are the final
parameters finite?). Nothing here changes how the Trainer trains: the only hook on the
unguarded model records its loss, read-only, to show what the logging filter hid.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finitetune.errors import NonFiniteHalt
from finitetune.guard.policy import Action
from finitetune.report import HealthReport, health_report, to_json, to_markdown
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import write_text_atomic

BATCH = 8
"""Micro-batch size of every arm (gradient accumulation 1: one micro-batch = one step)."""
LR = 3e-3
"""Learning rate of the healthy runs: the tiny model learns its task visibly in 20 steps."""
MAX_GRAD_NORM = 1.0
"""The Trainer's default clip value, used by both arms."""
SEED = 0
GUARD_ACTIONS = (Action.SKIP, Action.ROLLBACK, Action.REDUCE_LR, Action.HALT)


@dataclass
class Setup:
    """What every arm shares: the base model (never trained itself), tokenizer and rows."""

    model_name: str
    model: Any
    tokenizer: Any
    rows: list[dict]
    task: str
    threads: int

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))

    def fresh_model(self) -> Any:
        """A deep copy of the base model: every arm starts from bit-identical weights."""
        return copy.deepcopy(self.model)

    def take(self, n: int) -> list[dict]:
        """The first ``n`` training rows (``prepare_setup`` makes sure there are enough)."""
        return [dict(r) for r in self.rows[:n]]


@dataclass
class Check:
    """One pass/fail fact of a scenario, worded so the output explains itself."""

    label: str
    ok: bool


@dataclass
class ArmResult:
    """One training run and its judgement."""

    role: str
    directory: Path
    report: HealthReport
    params_finite: bool
    true_loss_nonfinite: list[int]
    """Steps whose real loss (before the Trainer's logging filter) was NaN or inf."""
    events: list[dict]
    """Guard events (``events.jsonl``); empty for the unguarded arm."""
    halted: str | None
    seconds: float
    trainer: Any = field(default=None, repr=False)

    @property
    def acted_steps(self) -> set[int]:
        """Steps where the guard did not simply apply the update."""
        return {int(e["step"]) for e in self.events if e.get("action") in GUARD_ACTIONS}

    def stat(self, metric: str) -> Any:
        return self.report.metrics.get(metric)

    def findings(self, *severities: str) -> list[Any]:
        sev = severities or ("critical", "warning")
        return [f for f in self.report.findings if f.severity in sev]

    def has_finding(self, *rules: str) -> bool:
        return any(f.rule in rules for f in self.findings())

    def unexplained_findings(self) -> list[Any]:
        """Critical/warning findings not confined to steps the guard acted on.

        A guarded run's log still shows the bad step it skipped (a NaN loss or grad norm on
        that one entry), and the report rightly notes it; a finding anywhere else, or one
        without steps (e.g. "loss not decreasing"), is a real problem of the guarded run.
        """
        acted = self.acted_steps
        return [f for f in self.findings()
                if f.severity == "critical" or not f.steps
                or not {int(s) for s in f.steps} <= acted]

    def loss_fell(self) -> bool:
        st = self.stat("loss")
        return bool(st and st.first is not None and st.last is not None and st.last < st.first)

    def summary(self) -> dict[str, Any]:
        """Plain data for ``verify.json``."""
        out: dict[str, Any] = {
            "directory": str(self.directory), "verdict": self.report.verdict,
            "findings": [{"rule": f.rule, "severity": f.severity, "title": f.title,
                          "steps": f.steps} for f in self.report.findings],
            "params_finite": self.params_finite,
            "true_loss_nonfinite_steps": self.true_loss_nonfinite,
            "guard_events": [{k: e.get(k) for k in ("step", "action", "reason")}
                             for e in self.events],
            "halted": self.halted, "seconds": round(self.seconds, 2),
        }
        for name in ("loss", "grad_norm"):
            st = self.stat(name)
            if st is not None:
                out[name] = {k: getattr(st, k) for k in
                             ("total", "valid", "nan", "inf", "zero", "min", "max", "mean",
                              "first", "last")}
        return out


@contextlib.contextmanager
def quiet(threads: int | None = None) -> Iterator[None]:
    """Keep the console for the tables: no Trainer log dicts (PrinterCallback is removed per
    trainer), no progress bars, no guard warnings (they are in events.jsonl and in the table),
    and ``threads`` torch threads (restored after)."""
    from transformers.utils import logging as hf_logging

    saved_threads = torch.get_num_threads()
    saved_verbosity = hf_logging.get_verbosity()
    saved_bars = hf_logging.is_progress_bar_enabled()
    ft_logger = logging.getLogger("finitetune")
    saved_level = ft_logger.level
    if threads is not None:
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ft_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(saved_threads)
        hf_logging.set_verbosity(saved_verbosity)
        if saved_bars:
            hf_logging.enable_progress_bar()
        ft_logger.setLevel(saved_level)


def build_trainer(
    setup: Setup, out: Path, rows: list[dict], steps: int, *, guard: Any = None,
    safe_loss: bool = False, lr: float = LR, schedule: str = "constant", warmup_steps: int = 0,
    save_steps: int = 0,
) -> tuple[Any, Any]:
    """A Trainer on a fresh copy of the model, wired by the same
    :func:`finitetune.integrations.hf.trainer.build_trainer` as ``finitetune train``; ``guard``
    (a GuardConfig) adds the guard, attribution and the metrics writer; ``save_steps`` > 0
    saves checkpoints (the on-disk rollback needs them). Returns (trainer, loss tracker or
    None)."""
    from transformers import PrinterCallback, TrainingArguments

    from finitetune.integrations.hf import trainer as wiring
    from finitetune.integrations.hf.seams import sequential_kwargs, use_sequential_sampler

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=lr, lr_scheduler_type=schedule, warmup_steps=warmup_steps,
        max_grad_norm=MAX_GRAD_NORM, logging_steps=1, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        save_total_limit=2,
        use_cpu=True, disable_tqdm=True, seed=SEED, data_seed=SEED,
        remove_unused_columns=False, dataloader_num_workers=0, **sequential_kwargs(),
    )
    trainer, tracker = wiring.build_trainer(
        setup.fresh_model(), args, rows, pad_token_id=setup.tokenizer.pad_token_id,
        guard=guard, safe_loss=safe_loss)
    use_sequential_sampler(trainer)  # in-order data on releases without the argument
    trainer.remove_callback(PrinterCallback)  # the Trainer's log dicts would bury the tables
    return trainer, tracker


class LossRecorder:
    """Read-only forward hook: the model's own loss on each training forward.

    Shows what ``logging_nan_inf_filter`` hides (it prints a window of NaN losses as 0.0).
    Stores device tensors; read once at the end.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.values: list[torch.Tensor] = []
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        loss = getattr(out, "loss", None)
        if module.training and loss is not None:
            self.values.append(loss.detach().float())

    def nonfinite_steps(self) -> list[int]:
        self._handle.remove()
        if not self.values:
            return []
        flags = torch.isfinite(torch.stack(self.values)).tolist()  # one host read, at the end
        return [i + 1 for i, ok in enumerate(flags) if not ok]


def params_finite(model: torch.nn.Module) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run_arm(
    setup: Setup, out: Path, role: str, rows: list[dict], steps: int, *, guard: Any = None,
    safe_loss: bool = False, inject: Callable[[Any], list[Any]] | None = None, **train_kw: Any,
) -> ArmResult:
    """Train one arm into ``out`` and judge it from the files it left there.

    ``inject(model)`` installs the scenario's fault (or simulation) on the arm's model and
    returns handles with ``remove()``.
    """
    out.mkdir(parents=True, exist_ok=True)
    trainer, _tracker = build_trainer(setup, out, rows, steps, guard=guard,
                                      safe_loss=safe_loss, **train_kw)
    handles = inject(trainer.model) if inject is not None else []
    recorder = LossRecorder(trainer.model) if guard is None and not safe_loss else None
    halted = None
    start = time.perf_counter()
    try:
        trainer.train()
    except NonFiniteHalt as exc:  # the guard's last resort is a result, not a crash
        halted = str(exc)
    finally:
        seconds = time.perf_counter() - start
        for h in handles:
            h.remove()
    trainer.state.save_to_json(str(out / run_files.TRAINER_STATE))
    report = health_report(out, vocab_size=setup.vocab_size, max_grad_norm=MAX_GRAD_NORM)
    write_text_atomic(out / run_files.REPORT_MD, to_markdown(report))
    write_text_atomic(out / run_files.REPORT_JSON, to_json(report))
    if recorder is not None:
        bad_loss = recorder.nonfinite_steps()
    else:  # the guarded run's metrics.jsonl logs the true window loss, NaN included
        bad_loss = [int(s) for s, v in zip(report.series.get("step", []),
                                          report.series.get("loss", []), strict=False)
                    if v is not None and not math.isfinite(v)]
    return ArmResult(role=role, directory=out, report=report,
                     params_finite=params_finite(trainer.model), true_loss_nonfinite=bad_loss,
                     events=run_files.read_jsonl(out / run_files.EVENTS).records,
                     halted=halted, seconds=seconds,
                     trainer=trainer)


def prepare_setup(model: str = "tiny", data: str | None = None, rows_needed: int = 320,
                  max_length: int | None = None) -> Setup:
    """Load the model once and tokenise the task: the embedded tiny task unless ``data``.

    Rows go through finitetune's own pipeline (label validation, unusable rows dropped), so
    the healthy baseline really is healthy; they are repeated if the data is short.
    """
    from finitetune.builtin.tasks import tiny_task
    from finitetune.data.pipeline import load_data_records, prepare_rows
    from finitetune.models import load_model, load_tokenizer, resolve_model
    from finitetune.settings.config import DataConfig

    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    if data:
        records, task = load_data_records(DataConfig(path=data)), f"{data}"
    else:
        records, task = tiny_task(max(400, rows_needed), seed=1), "the tiny word-group task"
    length = max_length or (32 if model == "tiny" else 96)
    rows, _report, _summary = prepare_rows(records, tokenizer, DataConfig(max_length=length))
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    rows = (rows * math.ceil(rows_needed / len(rows)))[:rows_needed]
    base = load_model(path)
    base.config.use_cache = False
    n_params = sum(p.numel() for p in base.parameters())
    # A small model runs fastest on one thread (and is immune to other jobs on a shared
    # machine); a real one needs every core.
    import os

    threads = 1 if n_params < 5_000_000 else (os.cpu_count() or 1)
    return Setup(model_name=model, model=base, tokenizer=tokenizer, rows=rows, task=task,
                 threads=threads)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks (``model.layers``, ``transformer.h``, ...)."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    for name, mod in lists:
        if name.split(".")[-1] in ("layers", "h", "blocks", "block"):
            return mod
    if lists:
        return lists[0][1]
    raise ValueError("verify: this model has no list of transformer blocks to inject into")


def mlp_projection(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The first feed-forward up-projection: where T5/Gemma-style activations grow past 65504.

    Falls back to the first feed-forward linear layer, then to any linear layer that is not
    the output head.
    """
    linears = [(n, m) for n, m in model.named_modules()
               if type(m).__name__ in ("Linear", "Conv1D") and getattr(m, "weight", None)
               is not None and not n.endswith(("lm_head", "embed_out", "output"))]
    for pick in (lambda n: n.endswith("up_proj"), lambda n: any(
            k in n for k in ("mlp", "ffn", "fc", "feed_forward")), lambda n: True):
        for name, mod in linears:
            if pick(name):
                return name, mod
    raise ValueError("verify: this model has no linear layer to inject into")
