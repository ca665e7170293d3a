"""``finitetune env``: versions, device, dtype support and the precision plan, for bug reports."""

from __future__ import annotations

import json
from importlib import metadata

import torch

from finitetune.cli.main import main
from finitetune.precision import probe as precision_probe

PACKAGES = ["python", "torch", "transformers", "peft", "accelerate", "datasets", "finitetune"]


def _cpu_without_amx(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(precision_probe, "cpu_features",
                        lambda: {"amx_bf16": False, "avx512_bf16": True, "avx512_fp16": False})


def test_env_prints_versions_device_and_plan_with_reasons(monkeypatch, capsys):
    _cpu_without_amx(monkeypatch)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in PACKAGES:
        line = next(ln for ln in lines if ln.startswith(f"- {name}: "))
        if name != "python":
            assert line == f"- {name}: {metadata.version(name)}"
    assert "- platform: " in out and "- torch build: CUDA " in out
    assert "device: cpu: " in out and "no AMX" in out
    assert "- CUDA available: no" in out and "- MPS available: no" in out
    assert "- bf16: emulated (slower than fp32)" in out
    assert "- fp16 training: no (needs a CUDA GPU)" in out
    assert "precision plan (requested auto): fp32" in out
    assert "- TrainingArguments: bf16=False, fp16=False" in out
    reasons = lines.index("- reasons:")
    assert lines[reasons + 1].startswith("  - CPU without native bf16")


def test_env_simulated_pre_ampere_gpu_shows_fp16_with_grad_scaler(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        including_emulation)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "device: cuda: Tesla T4 (compute capability 7.5)" in out
    assert "- CUDA available: yes (2 devices)" in out
    assert "- bf16: no" in out
    assert "precision plan (requested auto): fp16" in out
    assert "- autocast: yes; GradScaler: yes; kept in fp32: master_weights" in out


def test_env_with_a_model_covers_its_family_and_weights(monkeypatch, capsys, tiny_model_dir):
    _cpu_without_amx(monkeypatch)
    assert main(["env", "--model", str(tiny_model_dir), "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert f"precision plan for {tiny_model_dir} (requested bf16): bf16" in out
    assert "- model_type: llama; largest |weight|: " in out
    assert "- warnings:" in out and "2-3x slower" in out


def test_env_json_is_strict_and_complete(monkeypatch, capsys):
    _cpu_without_amx(monkeypatch)
    assert main(["env", "--json"]) == 0

    def reject(token):
        raise AssertionError(f"bare {token} in JSON")

    report = json.loads(capsys.readouterr().out, parse_constant=reject)
    assert set(PACKAGES) <= set(report["versions"])
    assert report["device"]["type"] == "cpu"
    assert report["device"]["dtypes"]["bf16"] == "emulated (slower than fp32)"
    plan = report["precision_plan"]
    assert plan["dtype"] == "fp32" and plan["reasons"] and plan["warnings"] == []


def test_env_unhonourable_request_prints_the_report_and_the_fix(monkeypatch, capsys):
    _cpu_without_amx(monkeypatch)
    assert main(["env", "--precision", "fp16"]) == 2
    out = capsys.readouterr().out
    assert "- torch: " in out  # the rest of the report is still there
    assert "precision plan (requested fp16): error" in out
    assert "fp16 needs a CUDA GPU; use bf16 or fp32 on CPU" in out
