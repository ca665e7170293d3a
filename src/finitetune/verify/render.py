"""Text output of ``finitetune verify``: the seed-style report and one before/after table per
scenario, as Markdown tables (readable in a terminal, pasteable into an issue)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finitetune.report.render import num, value_range
from finitetune.report.stats import trend_word
from finitetune.verify.harness import ArmResult
from finitetune.verify.scenarios import ScenarioResult


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def seed_report(arm: ArmResult, steps: int) -> str:
    """Entries, valid, NaN, zero, range, mean and trend: the report the seed wrote by hand."""
    r = arm.report
    rows = []
    for name in ("loss", "grad_norm"):
        st = r.metrics.get(name)
        if st is None:
            continue
        mean = num(st.mean) if st.mean is not None else "n/a"
        rows.append([name, str(st.total), str(st.valid), str(st.nan), str(st.inf),
                     str(st.zero), value_range(st), mean])
    t = r.trend
    trend = (f"{trend_word(t)} ({num(t.first)} -> {num(t.last)}, Theil–Sen over {t.n} points"
             + (f", {t.evidence} evidence)" if t.evidence != "none" else ")")
             if t.n >= 2 else "too few points")
    return "\n".join([
        f"## Minimal guarded run: {steps} steps",
        "",
        _table(["metric", "entries", "valid", "NaN", "inf", "zero", "range", "mean"], rows),
        "",
        f"loss trend: {trend}",
        f"verdict: {r.verdict}. {r.conclusion}",
    ])


def _counts(arm: ArmResult, metric: str) -> str:
    st = arm.stat(metric)
    if st is None:
        return "-"
    bad = f"{st.nan}" + (f" (+{st.inf} inf)" if st.inf else "")
    return f"{st.total} / {st.valid} / {bad} / {st.zero}"


def _first_last(arm: ArmResult) -> str:
    st = arm.stat("loss")
    if st is None or st.first is None:
        return "no finite loss"
    return f"{num(st.first)} -> {num(st.last)}"


def _guard(arm: ArmResult) -> str:
    if arm.role == "unguarded":
        return "-"
    acted = [e for e in arm.events if e.get("action") != "apply"]
    if not acted:
        return "nothing to do"
    return ", ".join(f"{e.get('action')} @{e.get('step')} ({e.get('reason')})" for e in acted[:4]
                     ) + (" ..." if len(acted) > 4 else "")


def _verdict(arm: ArmResult) -> str:
    r = arm.report
    bad = [f for f in r.findings if f.severity in ("critical", "warning")]
    if not bad:
        return r.verdict
    rules = ", ".join(dict.fromkeys(f.rule for f in bad))
    if arm.role != "unguarded" and not arm.unexplained_findings():
        steps = sorted({int(s) for f in bad for s in f.steps})
        return (f"{r.verdict} ({rules}) only at step {', '.join(map(str, steps))}, "
                "where the guard acted")
    return f"{r.verdict} ({rules})"


def _nonfinite_steps(arm: ArmResult) -> str:
    s = arm.true_loss_nonfinite
    if not s:
        return "0"
    shown = ", ".join(map(str, s[:3])) + (" ..." if len(s) > 3 else "")
    return f"{len(s)} (steps {shown})"


def scenario_table(i: int, res: ScenarioResult) -> str:
    u, g = res.unguarded, res.guarded
    rows = [
        ["logged loss: entries / valid / NaN / zero", _counts(u, "loss"), _counts(g, "loss")],
        ["grad_norm: entries / valid / NaN / zero", _counts(u, "grad_norm"),
         _counts(g, "grad_norm")],
        ["true loss non-finite (before the log filter)", _nonfinite_steps(u),
         _nonfinite_steps(g)],
        ["loss first -> last (finite entries)", _first_last(u), _first_last(g)],
        ["guard", _guard(u), _guard(g)],
        ["final parameters finite", _yes(u.params_finite), _yes(g.params_finite)],
        *[list(r) for r in res.rows],
        ["report verdict", _verdict(u), _verdict(g)],
    ]
    out = [
        f"## {i}. {res.title} (`{res.key}`)",
        "",
        f"fault: {res.fault}",
        "",
        _table(["", "unguarded (plain transformers)", "guarded (finitetune)"], rows),
        "",
    ]
    out += [f"note: {n}" for n in res.notes]
    out.append(f"reproduced: {_yes(res.reproduced)} — " + "; ".join(
        c.label if c.ok else f"FAILED: {c.label}" for c in res.reproduce))
    out.append(f"fixed: {_yes(res.fixed)} — " + "; ".join(
        c.label if c.ok else f"FAILED: {c.label}" for c in res.fix))
    return "\n".join(out)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def summary_line(results: list[ScenarioResult], minimal_ok: bool, seconds: float) -> str:
    n_ok = sum(r.ok for r in results)
    line = f"verify: {n_ok}/{len(results)} scenarios reproduced and fixed"
    if not minimal_ok:
        line += "; the minimal guarded run is NOT healthy"
    failed = [r.key for r in results if not r.ok]
    if failed:
        line += f" (failed: {', '.join(failed)})"
    ok = minimal_ok and not failed
    return line + f" in {seconds:.0f} s; exit {0 if ok else 1}"


def to_dict(results: list[ScenarioResult], minimal: ArmResult, minimal_ok: bool,
            info: dict[str, Any], root: Path) -> dict[str, Any]:
    """``verify.json``: every check and each arm's numbers; directories relative to ``root``."""
    def arm(a: ArmResult) -> dict[str, Any]:
        return {**a.summary(), "directory": a.directory.relative_to(root).as_posix()}

    return {
        **info,
        "ok": minimal_ok and all(r.ok for r in results),
        "minimal": {**arm(minimal), "ok": minimal_ok},
        "scenarios": [{
            "key": r.key, "title": r.title, "fault": r.fault, "reproduced": r.reproduced,
            "fixed": r.fixed,
            "reproduce_checks": [{"check": c.label, "ok": c.ok} for c in r.reproduce],
            "fix_checks": [{"check": c.label, "ok": c.ok} for c in r.fix],
            "notes": r.notes,
            "unguarded": arm(r.unguarded), "guarded": arm(r.guarded),
        } for r in results],
    }
