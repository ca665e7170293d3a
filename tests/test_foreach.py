"""The one grouped max-abs pass shared by the guard, the replay, the weight scan and the
checkpoint health check."""

import math

import torch

from finitetune.numerics.foreach import all_finite, per_tensor_max_abs


def test_max_abs_per_tensor_in_order_across_dtype_groups():
    ts = [torch.tensor([1.0, -3.0]), torch.tensor([2.0], dtype=torch.float64),
          torch.tensor([-7.0, 0.5], dtype=torch.bfloat16), torch.empty(0),
          torch.tensor([0.25], dtype=torch.float16)]
    out = per_tensor_max_abs(ts)
    assert out.dtype == torch.float32 and out.tolist() == [3.0, 2.0, 7.0, 0.0, 0.25]


def test_nan_and_inf_survive_the_reduction():
    out = per_tensor_max_abs([torch.tensor([1.0, float("nan"), 5.0]),
                              torch.tensor([-float("inf")]), torch.ones(3)]).tolist()
    assert math.isnan(out[0]) and out[1] == math.inf and out[2] == 1.0


def test_all_finite_ignores_integer_tensors_and_flags_any_nonfinite():
    steps = torch.tensor(3)  # an optimizer's integer step counter
    assert bool(all_finite([torch.ones(2), steps]))
    assert not bool(all_finite([torch.ones(2), torch.tensor([0.0, float("inf")])]))
    assert bool(all_finite([]))
