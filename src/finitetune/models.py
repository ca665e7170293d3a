"""Model resolution and loading: the embedded defaults and a user's own model, one code path.

``demo`` and ``tiny`` are materialised once (:mod:`finitetune.builtin.models`) into ordinary
model directories, and from then on they load exactly like a user's local directory: the
loading code the tests exercise is the code users run. Weights are read as safetensors only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finitetune.builtin import models as builtin
from finitetune.errors import ConfigError, DataError

BUILTIN_MODELS = ("demo", "tiny")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def resolve_model(name_or_path: str, *, tokenizer_flag: str | None = None) -> str:
    """Return a local model directory (materialising ``demo``/``tiny``) or a hub id unchanged.

    ``tokenizer_flag``: the calling command's option for a separate tokenizer (``check`` has
    ``--tokenizer``), named when the directory has no tokenizer files.
    """
    if name_or_path == "demo":
        return str(builtin.materialise_smollm2())
    if name_or_path == "tiny":
        return str(builtin.materialise_tiny())
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_model_dir(path, tokenizer_flag=tokenizer_flag)
        return str(path)
    return _hub_id(name_or_path, "model directory", "a local directory with config.json, "
                   "*.safetensors and tokenizer files, a hub id, 'demo' or 'tiny'")


def resolve_tokenizer(name_or_path: str) -> str:
    """A local tokenizer directory or a hub id; a path that does not exist is an error."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"tokenizer path {path} is not a directory; expected the folder "
                            "tokenizer.save_pretrained() wrote")
        return str(path)
    return _hub_id(name_or_path, "tokenizer directory",
                   "the folder tokenizer.save_pretrained() wrote, or a hub id")


def _hub_id(name: str, what: str, expected: str) -> str:
    # "org/name" (or "name") is a hub id; anything else that looks like a path does not exist
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(f"{what} not found: {name}. Give {expected}.")
    return name  # hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct"


def check_model_dir(path: str | os.PathLike, *, tokenizer_flag: str | None = None) -> None:
    """Raise :class:`DataError` naming what is missing from a local model directory.

    Pickled weights (``pytorch_model*.bin``) do not count: finitetune never unpickles a file
    from a model directory, because unpickling runs whatever code the file names.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"model path {path} is not a directory; expected a model folder")
    if not (path / "config.json").is_file():
        raise DataError(f"{path} has no config.json: is this a model directory?")
    names = os.listdir(path)
    if not any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        pickled = sorted(n for n in names if n.startswith("pytorch_model")
                         and n.endswith((".bin", ".bin.index.json")))
        if pickled:
            raise DataError(_pickled_message(path, pickled))
        raise DataError(
            f"{path} has no weights (*.safetensors). Save the model with "
            "model.save_pretrained(dir) first."
        )
    if not any(n in names for n in _TOKENIZER_FILES) and "tokenizer_config.json" not in names:
        other = f", or pass {tokenizer_flag} DIR" if tokenizer_flag else ""
        raise DataError(
            f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json). Save the "
            f"tokenizer with tokenizer.save_pretrained(dir) into it{other}."
        )


def _pickled_message(path: Path, pickled: list[str]) -> str:
    return (
        f"{path} holds only pickled weights ({', '.join(pickled)}), no *.safetensors. "
        "finitetune never unpickles a file from a model directory (a pickle can run any code "
        "when it is loaded). If you trust the file, convert it once to safetensors, e.g. "
        f"python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{path}').save_pretrained('{path}')\" (transformers reads it "
        "with torch.load(weights_only=True) and writes model.safetensors beside it)."
    )


def _remote_code_error(path: str, flag: str | None, exc: Exception) -> ConfigError:
    if flag:
        advice = f"re-run with {flag} only if you trust its author"
    else:
        advice = ("this command does not run a model's own code; use a model whose "
                  "architecture transformers ships")
    return ConfigError(f"{path} needs its own Python code to load (trust_remote_code); "
                       f"{advice}")


def load_tokenizer(path: str, *, trust_remote_code: bool = False,
                   remote_code_flag: str | None = None) -> Any:
    """Load a tokenizer and make sure it can pad (pad falls back to EOS, as most chat models do).

    ``remote_code_flag``: the calling command's option that allows a model's own code,
    named in the error when the tokenizer needs it (None: the command has no such option).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(path, remote_code_flag, exc) from exc
        raise DataError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise DataError(f"tokenizer in {path} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, trust_remote_code: bool = False, dtype: Any = None,
               remote_code_flag: str | None = None) -> Any:
    """Load a causal LM from safetensors only: a pickled ``.bin`` is never read.

    ``remote_code_flag`` as for :func:`load_tokenizer`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from finitetune.integrations.hf.seams import dtype_kwargs

    if Path(path).is_dir():
        check_model_dir(path)  # refuses pickled-only weights before transformers sees them
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            trust_remote_code=trust_remote_code,
            **dtype_kwargs(dtype or torch.float32),
            use_safetensors=True,  # never fall back to pytorch_model.bin (pickle)
        )
    except (OSError, ValueError) as exc:
        msg = str(exc)
        if "trust_remote_code" in msg:
            raise _remote_code_error(path, remote_code_flag, exc) from exc
        raise DataError(f"cannot load a causal LM from {path}: {msg.splitlines()[0]}") from exc
    return model
