"""Runtime label accounting: empty micro-batches are counted over the whole run, into
metrics.jsonl and the health report, and never logged as a loss of 0.0."""

from __future__ import annotations

import json

import torch
from transformers import Trainer, TrainingArguments

from finitetune.data.collate import CausalLMCollator
from finitetune.integrations.hf.metrics import MetricsCallback
from finitetune.loss.causal import SafeCausalLMLoss
from finitetune.report import write_reports


def _rows(n_batches: int, batch: int, empty_batches: set[int]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(n_batches):
        for _ in range(batch):
            ids = torch.randint(2, 60, (8,), generator=g).tolist()
            labels = [-100] * 8 if b in empty_batches else [-100] * 4 + ids[4:]
            rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_empty_microbatches_are_counted_over_the_entire_run(tmp_path):
    from finitetune.testing.models import tiny_llama

    model = tiny_llama(heads=2, positions=2048)
    # micro-batches 1 and 10 (of 12) have no supervised token: one early, one late, so a count
    # over a prefix of the run would miss the second
    rows = _rows(12, 2, empty_batches={1, 10})
    loss = SafeCausalLMLoss()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=6, logging_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True,
                             learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=CausalLMCollator(0), compute_loss_func=loss,
                      callbacks=[MetricsCallback(tmp_path / "metrics.jsonl", tracker=loss)])
    # no shuffling: the Trainer's sampler would move the empty batches around
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6]
    assert [x["empty_microbatches"] for x in lines] == [1, 0, 1]
    assert [x["empty_microbatches_total"] for x in lines] == [1, 1, 2]
    assert [x["micro_batches"] for x in lines] == [4, 4, 4]
    assert all(x["loss"] is not None and x["loss"] > 0 for x in lines)  # never a fake 0.0
    assert [x["tokens"] for x in lines] == [3 * 2 * 4 - 0, 4 * 2 * 4, 3 * 2 * 4]
    report = write_reports(tmp_path)
    assert report.guard["empty_microbatches"] == 2
    assert "empty micro-batches (summed over entries): 2" in (tmp_path / "report.md").read_text()
