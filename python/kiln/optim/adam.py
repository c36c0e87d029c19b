"""Adam and AdamW: torch.optim.Adam / AdamW on kiln's fused adam_step (one multi-tensor
update per parameter group, device and dtype)."""

from __future__ import annotations

import torch
from torch import Tensor

from kiln.ops.optim import adam_step, adam_step_checked, adam_step_planned, step_table

from ._common import (FusedOptimizer, buckets, check_flags, check_tensor_lr, current_plan, new_step, plan_for,
                      real, scalar, zeros_like)

# The state a step reads, in the order of adam_step's lists (the plan's buckets).
_KEYS = ("step", "exp_avg", "exp_avg_sq")
_KEYS_AMSGRAD = _KEYS + ("max_exp_avg_sq",)


class Adam(FusedOptimizer):
    """torch.optim.Adam's arguments, defaults, state (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``) and math; ``decoupled_weight_decay=True`` is AdamW.

    ``foreach`` and ``fused`` are accepted with any value (kiln's step is always fused);
    ``capturable=True`` and ``differentiable=True`` are refused. Sparse gradients are an error.
    """

    _name = "Adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False):
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        check_flags(self._name, defaults)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)
        self._steps_as_tensors()

    def _state(self, p: Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = new_step()
            state["exp_avg"] = zeros_like(p)
            state["exp_avg_sq"] = zeros_like(p)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = zeros_like(p)
        return state

    @staticmethod
    def _hyper(group):
        beta1, beta2 = group["betas"]
        return dict(lr=scalar(group["lr"]), beta1=scalar(beta1), beta2=scalar(beta2), eps=scalar(group["eps"]),
                    weight_decay=scalar(group["weight_decay"]), amsgrad=group["amsgrad"],
                    maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"])

    def _step_planned(self, group, index):
        plan = current_plan(self, index, _KEYS_AMSGRAD if group["amsgrad"] else _KEYS)
        found = plan.quick(group, self.state) if plan is not None else None
        if found is None:
            return False
        grads, addresses = found
        hyper = self._hyper(group)
        counts = plan.bump_counts()
        for indices, (ps, ms, vs, *vmax), steps, table, mutated in plan.tabled(step_table):
            adam_step_planned(table, plan.pick(addresses, indices), mutated, ps, plan.pick(grads, indices), ms, vs,
                              vmax[0] if vmax else None, steps, counts if indices is None else counts[indices],
                              **hyper)
        return True

    def _step_group(self, group, params, index):
        amsgrad = group["amsgrad"]
        hyper = self._hyper(group)
        keys = _KEYS_AMSGRAD if amsgrad else _KEYS
        plan = plan_for(self, index, group, params, keys)
        grads = plan.grads(params) if plan is not None else None
        if grads is not None:
            counts = plan.step_counts()
            for indices, (ps, ms, vs, *vmax), steps in plan.buckets:
                adam_step_checked(ps, plan.pick(grads, indices), ms, vs, vmax[0] if vmax else None, steps,
                                  plan.pick(counts, indices), **hyper)
            return
        states = [self._state(p, amsgrad) for p in params]
        steps = [s["step"] for s in states]
        if steps:
            torch._foreach_add_(steps, 1)
        for indices in buckets(params).values():
            ps, ss = [params[i] for i in indices], [states[i] for i in indices]
            adam_step([real(p) for p in ps], [real(p.grad) for p in ps], [real(s["exp_avg"]) for s in ss],
                      [real(s["exp_avg_sq"]) for s in ss],
                      [real(s["max_exp_avg_sq"]) for s in ss] if amsgrad else None,
                      [s["step"] for s in ss], **hyper)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (p *= 1 - lr * weight_decay
    before the Adam update), torch's default weight_decay 1e-2."""

    _name = "AdamW"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
