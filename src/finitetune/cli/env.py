"""``finitetune env``: versions, device, dtype support and the precision plan, for a bug report.

Paste its output into an issue: most "my loss is NaN" reports can only be answered once the
versions, the device and the precision the run would use are known. Nothing is downloaded and
no model is loaded unless ``--model`` is given (then the plan also covers that model's family and
weights). Exit 0; 2 when an explicit ``--precision`` cannot be honoured here (the report is still
printed, with the error and its fix).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from importlib import metadata
from typing import Any

from finitetune.errors import ConfigError

PACKAGES = ("finitetune", "torch", "transformers", "peft", "accelerate", "datasets", "trl",
            "tokenizers", "safetensors")


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser("env", help=help_text, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16 or fp32 (default auto)")
    p.add_argument("--device", help="cuda, cuda:N, cpu or mps (default: what training would use)")
    p.add_argument("--model", help="also plan for this model: demo, tiny or a local directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow --model's own Python code (as train --trust-remote-code)")
    return p


def versions() -> dict[str, str | None]:
    """Installed versions of Python and the packages that decide numerics (None: not installed)."""
    out: dict[str, str | None] = {"python": f"{platform.python_version()} "
                                            f"({platform.python_implementation()})"}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect(precision: str = "auto", device: str | None = None, model: str | None = None,
            trust_remote_code: bool = False) -> dict[str, Any]:
    """Everything ``finitetune env`` prints, as a dict. Precision errors are kept, not raised."""
    import torch

    from finitetune.integrations.hf.seams import TESTED, capabilities
    from finitetune.precision.policy import FP16_MAX, choose_precision, describe_device
    from finitetune.precision.probe import call_or_default

    report: dict[str, Any] = {
        "versions": versions(),
        "tested": {name: f"{lo} to {hi}" for name, (lo, hi) in TESTED.items()},
        "capabilities": [{"capability": name, "available": ok, "how": how}
                         for name, ok, how in capabilities()],
        "platform": platform.platform(),
        "torch_build": {"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
                        "cudnn": call_or_default(torch.backends.cudnn.version),
                        "threads": torch.get_num_threads()},
    }
    try:
        info = describe_device(device)
    except ConfigError as exc:
        report["device"] = {"error": str(exc)}
        return report
    report["device"] = {
        "type": info.type, "name": info.name, "detail": info.detail,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": call_or_default(torch.cuda.device_count, default=0),
        "mps_available": bool(call_or_default(torch.backends.mps.is_available, default=False)),
        "dtypes": {
            "fp32": "yes",
            "bf16": ("native" if info.bf16_native else "emulated (slower than fp32)")
            if info.bf16 else "no",
            "fp16 training": "yes (autocast + GradScaler)" if info.fp16_training
            else "no (needs a CUDA GPU)",
            "fp16 max": FP16_MAX,
        },
    }
    loaded = None
    if model is not None:
        loaded = _load_model(model, trust_remote_code)
    try:
        plan = choose_precision(loaded, device=device or info.type, requested=precision)
        report["precision_plan"] = plan.to_dict()
    except ConfigError as exc:
        report["precision_plan"] = {"requested": precision, "error": str(exc)}
    if model is not None:
        report["precision_plan"]["model"] = model
    return report


def _load_model(name: str, trust_remote_code: bool = False) -> Any:
    from finitetune.cli.main import set_offline_if_local

    set_offline_if_local(name)
    from finitetune.models import load_model, resolve_model

    return load_model(resolve_model(name), trust_remote_code=trust_remote_code,
                      remote_code_flag="--trust-remote-code")


def render(report: dict[str, Any]) -> str:
    """The report as plain text (markdown-friendly) for pasting into an issue."""
    lines = ["finitetune env (paste this into your bug report)", "", "versions:"]
    for name, version in report["versions"].items():
        lines.append(f"- {name}: {version or 'not installed'}")
    lines += ["", "tested releases (the CI matrix):"]
    lines += [f"- {name}: {span}" for name, span in report["tested"].items()]
    lines += ["", "what the installed releases support:"]
    lines += [f"- {c['capability']}: {'yes' if c['available'] else 'NO'} ({c['how']})"
              for c in report["capabilities"]]
    lines.append("")
    build = report["torch_build"]
    lines += [f"- platform: {report['platform']}",
              f"- torch build: CUDA {build['cuda'] or 'none'}, ROCm {build['hip'] or 'none'}, "
              f"cuDNN {build['cudnn'] or 'none'}, {build['threads']} CPU threads", ""]
    dev = report["device"]
    if "error" in dev:
        lines.append(f"device: error: {dev['error']}")
        return "\n".join(lines) + "\n"
    lines += [f"device: {dev['type']}: {dev['name']} ({dev['detail']})",
              f"- CUDA available: {'yes' if dev['cuda_available'] else 'no'}"
              + (f" ({dev['cuda_devices']} devices)" if dev["cuda_available"] else ""),
              f"- MPS available: {'yes' if dev['mps_available'] else 'no'}"]
    for name, support in dev["dtypes"].items():
        lines.append(f"- {name}: {support}")
    plan = report["precision_plan"]
    target = f" for {plan['model']}" if plan.get("model") else ""
    lines.append("")
    if "error" in plan:
        lines += [f"precision plan{target} (requested {plan['requested']}): error",
                  f"- {plan['error']}"]
        return "\n".join(lines) + "\n"
    targs = ", ".join(f"{k}={v}" for k, v in plan["training_arguments"].items())
    lines += [f"precision plan{target} (requested {plan['requested']}): {plan['dtype']}",
              f"- autocast: {'yes' if plan['autocast'] else 'no'}; GradScaler: "
              f"{'yes' if plan['grad_scaler'] else 'no'}; kept in fp32: "
              f"{', '.join(plan['fp32_modules'])}",
              f"- TrainingArguments: {targs}"]
    if plan.get("model_type"):
        lines.append(f"- model_type: {plan['model_type']}; largest |weight|: "
                     f"{plan['max_abs_weight']:.4g}")
    lines.append("- reasons:")
    lines += [f"  - {r}" for r in plan["reasons"]]
    if plan["warnings"]:
        lines.append("- warnings:")
        lines += [f"  - {w}" for w in plan["warnings"]]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    # the plan's warnings are in the report already; do not print them twice on stderr
    logger = logging.getLogger("finitetune.precision.policy")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        report = collect(args.precision, args.device, args.model, args.trust_remote_code)
    finally:
        logger.setLevel(level)
    if args.json:
        from finitetune.rundir.jsonio import dumps_strict

        print(dumps_strict(report, indent=2))
    else:
        sys.stdout.write(render(report))
    failed = "error" in report["device"] or "error" in report.get("precision_plan", {})
    return 2 if failed else 0


if __name__ == "__main__":
    from finitetune.cli.main import main

    sys.exit(main(["env", *sys.argv[1:]]))
