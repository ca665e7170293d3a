"""Restart-rollback from disk: the guard rolls back to the newest proven checkpoint in-process.

Unit part: :class:`DiskRollback` restores a saved checkpoint bit-exactly (parameters, every
optimizer-state tensor, scheduler) and re-applies the LR back-offs taken since it was saved.

End to end (the issue's "Done when"): the ``lr_divergence`` scenario of ``finitetune verify``
(peak LR 1.0 after a 10-step warm-up, full fine-tune of the tiny Llama, no LoRA) with
``rollback_to="disk"`` and a checkpoint every 2 steps: the spike is caught, the state comes back
from a checkpoint saved *before* the spiking state (not the checkpoint holding it), the LR is
backed off, no in-memory copy exists, and the scenario's own "fixed" checks all pass.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from finitetune.guard.disk_rollback import DiskRollback
from finitetune.guard.snapshot import Snapshot
from finitetune.rundir import files as run_files
from finitetune.rundir.checkpoints import write_marker


def _step(model, opt, sched, x):
    model(x).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_restore_is_bit_exact_and_reapplies_the_lr_backoffs(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(3, 4)
    for _ in range(3):
        _step(model, opt, sched, x)
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              ckpt / "model.safetensors")
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    torch.save(sched.state_dict(), ckpt / "scheduler.pt")
    (ckpt / run_files.TRAINER_STATE).write_text(json.dumps({"global_step": 3}))
    write_marker(ckpt, 3, lr_scale=1.0, proven_by_step=4)
    expected = Snapshot(list(model.parameters()), opt)
    expected.capture(4)
    want_params = [p.detach().clone() for p in model.parameters()]
    want_state = {i: {k: v.clone() for k, v in opt.state[p].items()}
                  for i, p in enumerate(model.parameters())}
    want_lr = opt.param_groups[0]["lr"]
    for _ in range(2):  # the run goes on, then a spike calls for a rollback
        _step(model, opt, sched, x)

    class _Guard:
        lr_scale = 0.5  # one back-off was taken after the checkpoint

    disk = DiskRollback(model, opt, sched, tmp_path)
    assert disk.exists and disk.step == 4 and disk.target.name == "checkpoint-3"
    disk.guard = _Guard()
    disk.restore()
    for p, w in zip(model.parameters(), want_params, strict=True):
        assert torch.equal(p, w)
    for i, p in enumerate(model.parameters()):
        assert opt.state[p].keys() == want_state[i].keys()
        for k, v in want_state[i].items():
            assert torch.equal(opt.state[p][k], v), (i, k)
    assert sched.last_epoch == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(want_lr * 0.5)
    assert sched.base_lrs == [pytest.approx(0.05)]


@pytest.mark.slow
def test_disk_rollback_recovers_the_lr_divergence_scenario_full_finetune(tmp_path):
    from finitetune.verify.harness import BATCH, prepare_setup, quiet, run_arm
    from finitetune.verify.scenarios import (
        DIVERGENT_LR,
        LR_STEPS,
        WARMUP,
        common_fix_checks,
        divergence_guard,
    )

    setup = prepare_setup("tiny", rows_needed=LR_STEPS * BATCH)
    kw = dict(lr=DIVERGENT_LR, schedule="constant_with_warmup", warmup_steps=WARMUP)
    rows = setup.take(LR_STEPS * BATCH)
    with quiet(setup.threads):
        u = run_arm(setup, tmp_path / "unguarded", "unguarded", rows, LR_STEPS, **kw)
        g = run_arm(setup, tmp_path / "disk", "guarded", rows, LR_STEPS,
                    guard=divergence_guard(rollback_to="disk"), save_steps=2, **kw)
    loss_u = u.stat("loss")
    assert loss_u.max > 2 * loss_u.first  # the scenario's fault is real here
    assert all(p.requires_grad for p in g.trainer.model.parameters())  # full fine-tune
    guard = next(cb.guard for cb in g.trainer.callback_handler.callbacks
                 if getattr(cb, "guard", None) is not None)
    assert isinstance(guard._snapshot, DiskRollback)  # no in-memory copy of the state
    rollbacks = [e for e in g.events if e.get("action") == "rollback"]
    restored = [e for e in g.events if e.get("action") == "restored"]
    assert rollbacks and len(restored) == len(rollbacks)
    for rb, rs in zip(rollbacks, restored, strict=True):
        assert rs["step"] == rb["step"]
        # the checkpoint holding the state that spiked (saved at step - 1) is not the target
        assert rs["checkpoint_step"] < rb["step"] - 1
    assert guard.lr_scale == pytest.approx(0.03 ** len(rollbacks))
    checks = common_fix_checks(g)
    assert all(c.ok for c in checks), [c.label for c in checks if not c.ok]
