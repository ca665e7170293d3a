"""``finitetune verify`` end to end: every scenario reproduced unguarded and fixed guarded.

Runs the real command (tiny model, ~15 s on 2 CPU cores) and checks specific cells of its
before/after tables, the files it leaves, and that it fails when a fault is not injected: a
verify that cannot fail proves nothing.
"""

import json
import re

import pytest

from finitetune.cli.main import main

SCENARIOS = ("all_masked", "hidden_nan", "inf_grad", "fp16_overflow", "lr_divergence")


def sections(text: str) -> dict[str, str]:
    """Scenario key -> its block of output."""
    parts = re.split(r"^## \d+\. ", text, flags=re.M)[1:]
    return {re.search(r"\(`(\w+)`\)", p).group(1): p for p in parts}


def row(block: str, label: str) -> tuple[str, str]:
    """(unguarded, guarded) cells of the table row starting with ``label``."""
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith(label):
            return cells[1], cells[2]
    raise AssertionError(f"no row {label!r} in:\n{block}")


def counts(cell: str) -> list[int]:
    """'20 / 6 / 14 (+1 inf) / 0' -> [20, 6, 14, 0] (entries, valid, NaN, zero)."""
    return [int(part.split()[0]) for part in cell.split(" / ")]


@pytest.fixture(scope="module")
def verify_run(tmp_path_factory, _isolated_cache):
    import sys
    from io import StringIO

    out_dir = tmp_path_factory.mktemp("verify")
    buf, saved = StringIO(), sys.stdout
    sys.stdout = buf
    try:
        code = main(["verify", "--steps", "5", "--output-dir", str(out_dir)])
    finally:
        sys.stdout = saved
    return code, buf.getvalue(), out_dir


def test_verify_exits_0_and_every_scenario_is_reproduced_and_fixed(verify_run):
    code, text, _ = verify_run
    assert code == 0, text
    last = text.rstrip().splitlines()[-1]
    assert last.startswith("verify: 5/5 scenarios reproduced and fixed") and last.endswith("exit 0")
    blocks = sections(text)
    assert list(blocks) == list(SCENARIOS)
    for key, block in blocks.items():
        assert "reproduced: yes" in block and "fixed: yes" in block, (key, block)
        assert "FAILED" not in block, block
        # the guarded run ends finite in every scenario
        assert row(block, "final parameters finite")[1] == "yes", key


def test_minimal_run_prints_the_seed_report(verify_run):
    _, text, out_dir = verify_run
    head = text.split("## 1.")[0]
    assert "## Minimal guarded run: 5 steps" in head
    loss = row(head, "loss")
    assert loss[0] == "5" and loss[1] == "5"  # entries, valid (then NaN, inf, zero, ...)
    assert "loss trend: decreasing" in head and "verdict: healthy" in head
    assert (out_dir / "minimal" / "metrics.jsonl").is_file()


def test_table_cells_show_the_failure_unguarded_and_the_fix_guarded(verify_run):
    _, text, _ = verify_run
    b = sections(text)
    # 1. empty batches: the model's loss is NaN on steps 6-8, printed as 0.0; guarded: none
    u, g = row(b["all_masked"], "true loss non-finite")
    assert u.startswith("3 (steps 6, 7, 8") and g == "0"
    assert counts(row(b["all_masked"], "logged loss")[0])[3] == 3  # three fake 0.0 losses
    assert counts(row(b["all_masked"], "logged loss")[1])[3] == 0
    assert "no_valid_tokens" in row(b["all_masked"], "guard")[1]
    # 2. hidden NaN: loss 0.0 and grad_norm NaN from step 7 on; guarded: one skipped step
    lu, lg = (counts(c) for c in row(b["hidden_nan"], "logged loss"))
    gu, gg = (counts(c) for c in row(b["hidden_nan"], "grad_norm"))
    assert lu[3] >= 10 and gu[2] >= 10
    assert lg[3] == 0 and gg[2] <= 1
    assert "hidden_nan_loss" in row(b["hidden_nan"], "report verdict")[0]
    assert row(b["hidden_nan"], "final parameters finite") == ("no", "yes")
    # 3. inf grad: weights NaN unguarded; guarded equals the control run bit for bit
    assert row(b["inf_grad"], "final parameters finite") == ("no", "yes")
    assert row(b["inf_grad"], "equals control run")[1] == "yes"
    # 4. fp16 overflow: NaN from the first step unguarded; the precision plan holds the value,
    # an explicit fp16 request is refused, and the output says what cannot be checked on a CPU
    assert counts(row(b["fp16_overflow"], "grad_norm")[0])[1] == 0  # no valid grad norm
    assert not row(b["fp16_overflow"], "precision")[1].startswith("fp16")
    assert row(b["fp16_overflow"], "report verdict")[1] == "healthy"
    assert "an explicit fp16 request on this CPU is refused with a fix (fp16" in \
        b["fp16_overflow"]
    assert "not applicable here" in b["fp16_overflow"]
    # 5. LR divergence: unguarded loss ends above its start; guarded rolled back and learned
    first, last = (float(x) for x in row(b["lr_divergence"], "loss first")[0].split(" -> "))
    assert last > first
    assert "rollback" in row(b["lr_divergence"], "guard")[1]
    # a rollback is reported (a warning: the LR was too high), and only where the guard acted
    assert row(b["lr_divergence"], "report verdict")[1] == \
        "warning (guard_rollback) only at step 5, where the guard acted"


def test_output_dir_keeps_each_arm(verify_run):
    _, _, out_dir = verify_run
    summary = json.loads((out_dir / "verify.json").read_text())
    assert summary["ok"] is True and summary["minimal"]["ok"] is True
    assert [s["key"] for s in summary["scenarios"]] == list(SCENARIOS)
    for s in summary["scenarios"]:
        assert s["reproduced"] and s["fixed"]
        assert (out_dir / s["key"] / "unguarded" / "trainer_state.json").is_file()
        assert (out_dir / s["key"] / "unguarded" / "report.md").is_file()
        assert (out_dir / s["key"] / "guarded" / "metrics.jsonl").is_file()
        assert json.loads((out_dir / s["key"] / "guarded" / "report.json").read_text())[
            "verdict"] in ("healthy", "warning")
    assert (out_dir / "inf_grad" / "control" / "trainer_state.json").is_file()
    events = (out_dir / "hidden_nan" / "guarded" / "events.jsonl").read_text().splitlines()
    assert [json.loads(e)["step"] for e in events] == [7]
    hidden = next(s for s in summary["scenarios"] if s["key"] == "hidden_nan")
    assert hidden["unguarded"]["params_finite"] is False
    assert hidden["guarded"]["grad_norm"]["nan"] == 1


def test_a_fault_that_does_not_reproduce_fails_verify(monkeypatch, tmp_path, capsys,
                                                      _isolated_cache):
    # Injection off: the unguarded arm trains cleanly, so the scenario proves nothing and
    # verify must say so and exit 1 (the guard has nothing to skip either).
    import finitetune.verify.scenarios as scenarios

    class NoFault:
        def __init__(self, *args, **kwargs):
            pass

        def remove(self):
            pass

    monkeypatch.setattr(scenarios, "GradFault", NoFault)
    code = main(["verify", "--steps", "5", "--scenario", "inf_grad",
                 "--output-dir", str(tmp_path / "v")])
    text = capsys.readouterr().out
    assert code == 1, text
    assert "reproduced: no" in text and "FAILED: final parameters finite" in text
    assert "verify: 0/1 scenarios reproduced and fixed (failed: inf_grad)" in text
    assert text.rstrip().endswith("exit 1")
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["ok"] is False


def test_a_precision_policy_that_accepts_fp16_on_the_cpu_fails_verify(monkeypatch, tmp_path,
                                                                      capsys, _isolated_cache):
    # The fp16 scenario's policy check can fail: a policy that lets fp16 through on a CPU (where
    # the Trainer would silently train fp32) makes verify say so and exit 1.
    import finitetune.precision.policy as policy
    from finitetune.precision.policy import PrecisionPlan

    real = policy.choose_precision

    def permissive(model=None, device=None, requested="auto"):
        if requested == "fp16":
            return PrecisionPlan(requested="fp16", dtype="fp16", autocast=True, grad_scaler=True,
                                 fp32_modules=[], device="cpu", reasons=["accepted"])
        return real(model, device=device, requested=requested)

    monkeypatch.setattr(policy, "choose_precision", permissive)
    code = main(["verify", "--steps", "5", "--scenario", "fp16_overflow"])
    text = capsys.readouterr().out
    assert code == 1, text
    assert "FAILED: an explicit fp16 request on this CPU is refused with a fix (it was " \
           "accepted)" in text


def test_bad_arguments_exit_2(capsys):
    assert main(["verify", "--scenario", "nope"]) == 2
    assert "unknown scenario 'nope'" in capsys.readouterr().err
    assert main(["verify", "--steps", "4"]) == 2
    assert "--steps 4: expected at least 5" in capsys.readouterr().err
