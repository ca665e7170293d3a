"""A snapshot of directory trees, for tests that a refused command changed nothing.

"Nothing was written" is checked the strict way: every entry under the roots (symlinks not
followed) with its kind, mode and mtime, a hash of every regular file's bytes, every link's
target, and the directories' own mtimes (a temporary file created and removed again shows
there). Two snapshots compare equal only when no byte, name, link or mode changed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

__all__ = ["snapshot"]


def snapshot(*roots: str | os.PathLike) -> dict[str, tuple]:
    """Every entry under ``roots``: ``path -> (type, mode, mtime_ns[, size, sha256 | link
    target | device])``."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(os.fspath(root)):
            for name in [*dirnames, *filenames, ""]:
                path = str(os.path.join(dirpath, name) if name else dirpath)
                st = os.lstat(path)
                entry: tuple = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_mtime_ns)
                if stat.S_ISREG(st.st_mode):
                    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                    entry += (st.st_size, digest)
                elif stat.S_ISLNK(st.st_mode):
                    entry += (os.readlink(path),)
                elif stat.S_ISCHR(st.st_mode):
                    entry += (st.st_rdev,)
                out[path] = entry
    return out
