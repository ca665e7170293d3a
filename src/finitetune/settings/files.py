"""The one reader of settings files: YAML, read the way people write it, errors at file:line.

Every command that takes ``--config FILE.yaml`` (``train``, ``run``) reads it here, so a value
means the same everywhere: ``1e-4`` is a number (YAML 1.2; PyYAML's YAML 1.1 would hand the
string "1e-4" to the config), a key set twice is an error, and every key knows its line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from finitetune.errors import ConfigError
from finitetune.parsing.nesting import check_yaml

__all__ = ["read_settings"]


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number as YAML 1.2 does (PyYAML follows
    YAML 1.1, where a float needs a dot, and would hand the string "1e-3" to the config)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_settings(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of a YAML file and, for each dotted key, ``file:line`` (for errors)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file (a directory or a "
                          "special file); give a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        check_yaml(text, str(path), _YamlLoader)  # the composer recurses: bound it first
        node = yaml.compose(text, Loader=_YamlLoader)
        values = yaml.load(text, Loader=_YamlLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got "
                          f"{type(values).__name__}")
    lines: dict[str, str] = {}
    _key_lines(node, path, "", lines)
    return values, lines


def _key_lines(node: Any, path: Path, prefix: str, out: dict[str, str]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        dotted = f"{prefix}{key.value}"
        here = f"{path}:{key.start_mark.line + 1}"
        if dotted in out:  # PyYAML keeps the last silently; a repeated key is a mistake
            raise ConfigError(f"{here}: {dotted} is set twice (first at {out[dotted]}); "
                              "keep one")
        out[dotted] = here
        _key_lines(value, path, f"{dotted}.", out)
