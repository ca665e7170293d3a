"""Precision policy: the rules with simulated devices, the weight scan, and real bf16 CPU training."""

from __future__ import annotations

import json

import pytest
import torch

from finitetune import PrecisionPlan, choose_precision
from finitetune.errors import ConfigError
from finitetune.precision import policy as P
from finitetune.precision import probe as precision_probe

NO_AMX = {"amx_bf16": False, "avx512_bf16": True, "avx512_fp16": True}
AMX = {"amx_bf16": True, "avx512_bf16": True, "avx512_fp16": True}


# --------------------------------------------------------------------------- simulated devices


def _no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def sim_cpu(monkeypatch, features=NO_AMX):
    _no_accelerators(monkeypatch)
    monkeypatch.setattr(precision_probe, "cpu_features", lambda: dict(features))


def sim_cuda(monkeypatch, bf16: bool, name="Tesla T4", cap=(7, 5)):
    """A CUDA GPU. Records how is_bf16_supported was asked (emulation must not count)."""
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return bf16 or including_emulation  # what real torch answers on a T4: True if emulated

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    return asked


def sim_mps(monkeypatch, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(precision_probe, "_mps_bf16_works", lambda: bf16)


class _Cfg:
    def __init__(self, model_type, text_config=None):
        self.model_type = model_type
        self.text_config = text_config


def tiny_model(model_type="llama", text_config=None):
    """A few Linear layers dressed as a transformers model of the given family."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    m.config = _Cfg(model_type, text_config)
    return m


# --------------------------------------------------------------------------- CUDA


def test_cuda_with_native_bf16_picks_bf16_without_loss_scaling(monkeypatch):
    sim_cuda(monkeypatch, bf16=True, name="NVIDIA H200", cap=(9, 0))
    plan = choose_precision(tiny_model())
    assert (plan.dtype, plan.autocast, plan.grad_scaler, plan.device) == ("bf16", True, False,
                                                                         "cuda")
    assert plan.training_arguments() == {"bf16": True, "fp16": False}
    assert "NVIDIA H200" in plan.reasons[0] and "natively" in plan.reasons[0]
    assert plan.warnings == []
    assert {"master_weights", "norms", "logits/loss"} <= set(plan.fp32_modules)


def test_cuda_without_bf16_picks_fp16_with_grad_scaler(monkeypatch):
    asked = sim_cuda(monkeypatch, bf16=False)
    plan = choose_precision(tiny_model("llama"))
    assert (plan.dtype, plan.autocast, plan.grad_scaler) == ("fp16", True, True)
    assert plan.training_arguments() == {"bf16": False, "fp16": True}
    assert "Tesla T4" in plan.reasons[0] and "7.5" in plan.reasons[0]
    assert "GradScaler" in plan.reasons[0]
    assert plan.warnings == []  # llama is not a family known to overflow
    # torch's default answers True on a T4 (emulated bf16): the rule must ask for hardware
    assert asked["including_emulation"] is False


@pytest.mark.parametrize("model_type,text_type", [
    ("t5", None), ("mt5", None), ("gemma2", None), ("qwen2", None), ("qwen3_moe", None),
    ("gemma3", "gemma3_text"),  # multimodal wrapper: the family is in text_config
])
def test_fp16_only_gpu_warns_and_recommends_fp32_for_overflow_families(monkeypatch, model_type,
                                                                       text_type):
    sim_cuda(monkeypatch, bf16=False)
    model = tiny_model(model_type, _Cfg(text_type) if text_type else None)
    plan = choose_precision(model)
    assert plan.dtype == "fp16" and plan.grad_scaler
    assert plan.model_type == model_type
    assert len(plan.warnings) == 1
    assert f"{model_type!r} is known to overflow fp16" in plan.warnings[0]
    assert "--precision fp32" in plan.warnings[0]


def test_bf16_gpu_needs_no_family_warning(monkeypatch):
    sim_cuda(monkeypatch, bf16=True, cap=(8, 0))
    plan = choose_precision(tiny_model("t5"))
    assert plan.dtype == "bf16" and plan.warnings == []


def test_explicit_bf16_on_pre_ampere_gpu_is_a_named_error(monkeypatch):
    sim_cuda(monkeypatch, bf16=False, name="Tesla V100", cap=(7, 0))
    with pytest.raises(ConfigError, match="no bf16 hardware") as exc:
        choose_precision(requested="bf16")
    assert "Tesla V100" in str(exc.value)
    assert "--precision fp16" in str(exc.value) and "--precision fp32" in str(exc.value)


def test_explicit_fp16_on_bf16_gpu_is_honoured_with_advice(monkeypatch):
    sim_cuda(monkeypatch, bf16=True, cap=(8, 6))
    plan = choose_precision(tiny_model("gemma"), requested="float16")
    assert plan.requested == "fp16" and plan.dtype == "fp16" and plan.grad_scaler
    assert any("--precision bf16" in w and "safer" in w for w in plan.warnings)
    family = [w for w in plan.warnings if "'gemma' is known" in w]
    assert family and "use --precision bf16 (this GPU has it)" in family[0]


def test_explicit_fp32_is_always_honoured(monkeypatch):
    sim_cuda(monkeypatch, bf16=True)
    plan = choose_precision(requested="fp32")
    assert (plan.dtype, plan.autocast, plan.grad_scaler) == ("fp32", False, False)
    assert plan.fp32_modules == ["all"]
    assert plan.training_arguments() == {"bf16": False, "fp16": False}


def test_named_cuda_device_without_cuda_is_an_error(monkeypatch):
    sim_cpu(monkeypatch)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        choose_precision(device="cuda:0")


# --------------------------------------------------------------------------- CPU


def test_cpu_without_amx_auto_is_fp32_even_with_avx512_bf16(monkeypatch):
    sim_cpu(monkeypatch, NO_AMX)
    plan = choose_precision(tiny_model())
    assert (plan.dtype, plan.autocast, plan.device) == ("fp32", False, "cpu")
    assert plan.reasons[0].startswith("CPU without native bf16")
    assert "emulated and slower; fp32" in plan.reasons[0]
    assert plan.training_arguments() == {"bf16": False, "fp16": False}


def test_cpu_with_amx_auto_is_bf16(monkeypatch):
    sim_cpu(monkeypatch, AMX)
    plan = choose_precision()
    assert (plan.dtype, plan.autocast, plan.grad_scaler) == ("bf16", True, False)
    assert "AMX" in plan.reasons[0] and plan.warnings == []


def test_cpu_explicit_bf16_is_honoured_with_a_speed_warning(monkeypatch):
    sim_cpu(monkeypatch, NO_AMX)
    plan = choose_precision(requested="bf16")
    assert plan.dtype == "bf16" and plan.training_arguments() == {"bf16": True, "fp16": False}
    assert len(plan.warnings) == 1 and "2-3x slower" in plan.warnings[0]


def test_cpu_fp16_is_a_named_error_not_a_silent_fp32_run(monkeypatch):
    sim_cpu(monkeypatch)
    with pytest.raises(ConfigError, match=r"fp16 needs a CUDA GPU; use bf16 or fp32 on CPU"):
        choose_precision(tiny_model(), requested="fp16")


def test_real_cpu_probe_reports_known_keys():
    feats = P.cpu_features()
    assert set(feats) == {"amx_bf16", "avx512_bf16", "avx512_fp16"}
    assert all(isinstance(v, bool) for v in feats.values())


# --------------------------------------------------------------------------- MPS, other, input


def test_mps_auto_is_fp32_with_the_reason(monkeypatch):
    sim_mps(monkeypatch)
    plan = choose_precision()
    assert (plan.dtype, plan.device) == ("fp32", "mps")
    assert "MPS" in plan.reasons[0] and "NaN" in plan.reasons[0]


def test_mps_explicit_fp16_is_honoured_with_a_nan_warning(monkeypatch):
    sim_mps(monkeypatch)
    plan = choose_precision(requested="fp16")
    assert plan.dtype == "fp16" and plan.grad_scaler
    assert "--precision fp32" in plan.warnings[0]


def test_mps_bf16_without_support_is_a_named_error(monkeypatch):
    sim_mps(monkeypatch, bf16=False)
    with pytest.raises(ConfigError, match="macOS 14"):
        choose_precision(requested="bf16")


def test_unknown_request_names_the_choices(monkeypatch):
    sim_cpu(monkeypatch)
    with pytest.raises(ConfigError, match="choose auto, bf16, fp16 or fp32"):
        choose_precision(requested="fp8")


# --------------------------------------------------------------------------- weights


def _set(model, index, value):
    with torch.no_grad():
        model[index].weight.view(-1)[0] = value


def test_weights_beyond_fp16_max_make_auto_fp32_on_fp16_only_gpu(monkeypatch):
    sim_cuda(monkeypatch, bf16=False)
    model = tiny_model()
    _set(model, 2, 1e5)
    plan = choose_precision(model)
    assert plan.dtype == "fp32" and "65504" in plan.reasons[0]
    assert plan.max_abs_weight == pytest.approx(1e5)
    with pytest.raises(ConfigError, match=r"\b2\.weight\b.*--precision fp32"):
        choose_precision(model, requested="fp16")


def test_weights_near_fp16_max_are_reported(monkeypatch):
    sim_cuda(monkeypatch, bf16=False)
    model = tiny_model()
    _set(model, 0, -2e4)
    plan = choose_precision(model)
    assert plan.dtype == "fp16"
    assert any("within 10x of fp16's max" in w and "0.weight" in w for w in plan.warnings)
    sim_cpu(monkeypatch)
    plan = choose_precision(model)  # not fp16: reported as information, not as a warning
    assert any("would overflow in fp16" in r for r in plan.reasons) and plan.warnings == []


def test_nonfinite_weights_and_half_trainable_params_are_warned(monkeypatch):
    sim_cpu(monkeypatch)
    model = tiny_model()
    _set(model, 0, float("inf"))
    model[2].to(torch.bfloat16)
    plan = choose_precision(model)
    assert any("already hold NaN/inf" in w and "0.weight" in w for w in plan.warnings)
    assert any("2 trainable parameters are stored in bfloat16" in w for w in plan.warnings)
    assert plan.max_abs_weight is not None and plan.max_abs_weight < 10


def test_weight_scan_costs_one_sync_per_dtype_group_not_per_parameter():
    from finitetune.testing import count_host_syncs

    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(30)])  # 60 params
    model[0].to(torch.bfloat16)
    with torch.no_grad():
        model[7].bias[1] = 7e4
    with count_host_syncs() as syncs:
        scan = P.scan_weights(model)
    assert syncs.count <= 2  # two (device, dtype) groups
    assert scan.over_fp16 == ["7.bias"] and scan.max_abs == pytest.approx(7e4)


def test_lora_adapters_listed_as_fp32_only_when_present(monkeypatch, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from finitetune.models import load_model

    sim_cuda(monkeypatch, bf16=True)
    base = load_model(tiny_model_dir)
    assert "lora_adapters" not in choose_precision(base).fp32_modules
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    plan = choose_precision(lora)
    assert plan.model_type == "llama" and "lora_adapters" in plan.fp32_modules


def test_plan_serialises_to_strict_json(monkeypatch):
    sim_cuda(monkeypatch, bf16=False)
    plan = choose_precision(tiny_model("t5"))
    d = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert d["training_arguments"] == {"bf16": False, "fp16": True}
    assert PrecisionPlan(**{k: v for k, v in d.items() if k != "training_arguments"}) == plan
    assert str(plan).startswith("fp16 (") and plan.torch_dtype is torch.float16


# --------------------------------------------------------------------------- the main job


class _AutocastSpy:
    """Records the output dtype of every Linear forward in training mode (global hook)."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()

    def __call__(self, module, args, out):
        if isinstance(module, torch.nn.Linear) and module.training and torch.is_grad_enabled():
            self.dtypes.add(out.dtype)


@pytest.mark.parametrize("requested,expected", [("bf16", torch.bfloat16),
                                                ("auto", torch.float32)])
def test_main_job_trains_with_the_plan(tmp_path, tiny_model_dir, monkeypatch, requested,
                                       expected):
    from torch.nn.modules.module import register_module_forward_hook

    from finitetune.cli.main import main

    sim_cpu(monkeypatch, NO_AMX)  # a CPU without AMX on any machine: auto = fp32
    spy = _AutocastSpy()
    handle = register_module_forward_hook(spy)
    out = tmp_path / "run"
    try:
        code = main(["train", "--model", "tiny", "--precision", requested, "--max-steps", "5",
                     "--logging-steps", "1", "--eval-size", "16", "--no-eval-before",
                     "--output-dir", str(out)])
    finally:
        handle.remove()
    assert code == 0
    plan = json.loads((out / "precision.json").read_text())
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[expected]
    assert plan["dtype"] == name and plan["device"] == "cpu" and plan["requested"] == requested
    assert plan["training_arguments"] == {"bf16": name == "bf16", "fp16": False}
    assert spy.dtypes == {expected}  # every training matmul ran in the planned dtype
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert all(isinstance(m["loss"], float) and m["loss"] > 0 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["after"]["total"] > 0 and ev["global_step"] == 5


def test_main_job_fp16_on_cpu_stops_with_the_named_error(tmp_path, tiny_model_dir, capsys,
                                                         monkeypatch):
    from finitetune.cli.main import main

    sim_cpu(monkeypatch)

    out = tmp_path / "run"
    code = main(["train", "--model", "tiny", "--precision", "fp16", "--max-steps", "2",
                 "--eval-size", "16", "--no-eval-before", "--output-dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "fp16 needs a CUDA GPU; use bf16 or fp32 on CPU" in err
    assert "Traceback" not in err
    assert not out.exists()  # stopped before anything was written
