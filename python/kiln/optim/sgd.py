"""SGD with momentum, dampening, Nesterov and weight decay: torch.optim.SGD on kiln's
fused sgd_step (one multi-tensor update per parameter group, device and dtype)."""

from __future__ import annotations

import torch

from kiln.ops.optim import sgd_step, sgd_step_checked, sgd_step_planned, step_table

from ._common import (FusedOptimizer, buckets, check_flags, check_tensor_lr, current_plan, plan_for, real,
                      scalar)

_KEYS = ("momentum_buffer",)  # the state a step with momentum reads


class SGD(FusedOptimizer):
    """torch.optim.SGD's arguments, defaults, state (``momentum_buffer``) and math.

    ``foreach`` and ``fused`` are accepted with any value (kiln's step is always fused);
    ``differentiable=True`` is refused. Sparse gradients are an error.
    """

    _name = "SGD"

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        check_tensor_lr(lr)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        check_flags("SGD", defaults)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    @staticmethod
    def _hyper(group):
        return dict(lr=scalar(group["lr"]), weight_decay=scalar(group["weight_decay"]),
                    momentum=scalar(group["momentum"]), dampening=scalar(group["dampening"]),
                    nesterov=group["nesterov"], maximize=group["maximize"])

    def _step_planned(self, group, index):
        hyper = self._hyper(group)
        plan = current_plan(self, index, _KEYS if hyper["momentum"] != 0 else ())
        found = plan.quick(group, self.state) if plan is not None else None
        if found is None:
            return False
        grads, addresses = found
        for indices, (ps, *bufs), _, table, mutated in plan.tabled(step_table):
            sgd_step_planned(table, plan.pick(addresses, indices), mutated, ps, plan.pick(grads, indices),
                             bufs[0] if bufs else None, **hyper)
        return True

    def _step_group(self, group, params, index):
        hyper = self._hyper(group)
        momentum = hyper["momentum"]
        # every buffer made (the plan holds from the second step): one call per bucket
        plan = plan_for(self, index, group, params, _KEYS if momentum != 0 else ())
        grads = plan.grads(params) if plan is not None else None
        if grads is not None:
            for indices, (ps, *bufs), _ in plan.buckets:
                sgd_step_checked(ps, plan.pick(grads, indices), bufs[0] if bufs else None, first_step=False,
                                 **hyper)
            return
        for indices in buckets(params).values():
            ps = [params[i] for i in indices]
            if momentum == 0:
                sgd_step([real(p) for p in ps], [real(p.grad) for p in ps], None, **hyper)
                continue
            # torch's first step sets the buffer to the (decayed) gradient, the later ones
            # update it: parameters whose buffer is new this step go in a call of their own
            fresh = [p for p in ps if self.state[p].get("momentum_buffer") is None]
            for p in fresh:
                self.state[p]["momentum_buffer"] = torch.empty_like(p.grad, memory_format=torch.preserve_format)
            fresh_ids = {id(p) for p in fresh}
            old = [p for p in ps if id(p) not in fresh_ids]
            for part, first in ((fresh, True), (old, False)):
                if part:
                    sgd_step([real(p) for p in part], [real(p.grad) for p in part],
                             [real(self.state[p]["momentum_buffer"]) for p in part], first_step=first, **hyper)
