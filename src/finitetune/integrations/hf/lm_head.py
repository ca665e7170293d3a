"""What a causal-LM's head computes, read off a transformers / PEFT model, and checked.

:mod:`finitetune.integrations.hf.hidden_loss` runs the model without its head and applies the head
itself, only at supervised positions. That is only correct if it knows *exactly* what the model
would have done after its base model: which module is the head, whether it carries a bias or
LoRA adapters, and what the family does to the logits afterwards (Gemma 2/3 soft-cap them,
Cohere multiplies them, Granite divides them). That knowledge lives here, in one table
(``FAMILIES``) of the classes whose forward was read for transformers 5.24:

    hidden = self.model(...).last_hidden_state
    logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
    logits = <family's post-processing>        # the table's entry

Anything not in the table, or a head that is not a plain ``nn.Linear`` (optionally under a PEFT
LoRA layer or ``modules_to_save`` wrapper), raises :class:`UnsupportedModel` (a ``ConfigError``)
naming what was found. Then :func:`probe` checks the reading on the real model: it runs a
4-token input through the model (eval mode, no grad) and compares the model's own logits with
the head applied here to its base model's hidden states, and checks that an empty
``logits_to_keep`` really leaves the logits empty. A transformers upgrade that changes a forward
fails there, at start-up, not silently in training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from finitetune.errors import ConfigError
from finitetune.loss.hidden import LMHead, LowRank

__all__ = ["FAMILIES", "HeadPlan", "UnsupportedModel", "head_spec", "probe", "understand"]


class UnsupportedModel(ConfigError):
    """The model's head or forward is not one the hidden-state loss knows how to reproduce."""


def _none(core: Any) -> tuple[float | None, float | None]:
    return None, None


def _softcap(core: Any) -> tuple[float | None, float | None]:
    cap = getattr(core.config, "final_logit_softcapping", None)
    return None, None if cap is None else float(cap)


def _cohere(core: Any) -> tuple[float | None, float | None]:
    return float(core.logit_scale), None


def _granite(core: Any) -> tuple[float | None, float | None]:
    return 1.0 / float(core.config.logits_scaling), None


FAMILIES: dict[str, Callable[[Any], tuple[float | None, float | None]]] = {
    # class name -> (logit_scale, logit_softcap) after the head, read from the model
    "LlamaForCausalLM": _none,
    "MistralForCausalLM": _none,
    "Qwen2ForCausalLM": _none,
    "Qwen3ForCausalLM": _none,
    "GemmaForCausalLM": _none,
    "Gemma2ForCausalLM": _softcap,
    "Gemma3ForCausalLM": _softcap,
    "Phi3ForCausalLM": _none,
    "Olmo2ForCausalLM": _none,
    "SmolLM3ForCausalLM": _none,
    "GraniteForCausalLM": _granite,
    "CohereForCausalLM": _cohere,
}
"""Causal-LM classes (transformers 5.24) whose forward is ``self.model`` -> ``lm_head`` ->
the listed post-processing, and which honour a tensor ``logits_to_keep``."""


@dataclass
class HeadPlan:
    """Where the hidden-state loss hooks in, and what it must compute."""

    core: Any
    """The ``*ForCausalLM`` module (under any PEFT / DDP wrapper)."""
    base: Any
    """``core.model``: its output's ``last_hidden_state`` is what the head would see."""
    head: Any
    """``core.lm_head`` as the model holds it (maybe a PEFT wrapper)."""
    family: str

    def post(self) -> tuple[float | None, float | None]:
        """``(logit_scale, logit_softcap)``, read now (a config change is seen)."""
        return FAMILIES[self.family](self.core)


def unwrap(model: Any) -> Any:
    """The ``*ForCausalLM`` under DDP / PEFT wrappers; prompt-learning PEFT is refused."""
    m = model
    for _ in range(8):
        if type(m).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(m, "module"):
            m = m.module
        elif type(m).__module__.startswith("peft.") and hasattr(m, "get_base_model"):
            config = getattr(m, "active_peft_config", None)
            if getattr(config, "is_prompt_learning", False):
                raise UnsupportedModel("PEFT prompt learning adds virtual tokens in front of the "
                                       "labels; the hidden-state loss does not support it")
            m = m.get_base_model()
        else:
            return m
    return m


def understand(model: Any) -> HeadPlan:
    """The :class:`HeadPlan` for ``model``, or :class:`UnsupportedModel` saying why not."""
    core = unwrap(model)
    name = type(core).__name__
    if name not in FAMILIES:
        raise UnsupportedModel(f"{name} is not among the model classes whose forward the "
                               f"hidden-state loss reproduces ({', '.join(sorted(FAMILIES))})")
    base, head = getattr(core, "model", None), getattr(core, "lm_head", None)
    if not isinstance(base, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        raise UnsupportedModel(f"{name} has no `model` / `lm_head` submodule")
    plan = HeadPlan(core=core, base=base, head=head, family=name)
    spec = head_spec(head)  # raises for a head it cannot reproduce
    w = spec.weight
    if w.numel() == 0 or type(w).__name__ == "DTensor" or hasattr(w, "ds_id"):
        raise UnsupportedModel("the LM head's weight is sharded (FSDP / DeepSpeed ZeRO-3)")
    return plan


def _is_peft(module: Any, cls: str) -> bool:
    return type(module).__name__ == cls and type(module).__module__.startswith("peft.")


def head_spec(module: Any) -> LMHead:
    """The head as an :class:`~finitetune.loss.hidden.LMHead`, following PEFT's own forward.

    ``nn.Linear``; PEFT ``modules_to_save`` (the active copy, or the original when adapters
    are disabled); PEFT LoRA ``Linear`` over an ``nn.Linear`` (vanilla LoRA: no DoRA or other
    variant, no ``lora_bias``; merged or disabled adapters are just the base layer).
    """
    if type(module) is torch.nn.Linear or (
            isinstance(module, torch.nn.Linear)
            and type(module).forward is torch.nn.Linear.forward):
        return LMHead(module.weight, module.bias)
    if _is_peft(module, "ModulesToSaveWrapper"):
        active = list(module.active_adapters)
        if module.disable_adapters or not active or any(a not in module.modules_to_save
                                                        for a in active):
            return head_spec(module.original_module)
        return head_spec(module.modules_to_save[active[0]])
    if _is_peft(module, "Linear") and hasattr(module, "lora_A"):
        return _lora_spec(module)
    raise UnsupportedModel(f"the LM head is a {type(module).__module__}.{type(module).__name__}, "
                           "not an nn.Linear (or PEFT LoRA over one)")


def _lora_spec(module: Any) -> LMHead:
    base = head_spec(module.base_layer)
    if module.disable_adapters:
        if module.merged:  # PEFT unmerges inside its forward: a weight change we do not mimic
            raise UnsupportedModel("the LM head's LoRA adapters are merged and disabled")
        return base
    if module.merged:
        return base
    if getattr(module, "fan_in_fan_out", False):
        raise UnsupportedModel("the LM head's LoRA layer uses fan_in_fan_out")
    terms: list[LowRank] = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}):
            raise UnsupportedModel(f"the LM head's adapter {name!r} is a LoRA variant "
                                   "(DoRA, ...), not plain LoRA")
        a, b = module.lora_A[name], module.lora_B[name]
        if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or b.bias is not None:
            raise UnsupportedModel(f"the LM head's adapter {name!r} is not a bias-free "
                                   "Linear pair")
        terms.append(LowRank(a.weight, b.weight, float(module.scaling[name]),
                             module.lora_dropout[name]))
    return LMHead(base.weight, base.bias, tuple(terms))


def apply_head(hidden: torch.Tensor, spec: LMHead, scale: float | None,
               softcap: float | None) -> torch.Tensor:
    """The head and post-processing on every position, the plain way (for :func:`probe`)."""
    logits = F.linear(hidden.to(spec.weight.dtype), spec.weight, spec.bias)
    for lr in spec.low_rank:
        low = F.linear(F.linear(hidden.to(lr.a_weight.dtype), lr.a_weight), lr.b_weight)
        logits = logits + (low * lr.scaling).to(logits.dtype)
    logits = logits.float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def probe(plan: HeadPlan) -> None:
    """Check the plan on the real model; :class:`UnsupportedModel` if the model disagrees.

    Three 4-token forwards in eval mode under ``no_grad`` (each module's train/eval mode is
    restored afterwards; no random numbers are drawn).
    """
    core = plan.core
    modes = {m: m.training for m in core.modules()}
    weight = head_spec(plan.head).weight
    embed = core.get_input_embeddings() if hasattr(core, "get_input_embeddings") else None
    device = embed.weight.device if isinstance(embed, torch.nn.Embedding) else weight.device
    ids = (torch.arange(4, device=device) % weight.shape[0])[None]
    try:
        core.eval()
        with torch.no_grad():
            full = core(input_ids=ids, use_cache=False).logits.float()
            cut = core(input_ids=ids, use_cache=False,
                       logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device)).logits
            hidden = _last_hidden(plan.base(input_ids=ids, use_cache=False))
            ours = apply_head(hidden, head_spec(plan.head), *plan.post())
    except Exception as exc:  # any failure means: not the forward we know
        raise UnsupportedModel(f"{plan.family} failed the start-up probe ({exc})") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    if cut.shape[-2] != 0:
        raise UnsupportedModel(f"{plan.family} ignores logits_to_keep (logits of shape "
                               f"{tuple(cut.shape)} for an empty selection)")
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    err = ((ours - full).abs().max() / full.abs().max().clamp(min=1.0)).item()
    if tuple(ours.shape) != tuple(full.shape) or not err <= tol:
        raise UnsupportedModel(f"{plan.family}'s logits differ from its head applied to its "
                               f"hidden states (relative error {err:.2g} > {tol:g}): this "
                               "transformers version changed the forward finitetune reproduces")


def _last_hidden(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    if not isinstance(hidden, torch.Tensor):
        raise UnsupportedModel(f"the base model returned {type(output).__name__} without "
                               "last_hidden_state")
    return hidden
