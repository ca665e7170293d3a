"""The frameworks people train through, driven by their own command lines under ``finitetune run``.

LLaMA-Factory (``llamafactory-cli train``), axolotl (``axolotl train``, which starts the Trainer
in an ``accelerate launch`` child) and ms-swift (``swift sft``) fine-tune a tiny local Llama
(full and LoRA, a few steps, CPU, offline). Fault: ``--inject nan_grad@3``. Must, guarded: step
3 is skipped (its event in the Trainer's ``output_dir``), and the final weights and the last
checkpoint's optimizer state are finite. The control, the same run with ``--no-guard``, must
end with non-finite weights: a check whose control does not fail proves nothing. ms-swift
drops the gradients of a step whose norm is NaN by itself (its own patch of accelerate's
clipping), but not of one whose norm is inf: its control runs ``inf_grad@3`` too.

Each framework's tests run only where it is installed: the CI version matrix (``.ci/matrix``)
builds one environment per framework.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STEPS = 5
FAULT_STEP = 3
TIMEOUT = 900
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if "
                 "add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- the tiny model and data, built in the framework's own environment ------------------------
def _rows(n: int = 64) -> list[dict]:
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "candle", "rocket"]
    rows = []
    for _ in range(n):
        k = rng.randint(1, 9)
        rows.append({"instruction": f"Is the number {k} even or odd?",
                     "input": " ".join(rng.sample(words, 2)),
                     "output": "even" if k % 2 == 0 else "odd"})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer (chat template, special tokens) trained
    in a second, and the task as alpaca JSON, alpaca JSONL, chat JSONL and LLaMA-Factory's
    dataset registry."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    model_dir, data_dir = root / "model", root / "data"
    data_dir.mkdir()
    rows = _rows()
    (data_dir / "alpaca.json").write_text(json.dumps(rows))
    (data_dir / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data_dir / "messages.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
        {"role": "assistant", "content": r["output"]}]}) + "\n" for r in rows))
    (data_dir / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name":
                                                                     "alpaca.json"}}))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
                            + ["user assistant system\n"] * 4,
                            trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                                show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel
                                                .alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)).save_pretrained(model_dir)
    return root


# ---- each framework's command line ------------------------------------------------------------
def llamafactory(tiny: Path, out: Path, tuning: str) -> list[str]:
    lora = "lora_rank: 4\nlora_alpha: 8\nlora_target: all\n" if tuning == "lora" else ""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(textwrap.dedent(f"""\
        model_name_or_path: {tiny / "model"}
        stage: sft
        do_train: true
        finetuning_type: {tuning}
        dataset: tiny
        dataset_dir: {tiny / "data"}
        template: chatml
        cutoff_len: 64
        overwrite_cache: true
        preprocessing_num_workers: 1
        dataloader_num_workers: 0
        output_dir: {out}
        per_device_train_batch_size: 4
        learning_rate: 1.0e-3
        max_steps: {STEPS}
        logging_steps: 1
        save_strategy: steps
        save_steps: {STEPS - 1}
        report_to: none
        disable_gradient_checkpointing: true
        seed: 0
        """) + lora)
    return [_bin("llamafactory-cli"), "train", str(config)]


def axolotl(tiny: Path, out: Path, tuning: str) -> list[str]:
    lora = ("adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\n"
            "lora_target_linear: true\nlora_mlp_kernel: false\nlora_qkv_kernel: false\n"
            "lora_o_kernel: false\n") if tuning == "lora" else ""
    config = out.parent / f"{out.name}.yml"
    config.write_text(textwrap.dedent(f"""\
        base_model: {tiny / "model"}
        tokenizer_type: PreTrainedTokenizerFast
        model_type: LlamaForCausalLM
        datasets:
          - path: {tiny / "data" / "alpaca.jsonl"}
            ds_type: json
            type: alpaca
        dataset_prepared_path: {out.parent / (out.name + "-prepared")}
        dataset_num_proc: 1
        val_set_size: 0
        output_dir: {out}
        sequence_len: 256
        sample_packing: false
        micro_batch_size: 4
        gradient_accumulation_steps: 1
        max_steps: {STEPS}
        num_epochs: 1
        optimizer: adamw_torch
        lr_scheduler: cosine
        learning_rate: 0.001
        bf16: false
        fp16: false
        tf32: false
        flash_attention: false
        gradient_checkpointing: false
        logging_steps: 1
        save_steps: {STEPS - 1}
        save_strategy: steps
        dataloader_num_workers: 0
        seed: 0
        """) + lora)
    return [_bin("axolotl"), "train", str(config)]


def swift(tiny: Path, out: Path, tuning: str) -> list[str]:
    lora = (["--lora_rank", "4", "--lora_alpha", "8", "--target_modules", "all-linear"]
            if tuning == "lora" else [])
    return [_bin("swift"), "sft", "--model", str(tiny / "model"), "--model_type", "llama",
            "--template", "chatml", "--dataset", str(tiny / "data" / "messages.jsonl"),
            "--tuner_type", tuning, *lora, "--max_length", "64",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", str(STEPS - 1),
            "--eval_strategy", "no", "--split_dataset_ratio", "0", "--torch_dtype", "float32",
            "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--report_to", "none",
            "--seed", "0", "--check_model", "false", "--output_dir", str(out),
            "--add_version", "false"]


FRAMEWORKS = {
    "llamafactory": (llamafactory, "llamafactory"),
    "axolotl": (axolotl, "axolotl"),
    "swift": (swift, "swift"),
}


def _bin(name: str) -> str:
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


def finitetune_run(options: list[str], command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               DISABLE_VERSION_CHECK="1", AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1",
               WANDB_DISABLED="true", TOKENIZERS_PARALLELISM="false")
    # as in an activated environment: axolotl starts its Trainer with `accelerate launch`,
    # found on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run([sys.executable, "-m", "finitetune", "run", "--no-report", *options,
                           "--", *command], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


# ---- what the run left ------------------------------------------------------------------------
def final_weights(out: Path) -> dict:
    """The trained weights the run saved last: the final save in ``output_dir``, else its newest
    checkpoint (full model or LoRA adapter, sharded or not)."""
    from safetensors.torch import load_file

    folders = [out, *sorted(out.glob("checkpoint-*"),
                            key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)]
    for folder in folders:
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return {k: v for f in files for k, v in load_file(f).items()}
    raise AssertionError(f"no safetensors weights under {out}: {sorted(out.rglob('*'))[:20]}")


def optimizer_state(out: Path) -> list:
    """Every tensor of the newest checkpoint's optimizer state."""
    import torch

    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    state = torch.load(newest / "optimizer.pt", map_location="cpu", weights_only=True)
    return [t for s in state["state"].values() for t in s.values() if torch.is_tensor(t)]


def nonfinite(tensors) -> int:
    import torch

    return sum(int((~torch.isfinite(t.float())).sum()) for t in tensors)


def events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _needs(framework: str):
    # CI's environment made for this framework (.ci/matrix) runs it even when the import is
    # missing, so a broken environment fails instead of passing with every case skipped
    here = os.environ.get("FINITETUNE_MATRIX_ENV") == framework
    return pytest.mark.skipif(not here and not installed(FRAMEWORKS[framework][1]),
                              reason=f"{framework} is not installed (CI's version matrix has "
                                     "an environment with it)")


CASES = [pytest.param(fw, tuning, marks=[_needs(fw), pytest.mark.slow], id=f"{fw}-{tuning}")
         for fw in FRAMEWORKS for tuning in ("full", "lora")]


@pytest.mark.parametrize(("framework", "tuning"), CASES)
def test_the_framework_cli_is_guarded_and_its_control_fails(framework, tuning, tiny, tmp_path):
    make = FRAMEWORKS[framework][0]
    guarded = finitetune_run(["--inject", f"nan_grad@{FAULT_STEP}"],
                             make(tiny, tmp_path / "guarded", tuning))
    assert guarded.returncode == 0, guarded.stderr[-4000:]
    assert [(e["step"], e["action"], e["reason"]) for e in events(tmp_path / "guarded")] == [
        (FAULT_STEP, "skip", "nonfinite_grad")], guarded.stderr[-4000:]
    assert nonfinite(final_weights(tmp_path / "guarded").values()) == 0
    assert nonfinite(optimizer_state(tmp_path / "guarded")) == 0
    fault = "inf_grad" if framework == "swift" else "nan_grad"  # swift drops NaN-norm steps
    control = finitetune_run(["--no-guard", "--inject", f"{fault}@{FAULT_STEP}"],
                             make(tiny, tmp_path / "control", tuning))
    assert control.returncode == 0, control.stderr[-4000:]
    assert events(tmp_path / "control") == []
    assert nonfinite(final_weights(tmp_path / "control").values()) > 0, \
        "the control run ended finite: the injected fault did not reach the weights"


@_needs("swift")
@pytest.mark.slow
def test_swift_inf_gradient_is_skipped_by_the_guard(tiny, tmp_path):
    # ms-swift's own patch lets an inf norm through (its control above ends non-finite). Must,
    # guarded: the inf step is skipped like a NaN one, and everything ends finite.
    run = finitetune_run(["--inject", f"inf_grad@{FAULT_STEP}"],
                         swift(tiny, tmp_path / "guarded", "lora"))
    assert run.returncode == 0, run.stderr[-4000:]
    assert [(e["step"], e["reason"]) for e in events(tmp_path / "guarded")] == [
        (FAULT_STEP, "nonfinite_grad")]
    assert nonfinite(final_weights(tmp_path / "guarded").values()) == 0
    assert nonfinite(optimizer_state(tmp_path / "guarded")) == 0
