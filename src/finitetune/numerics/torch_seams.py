"""The private or underscore-named parts of torch finitetune relies on, listed once.

Each is used for a reason a public API does not serve (one fused kernel launch per
device/dtype group instead of a Python loop over parameters; the GradScaler's own found-inf
result instead of a second pass). ``tests/test_architecture.py`` fails when the code uses an
underscore name of a library that no list holds (this one, the Trainer adapter's
``finitetune.integrations.hf.seams.SEAMS``, DeepSpeed's
``finitetune.integrations.deepspeed.engine.SEAMS``). Pure data: no torch import here.
"""

from __future__ import annotations

__all__ = ["TORCH_SEAMS"]

TORCH_SEAMS: dict[str, str] = {
    "torch._foreach_norm": "per-tensor norms of many tensors in one kernel per device/dtype "
                           "group (the guard's gradient pass, checkpoint and weight scans)",
    "torch._foreach_copy_": "the in-memory rollback snapshot: copy every tensor in one call",
    "torch._foreach_mul_": "clipping with the norm already computed (what "
                           "torch.nn.utils.clip_grad_norm_ does inside)",
    "torch._foreach_zero_": "the moment reset after a spike (SPAM): every moment tensor "
                            "zeroed in one call",
    "torch.utils._foreach_utils._group_tensors_by_device_and_dtype": "the same grouping "
                           "torch's own clipping uses, so the guard launches O(groups) kernels",
    "torch.utils._python_dispatch.TorchDispatchMode": "finitetune.testing.count_host_syncs "
                           "sees every op that reads a device value back to the host",
    "torch.distributed._tensor.DTensor": "DTensor's home before torch 2.5 (FSDP2 shards)",
    "torch.amp.GradScaler._found_inf_per_device": "fp16: reuse the scaler's found-inf check "
                           "instead of a second pass over the gradients",
    "torch.optim.lr_scheduler.LRScheduler._last_lr": "the rollback restores the LR the "
                           "scheduler last set along with its state",
}
"""Dotted name -> why finitetune uses it."""
