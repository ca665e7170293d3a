"""The report's layers hold: the model never imports a view, and no report module imports
transformers, peft, accelerate or torch (the report runs on anyone's logs, anywhere).

Imports are read from the source (every ``import`` statement, also those inside functions),
so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import finitetune.report

REPORT = Path(finitetune.report.__file__).parent
SRC = REPORT.parents[1]
VIEWS = {"finitetune.report.render", "finitetune.report.html", "finitetune.report.plots",
         "finitetune.report.live"}
MODEL = {"finitetune.report.health", "finitetune.report.stats", "finitetune.report.rules",
         "finitetune.report.rules.base", "finitetune.report.rules.nonfinite",
         "finitetune.report.rules.progress", "finitetune.report.rules.divergence",
         "finitetune.report.evidence", "finitetune.report.run_status"}
LOADING = {"finitetune.report.records", "finitetune.report.names", "finitetune.report.fmt",
           "finitetune.report.history",
           "finitetune.report.console", "finitetune.report.fragments",
           "finitetune.report.load", "finitetune.report.run_reader",
           "finitetune.report.tensorboard", "finitetune.report.trackers",
           "finitetune.report.follow"}
FORBIDDEN = ("transformers", "peft", "accelerate", "torch", "matplotlib", "rich")


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


MODULES = {_module(p): _imports(p) for p in REPORT.rglob("*.py")}


def test_every_report_module_is_in_one_layer():
    layered = VIEWS | MODEL | LOADING | {"finitetune.report"}
    assert set(MODULES) == layered, set(MODULES) ^ layered


def _hits(module: str, names: set[str]) -> set[str]:
    return {imp for imp in MODULES[module] for n in names if imp == n or imp.startswith(n + ".")}


def test_analysis_and_loading_import_no_view():
    for module in sorted(MODEL | LOADING):
        assert not _hits(module, VIEWS), f"{module} imports a view: {_hits(module, VIEWS)}"


def test_loading_imports_no_analysis():
    for module in sorted(LOADING):
        assert not _hits(module, MODEL), f"{module} imports the model: {_hits(module, MODEL)}"


def test_model_and_loading_import_no_ml_framework_or_plotting():
    for module in sorted(MODEL | LOADING):
        bad = {imp for imp in MODULES[module] if imp.split(".")[0] in FORBIDDEN}
        assert not bad, f"{module} imports {bad}"


def test_no_report_module_imports_transformers_peft_accelerate_or_torch():
    for module, imports in MODULES.items():
        bad = {i for i in imports if i.split(".")[0] in FORBIDDEN[:4]}
        assert not bad, f"{module} imports {bad}"


def test_the_spike_rule_and_the_guard_share_one_robust_z_score():
    import finitetune.guard.policy as policy
    import finitetune.numerics.robust_stats as robust

    assert policy.robust_z is robust.robust_z
    assert ("finitetune.numerics.robust_stats.robust_scale"
            in MODULES["finitetune.report.rules.divergence"])  # the loss and grad-norm spikes
    assert robust.robust_z([1.0, 1.0, 1.0, 2.0], 1.5, 0.02) == robust.robust_scale(
        [1.0, 1.0, 1.0, 2.0], 0.02).z(1.5)
