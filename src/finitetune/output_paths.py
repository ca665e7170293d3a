"""Where finitetune may write: regular files, and directories it created itself.

The rules, checked before anything is written (so a refused path leaves the file system as it
was):

- an output *file* (``report -o``) is a regular file or a new name in a writable directory;
  a directory, a device, a FIFO, a socket or a symbolic link there is refused (``-o -`` is
  stdout), because the atomic rename would replace it;
- an output *directory* (``train --output-dir``, ``verify --output-dir``) is new, empty, or one
  finitetune created: it carries :data:`~finitetune.run_files.OWNER_MARKER`, written first
  when the directory is made. Only such a directory is replaced (``--overwrite``) or resumed
  (``--resume``); a user's folder is never written into or deleted;
- the directory that will receive a new file or folder must exist somewhere up the path as a
  directory this process may write.

Pure Python (no torch): ``report`` uses it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from finitetune import run_files
from finitetune.errors import OutputError
from finitetune.jsonio import file_kind, write_text_atomic

STDOUT = "-"


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
        owner = json.loads(marker.read_text(encoding="utf-8")).get("created_by")
    except (OSError, ValueError, AttributeError):
        return False
    return owner == created_by


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
