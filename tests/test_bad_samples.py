"""Bad batches remembered: the samples of a faulty step are written down and left out later.

Fault (end to end): one training example is poisoned: whenever it is in a micro-batch, the
embedding output of its row becomes NaN (a corrupt sample, as a bad record or a broken
tokenisation would make it). The first run meets it at some step K; the guard skips K and
``bad_samples.jsonl`` names the sample and its source line. The run is then restarted from a
checkpoint before K (``--resume`` after the later checkpoints are gone): it must never feed that
sample to the model again, train step K normally, and the report and ``explain`` must name it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finitetune.cli.main import main
from finitetune.guard.bad_batches import BadSampleMemory, SkipSamples
from finitetune.rundir import files as run_files


def _collate(rows):
    return [r["index"] for r in rows]


def test_skip_samples_drops_remembered_rows_and_never_returns_an_empty_batch():
    from finitetune.data.collate import CausalLMCollator

    coll = SkipSamples(CausalLMCollator(0, sample_ids=True), {2, 5})
    rows = [{"index": i, "input_ids": [7, 8, 9], "labels": [-100, 8, 9]} for i in range(6)]
    assert coll(rows[1:4])["sample_ids"].tolist() == [1, 3]
    empty = coll([rows[5], rows[2]])  # one masked padding row instead of nothing
    assert empty["input_ids"].tolist() == [[0]] and empty["labels"].tolist() == [[-100]]
    assert coll.dropped == 3
    assert [ids for _, ids in coll.log] == [[1, 3], []]
    assert coll.pad_token_id == 0  # the wrapped collator's attributes stay reachable


class _Outcome:
    def __init__(self, step, reason="nonfinite_loss", action="skip"):
        self.step, self.reason, self.action = step, reason, action


@pytest.mark.parametrize("mode,expected", [("off", set()), ("step", {10, 11}),
                                            ("culprits", {11}), ("window", {8, 9, 10, 11,
                                                                             12, 13})])
def test_modes_choose_which_remembered_samples_are_left_out(tmp_path, mode, expected):
    memory = BadSampleMemory(tmp_path, mode=mode, window=1, sources={11: "d.jsonl:12"})
    coll = memory.wrap(_collate)
    for ids in ([6, 7], [8, 9], [10, 11]):  # data order: micro-batches of steps 3, 4, 5
        coll([{"index": i} for i in ids])
    memory.record(_Outcome(5), [[10, 11]], culprits=[11])
    coll([{"index": i} for i in (12, 13)])  # the step after the fault
    memory.flush()
    again = BadSampleMemory(tmp_path, mode=mode, window=1)  # a resumed run reads the file
    assert again.skip == expected
    first = run_files.read_jsonl(tmp_path / run_files.BAD_SAMPLES).records[0]
    assert first["sample_ids"] == [10, 11] and first["sources"] == [None, "d.jsonl:12"]


def test_a_fault_of_the_state_does_not_blame_the_data(tmp_path):
    memory = BadSampleMemory(tmp_path)
    memory.record(_Outcome(6), [[1, 2]], state_bad=["model.layers.0.mlp.up_proj.weight"])
    assert BadSampleMemory(tmp_path).skip == set()


def _poisoned_data(tmp_path: Path) -> tuple[Path, int]:
    from finitetune.builtin.tasks import tiny_task

    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in tiny_task(40, seed=7)]
    rows[20]["prompt"] = "~~~~ " + rows[20]["prompt"]  # "~" is in no other row
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, 21  # its line number


class _NaNForToken:
    """Fault: rows containing ``token`` get a NaN embedding output (training forwards only);
    counts the training forwards that saw it."""

    def __init__(self, model, token: int):
        self.token, self.seen = token, 0
        model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        rows = (args[0] == self.token).any(-1)
        if bool(rows.any()):
            self.seen += int(module.training)
            out = out.clone()
            out[rows] = float("nan")
        return out


def _nan_for_poisoned_rows(monkeypatch, tiny_model_dir) -> list[_NaNForToken]:
    """Every model ``finitetune train`` loads from now on outputs NaN for the rows holding the
    marker token "~~~~"; the list fills with one fault hook per model loaded."""
    import finitetune.models as models
    from finitetune.models import load_tokenizer

    token = load_tokenizer(tiny_model_dir)("~~~~")["input_ids"][0]
    faults: list[_NaNForToken] = []
    real_load = models.load_model

    def load_with_fault(*args, **kwargs):
        model = real_load(*args, **kwargs)
        faults.append(_NaNForToken(model, token))
        return model

    monkeypatch.setattr(models, "load_model", load_with_fault)
    return faults


@pytest.mark.slow
def test_nan_batch_is_not_seen_again_after_a_restart_and_the_report_names_it(
        tmp_path, tiny_model_dir, monkeypatch, one_thread, capsys):
    data, line = _poisoned_data(tmp_path)
    faults = _nan_for_poisoned_rows(monkeypatch, tiny_model_dir)
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out),
            "--max-steps", "9", "--save-steps", "1", "--save-total-limit", "20",
            "--logging-steps", "1", "--batch-size", "4", "--eval-size", "4", "--lora-r", "0",
            "--precision", "fp32", "--no-eval-before"]
    assert main(args) == 0
    assert faults[0].seen >= 1  # met in training (and in attribution's replay)
    bad = run_files.read_jsonl(out / run_files.BAD_SAMPLES).records
    assert len(bad) == 1 and bad[0]["reason"] in ("nonfinite_loss", "nonfinite_grad")
    assert len(bad[0]["culprits"]) == 1  # attribution's replay found the one bad row
    k = bad[0]["step"]
    where = f"{data}:{line}"  # the source line of the poisoned example
    assert where in bad[0]["sources"]
    poisoned_id = bad[0]["sample_ids"][bad[0]["sources"].index(where)]

    # restart from the checkpoint before K (as if the run had died at K)
    for path in run_files.checkpoints(out):
        if run_files.checkpoint_step(path) >= k:
            shutil.rmtree(path)
    assert main([*args, "--resume"]) == 0
    assert faults[1].seen == 0  # never fed to the model again
    metrics = {m["step"]: m for m in run_files.read_jsonl(out / "metrics.jsonl").records}
    assert sorted(metrics) == list(range(1, 10))
    # K trains now, on the 3 other samples of its batch (skip_bad_samples=culprits)
    assert metrics[k]["skipped"] == 0 and metrics[k]["loss"] is not None
    events = run_files.read_jsonl(out / "events.jsonl").records
    assert not [e for e in events if e.get("kind") == "guard"]  # the fault did not recur
    assert run_files.read_jsonl(out / run_files.BAD_SAMPLES).records == bad  # still remembered

    report = (out / "report.md").read_text()
    assert f"{poisoned_id} ({where})" in report
    assert json.loads((out / "report.json").read_text())["guard"]["bad_samples"][0]["step"] == k
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{poisoned_id} ({where})" in text and "resuming from checkpoint-" in text
    assert torch.isfinite(torch.tensor(metrics[9]["loss"]))


# ---------------------------------------------------------------- remembered by content --
def _fps(records):
    from finitetune.data.fingerprint import RowFingerprints

    return RowFingerprints.of(records, records)


def test_remembered_samples_are_found_by_content_when_the_data_changed(tmp_path, caplog):
    """Five rows inserted at the top: the poisoned row moved from index 3 to 8. The resumed
    run leaves out index 8 (the poisoned row), not index 3 (a healthy row now), says so at
    start-up, and records where the rows went; a row no longer in the data is named too."""
    old = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    new = [{"prompt": f"n{i}", "response": "x"} for i in range(5)] + old[:6] + old[7:]
    memory = BadSampleMemory(tmp_path, mode="step", fingerprints=_fps(old),
                             sources=lambda i: f"d.jsonl:{i + 1}")
    memory.record(_Outcome(4), [[3, 6]])  # the step held rows 3 and 6 of the old file
    assert memory.skip == {3, 6}
    first = run_files.read_jsonl(tmp_path / run_files.BAD_SAMPLES).records[0]
    assert first["data"] == _fps(old).data and len(first["fingerprints"]) == 2

    caplog.set_level("WARNING", logger="finitetune")
    again = BadSampleMemory(tmp_path, mode="step", fingerprints=_fps(new),
                            sources=lambda i: f"d.jsonl:{i + 1}")
    assert again.skip == {8}  # row 3 moved to 8; row 6 was removed from the file
    assert 3 not in again.skip and 6 not in again.skip  # healthy rows now at those indices
    said = caplog.text
    assert "3 (d.jsonl:4) is now 8 (d.jsonl:9)" in said
    assert "NOT found among today's training rows" in said and "6 (d.jsonl:7)" in said
    remap = run_files.read_jsonl(tmp_path / run_files.BAD_SAMPLES).records[-1]
    assert remap["kind"] == "remap" and remap["moved"][0]["now"] == 8
    assert [m["sample_id"] for m in remap["missing"]] == [6]

    from finitetune.report.history import bad_sample_lines

    lines = bad_sample_lines(run_files.read_jsonl(tmp_path / run_files.BAD_SAMPLES).records)
    assert "3 (d.jsonl:4; now 8 at d.jsonl:9)" in lines[0]
    assert "6 (d.jsonl:7; not among the training rows any more)" in lines[0]
    # the same data again: nothing moves, nothing is said, the indices stand
    caplog.clear()
    same = BadSampleMemory(tmp_path, mode="step", fingerprints=_fps(old))
    assert same.skip == {3, 6} and "data changed" not in caplog.text


@pytest.mark.slow
def test_a_poisoned_row_moved_by_an_edit_is_still_left_out_after_resume(
        tmp_path, tiny_model_dir, monkeypatch, one_thread, capsys, caplog):
    """The case that fed the poisoned row: remembered at one line, five lines inserted at the
    top of the data file, resume. The poisoned row is never fed again, the healthy row now at
    its old index is trained on, the start-up says what moved, and explain names the line the
    row is on now."""
    from finitetune.builtin.tasks import tiny_task
    from finitetune.train.recipe import split_records

    base = [{"prompt": r["prompt"], "response": r["response"]} for r in tiny_task(45, seed=7)]
    old, extra = base[:40], base[40:]
    new = extra + old
    # a row in the training split of both files, at a different training index in each
    def train_index(n, line):
        train, _ = split_records([{"at": i} for i in range(n)], 4, 0)
        at = [t["at"] for t in train]
        return at.index(line) if line in at else None
    line = next(i for i in range(40) if train_index(40, i) is not None
                and train_index(45, i + 5) is not None
                and train_index(40, i) != train_index(45, i + 5))
    old[line] = {**old[line], "prompt": "~~~~ " + old[line]["prompt"]}
    new = extra + old
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in old))
    faults = _nan_for_poisoned_rows(monkeypatch, tiny_model_dir)
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out),
            "--max-steps", "9", "--save-steps", "1", "--save-total-limit", "20",
            "--logging-steps", "1", "--batch-size", "4", "--eval-size", "4", "--lora-r", "0",
            "--precision", "fp32", "--no-eval-before", "--skip-bad-samples", "step"]
    assert main(args) == 0
    bad = run_files.read_jsonl(out / run_files.BAD_SAMPLES).records
    assert len(bad) == 1 and f"{data}:{line + 1}" in bad[0]["sources"]
    k = bad[0]["step"]
    old_id = bad[0]["sample_ids"][bad[0]["sources"].index(f"{data}:{line + 1}")]
    new_id = train_index(45, line + 5)
    for path in run_files.checkpoints(out):
        if run_files.checkpoint_step(path) >= k:
            shutil.rmtree(path)
    data.write_text("".join(json.dumps(r) + "\n" for r in new))  # 5 lines at the top
    caplog.set_level("WARNING", logger="finitetune")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert faults[1].seen == 0  # the poisoned row, now 5 lines down, was never fed again
    assert (f"{old_id} ({data}:{line + 1}) is now {new_id} ({data}:{line + 6})"
            in caplog.text)
    remap = run_files.read_jsonl(out / run_files.BAD_SAMPLES).records[-1]
    assert remap["kind"] == "remap" and {"sample_id": old_id, "now": new_id,
                                         "source": f"{data}:{line + 6}"}.items() <= next(
        m for m in remap["moved"] if m["sample_id"] == old_id).items()
    assert not remap["missing"]  # the step's other rows were all found again too
    metrics = {m["step"]: m for m in run_files.read_jsonl(out / "metrics.jsonl").records}
    assert sorted(metrics) == list(range(1, 10)) and metrics[9]["loss"] is not None
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    assert f"now {new_id} at {data}:{line + 6}" in capsys.readouterr().out
