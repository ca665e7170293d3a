"""Cross-rank consistency : ranks that should hold the
same gradients or parameters and do not are named by a ``rank_mismatch`` event.

The pure parts (who is the odd one out; how a mismatch folds into the step's decision) are
tested directly; the DDP behaviour with 2 real gloo processes and a hard timeout.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

from finitetune import Guard, GuardConfig
from finitetune.errors import ConfigError
from finitetune.guard.policy import Action, Decision, PolicyContext, Reason
from finitetune.guard.rank_check import odd_ranks, resolve
from finitetune.loss.causal import causal_lm_loss
from finitetune.testing import run_distributed

VOCAB, SEQ = 32, 8
TIMEOUT = 90


# --------------------------------------------------------------------------- pure parts


def test_odd_ranks_majority_reference_and_two_rank_convention():
    """The majority is the reference; with no strict majority (2 ranks) rank 0's group is, and
    every rank outside the reference group is named. Equal values (within the relative
    tolerance) name nobody."""
    assert odd_ranks([1.0, 1.0, 1.0, 1.0], 0.0) is None
    assert odd_ranks([1.0, 1.0, 2.0, 1.0], 0.0) == ([2], 0)
    assert odd_ranks([2.0, 1.0, 1.0], 0.0) == ([0], 1)  # rank 0 itself can be the odd one
    assert odd_ranks([1.0, 1.0 + 1e-3], 0.0) == ([1], 0)
    assert odd_ranks([1.0, 1.0 + 1e-9], 1e-6) is None
    assert odd_ranks([1.0, 3.0, 3.0, 2.0, 3.0], 0.0) == ([0, 3], 1)


def test_resolve_folds_a_mismatch_into_the_decision():
    """Clean step + mismatch -> the configured action with reason rank_mismatch; a step
    already skipped for another reason keeps it (the mismatch rides along in its event); a skip
    that would be one too many in a row halts."""
    mm = {"mismatch_in": "params", "mismatch_ranks": [1], "reference_rank": 0}
    clean, ctx = Decision(Action.APPLY), PolicyContext()
    for action, expected in (("halt", Action.HALT), ("skip", Action.SKIP),
                             ("warn", Action.APPLY)):
        d = resolve(clean, mm, ctx, GuardConfig(rank_mismatch_action=action))
        assert (d.action, d.reason) == (expected, Reason.RANK_MISMATCH)
        assert d.detail["mismatch_ranks"] == [1] and "rank(s) [1]" in d.detail["note"]
    nan = Decision(Action.SKIP, Reason.NONFINITE_GRAD)
    d = resolve(nan, mm, ctx, GuardConfig())
    assert (d.action, d.reason, d.detail["mismatch_ranks"]) == (Action.SKIP,
                                                                Reason.NONFINITE_GRAD, [1])
    d = resolve(clean, mm, PolicyContext(consecutive_skips=5),
                GuardConfig(rank_mismatch_action="skip", max_consecutive_skips=5))
    assert d.action == Action.HALT
    assert resolve(clean, None, ctx, GuardConfig()) is clean


@pytest.mark.parametrize("field,value", [("rank_check_every", -1), ("rank_check_every", 1.5),
                                         ("rank_tolerance", -0.1), ("rank_tolerance", 1.0),
                                         ("rank_mismatch_action", "rollback")])
def test_rank_check_settings_are_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        GuardConfig(**{field: value})


# --------------------------------------------------------------------------- DDP, 2 processes


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def _ddp_rank1_drifts(out_dir: str) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, GuardConfig(rank_check_every=3, rank_mismatch_action="skip"),
                  output_dir=out_dir)
    calls: list[int] = []
    original = dist.all_reduce

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = spy
    log: dict = {"steps": [], "reduces": [], "unchanged": []}
    for step in range(1, 6):
        g = torch.Generator().manual_seed(10 * step + rank)
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        loss = causal_lm_loss(model(ids), ids)
        loss.backward()
        if step == 4 and rank == 1:  # rank 1's all-reduced gradient goes wrong (finite)
            model.module.head.weight.grad[0, 0] *= 2.0
        before = [p.detach().clone() for p in model.parameters()]
        n = len(calls)
        outcome = guard.step()
        opt.zero_grad(set_to_none=True)
        log["reduces"].append(len(calls) - n)
        log["steps"].append((outcome.applied, outcome.reason.value if outcome.reason else None))
        log["unchanged"].append(all(torch.equal(a, b) for a, b in zip(before,
                                                                       model.parameters())))
        if step == 1 and rank == 1:  # rank 1's replica of a weight drifts (a bad device)
            with torch.no_grad():
                model.module.head.bias[3] += 1e-3
    log["counters"] = dict(guard.counters)
    return log


def test_ddp_rank_whose_weights_or_gradients_differ_is_named():
    """Drift under DDP: rank 1's weights drift after step 1. Step 2: the gradients are
    still all-reduced (equal), no checksum due: applied. Step 3 (``rank_check_every=3``): the
    parameter checksums disagree -> both ranks skip, event names rank 1. Step 4: rank 1's
    all-reduced gradient is changed (finite): the per-rank gradient norms disagree -> skipped,
    rank 1 named. Still exactly one all-reduce per step: the slots ride in the guard's."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        r0, r1 = run_distributed(_ddp_rank1_drifts, tmp, timeout=TIMEOUT)
        lines = [json.loads(x) for x in (Path(tmp) / "events.jsonl").read_text().splitlines()]
    assert r0["steps"] == r1["steps"] == [
        (True, None), (True, None), (False, "rank_mismatch"), (False, "rank_mismatch"),
        (True, None)]
    assert r0["reduces"] == r1["reduces"] == [1, 1, 1, 1, 1]
    assert r0["unchanged"][2:4] == r1["unchanged"][2:4] == [True, True]  # a skip is a skip
    assert r0["counters"]["rank_mismatches"] == 2
    assert [(e["step"], e["reason"], e["mismatch_in"], e["mismatch_ranks"],
             e["reference_rank"]) for e in lines] == [
        (3, "rank_mismatch", "params", [1], 0), (4, "rank_mismatch", "grad_norm", [1], 0)]
    assert all(e["rank"] == 0 and e["world_size"] == 2 for e in lines)
