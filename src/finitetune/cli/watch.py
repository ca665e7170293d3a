"""``finitetune watch PATH``: follow a run while it grows; judge it as it goes.

PATH is a finitetune run directory, a Trainer output folder, a TensorBoard folder or a log
file. Parsing is incremental (each poll reads only the new bytes); the verdict is recomputed
when something new arrives, at once when the new entries carry a NaN/inf or zero value or an
event, otherwise at most every ``max(--interval, 10 x the last analysis time)`` so that a
huge log never makes the watcher itself the bottleneck.

Exit codes: 1 as soon as the verdict reaches ``--exit-on`` (so a job script can stop a burning
run), else, when a finitetune run ends (its report.json appears, or its process died: no one
holds its lock, and the last verdict says it did not finish) or nothing new arrived for
``--idle-exit`` seconds, the verdict's code (1 unhealthy, else 0); 2 for a path that cannot
be read; 130 on Ctrl-C. An inconclusive verdict (too little logged yet to show learning) never
triggers ``--exit-on``: every run starts that way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from finitetune.errors import ReportInputError

ANALYSIS_COST_RATIO = 10.0
"""Time between routine analyses >= this x the last analysis' time (<= ~10 % of a core)."""
LEVELS = {"warning": ("warning", "unhealthy"), "unhealthy": ("unhealthy",)}


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    """Register the ``watch`` verb and its options."""
    p = subparsers.add_parser("watch", help=help_text, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="run directory, log file or TensorBoard folder")
    p.add_argument("--exit-on", choices=tuple(LEVELS), help="exit 1 as soon as the verdict is "
                   "unhealthy (or, with 'warning', a warning or worse)")
    p.add_argument("--interval", type=float, default=0.2, metavar="S",
                   help="seconds between looks at the files (default 0.2)")
    p.add_argument("--idle-exit", type=float, metavar="S",
                   help="stop after S seconds without anything new (default: follow until the "
                        "run ends or Ctrl-C)")
    p.add_argument("--plain", action="store_true",
                   help="one line per change of verdict, even on a terminal")
    p.add_argument("--vocab-size", type=int, metavar="N", help="as for `finitetune report`")
    p.add_argument("--max-grad-norm", type=float, metavar="X", help="as for `finitetune report`")
    return p


def run(args: argparse.Namespace) -> int:
    """Follow, judge, show; return the exit code (see the module's docstring)."""
    from finitetune.report.follow import Follower

    for name in ("interval", "idle_exit"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ReportInputError(f"--{name.replace('_', '-')} {value}: expected seconds > 0")
    follower = Follower(Path(args.path))
    live = sys.stdout.isatty() and not args.plain
    try:
        return _loop(args, follower, live)
    finally:
        follower.close()


def _loop(args: argparse.Namespace, follower, live: bool) -> int:
    from finitetune.report.health import analyse

    view = _LiveView(args.path) if live else None
    verdict: str | None = None
    report = None
    last_new = time.monotonic()
    next_routine, dirty = 0.0, False
    try:
        while True:
            added, alarm = follower.poll()
            now = time.monotonic()
            if added:
                last_new, dirty = now, True
            if dirty and (alarm or now >= next_routine):
                start = time.perf_counter()
                report = analyse(follower.log, vocab_size=args.vocab_size,
                                 max_grad_norm=args.max_grad_norm)
                cost = time.perf_counter() - start
                next_routine = time.monotonic() + max(args.interval, ANALYSIS_COST_RATIO * cost)
                dirty = False
                if report.verdict != verdict and not live:
                    from finitetune.report.live import change_line

                    print(change_line(report, verdict), flush=True)
                verdict = report.verdict
                if args.exit_on and verdict in LEVELS[args.exit_on]:
                    return 1
            if view is not None:
                view.update(report, follower)
            if not dirty and report is not None and follower.ended():
                if follower.log.status is not None:  # its writer died: the last word says so
                    report = analyse(follower.log, vocab_size=args.vocab_size,
                                     max_grad_norm=args.max_grad_norm)
                    if not live:  # the final verdict and its reasons, changed or not
                        from finitetune.report.live import change_line

                        print(change_line(report, verdict if report.verdict != verdict
                                          else None), flush=True)
                    if view is not None:
                        view.update(report, follower)
                return report.exit_code()
            if args.idle_exit and now - last_new >= args.idle_exit and not dirty:
                return report.exit_code() if report is not None else 0
            time.sleep(args.interval)
    finally:
        if view is not None:
            view.stop()


class _LiveView:
    """``rich.live.Live`` around :func:`finitetune.report.live.panel`, redrawn at most 4/s."""

    def __init__(self, source: str) -> None:
        from rich.live import Live

        self.source = source
        self.live = Live(auto_refresh=False, transient=False)
        self.live.start()
        self._last = 0.0

    def update(self, report, follower) -> None:
        from finitetune.report.live import panel

        now = time.monotonic()
        if now - self._last < 0.25:
            return
        self._last = now
        self.live.update(panel(report, self.source, follower.log.events), refresh=True)

    def stop(self) -> None:
        self.live.stop()
