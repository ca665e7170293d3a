"""Runs that diverge on purpose, and healthy runs the guard must leave alone.

    python -m bench.bench_stability                   # tiny grid (make bench)
    python -m bench.bench_stability --healthy         # healthy tiny runs (make bench)
    python -m bench.bench_stability --demo            # the demo cells (SmolLM2; hours on 2 cores)
    python -m bench.bench_stability --demo --healthy  # healthy demo runs with partial windows

**Grid** (``finitetune train --model tiny``, its preset: 60 steps, batch 16, warm-up 10 %, cosine,
``max_grad_norm`` 1.0): learning rate 1x, 2x, 4x, 8x, 16x, 32x the preset's 3e-3, seeds 0-2,
variants (a) a plain Trainer (its own clipping at 1.0, no guard), (b) the guard as it ships
(fixed clipping), (c) adaptive clipping (``clip="adaptive"``), (d1) adaptive + per-tensor
thresholds (``clip_per_tensor``), (d2) adaptive + moment reset (``reset_moments_on_spike``).
Per cell: exact match on the 200 held-out examples, whether the weights ended finite, steps not
applied, loss spikes (a logged training loss more than 6 robust standard deviations above the
previous 50, after 10; the same median/MAD z-score as the guard), steps the adaptive threshold
cut, training seconds. A run the guard halts, or whose weights end non-finite, is evaluated as
it stands (a NaN model scores 0).

**Cost** of adaptive clipping, from the grid's 1x cells: the guard's own work per step
(``Guard.work_seconds``, timed inside the step) with adaptive minus with fixed clipping, over the
median step (``on_step_begin`` -> ``on_step_end``); precise where whole steps drift ±10 %.

**Healthy runs**: the guard as it ships, and with adaptive clipping, on runs with nothing wrong:
the tiny preset; 37 rows at batch 4 x accumulation 3 (every epoch ends with a 1-row window);
121 rows at 4 x 2; 50 rows at 6 x 4; random-token text (the model cannot learn it: very steady
norms, with real norm spikes) with and without partial windows; 3 seeds each. Counted: steps not
applied (target 0) and warnings. ``--demo --healthy``: the demo at its preset and with 121 rows
at 4 x 2 (a 1-row last window every epoch), 3 seeds.

**Demo cells** (``--demo``): (b) and (c) at the demo's learning rate (1e-3) and at the lowest
multiple at which (a) or (b) ends below 50 % exact match or non-finite in 2 of 3 seeds, plus (a)
there, 3 seeds each. The multiple is probed with (b), seed 0, from 8x (halved while it fails,
doubled while it holds), or given with ``--demo-mult``: about 17 runs of ~4 min on 2 idle cores.
Each finished cell is saved to ``--cells`` (JSON), so a long run can be resumed, and summarised
part-way with ``--summarize`` (only measured cells are tabulated).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MULTS = (1, 2, 4, 8, 16, 32)
SEEDS = (0, 1, 2)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "a": ("no guard (plain Trainer, clip 1.0)", None),
    "b": ("guard, fixed clip 1.0", {}),
    "c": ("guard, adaptive clip", {"clip": "adaptive"}),
    "d1": ("adaptive + per-tensor (AdaGC)", {"clip": "adaptive", "clip_per_tensor": True}),
    "d2": ("adaptive + moment reset (SPAM)", {"clip": "adaptive",
                                              "reset_moments_on_spike": True}),
    "b0": ("guard, no clipping", {}),
    "c0": ("guard, adaptive clip, no cap", {"clip": "adaptive"}),
}
"""(a)-(d2): the grid. ``b0``/``c0`` (``--variants``): ``max_grad_norm=0``, so the adaptive
threshold is the only clip: what it does where a fixed cap does not already bind."""
UNCAPPED = ("b0", "c0")
SPIKE_Z, SPIKE_WINDOW, SPIKE_WARMUP = 6.0, 50, 10


class _Cell:
    """What the patched recipe saw of the run in progress."""

    unguarded = False
    trainer: Any = None
    timer: Any = None
    logs: ClassVar[list[dict[str, Any]]] = []
    em_on_failure: float | None = None


@contextlib.contextmanager
def patched_recipe():
    """Run ``finitetune train``'s recipe with a few seams for measuring: variant (a) gets the
    Trainer without the guard; every run gets a step timer and a log recorder; a run that fails
    (a guard halt, non-finite final weights) is still evaluated as it stands."""
    from transformers import TrainerCallback

    from bench.common import StepTimer
    from finitetune.integrations.hf import trainer as hf_trainer
    from finitetune.train import evaluation, recipe

    build, train_eval = hf_trainer.build_trainer, recipe._train_and_evaluate

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                _Cell.logs.append({"step": state.global_step, **logs})

    def build_trainer(*args: Any, **kwargs: Any) -> Any:
        if _Cell.unguarded:
            kwargs["guard"] = None
        trainer, loss = build(*args, **kwargs)
        _Cell.timer = StepTimer()
        trainer.add_callback(_Cell.timer.callback)
        trainer.add_callback(Recorder())
        _Cell.trainer = trainer
        return trainer, loss

    def train_and_evaluate(cfg, out, model, tokenizer, rows, eval_recs, eval_rows, eval_kwargs,
                           *rest: Any) -> Any:
        try:
            return train_eval(cfg, out, model, tokenizer, rows, eval_recs, eval_rows,
                              eval_kwargs, *rest)
        except Exception:
            _Cell.em_on_failure = evaluation.exact_match(
                model, tokenizer, eval_recs, **eval_kwargs)["exact_match"]
            raise

    hf_trainer.build_trainer, recipe._train_and_evaluate = build_trainer, train_and_evaluate
    try:
        yield
    finally:
        hf_trainer.build_trainer, recipe._train_and_evaluate = build, train_eval


def loss_spikes(losses: list[float]) -> int:
    """Logged losses more than ``SPIKE_Z`` robust SDs above the previous ``SPIKE_WINDOW``."""
    from finitetune.numerics.robust_stats import robust_z

    count, window = 0, []
    for v in losses:
        if not math.isfinite(v):
            continue
        if len(window) >= SPIKE_WARMUP and robust_z(window, v, 0.02) > SPIKE_Z:
            count += 1
        window = [*window, v][-SPIKE_WINDOW:]
    return count


def run_cell(variant: str, seed: int, settings: dict[str, Any], out: str) -> dict[str, Any]:
    """One training run through ``finitetune train``'s recipe; the measurements of one cell."""
    import torch

    from finitetune.integrations.hf.callback import guard_of
    from finitetune.train.api import train

    guard = VARIANTS[variant][1]
    _Cell.unguarded, _Cell.logs, _Cell.em_on_failure = guard is None, [], None
    kw = dict(settings, seed=seed, output_dir=out, overwrite=True, eval_before=False,
              logging_steps=1)
    if variant in UNCAPPED:
        kw["max_grad_norm"] = 0.0
    if guard is not None:
        kw["guard"] = {**kw.get("guard", {}), **guard}
    start, error = time.perf_counter(), None
    try:
        result = train(**kw)
        em, train_s = result.eval_after["exact_match"], result.train_seconds
    except Exception as exc:  # a halt, or non-finite weights at the end
        error, em, train_s = type(exc).__name__, _Cell.em_on_failure, time.perf_counter() - start
    trainer = _Cell.trainer
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    g = None if guard is None else guard_of(trainer)
    steps = max(1, trainer.state.global_step)
    times = sorted(_Cell.timer.times[1:]) or [float("nan")]
    counters = g.counters if g is not None else {}
    return {
        "variant": variant, "seed": seed, "em": em, "finite": finite, "error": error,
        "steps": trainer.state.global_step, "skipped": counters.get("skipped", 0),
        "warnings": counters.get("warnings", 0),
        "adaptive_clipped": counters.get("adaptive_clipped", 0),
        "clipped": counters.get("clipped", 0),
        "moment_resets": counters.get("moment_resets", 0),
        "loss_spikes": loss_spikes([float(x["loss"]) for x in _Cell.logs]),
        "train_s": round(train_s, 2), "step_s": statistics.median(times),
        "guard_s": (g.work_seconds / steps) if g is not None else None,
        "events": _events(out),
    }


def _events(out: str) -> dict[str, int]:
    path = Path(out) / "events.jsonl"
    found: dict[str, int] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            e = json.loads(line)
            if e.get("kind") == "guard":
                key = f"{e.get('reason')}:{'warn' if e.get('applied') else e.get('action')}"
                found[key] = found.get(key, 0) + 1
    return found


# --------------------------------------------------------------------------- data


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


FEW_WORDS = ("apple", "tiger", "red", "hammer", "pear", "otter", "blue", "saw", "plum", "zebra",
             "green", "drill", "Words", "Group", "fruit", "animal", "color", "tool")
"""18 words: random text over them is partly learnable (their frequencies), and its runs have
full-window grad-norm spikes while the loss stays flat."""


def _random_text(n: int, seed: int, words: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of random words (default: the whole tiny vocabulary): nothing to learn but word
    frequencies, steady norms."""
    from finitetune.builtin.tasks import TINY_GROUPS

    if words is None:
        words = tuple(sorted({w for ws in TINY_GROUPS.values() for w in ws} | set(TINY_GROUPS)))
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(words) for _ in range(6)),
             "response": " " + " ".join(rng.choice(words) for _ in range(4))} for _ in range(n)]


def _with_eval(train_rows: int) -> int:
    """Records to write so that the recipe's held-out split (a fifth) leaves ``train_rows``."""
    n = train_rows
    while n - n // 5 != train_rows:
        n += 1
    return n


def healthy_configs(data: Path, seed: int, demo: bool) -> dict[str, dict[str, Any]]:
    """The healthy runs' settings for one seed (their data written under ``data``)."""
    from finitetune.builtin.tasks import bbc_topics, tiny_task

    def partial(rows: list[dict], n: int, name: str, batch: int, ga: int, **kw: Any) -> dict:
        path = _write(data / f"{name}-{seed}.jsonl", rows[:_with_eval(n)])
        return {"data": {"path": path}, "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": ga, **kw}

    if demo:
        recs = random.Random(seed).sample(bbc_topics(), _with_eval(121))
        return {"demo preset (batch 8)": {},
                "demo, 121 rows, batch 4 x GA 2": partial(recs, 121, "demo121", 4, 2,
                                                          max_steps=80)}
    rows, text = tiny_task(1400, seed=100 + seed), _random_text(1400, seed)
    few = [_random_text(46, seed, FEW_WORDS), _random_text(151, seed, FEW_WORDS)]
    epochs = {"max_steps": -1}
    return {
        "tiny preset (batch 16)": {"model": "tiny"},
        "37 rows, batch 4 x GA 3, 30 epochs": partial(rows, 37, "t37", 4, 3, model="tiny",
                                                      num_train_epochs=30, **epochs),
        "121 rows, batch 4 x GA 2, 8 epochs": partial(rows, 121, "t121", 4, 2, model="tiny",
                                                      num_train_epochs=8, **epochs),
        "50 rows, batch 6 x GA 4, 40 epochs": partial(rows, 50, "t50", 6, 4, model="tiny",
                                                      num_train_epochs=40, **epochs),
        "random tokens, batch 16, 200 steps": {"model": "tiny", "max_steps": 200,
                                               "data": {"path": _write(
                                                   data / f"rand-{seed}.jsonl", text)}},
        "random tokens, 37 rows, batch 4 x GA 3": partial(text, 37, "r37", 4, 3, model="tiny",
                                                          num_train_epochs=30, **epochs),
        "18 random words, 37 rows, batch 4 x GA 3": partial(
            few[0], 37, "w37", 4, 3, model="tiny", num_train_epochs=30, **epochs),
        "18 random words, 121 rows, batch 4 x GA 2": partial(
            few[1], 121, "w121", 4, 2, model="tiny", num_train_epochs=8, **epochs),
    }


# --------------------------------------------------------------------------- running


class Cells:
    """Finished cells, saved after each one (``--cells``): a long run can be resumed and
    summarised part-way."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.done: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            self.done = json.loads(self.path.read_text(encoding="utf-8"))

    def run(self, key: str, variant: str, seed: int, settings: dict[str, Any], tmp: str
            ) -> dict[str, Any]:
        if key not in self.done:
            cell = run_cell(variant, seed, settings, os.path.join(tmp, "run"))
            cell["finished"] = time.strftime("%Y-%m-%d %H:%M %Z")
            self.done[key] = cell
            print(f"  {key}: em={_pct(cell['em'])} finite={cell['finite']} "
                  f"skipped={cell['skipped']} spikes={cell['loss_spikes']} "
                  f"clipped={cell['adaptive_clipped']} events={cell['events']} "
                  f"{cell['train_s']:.1f}s", flush=True)
            if self.path is not None:
                tmp_path = self.path.with_suffix(".tmp")
                tmp_path.write_text(json.dumps(self.done, indent=1), encoding="utf-8")
                os.replace(tmp_path, self.path)
        return self.done[key]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def grid(cells: Cells, base: dict[str, Any], lr: float, mults: tuple[int, ...],
         variants: list[str], tmp: str, label: str) -> dict[tuple[int, str], list[dict]]:
    out: dict[tuple[int, str], list[dict]] = {}
    for mult in mults:
        for v in variants:
            settings = dict(base, learning_rate=lr * mult)
            done = [cells.run(f"{label}|{mult}x|{v}|s{s}", v, s, settings, tmp) for s in SEEDS]
            if any(done):
                out[(mult, v)] = [c for c in done if c]
    return out


def grid_table(results: dict[tuple[int, str], list[dict]], lr: float) -> str:
    rows = ["| LR | variant | exact match % (seeds 0/1/2) | mean | finite | not applied "
            "| loss spikes | adaptive cuts | train s (mean) |", "|---|---|---|---|---|---|---|---|---|"]
    for (mult, v), cs in results.items():
        ems = [c["em"] for c in cs]
        mean = statistics.mean(e or 0.0 for e in ems)
        rows.append(
            f"| {mult}x ({lr * mult:.3g}) | ({v}) {VARIANTS[v][0]} | "
            f"{' / '.join(_pct(e) for e in ems)} | {100 * mean:.1f} | "
            f"{sum(c['finite'] for c in cs)}/{len(cs)} | "
            f"{' / '.join(str(c['skipped']) for c in cs)} | "
            f"{' / '.join(str(c['loss_spikes']) for c in cs)} | "
            f"{' / '.join(str(c['adaptive_clipped']) for c in cs)} | "
            f"{statistics.mean(c['train_s'] for c in cs):.1f} |")
    return "\n".join(rows)


def failing(cs: list[dict]) -> bool:
    """(a)/(b)'s failure rule: below 50 % exact match or non-finite, in at least 2 of 3 seeds
    (all 3 seeds measured, or 2 measured and both failing)."""
    return sum((c["em"] or 0.0) < 0.5 or not c["finite"] for c in cs) >= 2


def headline(results: dict[tuple[int, str], list[dict]], mults: tuple[int, ...]) -> str:
    """The lowest multiple where (a) or (b) fails, and what each variant reached there."""
    lowest = next((m for m in mults if any(
        (m, v) in results and failing(results[(m, v)]) for v in ("a", "b"))), None)
    if lowest is None:
        return "No multiple made (a) or (b) fail (below 50 % or non-finite in 2 of 3 seeds)."
    parts = []
    for v in VARIANTS:
        cs = results.get((lowest, v))
        if cs:
            n90 = sum((c["em"] or 0.0) >= 0.9 for c in cs)
            parts.append(f"({v}) mean {100 * statistics.mean(c['em'] or 0.0 for c in cs):.1f} %, "
                         f">= 90 % in {n90}/{len(cs)}")
    return (f"Lowest multiple where (a) or (b) fails: **{lowest}x**. There: "
            + "; ".join(parts) + ".")


def cost_table(results: dict[tuple[int, str], list[dict]]) -> str:
    """Adaptive clipping's cost at 1x: guard work per step, adaptive minus fixed, / step."""
    b, c = results.get((1, "b")), results.get((1, "c"))
    if not b or not c or len(b) < len(SEEDS) or len(c) < len(SEEDS):
        return ""
    work_b = statistics.median(x["guard_s"] for x in b)
    work_c = statistics.median(x["guard_s"] for x in c)
    step = statistics.median(x["step_s"] for x in b + c)
    acc_b = statistics.mean(x["em"] or 0.0 for x in b)
    acc_c = statistics.mean(x["em"] or 0.0 for x in c)
    arithmetic = _threshold_seconds()
    return ("| at the default LR (1x), 3 seeds | value |\n|---|---|\n"
            f"| exact match, adaptive - fixed (mean of 3 seeds) | {100 * (acc_c - acc_b):+.1f} "
            f"points |\n| guard's own work per step, fixed clip | {work_b * 1e3:.3f} ms |\n"
            f"| guard's own work per step, adaptive clip | {work_c * 1e3:.3f} ms |\n"
            f"| median step | {step * 1e3:.1f} ms |\n"
            f"| adaptive clipping's extra work / median step | "
            f"**{100 * (work_c - work_b) / step:.2f}%** |\n"
            f"| its threshold arithmetic alone (limit + update), timed over 100,000 steps | "
            f"{arithmetic * 1e6:.2f} us = {100 * arithmetic / step:.4f}% of the median step |")


def _threshold_seconds(n: int = 100_000) -> float:
    """Seconds per step of the adaptive threshold's host arithmetic (``limit`` + ``update``)."""
    from finitetune.guard.clipping import AdaptiveClip
    from finitetune.settings.config import GuardConfig

    clip = AdaptiveClip(GuardConfig(clip="adaptive", clip_warmup=2), 1.0)
    norms = [0.5 + 0.1 * math.sin(i) + (3.0 if i % 97 == 0 else 0.0) for i in range(n)]
    start = time.perf_counter()
    for norm in norms:
        clip.update(norm, clip.limit(norm)[1])
    return (time.perf_counter() - start) / n


def healthy(cells: Cells, tmp: str, demo: bool, variants: list[str]) -> str:
    """Healthy runs: steps not applied (target 0) and warnings, per config and variant."""
    data = Path(tmp) / "data"
    data.mkdir(exist_ok=True)
    per: dict[tuple[str, str], list[dict | None]] = {}
    for seed in SEEDS:
        for name, settings in healthy_configs(data, seed, demo).items():
            for v in variants:
                key = f"{'demo' if demo else 'tiny'}-healthy|{name}|{v}|s{seed}"
                if demo and not settings:  # the preset itself: the same run as a 1x demo cell
                    key = f"demo|1x|{v}|s{seed}"
                per.setdefault((name, v), []).append(cells.run(key, v, seed, settings, tmp))
    rows = ["| run | variant | steps (seeds 0/1/2) | not applied | warnings | what warned |",
            "|---|---|---|---|---|---|"]
    total_not_applied = 0
    def each(cs: list[dict | None], field: str) -> str:  # "-": a seed not measured (--summarize)
        return " / ".join("-" if c is None else str(c[field]) for c in cs)

    for (name, v), cs in per.items():
        measured = [c for c in cs if c is not None]
        if not measured:
            continue
        reasons: dict[str, int] = {}
        for c in measured:
            for k, n in c["events"].items():
                reasons[k] = reasons.get(k, 0) + n
        total_not_applied += sum(c["skipped"] for c in measured)
        rows.append(f"| {name} | ({v}) {VARIANTS[v][0]} | {each(cs, 'steps')} | "
                    f"{each(cs, 'skipped')} | {each(cs, 'warnings')} | "
                    f"{', '.join(f'{k} x{n}' for k, n in sorted(reasons.items())) or '-'} |")
    rows += ["", "| healthy runs, all of the above | value |", "|---|---|",
             f"| steps not applied, total | **{total_not_applied}** |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--healthy", action="store_true", help="the healthy runs instead of the grid")
    p.add_argument("--demo", action="store_true", help="the demo (SmolLM2) instead of tiny")
    p.add_argument("--demo-mult", type=int, default=None,
                   help="--demo: the LR multiple of the failing cells (default: probe for it)")
    p.add_argument("--mults", default=",".join(map(str, MULTS)), help="grid multiples")
    p.add_argument("--variants", help="variants to run (grid default: a,b,c,d1,d2; "
                                       "--healthy: b,c); b0,c0 on request")
    p.add_argument("--title", help="the history section's title (default: by mode)")
    p.add_argument("--note", help="a sentence for the history section (the conditions)")
    p.add_argument("--cells", help="JSON file the finished cells are kept in (resumable)")
    p.add_argument("--summarize", action="store_true", help="only tabulate --cells")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    cells = Cells(args.cells)
    mults = tuple(int(m) for m in args.mults.split(","))
    variants = args.variants.split(",") if args.variants else None
    with tempfile.TemporaryDirectory(prefix="bench_stability_") as tmp, patched_recipe():
        if args.summarize:
            cells.run = _only_done(cells)  # type: ignore[method-assign]
        if args.healthy:
            title = ("Healthy demo runs: steps not applied" if args.demo
                     else "Healthy runs: steps not applied")
            body = healthy(cells, tmp, args.demo, variants or ["b", "c"])
        elif args.demo:
            title, body = "Stability: demo cells", demo_cells(cells, tmp, args)
        else:
            lr = 3e-3
            chosen = variants or [v for v in VARIANTS if v not in UNCAPPED]
            results = grid(cells, {"model": "tiny"}, lr, mults, chosen, tmp, "tiny")
            title = "Stability: tiny model, learning rate x1 to x32"
            body = "\n\n".join(x for x in (headline(results, mults), grid_table(results, lr),
                                            cost_table(results)) if x)
    runs = {json.dumps(c, sort_keys=True): c for c in cells.done.values() if c}
    when = sorted(c["finished"] for c in runs.values() if c.get("finished"))
    if when:
        body += (f"\n\nThe `--cells` file holds {len(when)} `finitetune train` runs (all modes), "
                 f"measured {when[0]} to {when[-1]}, each in this process.")
    if args.note:
        body += f"\n\n{args.note}"
    print(body)
    if not args.no_append:
        from bench.common import append_result

        append_result(args.title or title, body + f"\n\nLoss spike: {SPIKE_Z:g} robust SDs above the "
                      f"previous {SPIKE_WINDOW} logged losses (after {SPIKE_WARMUP}).")
    return 0


def _only_done(cells: Cells) -> Any:
    """``--summarize``: the measured cells only (a missing one is left out of the tables)."""
    def run(key: str, *a: Any, **kw: Any) -> dict[str, Any] | None:
        return cells.done.get(key)
    return run


def demo_cells(cells: Cells, tmp: str, args: argparse.Namespace) -> str:
    """The demo's cells: find the failing multiple (or take ``--demo-mult``), then (b) and (c)
    at 1x and there, and (a) there, 3 seeds each. Only measured cells are tabulated."""
    lr = 1e-3

    def one(mult: int, v: str, seed: int) -> dict[str, Any] | None:
        return cells.run(f"demo|{mult}x|{v}|s{seed}", v, seed, {"learning_rate": lr * mult}, tmp)

    mult, probe = args.demo_mult, {}
    if mult is None:  # (b), seed 0: from 8x, halve while it fails, double while it holds
        m = 8
        while m in MULTS[1:] and m not in probe:
            cell = one(m, "b", 0)
            if cell is None:
                break
            probe[m] = (cell["em"] or 0.0) < 0.5 or not cell["finite"]
            m = m // 2 if probe[m] else m * 2
        mult = min((k for k, bad in probe.items() if bad), default=None)
    mults = (1,) + ((mult,) if mult else ())
    results = grid(cells, {}, lr, mults, ["b", "c"], tmp, "demo")
    if mult:
        results.update(grid(cells, {}, lr, (mult,), ["a"], tmp, "demo"))
    parts = []
    if probe:
        steps = ", ".join(f"{m}x {'fails' if bad else 'holds'}" for m, bad in probe.items())
        parts.append(f"Probe, (b) seed 0: {steps}; the cells below use {mult or '-'}x.")
    if mult:
        parts.append(headline(results, (mult,)))
    parts.append(grid_table(results, lr))
    cost = cost_table(results)
    if cost:
        parts.append(cost)
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
