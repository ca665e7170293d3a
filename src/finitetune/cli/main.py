"""``finitetune`` command line: one module per verb under ``finitetune.cli``.

Each verb module exposes ``add_parser(subparsers)`` and ``run(args) -> int``. Verbs are imported
only when chosen, so ``finitetune report`` never pays for importing torch.

Exit codes: 0 success / healthy, 1 problems found (unhealthy run, bad labels over the limit,
halted training), 2 unusable input (missing file, bad format, bad config); ``finitetune run``
returns its program's exit code, or 3 when the guard halted the program's training.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from finitetune.errors import FinitetuneError

VERBS: dict[str, str] = {
    "train": "fine-tune a causal LM with label validation, safe loss and the gradient guard",
    "check": "validate the labels of a data file before training",
    "report": "health report of a run directory, trainer_state.json or pasted logs",
    "watch": "follow a run while it grows: live counts, plots, verdict; exit on unhealthy",
    "explain": "timeline of guard events of a run, with their attribution",
    "verify": "prove the fixes: failure scenarios unguarded vs guarded",
    "env": "versions, device and precision plan, ready for a bug report",
    "run": "run any Trainer program (python, trl, torchrun, accelerate) guarded, unedited",
}


def _verb_module(name: str):
    return importlib.import_module(f"finitetune.cli.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finitetune",
        description="Numerically safe fine-tuning of causal language models.",
    )
    from finitetune import __version__

    parser.add_argument("--version", action="version", version=f"finitetune {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, help_text in VERBS.items():
        if only is not None and name != only:
            # register a placeholder so `finitetune --help` lists every verb cheaply
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            module = _verb_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"finitetune.cli.{name}":
                raise
            continue  # verb not available in this build
        module.add_parser(sub, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    verb = verb if verb in VERBS else None
    parser = build_parser(only=verb)
    args = parser.parse_args(argv)
    _printable_logs()
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return int(_verb_module(args.verb).run(args) or 0)
    except FinitetuneError as exc:
        from finitetune.parsing.terminal import printable

        print(printable(f"finitetune {args.verb}: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("finitetune: interrupted", file=sys.stderr)
        return 130


def _printable_logs() -> None:
    """finitetune's warnings name the user's files and samples: no escape reaches the terminal."""
    import logging

    from finitetune.parsing.terminal import PrintableLog

    logger = logging.getLogger("finitetune")
    if not any(isinstance(f, PrintableLog) for f in logger.filters):
        logger.addFilter(PrintableLog())


def set_offline_if_local(*paths: str | None) -> None:
    """Set HF_HUB_OFFLINE=1 before transformers is imported when nothing needs the hub.

    Offline, the hub client retries for ~45 s before failing; with everything local we never
    want to wait for it. An explicit HF_HUB_OFFLINE from the user always wins.
    """
    builtin = {"demo", "tiny"}
    if all(p is None or p in builtin or os.path.exists(p) for p in paths):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


if __name__ == "__main__":  # python -m finitetune.cli.main
    sys.exit(main())
