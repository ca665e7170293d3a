"""Test set-up shared by every test module.

The hub client retries for ~45 s when offline unless HF_HUB_OFFLINE is set *before*
transformers is imported, so it is set here, at collection time.
"""

import contextlib
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


@pytest.fixture(scope="session", autouse=True)
def _sequential_sampling_on_every_release():
    """The tests ask ``TrainingArguments(train_sampling_strategy="sequential")`` (transformers
    5.2+) so that a control run on the data without one step's rows sees the same batches
    otherwise. On older releases (the CI matrix's lowest environment) the keyword is emulated
    here, for the tests only: accepted and remembered, and honoured by ``_get_train_sampler``
    (the same per-instance seam ``finitetune.integrations.hf.seams.use_sequential_sampler``
    uses). The code under test is unchanged."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments, Trainer, TrainingArguments

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        yield
        return
    from torch.utils.data import SequentialSampler

    with contextlib.suppress(ImportError):  # TRL's configs are TrainingArguments too
        import trl

        for name in dir(trl):  # TRL imports its modules lazily: load every config class
            if name.endswith("Config"):
                with contextlib.suppress(Exception):
                    getattr(trl, name)

    def family(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from family(sub)

    saved = {cls: cls.__init__ for cls in family(TrainingArguments)}
    assert Seq2SeqTrainingArguments in saved
    sampler = Trainer._get_train_sampler

    def accepting(cls):
        init = saved[cls]

        def __init__(self, *args, train_sampling_strategy="random", **kwargs):
            init(self, *args, **kwargs)
            self.__dict__["_test_sampling"] = train_sampling_strategy
        return __init__

    def get_train_sampler(self, *args, **kwargs):
        if self.args.__dict__.get("_test_sampling") == "sequential":
            return SequentialSampler(args[0] if args else self.train_dataset)
        return sampler(self, *args, **kwargs)

    for cls in saved:
        cls.__init__ = accepting(cls)
    Trainer._get_train_sampler = get_train_sampler
    yield
    for cls, init in saved.items():
        cls.__init__ = init
    Trainer._get_train_sampler = sampler
