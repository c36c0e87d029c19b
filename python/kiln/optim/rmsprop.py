"""RMSprop (optionally centered, with momentum): torch.optim.RMSprop on kiln's fused
rmsprop_step (one multi-tensor update per parameter group, device and dtype)."""

from __future__ import annotations

import torch

from kiln.ops.optim import rmsprop_step

from ._common import FusedOptimizer, buckets, check_flags, check_tensor_lr, new_step, real, scalar, zeros_like


class RMSprop(FusedOptimizer):
    """torch.optim.RMSprop's arguments, defaults, state (``step``, ``square_avg``,
    ``momentum_buffer``, ``grad_avg``) and math.

    ``foreach`` is accepted with any value (kiln's step is always fused);
    ``capturable=True`` and ``differentiable=True`` are refused. Sparse gradients are an error.
    """

    _name = "RMSprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False):
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
                        differentiable=differentiable)
        check_flags("RMSprop", defaults)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)
        self._steps_as_tensors()

    def _state(self, p, has_momentum: bool, centered: bool) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = new_step()
            state["square_avg"] = zeros_like(p)
        if has_momentum and "momentum_buffer" not in state:
            state["momentum_buffer"] = zeros_like(p)
        if centered and "grad_avg" not in state:
            state["grad_avg"] = zeros_like(p)
        return state

    def _step_group(self, group, params, index):
        momentum, centered = scalar(group["momentum"]), group["centered"]
        states = [self._state(p, momentum > 0, centered) for p in params]
        steps = [s["step"] for s in states]
        if steps:
            torch._foreach_add_(steps, 1)
        hyper = dict(lr=scalar(group["lr"]), alpha=scalar(group["alpha"]), eps=scalar(group["eps"]),
                     weight_decay=scalar(group["weight_decay"]), momentum=momentum, centered=centered,
                     maximize=group["maximize"])
        for indices in buckets(params).values():
            ps, ss = [params[i] for i in indices], [states[i] for i in indices]
            rmsprop_step([real(p) for p in ps], [real(p.grad) for p in ps], [real(s["square_avg"]) for s in ss],
                         [real(s["momentum_buffer"]) for s in ss] if momentum > 0 else None,
                         [real(s["grad_avg"]) for s in ss] if centered else None, **hyper)
