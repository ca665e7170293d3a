"""The child side of ``finitetune run``: guard every Trainer a program builds, without editing it.

``finitetune run`` starts the program with a generated ``sitecustomize.py`` first on
``PYTHONPATH`` (the way instrumentation tools reach a process they do not own); every Python
process of the program, including the workers ``torchrun`` and ``accelerate launch`` start,
imports it at start-up and calls :func:`bootstrap`. That costs nothing until the program
imports ``transformers.trainer``: only then (an import hook that fires once) is
:func:`~finitetune.integrations.hf.mixin.install_construction_hook` installed, with
:func:`attach` as its ``auto_attach``. Each Trainer the program then constructs gets, unless it
already has them:

- a ``GuardCallback`` built from the run's settings (policy, config, attribution, events dir);
- a ``CheckpointCallback`` (with the guard): a save whose weights or optimizer state hold a
  NaN/inf is refused and the last healthy checkpoint pinned against ``save_total_limit``;
  ``resume_from_checkpoint=True`` picks the newest healthy one; ``rollback_to: disk`` works;
- a ``MetricsCallback`` writing ``metrics.jsonl`` next to ``events.jsonl`` (for the report);
- a ``FaultInjector`` for ``--inject`` specs;
- a :class:`~finitetune.integrations.launch.manifest.RunRecorder` that appends the Trainer's run
  directory and outcome to the run's manifest, which ``finitetune run`` reads to print each
  run's health report.

Before any of that, rank 0 takes the :class:`~finitetune.rundir.paths.RunLock` of the
Trainer's ``output_dir`` (and of ``--events-dir``), and holds it until the process ends: a
second program writing the same directory (another ``finitetune run``, a ``finitetune
train``) is refused while this one lives, naming it, instead of interleaving its lines with
this one's. The refused program stops at that Trainer's construction (exit 2) with nothing
written to the directory; ``finitetune run`` says why and exits 2.

If anything here fails, the program fails with it (loudly) rather than train unguarded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Any

from finitetune.parsing.nesting import json_loads

__all__ = ["SETTINGS_ENV", "attach", "bootstrap"]

SETTINGS_ENV = "FINITETUNE_RUN_SETTINGS"
"""Environment variable holding the path of the run's settings (JSON, written by the CLI)."""
_TARGET = "transformers.trainer"
_settings_cache: dict[str, Any] | None = None


def settings() -> dict[str, Any]:
    """The run's settings: ``guard`` (bool), ``config`` (GuardConfig dict), ``attribution``,
    ``events_dir`` (or None), ``inject`` (spec strings), ``manifest`` (path)."""
    global _settings_cache
    if _settings_cache is None:
        path = os.environ[SETTINGS_ENV]
        _settings_cache = json_loads(Path(path).read_text(encoding="utf-8"), path)
    return _settings_cache


def bootstrap() -> None:
    """Called by the generated ``sitecustomize``: install the guard when transformers' Trainer
    is imported (at once if it already is)."""
    if SETTINGS_ENV not in os.environ:
        return
    if _TARGET in sys.modules:
        _install()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _install() -> None:
    from finitetune.integrations.hf.mixin import install_construction_hook

    install_construction_hook(auto_attach=attach)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.trainer`` like the normal path finder, and runs :func:`_install`
    right after the module has executed (so ``Trainer`` exists and nothing else is imported)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # fire once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_install(module: Any) -> None:
            exec_module(module)
            _install()

        loader.exec_module = exec_and_install  # type: ignore[method-assign]
        return spec


def attach(trainer: Any) -> None:
    """Give a newly constructed Trainer the run's callbacks (see the module docstring)."""
    from finitetune.integrations.hf.callback import GuardCallback
    from finitetune.integrations.hf.checkpoint_callback import CheckpointCallback
    from finitetune.integrations.hf.metrics import MetricsCallback
    from finitetune.integrations.launch.callbacks import FaultInjector, RunRecorder

    s = settings()
    handler = trainer.callback_handler
    guard_cb = next((cb for cb in handler.callbacks if isinstance(cb, GuardCallback)), None)
    events_dir = Path(s.get("events_dir") or trainer.args.output_dir)
    if s["guard"] or guard_cb is not None:  # decided before the lock writes anything
        _check_or_record(trainer, s["manifest"])
    _hold(trainer, [Path(trainer.args.output_dir), events_dir], s)
    if s["guard"] and guard_cb is None:
        guard_cb = GuardCallback(s["config"], output_dir=s.get("events_dir"),
                                 attribution=s["attribution"])
        handler.add_callback(guard_cb)
    elif guard_cb is not None:
        events_dir = Path(guard_cb.output_dir or trainer.args.output_dir)
        _say(trainer, "the program has its own GuardCallback: its settings are kept")
    if guard_cb is not None and not any(isinstance(cb, CheckpointCallback)
                                        for cb in handler.callbacks):
        handler.add_callback(CheckpointCallback(s.get("events_dir"), config=guard_cb.config))
    if not any(isinstance(cb, MetricsCallback) for cb in handler.callbacks):
        handler.add_callback(MetricsCallback(events_dir / "metrics.jsonl"))
    injector = FaultInjector(s["inject"]) if s["inject"] else None
    if injector is not None:
        handler.add_callback(injector)
    handler.add_callback(RunRecorder(s["manifest"], events_dir, injector))
    what = "guarding" if guard_cb is not None else "NOT guarding (--no-guard)"
    _say(trainer, f"{what} {type(trainer).__name__}; events and metrics -> {events_dir}"
         + (f"; injecting {', '.join(s['inject'])}" if s["inject"] else ""))


def _check_or_record(trainer: Any, manifest: str) -> None:
    """The guard's seam checks at construction; a refusal is recorded for ``finitetune run``
    (which names it as the guard's refusal) and raised, so the program stops unguarded never."""
    from finitetune.errors import ConfigError
    from finitetune.integrations.hf.seams import check_trainer
    from finitetune.integrations.launch.manifest import refused_record

    try:
        check_trainer(trainer)
    except ConfigError as exc:
        if trainer.is_world_process_zero():
            refused_record(manifest, str(trainer.args.output_dir), str(exc), who="guard",
                           trainer=type(trainer).__name__)
        raise


_HELD: dict[str, Any] = {}
"""Directories this process holds (resolved path -> RunLock), until it exits."""


def _hold(trainer: Any, folders: list[Path], s: dict[str, Any]) -> None:
    """Rank 0 locks each folder for the rest of the process (the kernel releases the locks when
    it ends, however it ends); one held by another process stops the program here, before
    this Trainer writes anything, with exit 2."""
    if not trainer.is_world_process_zero():
        return
    from finitetune.errors import OutputError
    from finitetune.integrations.launch.manifest import refused_record
    from finitetune.rundir.paths import RunLock

    command = f"finitetune run ({s.get('command') or 'a program'})"
    for folder in folders:
        key = str(folder.resolve())
        if key in _HELD:
            continue  # this process already holds it (a second Trainer of the program)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _HELD[key] = RunLock(folder, command).__enter__()
        except OutputError as exc:
            refused_record(s["manifest"], str(folder), str(exc), who="lock",
                           trainer=type(trainer).__name__)  # finitetune run prints it
            raise SystemExit(2) from None


def _say(trainer: Any, text: str) -> None:
    if trainer.is_world_process_zero():
        print(f"finitetune run: {text}", file=sys.stderr, flush=True)
