"""The Trainer path of the hidden-state loss: the model's head runs only where a label is.

``Trainer(compute_loss_func=loss)`` hands the loss the model's *outputs*; by then the head has
run on every position and the logits exist. To apply the head only at supervised positions
(:func:`~finitetune.loss.hidden.causal_lm_loss_from_hidden`), the forward must stop before the
head and the loss must get the hidden states. The seam chosen, and why:

- **Chosen: two hooks on the unwrapped ``*ForCausalLM``, plus transformers' public
  ``logits_to_keep`` argument.** A forward pre-hook passes ``logits_to_keep=<empty index
  tensor>`` on training forwards, so the model applies its head (and soft-cap) to zero
  positions; a forward hook on its base model (``core.model``) keeps ``last_hidden_state``;
  :class:`HiddenStateLoss`, used as ``compute_loss_func``, takes them and applies the head
  itself. The Trainer still calls the *outermost* model, so everything wrapped around the
  forward keeps working: DDP's forward (which prepares the gradient all-reduce), accelerate's
  autocast wrapper, PEFT's forward, the guard's wrapped ``training_step``. The empty logits feed
  no loss, so backward never visits the model's own head. Nothing to change in the user's model,
  collator or Trainer class.
- Not chosen: ``logits_to_keep`` as a boolean mask of the supervised positions (transformers
  5.24 accepts one). The model would still compute the (supervised, vocab) logits in one piece,
  and their gradient, instead of chunk by chunk; and the Trainer pops ``labels`` before the
  forward, so the mask would have to come from the collator.
- Not chosen: a ``Trainer`` subclass whose ``compute_loss`` calls ``model.model`` directly. It
  bypasses the DDP / autocast / PEFT wrappers of the top-level forward, and every user (and TRL's
  trainers) would have to adopt the subclass.

A "training forward" is one in train mode with autograd on, without ``labels`` (a caller that
passes labels wants the model's own loss: the guard's replay does) and without an explicit
``logits_to_keep``. Generation and evaluation (``no_grad``) are untouched.

Fails loudly: :class:`HiddenStateLoss` raises :class:`~finitetune.integrations.hf.lm_head.
UnsupportedModel` (a ``ConfigError``) at construction for a model whose head it cannot reproduce
(see :mod:`finitetune.integrations.hf.lm_head`, which also probes the real model), and a
``ConfigError`` at the first step if the hooks did not do their job (logits not cut, or cut
logits without hidden states). :func:`choose_loss` (what ``finitetune train`` uses) instead
falls back to the regular :class:`~finitetune.loss.causal.SafeCausalLMLoss` and says why in one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch

from finitetune.errors import ConfigError
from finitetune.integrations.hf.lm_head import UnsupportedModel, head_spec, probe, understand
from finitetune.loss.causal import SafeCausalLMLoss
from finitetune.loss.hidden import LMHead, causal_lm_loss_from_hidden_parts, default_chunk_rows
from finitetune.numerics.constants import IGNORE_INDEX

__all__ = ["HiddenStateLoss", "autocast_head", "choose_loss"]

_ATTACHED = "_finitetune_hidden_loss"


def _logits(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        value = outputs.get("logits")
    else:
        value = getattr(outputs, "logits", None)
    return value if isinstance(value, torch.Tensor) else None


class HiddenStateLoss(SafeCausalLMLoss):
    """``SafeCausalLMLoss`` whose training forwards skip the head; the loss applies it itself.

    ``loss = HiddenStateLoss(model)``, then ``Trainer(model, ..., compute_loss_func=loss)``. It
    records the window's loss sum, token count and empty micro-batches exactly like its parent
    (``window()``, ``read_and_reset()``), so ``MetricsCallback`` and the guard see the same
    numbers. Calls whose outputs carry full logits (evaluation) use the parent's loss.

    Args:
        model: the model the Trainer gets (plain, PEFT-wrapped; DDP-wrapped works too).
        ignore_index, z_loss: as for ``SafeCausalLMLoss``.
        chunk_size: supervised rows per chunk of logits; None: 64 MiB of fp32 logits per chunk.
        verify: run :func:`~finitetune.integrations.hf.lm_head.probe` (three 4-token forwards).

    Raises:
        UnsupportedModel: a model whose head / forward it cannot reproduce (names why).
    """

    def __init__(self, model: Any, *, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None,
                 z_loss: float = 0.0, verify: bool = True) -> None:
        super().__init__(ignore_index=ignore_index, chunk_size=chunk_size, z_loss=z_loss)
        self.plan = understand(model)
        if verify:
            probe(self.plan)
        self._hidden: torch.Tensor | None = None
        self._cutting = False
        self._autocast: torch.dtype | None = None
        core = self.plan.core
        previous = getattr(core, _ATTACHED, None)
        if previous is not None:  # one loss per model: the newest wins, the old one is unhooked
            previous.detach()
        setattr(core, _ATTACHED, self)
        self._handles = [
            core.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.plan.base.register_forward_hook(self._keep_hidden),
            core.register_forward_hook(self._after_forward, always_call=True),
        ]

    @property
    def description(self) -> str:
        vocab = head_spec(self.plan.head).weight.shape[0]
        rows = self.chunk_size or default_chunk_rows(vocab)
        return (f"LM head only at supervised positions ({self.plan.family}, chunks of {rows} "
                "rows, fp32 log-softmax)")

    def detach(self) -> None:
        """Remove the hooks: every forward is the model's own again."""
        for handle in self._handles:
            handle.remove()
        if getattr(self.plan.core, _ATTACHED, None) is self:
            delattr(self.plan.core, _ATTACHED)
        self._handles, self._hidden, self._cutting = [], None, False

    # ---- hooks ------------------------------------------------------------------------------
    def _before_forward(self, module: Any, args: tuple, kwargs: dict) -> Any:
        self._hidden = None  # a capture is only ever used by the loss right after its forward
        self._cutting = (module.training and torch.is_grad_enabled()
                         and kwargs.get("labels") is None and "logits_to_keep" not in kwargs)
        if not self._cutting:
            return None
        device = head_spec(self.plan.head).weight.device
        # the head then runs where autocast would have run it (bf16/fp16 matmul, fp32 softmax)
        kind = device.type
        self._autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return args, {**kwargs, "logits_to_keep": torch.empty(0, dtype=torch.long, device=device)}

    def _keep_hidden(self, module: Any, args: tuple, output: Any) -> None:
        if self._cutting:
            hidden = getattr(output, "last_hidden_state", None)
            self._hidden = output[0] if hidden is None else hidden

    def _after_forward(self, module: Any, args: tuple, output: Any) -> None:
        self._cutting = False

    # ---- the loss ---------------------------------------------------------------------------
    def __call__(
        self, outputs: Any, labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | float | None = None, *,
        shift_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        logits = _logits(outputs)
        cut = logits is not None and logits.dim() >= 2 and logits.shape[-2] == 0
        if hidden is None:
            if cut:
                raise ConfigError("the model returned empty logits but its hidden states were "
                                  "not captured: the loss hooks did not run as tested "
                                  "(train with `--loss full` and report this)")
            return super().__call__(outputs, labels, num_items_in_batch,
                                    shift_labels=shift_labels)
        if not cut:
            raise ConfigError(f"{self.plan.family} returned logits of shape "
                              f"{None if logits is None else tuple(logits.shape)} although the "
                              "loss asked for none (logits_to_keep ignored); train with "
                              "`--loss full`")
        if labels is not None:
            labels = labels.to(hidden.device)
        if shift_labels is not None:
            shift_labels = shift_labels.to(hidden.device)
        scale, softcap = self.plan.post()
        parts = causal_lm_loss_from_hidden_parts(
            hidden, autocast_head(head_spec(self.plan.head), self._autocast), labels,
            num_items_in_batch,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size, z_loss=self.z_loss,
            logit_softcap=softcap, logit_scale=scale, shift_labels=shift_labels,
        )
        if torch.is_grad_enabled():
            self._record(parts, num_items_in_batch)
        return parts.loss


def autocast_head(spec: LMHead, dtype: torch.dtype | None) -> LMHead:
    """The head's weights in ``dtype`` if the forward ran under autocast to that (narrower)
    dtype, as autocast would cast them for ``F.linear``; gradients flow back through the cast."""
    if dtype is None or spec.weight.dtype.itemsize <= dtype.itemsize:
        return spec
    low = tuple(lr._replace(a_weight=lr.a_weight.to(dtype), b_weight=lr.b_weight.to(dtype))
                for lr in spec.low_rank)
    return LMHead(spec.weight.to(dtype), None if spec.bias is None else spec.bias.to(dtype), low)


def _sharded_training(args: Any) -> str | None:
    """Why the head's weight will be sharded at training time (FSDP / DeepSpeed), or None."""
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        if os.environ.get(var, "false").lower() == "true":
            return f"{var}=true (sharded parameters)"
    if args is not None and (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)):
        return "FSDP / DeepSpeed in the training arguments (sharded parameters)"
    return None


def choose_loss(model: Any, setting: str | Enum = "auto", *, args: Any = None,
                z_loss: float = 0.0) -> tuple[SafeCausalLMLoss, str]:
    """The loss object for ``Trainer(compute_loss_func=...)`` and one line saying which and why.

    ``setting``: ``auto`` (the hidden-state loss where the model is understood, else the full
    safe loss, the line says why), ``supervised`` (the hidden-state loss or
    :class:`UnsupportedModel`), ``full`` (the full safe loss: the head at every position).
    ``args``: the ``TrainingArguments``, if built (FSDP / DeepSpeed mean: full loss).
    """
    value = str(setting.value if isinstance(setting, Enum) else setting)
    if value == "full":
        return SafeCausalLMLoss(z_loss=z_loss), "full (LM head at every position; --loss full)"
    if value not in ("auto", "supervised"):
        raise ConfigError(f"unknown loss {value!r}; choose auto, supervised or full")
    try:
        why = _sharded_training(args)
        if why is not None:
            raise UnsupportedModel(why)
        loss = HiddenStateLoss(model, z_loss=z_loss)
    except UnsupportedModel as exc:
        if value == "supervised":
            raise
        return SafeCausalLMLoss(z_loss=z_loss), (
            f"full (LM head at every position): the supervised-positions loss does not "
            f"apply: {exc}")
    return loss, loss.description
