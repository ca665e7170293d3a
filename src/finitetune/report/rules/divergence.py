"""Rules for values that leave the run's level: spikes of the loss and of the grad norm, and a
last loss far above where the run had been.

They measure the way the guard's spike detector does (:class:`finitetune.guard.policy.
SpikeDetector`): each entry against a rolling window of the entries before it (up to
:data:`WINDOW`, at least :data:`MIN_POINTS`), with the one robust z-score
(:func:`finitetune.numerics.robust_stats.robust_scale`: median and MAD), here on the
logarithm, since losses and norms move by factors. An entry is a spike when it is more than
:data:`SPIKE_Z` robust standard deviations *and* at least :data:`SPIKE_RATIO` times above the
median of its window. A window looks back, so a loss that falls fast at the start is never a
spike, and one outlier cannot move the median it is measured against: a single 1e30 among
losses of 2 is found. Losses that are negative (reward-style objectives) have no logarithm:
the loss rules then say nothing.
"""

from __future__ import annotations

import math
from typing import Any

from finitetune.numerics.robust_stats import robust_scale
from finitetune.report.rules.base import Context, finding, fmt

SPIKE_Z = 6.0
"""Robust z-score (MAD units, on the logarithm) of a spike."""
SPIKE_RATIO = 10.0
"""A spike is also at least this many times the median of its window."""
WINDOW = 50
"""Entries before an entry that make its window (the guard's ``spike_window`` default)."""
MIN_POINTS = 10
"""Entries a window needs before a spike can be judged against it."""
LAST_MIN_POINTS = 4
"""Entries the last-loss rule needs before the last one."""
LAST_WARN_RATIO = 4.0
"""A last loss this many times the median before it (and an outlier) is a warning..."""
LAST_CRITICAL_RATIO = 10.0
"""... and this many times, critical: the weights the run ends with are diverged."""


def _above(values: list[float | None], among: list[int], *, ratio: float,
           min_points: int = MIN_POINTS, only: int | None = None) -> list[tuple[int, float]]:
    """``(index, median of its window)`` of the entries of ``among`` (positive, finite) that
    lie above the window of entries before them; ``only``: judge that index alone."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    if len(among) <= min_points:
        return []
    logs = np.log(np.asarray([values[i] for i in among], dtype=np.float64))
    # candidates, vectorised: an entry `ratio` x above its window's median is at least that
    # far above the window's lowest value (the exact test below runs on these few only)
    padded = np.concatenate([np.full(WINDOW - 1, np.inf), logs])
    lows = sliding_window_view(padded, WINDOW).min(axis=1)  # lows[k]: min of logs[k-W+1..k]
    step = math.log(ratio)
    candidates = np.nonzero(logs[1:] - lows[:-1] >= step)[0] + 1
    out = []
    for k in candidates.tolist():
        if k < min_points or (only is not None and among[k] != only):
            continue
        scale = robust_scale(logs[max(0, k - WINDOW):k].tolist())
        if scale.z(float(logs[k])) > SPIKE_Z and logs[k] - scale.center >= step:
            out.append((among[k], math.exp(scale.center)))
    return out


def _positive(values: list[float | None]) -> list[int]:
    """Indices of the finite, non-zero entries; none when any finite entry is negative."""
    import numpy as np

    arr = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    keep = np.isfinite(arr) & (arr != 0.0)
    if bool((arr[keep] < 0).any()):
        return []
    return np.nonzero(keep)[0].tolist()


def grad_spikes(c: Context) -> list[dict[str, Any]]:
    """Grad-norm spikes (information: isolated ones are usually single bad batches)."""
    have = _positive(c.grad)
    found = _above(c.grad, have, ratio=SPIKE_RATIO) if have else []
    if not found:
        return []
    hits = [c.steps[i] for i, _ in found]
    return [finding(
        "grad_norm_spikes", "info",
        f"{len(hits)} grad-norm spike(s), first at step {fmt(hits[0])} "
        f"(>= 10x the median {found[0][1]:.4g} of the entries before it)",
        "A spike followed by a rising loss is the start of a divergence; isolated "
        "spikes are usually single bad batches.",
        "the batches of those steps; finitetune's spike detector can skip them.", hits)]


def loss_spikes(c: Context) -> list[dict[str, Any]]:
    """Loss spikes before the last entry (the last is :func:`last_loss`'s): a warning, since a
    step that spiked the loss was applied to the weights unless a guard skipped it."""
    have = _positive(c.loss)
    found = [(i, m) for i, m in _above(c.loss, have, ratio=SPIKE_RATIO) if i != have[-1]] \
        if have else []
    if not found:
        return []
    hits = [c.steps[i] for i, _ in found]
    worst, median = max(found, key=lambda f: c.loss[f[0]] or 0.0)
    return [finding(
        "loss_spikes", "warning",
        f"{len(hits)} loss spike(s), first at step {fmt(hits[0])}; the largest "
        f"{c.loss[worst]:.4g} at step {fmt(c.steps[worst])}, "
        f"{(c.loss[worst] or 0.0) / median:.3g}x the median {median:.4g} of the entries before it",
        "A loss many times its usual level is a bad batch (corrupt, mislabelled, far longer "
        "than the rest) or an update that threw the weights off; the step was applied unless "
        "a guard skipped it, and a divergence often starts this way.",
        "the batches of those steps, the learning rate there, grad-norm spikes before it; "
        "finitetune's guard skips such steps (spike_action).", hits)]


def last_loss(c: Context) -> list[dict[str, Any]]:
    """The last logged loss far above the entries before it: the run ends diverged."""
    have = _positive(c.loss)
    if not have or have[-1] != max(i for i, v in enumerate(c.loss) if v is not None):
        return []  # none, or the last entry's loss is 0.0 or not finite: other rules say so
    found = _above(c.loss, have, ratio=LAST_WARN_RATIO, min_points=LAST_MIN_POINTS,
                   only=have[-1])
    if not found:
        return []
    last, median = found[0]
    value = c.loss[last] or 0.0
    times = value / median
    return [finding(
        "last_loss_high", "critical" if times >= LAST_CRITICAL_RATIO else "warning",
        f"Last loss {value:.4g} (step {fmt(c.steps[last])}) is {times:.3g}x the median "
        f"{median:.4g} of the entries before it: the run ends far above where it had been",
        "The weights the run ends with give a loss far above the rest of the run: a "
        "divergence at the end (learning rate too high for this stage, a bad batch applied) "
        "that a falling trend over the earlier steps does not undo.",
        "the last steps' learning rate and grad norms; a checkpoint from before the jump.",
        [c.steps[last]])]
