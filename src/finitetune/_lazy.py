"""Lazy re-exports for package ``__init__`` modules.

A package lists, for each defining module, the names it re-exports, and gets a module
``__getattr__`` that imports the module on first use, so importing the package (e.g. for
``finitetune report``) does not pay for torch and transformers until a name that needs them is
touched.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str],
                 namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving ``exports`` and caching them in ``namespace``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # cache: later look-ups skip __getattr__
        return value

    return __getattr__


def lazy_exports(package: str, modules: dict[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], list[str]]:
    """``__getattr__`` and ``__all__`` of a package re-exporting, lazily, the names each module
    defines (``modules``: defining module -> its names, space-separated)."""
    exports = {name: module for module, names in modules.items() for name in names.split()}
    return lazy_getattr(package, exports, namespace), sorted(exports)
