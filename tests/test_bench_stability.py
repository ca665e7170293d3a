"""The stability benchmark measures through ``finitetune train``'s own recipe, with seams it
patches in (the Trainer without the guard for variant (a), a step timer, a log recorder, an
evaluation of a run that failed). When the recipe's functions change shape, these seams must
still fit: one short cell of each kind, on the tiny model, checked for what the tables use."""

from __future__ import annotations

import pytest
from bench import bench_stability as B

from finitetune.integrations.hf.callback import guard_of


@pytest.mark.parametrize("variant", ["a", "c"])
def test_one_cell_runs_the_recipe_and_measures_what_the_tables_show(tmp_path, variant):
    with B.patched_recipe():
        cell = B.run_cell(variant, 0, {"model": "tiny", "max_steps": 4}, str(tmp_path / "run"))
    assert cell["error"] is None
    assert cell["steps"] == 4 and cell["finite"] is True
    assert 0.0 <= cell["em"] <= 1.0
    assert cell["train_s"] > 0 and cell["step_s"] > 0
    trainer = B._Cell.trainer
    callbacks = {type(cb).__name__ for cb in trainer.callback_handler.callbacks}
    if variant == "a":  # the plain Trainer: no guard anywhere in the run
        assert guard_of(trainer) is None and "GuardCallback" not in callbacks
        assert cell["guard_s"] is None and cell["skipped"] == 0
    else:
        assert guard_of(trainer) is not None and "GuardCallback" in callbacks
        assert cell["guard_s"] > 0


def test_a_failed_run_is_still_evaluated_as_it_stands(tmp_path):
    """A halt is a measured outcome, not a crash of the benchmark: the cell keeps the exact
    match of the weights the run stopped with."""
    settings = {"model": "tiny", "max_steps": 6, "learning_rate": 1e6,
                "guard": {"policy": "halt", "spike_warmup": 2}}
    with B.patched_recipe():
        cell = B.run_cell("b", 0, settings, str(tmp_path / "run"))
    assert cell["error"] == "NonFiniteHalt" and cell["steps"] < 6
    assert cell["em"] is not None and 0.0 <= cell["em"] <= 1.0
