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
