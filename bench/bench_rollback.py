"""Peak memory and time of the rollback policies, on ``finitetune verify``'s lr_divergence scenario.

    python -m bench.bench_rollback                 # 3.5M-parameter Llama, full fine-tune (~1 min)
    python -m bench.bench_rollback --hidden 512 --layers 6   # 21M parameters (~7 min on 2 cores)

The in-memory rollback keeps a copy of the trainable parameters and their AdamW state (three
times the model's fp32 size) for the whole run; the on-disk rollback keeps nothing and reads
the newest proven checkpoint back when it rolls back. Three arms, each in its own fresh
interpreter (peak RSS is per process), same model, data, seed and checkpoints every
``--save-steps``: ``skip`` (spikes only skipped: no rollback state, the memory floor),
``memory`` and ``disk`` (``GuardConfig.rollback_to``). Reported: peak RSS, its excess over the
floor and the ratio of the two excesses; the analytic size of the in-memory copy; wall time;
the time each on-disk restore took; and whether the scenario's "fixed" checks pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import append_result


def _arm(args: argparse.Namespace) -> dict:
    """One arm in this process: train the scenario, return what was measured."""
    from finitetune.verify.harness import BATCH, prepare_setup, quiet, run_arm
    from finitetune.verify.scenarios import (
        DIVERGENT_LR,
        LR_STEPS,
        WARMUP,
        common_fix_checks,
        divergence_guard,
    )

    setup = prepare_setup(args.model_dir, rows_needed=LR_STEPS * BATCH)
    cfg = (divergence_guard(policy="skip", spike_action="skip") if args.arm == "skip"
           else divergence_guard(rollback_to=args.arm))
    t0 = time.perf_counter()
    with quiet(setup.threads):
        g = run_arm(setup, Path(args.out), "guarded", setup.take(LR_STEPS * BATCH), LR_STEPS,
                    guard=cfg, save_steps=args.save_steps, lr=DIVERGENT_LR,
                    schedule="constant_with_warmup", warmup_steps=WARMUP)
    seconds = time.perf_counter() - t0
    params = [p for p in g.trainer.model.parameters() if p.requires_grad]
    state = [v for p in params for v in g.trainer.optimizer.state[p].values()
             if hasattr(v, "numel") and v.dim() > 0]
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds, "params": sum(p.numel() for p in params),
        "copy_mb": (sum(p.numel() * p.element_size() for p in params)
                    + sum(v.numel() * v.element_size() for v in state)) / 2**20,
        "rollbacks": sum(e.get("action") == "rollback" for e in g.events),
        "restore_s": [e["seconds"] for e in g.events if e.get("action") == "restored"],
        "fixed": all(c.ok for c in common_fix_checks(g)),
        "failed": [c.label for c in common_fix_checks(g) if not c.ok],
    }


def _build_model(root: Path, hidden: int, layers: int) -> Path:
    from finitetune.builtin.models import build_tiny_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    heads = max(4, hidden // 64)
    model = build_tiny_model(tok, hidden_size=hidden, intermediate_size=3 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=heads)
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--arm", choices=["skip", "memory", "disk"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(_arm(args)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-rollback-"))
    model_dir = _build_model(root, args.hidden, args.layers)
    res = {}
    for arm in ("skip", "memory", "disk"):
        cmd = [sys.executable, "-m", "bench.bench_rollback", "--arm", arm, "--model-dir",
               str(model_dir), "--out", str(root / arm), "--save-steps", str(args.save_steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[arm] = json.loads(done.stdout.strip().splitlines()[-1])
        print(arm, res[arm], flush=True)
    floor = res["skip"]["peak_rss_mb"]
    extra = {a: res[a]["peak_rss_mb"] - floor for a in ("memory", "disk")}
    ratio = extra["disk"] / extra["memory"] if extra["memory"] > 0 else float("nan")
    rows = ["| policy | peak RSS (MiB) | over the floor (MiB) | wall time (s) | rollbacks | "
            "restore time (s) | scenario fixed |", "|---|---|---|---|---|---|---|"]
    for arm, label in (("skip", "skip (no rollback state; floor)"),
                       ("memory", "rollback_to=memory"), ("disk", "rollback_to=disk")):
        r = res[arm]
        rows.append(f"| {label} | {r['peak_rss_mb']:.0f} | "
                    f"{(r['peak_rss_mb'] - floor):+.0f} | {r['seconds']:.1f} | {r['rollbacks']} "
                    f"| {', '.join(f'{s:.2f}' for s in r['restore_s']) or '-'} | "
                    f"{'yes' if r['fixed'] else 'no: ' + r['failed'][0][:70]} |")
    text = (f"lr_divergence scenario (peak LR 1.0, 30 steps), full fine-tune of a "
            f"{res['memory']['params'] / 1e6:.1f}M-parameter Llama (hidden {args.hidden}, "
            f"{args.layers} layers), AdamW fp32, checkpoint every {args.save_steps} steps in "
            f"every arm. In-memory copy of the trainable state (weights + AdamW moments): "
            f"{res['memory']['copy_mb']:.0f} MiB.\n\n" + "\n".join(rows)
            + f"\n\nExtra peak memory of the on-disk policy / the in-memory policy: "
              f"**{ratio:.2f}** ({extra['disk']:+.0f} MiB vs {extra['memory']:+.0f} MiB).\n")
    print(text)
    append_result("Rollback policies: peak memory, in-memory vs on-disk", text)


if __name__ == "__main__":
    main()
