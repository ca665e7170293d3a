"""Where finitetune may write: regular files, and directories it created itself.

The rules, checked before anything is written (so a refused path leaves the file system as it
was):

- an output *file* (``report -o``) is a regular file or a new name in a writable directory;
  a directory, a device, a FIFO, a socket or a symbolic link there is refused (``-o -`` is
  stdout), because the atomic rename would replace it;
- an output *directory* (``train --output-dir``, ``verify --output-dir``) is new, empty, or one
  finitetune created: it carries :data:`~finitetune.rundir.files.OWNER_MARKER`, written first
  when the directory is made. Only such a directory is replaced (``--overwrite``) or resumed
  (``--resume``); a user's folder is never written into or deleted;
- the directory that will receive a new file or folder must exist somewhere up the path as a
  directory this process may write;
- a directory another process is writing right now (it holds :class:`RunLock`) is neither
  resumed, replaced nor reused until that process ends.

Pure Python (no torch): ``report`` uses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a live run is then not detected
    fcntl = None  # type: ignore[assignment]

from finitetune.errors import OutputError
from finitetune.parsing.nesting import json_loads
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import file_kind, write_text_atomic

STDOUT = "-"
log = logging.getLogger("finitetune")


def _writable_ancestor(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory we may write into."""
    ancestor = Path(os.path.abspath(path)).parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():  # follows symlinks: a parent that links to a directory is fine
        raise OutputError(f"{what} {path}: {ancestor} is a {file_kind(ancestor)}, not a "
                          "directory; choose a path inside a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot write in {ancestor} (permission denied); "
                          "choose a directory you can write to")


def _refuse_kind(path: Path, kind: str, what: str, expected: str, hint: str) -> OutputError:
    if kind == "symbolic link":
        target = os.readlink(path)
        return OutputError(f"{what} {path} is a symbolic link (to {target}); finitetune does "
                           f"not write through links: give the real path, or another name")
    return OutputError(f"{what} {path} is a {kind}, not a {expected}: refusing to write "
                       f"there; {hint}")


def check_output_file(path: str | os.PathLike, what: str = "-o") -> Path | None:
    """The file to write, or None for ``-`` (stdout). Raises :class:`OutputError` for a path
    that is not a regular file or a new name in a writable directory."""
    if str(path) == STDOUT:
        return None
    path = Path(path)
    kind = file_kind(path)
    if kind is None:
        _writable_ancestor(path, what)
        return path
    if kind != "regular file":
        hint = (f"give a file name inside it, e.g. {path / 'report.md'}" if kind == "directory"
                else f"use {what} - to write to stdout")
        raise _refuse_kind(path, kind, what, "regular file", hint)
    _writable_ancestor(path, what)  # the atomic rename creates its temporary file beside it
    if not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: the file is read-only (permission denied)")
    return path


def is_owned(path: str | os.PathLike, created_by: str | None = None) -> bool:
    """Whether ``path`` is a directory finitetune created (it carries the owner marker), and,
    with ``created_by``, created by that command (``verify`` never replaces a training run)."""
    marker = Path(path) / run_files.OWNER_MARKER
    if file_kind(path) != "directory" or file_kind(marker) != "regular file":
        return False
    if created_by is None:
        return True
    try:
        owner = json_loads(marker.read_text(encoding="utf-8"), str(marker)).get("created_by")
    except (OSError, ValueError, AttributeError):
        return False
    return owner == created_by


class RunLock:
    """The lock a process holds on the directory it is writing (:data:`~finitetune.rundir.files.
    RUN_LOCK`), so that a second ``finitetune train --resume`` or ``--overwrite`` (or a second
    ``verify``) on it stops with a clear error instead of trimming or deleting the files of a
    run that is still going. ``with RunLock(path, "finitetune train"):`` takes it (or raises
    :class:`OutputError` naming the holder) and keeps it to the end of the block. An exclusive
    ``flock`` on the file: the kernel releases it when the process exits, even on SIGKILL, so
    there is never a stale lock to clean up. Advisory, and only on POSIX systems."""

    def __init__(self, path: str | os.PathLike, command: str) -> None:
        self.path = Path(path)
        self.command = command
        self._fh: IO[str] | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        lock = self.path / run_files.RUN_LOCK
        kind = file_kind(lock)
        if kind not in (None, "regular file"):  # opening it would write through a link
            raise _refuse_kind(lock, kind, "the run lock", "regular file",
                               "remove it; finitetune makes its own")
        fh = open(lock, "a+", encoding="utf-8")  # held until __exit__
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            holder = run_files.lock_holder(self.path) or "another process"
            raise OutputError(_busy(self.path, holder)) from None
        except OSError as exc:  # a file system without locks (some network mounts): go on
            fh.close()
            log.warning("finitetune: cannot lock %s (%s); a second --resume or --overwrite "
                        "on it will not be stopped while this run goes on", lock, exc)
            return self
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"command": self.command, "pid": os.getpid(),
                             "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing the descriptor releases the lock


def _busy(path: Path, holder: str) -> str:
    return (f"{path} is in use: {holder} is writing it now. Wait for that run to end (or stop "
            "it) before --resume or --overwrite, or choose another directory")


def check_output_dir(path: str | os.PathLike, what: str = "--output-dir", *,
                     created_by: str = "finitetune train", resume: bool = False,
                     replace: bool = False, busy_hint: str = "choose another directory") -> None:
    """Raise :class:`OutputError` unless ``created_by`` may use ``path`` as its output directory.

    ``resume``: it must be a directory ``created_by`` made, holding a checkpoint (or killed
    before its first one: its status still says running). ``replace``:
    a directory ``created_by`` made may be deleted and made again. Otherwise it must be new or
    empty; ``busy_hint`` says what to do when it holds an earlier output.
    """
    path = Path(path)
    kind = file_kind(path)
    if kind is None:
        if resume:
            raise OutputError(f"--resume: {path} does not exist; there is no run to continue")
        _writable_ancestor(path, what)
        return
    if kind != "directory":
        raise _refuse_kind(path, kind, what, "directory", "choose a new directory name")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot write in it (permission denied)")
    owned = is_owned(path, created_by)
    holder = run_files.lock_holder(path) if owned else None
    if holder is not None:
        raise OutputError(_busy(path, holder))
    if resume:
        if not owned:
            raise OutputError(
                f"--resume: {path} is not a run directory created by {created_by} (no "
                f"{run_files.OWNER_MARKER} of its own); --resume only continues such a "
                "directory and never writes into another folder")
        # a run killed before its first save (status still "running") starts again from 0
        if not run_files.checkpoints(path) and (
                run_files.read_status(path) != run_files.RunState.RUNNING):
            raise OutputError(f"--resume: no checkpoint-* folder in {path}; the run saved "
                              "none (see --save-steps), so it can only be started again")
        return
    if not any(path.iterdir()):
        return
    if not owned:
        raise OutputError(
            f"{what} {path} is not empty and was not created by {created_by} (no "
            f"{run_files.OWNER_MARKER} of its own); finitetune never writes into or deletes a "
            "folder it did not create: choose a new or empty directory")
    if not replace:
        raise OutputError(f"{path} holds an earlier run; {busy_hint}")


def prepare_output_dir(path: str | os.PathLike, what: str, created_by: str, *,
                       resume: bool = False, replace: bool = False,
                       busy_hint: str = "choose another directory") -> Path:
    """Check ``path`` (:func:`check_output_dir`), delete it when it is ours and ``replace``,
    then create it with the owner marker. Returns the path."""
    path = Path(path)
    check_output_dir(path, what, created_by=created_by, resume=resume, replace=replace,
                     busy_hint=busy_hint)
    if replace and is_owned(path, created_by) and any(path.iterdir()):
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not is_owned(path, created_by):
            write_text_atomic(path / run_files.OWNER_MARKER, json.dumps(
                {"created_by": created_by, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                + "\n")
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot create it ({exc.strerror or exc})") from exc
    return path


WRITTEN_FILES = (run_files.OWNER_MARKER, run_files.RUN_LOCK, run_files.STATUS,
                 run_files.CONFIG, run_files.LABEL_REPORT, run_files.PRECISION, run_files.EVAL,
                 run_files.METRICS, run_files.EVENTS, run_files.BAD_SAMPLES,
                 run_files.REPORT_MD, run_files.REPORT_JSON, run_files.REPORT_HTML)
"""Files of a run directory that a resumed run replaces or appends to."""
WRITTEN_DIRS = (run_files.TOKENIZER_DIR, run_files.FINAL_DIR, run_files.FAULTS_DIR)
"""Folders whose files a resumed run writes."""


def check_run_files(path: str | os.PathLike, what: str = "--resume") -> None:
    """Raise :class:`OutputError` when a file that continuing the run in ``path`` would
    replace, append to or write inside is not a regular file (a symbolic link, a FIFO, a
    device), or a folder it writes in (``tokenizer/``, ``final/``, ``faults/``, the checkpoint
    folders) is not a real directory or holds such a file. Reads only: called before anything
    is written, so a refused resume leaves the directory exactly as it was (the atomic writer
    would refuse the same file only once the run had already rewritten others)."""
    path = Path(path)
    names = [*WRITTEN_FILES, *(p.name for p in path.glob("config.resume-*.yaml"))]
    for name in names:
        kind = file_kind(path / name)
        if kind not in (None, "regular file"):
            raise _not_ours(path / name, kind, what, "file")
    folders = [*(path / d for d in WRITTEN_DIRS),
               *(p for p in path.iterdir() if p.name.startswith(
                   (run_files.CHECKPOINT_PREFIX, run_files.PARTIAL_PREFIX,
                    run_files.NONFINITE_PREFIX)))]
    for folder in folders:
        kind = file_kind(folder)
        if kind is None:
            continue
        if kind != "directory":
            raise _not_ours(folder, kind, what, "folder")
        if folder.name in WRITTEN_DIRS:
            for inner in folder.rglob("*"):
                kind = file_kind(inner)
                if kind not in ("regular file", "directory"):
                    raise _not_ours(inner, kind or "special file", what, "file")


def _not_ours(path: Path, kind: str, what: str, thing: str) -> OutputError:
    target = f" (to {os.readlink(path)})" if kind == "symbolic link" else ""
    return OutputError(
        f"{what}: {path} is a {kind}{target}; continuing the run would replace or write into "
        f"this {thing}, and finitetune does not write through links or into special files. "
        f"Nothing was changed. Put the real {thing} there (or remove it), then resume again")
