"""``finitetune.testing`` is shipped for users' own tests: its checks must hold under
``python -O`` too (which strips ``assert`` statements)."""

import subprocess
import sys

import pytest
import torch

from finitetune.testing import StateMismatch, assert_same_state


def test_names_the_first_differing_parameter():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert_same_state(a, b)  # identical: no error
    with torch.no_grad():
        b.bias[1] += 1
    with pytest.raises(StateMismatch, match="parameter/buffer bias differs"):
        assert_same_state(a, b)


def test_optimizer_state_difference_is_named():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    b.load_state_dict(a.state_dict())
    oa, ob = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    for model, opt, steps in ((a, oa, 1), (b, ob, 2)):
        for _ in range(steps):
            model(torch.zeros(1, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
    with pytest.raises(StateMismatch, match=r"optimizer state of parameter #0, key 'step'"):
        assert_same_state(a, a, oa, ob)


def test_still_raises_under_python_O():
    code = ("import torch; from finitetune.testing import assert_same_state\n"
            "a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)\n"
            "assert_same_state(a, b)\n")
    done = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "StateMismatch" in done.stderr
