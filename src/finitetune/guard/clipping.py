"""The clip threshold: fixed, or following the gradient norm's own recent history.

A fixed ``max_grad_norm`` is the wrong size most of the time: far above the norm on a calm run
(it never acts) and a hard cut that still lets an aggressive learning rate drift off. The
adaptive mode follows ZClip (Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM
Pre-Training", arXiv 2504.02507, and its reference implementation ``bluorion-com/ZClip``):

- an exponential moving average of the pre-clip norm and of its variance, ``alpha = 0.97``;
- warm-up: the first ``clip_warmup`` (25) applied steps only collect norms (the fixed clip acts);
  the EMA then starts from their mean and variance;
- a norm whose z-score ``(norm - mean) / std`` exceeds ``clip_z`` (2.5) is clipped to
  ``mean + clip_z**2 * std / z`` (ZClip's default "adaptive scaling": the larger the outlier,
  the closer to the mean it is cut; at ``z = clip_z`` this is ``mean + clip_z * std``);
- the EMA then takes the clipped value, so one spike does not raise the threshold for the next;
- never above ``max_grad_norm`` when one is set: the adaptive threshold only ever clips more.

Everything here runs on host floats after the guard's one sync: the norm is the guard's already
reduced one, so every rank computes the same threshold, and the history is plain numbers in the
guard's ``state_dict`` (a resume continues it bit-identically). Non-finite and skipped steps
never enter it.

Two optional parts, each a separate switch, measured in ``bench/bench_stability.py``:

- ``clip_per_tensor`` (AdaGC: Wang et al., "AdaGC: Improving Training Stability for Large
  Language Model Pretraining", arXiv 2502.11034): each parameter tensor has its own EMA of its
  norm (``beta = 0.98``) and is cut to ``1.05 x`` it; device-side, no sync; the global
  ``max_grad_norm`` still caps the total;
- ``reset_moments_on_spike`` (SPAM: Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset
  for Stable LLM Training", ICLR 2025): after a step the adaptive threshold cut, the
  optimizer's moments (``exp_avg``, ``exp_avg_sq``, momentum buffers) are zeroed and its step
  count restarted, so the spike does not live on in them for the next hundreds of steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from finitetune.guard.stats import GradStats
from finitetune.settings.config import ClipMode, GuardConfig

__all__ = ["ADAGC_BETA", "ADAGC_RELATIVE", "AdaptiveClip", "PerTensorClip", "clip_gradients",
           "cut_applied", "reset_moments"]

ZCLIP_EPS = 1e-6
"""Added to the standard deviation in the z-score (ZClip's ``eps``): a constant history
must not divide by zero."""
ADAGC_BETA = 0.98
"""AdaGC's EMA factor for the per-tensor norm."""
ADAGC_RELATIVE = 1.05
"""AdaGC's relative threshold: a tensor is cut to this multiple of its norm's EMA."""


class AdaptiveClip:
    """The guard's clip value for each step: ``max_grad_norm`` (``clip="fixed"``) or ZClip's.

    ``limit`` is asked once per step with the pre-clip norm (a finite host float), ``update``
    once per *applied* step; nothing else changes the history.
    """

    def __init__(self, config: GuardConfig, max_grad_norm: float) -> None:
        self.adaptive = config.clip == ClipMode.ADAPTIVE
        self.max_norm = float(max_grad_norm or 0.0)
        self.alpha = float(config.clip_alpha)
        self.z_max = float(config.clip_z)
        self.warmup = int(config.clip_warmup)
        self.mean: float | None = None
        self.var: float | None = None
        self.buffer: list[float] = []

    @property
    def ready(self) -> bool:
        """Whether the adaptive threshold acts (after the warm-up)."""
        return self.adaptive and self.mean is not None

    def threshold(self) -> float:
        """The norm above which this step is cut (``inf``: none): ``mean + z * std`` once
        warmed up, never above ``max_grad_norm``. What the logs and the plot show."""
        cap = self.max_norm if self.max_norm > 0 else math.inf
        if not self.ready:
            return cap
        assert self.mean is not None and self.var is not None
        return min(cap, self.mean + self.z_max * math.sqrt(self.var))

    def limit(self, norm: float) -> tuple[float, float | None]:
        """(the value to clip this step's norm to, ``inf`` for none; the adaptive value
        itself when the z-score crossed ``clip_z``, else None)."""
        cap = self.max_norm if self.max_norm > 0 else math.inf
        if not self.ready or not math.isfinite(norm):
            return cap, None
        assert self.mean is not None and self.var is not None
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + ZCLIP_EPS)
        if z <= self.z_max:
            return cap, None
        cut = self.mean + self.z_max * self.z_max * std / z  # ZClip's "adaptive scaling"
        return min(cap, cut), cut

    def update(self, norm: float, cut: float | None) -> None:
        """Fold an applied step's norm (or its adaptive cut, when there was one) into the EMA."""
        if not self.adaptive or not math.isfinite(norm):
            return
        if self.mean is None:
            self.buffer.append(float(norm))
            if len(self.buffer) >= self.warmup:
                n = len(self.buffer)
                self.mean = sum(self.buffer) / n
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / n
                self.buffer = []
            return
        assert self.var is not None
        value = norm if cut is None else cut
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = state.get("mean")
        self.var = state.get("var")
        self.buffer = [float(v) for v in state.get("buffer", [])]


class PerTensorClip:
    """AdaGC's per-tensor thresholds, on the device: no host sync, no Python loop per tensor.

    ``coefficients`` maps this step's per-tensor norms (the guard's fused pass already has
    them) to one scale factor per tensor; the guard folds the global cap in and multiplies each
    (device, dtype) group once. A step whose gradients do not line up with the tensors the
    history was built on (some ``.grad`` is None) is left to the global clip alone.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = int(warmup)
        self.ema: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.seen = 0

    def coefficients(self, norms: torch.Tensor) -> torch.Tensor | None:
        """Per-tensor factors in (0, 1] (None during warm-up or for a misaligned step)."""
        if self.ema is None or self.ema.shape != norms.shape:
            return None
        limit = ADAGC_RELATIVE * self.ema
        return torch.clamp(limit / (norms.float() + ZCLIP_EPS), max=1.0)

    def update(self, norms: torch.Tensor, coef: torch.Tensor | None) -> None:
        """An applied step: accumulate the warm-up mean, or fold the clipped norms in."""
        norms = norms.detach().float()
        if self.ema is None:
            if self.total is not None and self.total.shape != norms.shape:
                return
            self.total = norms.clone() if self.total is None else self.total + norms
            self.seen += 1
            if self.seen >= self.warmup:
                self.ema, self.total = self.total / self.seen, None
            return
        if coef is None:
            return
        self.ema.mul_(ADAGC_BETA).add_(norms * coef, alpha=1 - ADAGC_BETA)

    def state_dict(self) -> dict[str, Any]:
        """Host lists (a sync, at checkpoint time only)."""
        return {"ema": None if self.ema is None else self.ema.tolist(),
                "total": None if self.total is None else self.total.tolist(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        ema, total = state.get("ema"), state.get("total")
        self.ema = None if ema is None else torch.tensor(ema, dtype=torch.float32, device=device)
        self.total = None if total is None else torch.tensor(total, dtype=torch.float32,
                                                              device=device)
        self.seen = int(state.get("seen", 0))


def cut_applied(limit: tuple[float, float | None]) -> bool:
    """Whether the adaptive threshold, not ``max_grad_norm``, set this step's clip value
    (``limit``: what :meth:`AdaptiveClip.limit` returned). A cut above the cap changes nothing
    but the history, so it is not counted as one."""
    return limit[1] is not None and limit[1] <= limit[0]


def clip_gradients(grads: GradStats, per_tensor: PerTensorClip | None, clip_norm: torch.Tensor,
                   clip_value: float, limit: tuple[float, float | None]) -> None:
    """Scale an applied step's gradients to ``limit[0]`` (``inf``: leave them), per tensor
    first with ``clip_per_tensor``. ``clip_norm``: the step's total norm on the device;
    ``clip_value``: the same as a host float (it came with the guard's one sync)."""
    if per_tensor is not None:
        norms = grads.norms
        coef = per_tensor.coefficients(norms) if norms is not None else None
        if coef is not None:
            grads.scale_(coef, limit[0])
        if norms is not None:
            per_tensor.update(norms, coef)
        if coef is not None:
            return
    # Multiply only when the coefficient may be < 1 (x1.0 is exact, so skipping it changes
    # nothing but saves a pass over the gradients). With a fixed limit this is exactly
    # clip_grad_norm_: the same formula and kernels.
    if limit[0] < math.inf and clip_value + 1e-6 >= limit[0] * (1 - 1e-5):
        grads.clip_(limit[0], clip_norm)


_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def reset_moments(optimizer: Any) -> int:
    """Zero the optimizer's moment estimates and restart its step count (SPAM's reset).

    Only after a step the adaptive threshold cut (rare), so the loop over the state is off the
    hot path. Restarting ``step`` keeps Adam's bias correction exact: the next update is sized
    as Adam's first one, not ``(1 - beta1) / sqrt(1 - beta2)`` (3x) larger. Returns the number of
    parameters whose state was reset.
    """
    zeros: list[torch.Tensor] = []
    count = 0
    for state in optimizer.state.values():
        found = False
        for key in _MOMENTS:
            value = state.get(key)
            if isinstance(value, torch.Tensor):
                zeros.append(value)
                found = True
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            zeros.append(step)
        elif step is not None:
            state["step"] = 0
        count += int(found)
    if zeros:
        torch._foreach_zero_(zeros)
    return count
