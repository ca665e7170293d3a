"""Tiny helpers shared by the benchmarks: machine/version info, median, appending results."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-history.md"
"""Every benchmark run, appended: ``bench/run_all.py`` builds ``docs/benchmarks.md`` from it."""


def machine_info() -> str:
    """One line: CPU model and count, RAM, OS, Python and the versions that drive the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ram = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        ram = "RAM unknown"
    versions = [f"python {platform.python_version()}"]
    for name in ("torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{name} {metadata.version(name)}")
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} CPUs, {ram}, {system}; " + ", ".join(versions)


def median(values: list[float]) -> float:
    return statistics.median(values)


def append_result(title: str, rows_markdown: str) -> Path:
    """Append a dated section (title, machine + versions, the given markdown) to the results file.

    Appends under an exclusive file lock in one write, so concurrent benchmarks do not interleave.
    """
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    script = Path(sys.argv[0]).resolve()
    if script.parent == RESULTS.parents[1] / "bench":  # run as `python -m bench.<name>`
        command = " ".join(["python -m", f"bench.{script.stem}", *sys.argv[1:]])
    else:
        command = " ".join(["python", *sys.argv])
    section = (
        f"\n## {title} ({stamp})\n\n"
        f"Machine: {machine_info()}  \nCommand: `{command}`\n\n{rows_markdown.strip()}\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if os.fstat(f.fileno()).st_size == 0:
            section = ("# Benchmark history\n\nEvery run of a `bench/` script, appended; newest last. "
                       "The current table is [benchmarks.md](benchmarks.md).\n" + section)
        f.write(section)
        fcntl.flock(f, fcntl.LOCK_UN)
    return RESULTS


class StepTimer:
    """Trainer callback (``.callback``): wall time of each optimizer step, in ``.times``."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer._t0)

        self.callback = _CB()
        self.times: list[float] = []
        self._t0 = 0.0
