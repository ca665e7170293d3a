"""Test set-up shared by every test module.

The hub client retries for ~45 s when offline unless HF_HUB_OFFLINE is set *before*
transformers is imported, so it is set here, at collection time.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in models materialise into a per-session cache, never the user's ~/.cache."""
    if "FINITETUNE_CACHE" not in os.environ:
        os.environ["FINITETUNE_CACHE"] = str(tmp_path_factory.mktemp("finitetune-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(_isolated_cache):
    """The embedded tiny model as an ordinary local model directory."""
    from finitetune.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture
def one_thread():
    """One torch thread for tiny models: faster, and immune to other jobs on a shared 2-core
    machine (fused AdamW's parallel region costs ~0.1 s per step when cores are oversubscribed)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
