"""A tiny real Trainer run that reports to TensorBoard, MLflow, trackio and W&B (offline) at once.

Run as a script by ``tests/test_report_trackers.py`` (a subprocess: the trackers keep global
state and background processes that must not live in the test process):

    python tests/report_tracker_run.py MODEL_DIR OUT_DIR

Writes OUT_DIR/out (Trainer output, TensorBoard events under out/runs/), OUT_DIR/mlruns (MLflow
file store), OUT_DIR/trackio (trackio's SQLite store), OUT_DIR/wandb (W&B offline run) and
OUT_DIR/out/trainer_state.json (the run's own record, the reference for every reader). Step 8's
loss is NaN (a NaN injected into the model's output), so the non-finite path is compared too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(model_dir: str, out: str) -> None:
    root = Path(out)
    os.environ.update({
        "MLFLOW_TRACKING_URI": (root / "mlruns").resolve().as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(root / "trackio"),
        "WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "DISABLE_MLFLOW_INTEGRATION": "FALSE",
    })
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from finitetune.models import load_model, load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    texts = [f"topic: {'sports' if i % 2 else 'tech'}. headline number {i}" for i in range(64)]
    enc = tok(texts, truncation=True, max_length=16, padding="max_length")
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "labels": enc["input_ids"]})

    class NanAtStep8(TrainerCallback):
        """Make the 8th step's loss NaN through a forward hook on the last layer norm."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.active = state.global_step == 7

    nan_cb = NanAtStep8()
    nan_cb.active = False

    def hook(_module, _inputs, output):
        return output * float("nan") if nan_cb.active else output

    model.model.norm.register_forward_hook(hook)
    args = TrainingArguments(
        output_dir=str(root / "out"), max_steps=12, per_device_train_batch_size=4,
        logging_steps=1, eval_strategy="steps", eval_steps=4, learning_rate=1e-3,
        report_to=["tensorboard", "mlflow", "trackio", "wandb"], run_name="tiny-run",
        use_cpu=True, save_strategy="no", logging_nan_inf_filter=False, max_grad_norm=0.0,
        seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds.select(range(8)),
                      callbacks=[nan_cb])
    trainer.train()
    trainer.state.save_to_json(str(root / "out" / "trainer_state.json"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
