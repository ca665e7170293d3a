"""The public surface is a short, deliberate list: adding or removing a name is a decision."""

import subprocess
import sys

import finitetune

PUBLIC = {
    "validate_labels", "LabelReport", "causal_lm_loss", "Guard", "GuardConfig", "StepOutcome",
    "GuardCallback", "NonFiniteHalt", "choose_precision", "PrecisionPlan", "health_report",
    "HealthReport",
}


def test_all_is_locked_and_every_name_resolves():
    assert set(finitetune.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(finitetune, name).__name__ == name


def test_import_is_cheap():
    """`import finitetune` (and so `finitetune report`) must not import torch or transformers."""
    code = ("import sys, finitetune; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Import paths the documentation shows: each must keep working (the object it names included).
DOCUMENTED = [
    ("finitetune.loss", "causal_lm_loss"), ("finitetune.loss", "SafeCausalLMLoss"),
    ("finitetune.loss", "causal_lm_loss_from_hidden"),
    ("finitetune.integrations.hf", "GuardCallback"), ("finitetune.integrations.hf", "guarded"),
    ("finitetune.integrations.hf", "GuardedTrainerMixin"),
    ("finitetune.integrations.hf", "CheckpointCallback"),
    ("finitetune.guard", "Guard"), ("finitetune.guard", "FaultHook"),
    ("finitetune.guard.attribution", "Attributor"),
    ("finitetune.precision", "choose_precision"), ("finitetune.train", "train"),
    ("finitetune.testing", "run_distributed"), ("finitetune.testing", "count_host_syncs"),
    ("finitetune.report", "to_markdown"), ("finitetune.report", "health_report"),
]

# The previous release's module paths: they still import, as the same module, with a warning.
MOVED = [
    ("finitetune.config", "finitetune.settings.config", "GuardConfig"),
    ("finitetune.integrations.checkpoint_callback",
     "finitetune.integrations.hf.checkpoint_callback", "CheckpointCallback"),
    ("finitetune.run_files", "finitetune.rundir.files", "read_jsonl"),
    ("finitetune.recipe", "finitetune.train.recipe", "run_training"),
    ("finitetune.integrations.trainer", "finitetune.integrations.hf.trainer", "build_trainer"),
]


def test_documented_import_paths_resolve():
    import importlib

    for module, name in DOCUMENTED:
        assert getattr(importlib.import_module(module), name) is not None, (module, name)
    # the names the README's examples use are the public objects themselves
    assert finitetune.integrations.hf.GuardCallback is finitetune.GuardCallback
    assert finitetune.loss.causal_lm_loss is finitetune.causal_lm_loss


def test_old_module_paths_import_the_moved_module_with_a_warning():
    import importlib

    import pytest

    for old, new, name in MOVED:
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_the_previous_home_of_train_still_works():
    from finitetune.cli import train as cli_train
    from finitetune.train import train

    assert cli_train.train is train
