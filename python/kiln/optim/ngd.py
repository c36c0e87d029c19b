"""Normalized gradient descent (the notes' section 9.7): theta <- theta - lr g / ||g||.

Every step moves the same distance lr whatever the gradient's size. ||g|| is the norm of
the whole gradient of a parameter group (all its parameters with a gradient, as one
vector), or of each parameter's own gradient with per_tensor=True. A zero gradient has no
direction: the step leaves the parameters as they are. One fused ngd_step per group,
device and dtype (with several devices or dtypes in one group, the group norm is still
taken over all of them).
"""

from __future__ import annotations

import math

import torch

from kiln.ops.optim import ngd_step

from ._common import FusedOptimizer, buckets, check_tensor_lr, is_dtensor, real, scalar


class NGD(FusedOptimizer):
    """NGD(params, lr, per_tensor=False, *, maximize=False); no state."""

    _name = "NGD"

    def __init__(self, params, lr, per_tensor=False, *, maximize=False):
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        super().__init__(params, dict(lr=lr, per_tensor=per_tensor, maximize=maximize))

    def _step_group(self, group, params, index):
        if any(is_dtensor(p) for p in params):
            raise ValueError("kiln.optim.NGD: params are DTensors (FSDP shards) whose norms are local; "
                             "NGD needs the whole gradient's norm: train without FSDP")
        lr, per_tensor = scalar(group["lr"]), group["per_tensor"]
        parts = list(buckets(params).values())
        if len(parts) > 1 and not per_tensor:
            # the group norm spans several fused calls: take it first, then step each
            # part with its lr scaled so that lr_part / ||g_part|| = lr / ||g_group||
            norms = [torch.linalg.vector_norm(torch.stack([
                torch.linalg.vector_norm(real(params[i].grad), dtype=torch.float64) for i in ix]))
                .item() for ix in parts]
            total = math.sqrt(math.fsum(n * n for n in norms))
            lrs = [lr * n / total if total > 0 else 0.0 for n in norms]
        else:
            lrs = [lr] * len(parts)
        for indices, part_lr in zip(parts, lrs):
            ps = [params[i] for i in indices]
            ngd_step([real(p) for p in ps], [real(p.grad) for p in ps], lr=part_lr, per_tensor=per_tensor,
                     maximize=group["maximize"])
