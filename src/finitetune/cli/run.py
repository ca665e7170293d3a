"""``finitetune run [options] -- COMMAND ...``: any Trainer program, guarded, unedited.

    finitetune run -- python train.py --lr 1e-4
    finitetune run --inject nan_grad@3 -- trl sft --model_name_or_path DIR --dataset_name DATA
    finitetune run -- torchrun --nproc_per_node 2 train.py
    finitetune run -- accelerate launch train.py
    finitetune run -- llamafactory-cli train config.yaml

Every ``transformers.Trainer`` (TRL's included) the program constructs, in any of its
processes, gets the gradient guard (:mod:`finitetune.integrations.launch.autoguard` explains how).
``events.jsonl``, ``metrics.jsonl`` and ``faults/`` go to each Trainer's ``output_dir`` (or
``--events-dir``). When the program has exited, the health report of each Trainer's run is
printed.

Exit code: the program's own, except **3** when the guard halted a Trainer's training (too many
bad steps in a row; the program then ends with ``NonFiniteHalt``), and 2 for a bad option, a
command that cannot be started, or a Trainer whose ``output_dir`` (or ``--events-dir``)
another process is writing: each Trainer's directory is locked by the program that uses it
(the lock of ``finitetune train``), and a second writer is refused, naming the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from finitetune.errors import ConfigError, FinitetuneError
from finitetune.parsing.terminal import printable

HALT_EXIT_CODE = 3
"""Exit code of ``finitetune run`` when the guard halted a Trainer of the program."""

_SITECUSTOMIZE = '''\
# Written by `finitetune run`: guard every transformers.Trainer this process builds.
import os as _os
import sys as _sys

try:
    from finitetune.integrations.launch.autoguard import bootstrap as _bootstrap
except ImportError as _exc:
    print(f"finitetune run: this Python ({_sys.executable}) cannot import finitetune "
          f"({_exc}); refusing to run the program unguarded.", file=_sys.stderr, flush=True)
    raise SystemExit(2) from None
_bootstrap()

# then whatever sitecustomize this environment had (ours shadows it on sys.path)
_here = _os.path.dirname(_os.path.abspath(__file__))
import importlib.machinery as _machinery

_spec = _machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in _sys.path if _os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(type(_sys)("sitecustomize"))
'''


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    """Register the ``run`` verb and its options."""
    p = subparsers.add_parser(
        "run", help=help_text, usage="finitetune run [options] -- COMMAND [ARG ...]",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guard-policy", choices=("skip", "rollback", "halt"),
                   help="action on a non-finite step (default skip)")
    p.add_argument("--clip", choices=("fixed", "adaptive"),
                   help="gradient clipping: fixed (the Trainer's max_grad_norm, default) or "
                        "adaptive (ZClip: follows the recent grad norms, never above it)")
    p.add_argument("--max-consecutive-skips", type=int, metavar="N",
                   help="halt after more than N bad steps in a row (default 5)")
    p.add_argument("--config", metavar="YAML",
                   help="guard settings: GuardConfig fields, at the top level or under 'guard:'")
    p.add_argument("--no-attribution", action="store_true",
                   help="do not replay faulty steps to name the layer and samples")
    p.add_argument("--events-dir", metavar="DIR",
                   help="where events.jsonl, metrics.jsonl and faults/ go (default: each "
                        "Trainer's output_dir)")
    p.add_argument("--inject", action="append", default=[], metavar="KIND@STEP",
                   help="inject a fault: nan_grad@K, inf_grad@K, inf_loss@K or empty_batch@K "
                        "(optimizer step K; add :rankR for one rank); repeatable")
    p.add_argument("--no-guard", action="store_true",
                   help="run the program (and --inject) without the guard, to see the failure")
    p.add_argument("--no-report", action="store_true", help="do not print the health reports")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the program, after --")
    return p


def guard_config(args: argparse.Namespace) -> Any:
    """GuardConfig from ``--config`` and the flags (flags win); errors name the file and line, or
    the flag, holding the bad value. The file is read by the one settings reader, as
    ``finitetune train`` reads it (``1e-4`` is a number)."""
    from finitetune.settings.config import GuardConfig
    from finitetune.settings.files import read_settings
    from finitetune.settings.validation import build, check_layers

    layers: list[tuple[dict[str, Any], dict[str, str], str]] = []
    if args.config:
        data, lines = read_settings(args.config)
        if isinstance(data.get("guard"), dict):  # a finitetune train file: its guard section
            data = data["guard"]
            lines = {k.removeprefix("guard."): v for k, v in lines.items()}
        layers.append((data, lines, str(args.config)))
    flags: dict[str, Any] = {}
    if args.guard_policy is not None:
        flags["policy"] = args.guard_policy
    if args.max_consecutive_skips is not None:
        flags["max_consecutive_skips"] = args.max_consecutive_skips
    if getattr(args, "clip", None) is not None:
        flags["clip"] = args.clip
    layers.append((flags, {"policy": "flag --guard-policy", "clip": "flag --clip",
                           "max_consecutive_skips": "flag --max-consecutive-skips"}, "flag"))
    check_layers(GuardConfig, layers)
    return build(GuardConfig, {k: v for layer, _, _ in layers for k, v in layer.items()})


def run(args: argparse.Namespace) -> int:
    """Run the program with the guard, print the reports, return the exit code."""
    from finitetune.integrations.launch.faults import FaultSpec

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("give the program to run after --, e.g. "
                          "finitetune run -- python train.py")
    config = guard_config(args)
    specs = [str(FaultSpec.parse(s)) for s in args.inject]
    with tempfile.TemporaryDirectory(prefix="finitetune-run-") as tmp:
        manifest = Path(tmp) / "manifest.jsonl"
        settings = {"guard": not args.no_guard, "config": config.to_dict(),
                    "command": shlex.join(command),
                    "attribution": not args.no_attribution,
                    "events_dir": str(Path(args.events_dir).resolve()) if args.events_dir
                    else None, "inject": specs, "manifest": str(manifest)}
        (Path(tmp) / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
        (Path(tmp) / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
        rc = _run_program(command, _child_env(tmp))
        from finitetune.integrations.launch.manifest import read_manifest

        runs = read_manifest(manifest)
    return _conclude(runs, rc, args)


def _child_env(tmp: str) -> dict[str, str]:
    import finitetune
    from finitetune.integrations.launch.autoguard import SETTINGS_ENV

    root = str(Path(finitetune.__file__).resolve().parent.parent)  # so any Python finds it
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (tmp, root, env.get("PYTHONPATH", "")) if p)
    env[SETTINGS_ENV] = str(Path(tmp) / "settings.json")
    return env


def _run_program(command: list[str], env: dict[str, str]) -> int:
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as exc:
        raise ConfigError(f"cannot start {command[0]!r}: {exc}") from exc
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the program got the same SIGINT; let it finish its own way
        return proc.wait()


def _conclude(runs: list[Any], rc: int, args: argparse.Namespace) -> int:
    out = sys.stdout
    refused = [r for r in runs if r.refused]
    for r in refused:
        print(printable(f"finitetune run: the guard refused to train {r.trainer} (output_dir "
                        f"{r.output_dir}): {r.refused}" if r.refused_by == "guard"
                        else f"finitetune run: error: {r.refused}"), file=sys.stderr)
    if refused:  # stopped when the Trainer was built: nothing of it trained, nothing written
        return rc or 2
    if not runs:  # its own error is above; say only what finitetune saw
        exited = f" (it exited with code {rc})" if rc else ""
        guarded = "" if args.no_guard else ": nothing was guarded"
        print(f"finitetune run: the program built no transformers.Trainer that started "
              f"training{exited}{guarded}.", file=sys.stderr)
        return rc
    for run in runs:
        c = run.counters
        status = ("halted by the guard" if run.halted else "finished" if run.finished
                  else "did not finish (the program stopped inside train())")
        counts = (f", {c.get('skipped', 0)} step(s) not applied, {c.get('nonfinite', 0)} "
                  f"non-finite" if c else "")
        injected = f"; injected {', '.join(run.injected)}" if run.injected else ""
        print(printable(f"\nfinitetune run: training in {run.output_dir} {status} at step "
                        f"{run.global_step}{counts}{injected}; events and metrics in "
                        f"{run.events_dir}{_ranks_note(run.rank_checksums)}"), file=out)
        if not args.no_report:
            _print_report(run.events_dir, out)
    if any(r.halted for r in runs):
        return HALT_EXIT_CODE
    return rc


def _ranks_note(checksums: list[float | None]) -> str:
    """Whether every rank ended on the same parameters (DDP: they must)."""
    known = [c for c in checksums if c is not None]
    if len(checksums) < 2 or len(known) < len(checksums):
        return ""
    if all(c == known[0] or (c != c and known[0] != known[0]) for c in known):
        return f"; parameters identical on all {len(known)} ranks"
    return f"; WARNING: parameters differ between ranks (checksums {known})"


def _print_report(events_dir: str, out: Any) -> None:
    from finitetune.report import health_report, to_markdown

    try:
        report = health_report(events_dir)
    except FinitetuneError as exc:
        print(f"finitetune run: no report for {events_dir}: {exc}", file=out)
        return
    out.write(to_markdown(report))
    out.flush()
