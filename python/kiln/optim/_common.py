"""What the kiln optimizers share: torch's flags, grouping a step's tensors, state tensors."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer


def check_flags(name: str, group: dict) -> None:
    """torch's implementation flags. foreach and fused choose among torch's own loops, and
    kiln's step is always one fused update, so any value runs it; capturable (CUDA-graph
    capture with the step counters on the device) and differentiable (autograd through
    the step) are not implemented: refused, naming the flag."""
    if group.get("capturable", False):
        raise ValueError(f"kiln.optim.{name}: capturable=True is not supported (kiln keeps the step "
                         f"counters on the CPU as torch's non-capturable optimizers do); use capturable=False")
    if group.get("differentiable", False):
        raise ValueError(f"kiln.optim.{name}: differentiable=True is not supported (kiln's fused step "
                         f"updates in place without autograd); use differentiable=False or torch.optim.{name}")
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def params_with_grad(name: str, group: dict) -> list[Tensor]:
    """The group's parameters that have a gradient (the others are skipped, as torch does)."""
    found = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"kiln.optim.{name} does not support sparse gradients "
                               f"(parameter of shape {tuple(p.shape)}); use torch.optim.SparseAdam")
        found.append(p)
    return found


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def real(t: Tensor) -> Tensor:
    """A complex tensor as its real view (torch's optimizers update complex parameters
    as pairs of reals, every formula elementwise); a DTensor (an FSDP shard) as its local
    tensor, which shares its storage: an elementwise update of the shards is the update."""
    if is_dtensor(t):
        t = t.to_local()
    return torch.view_as_real(t) if torch.is_complex(t) else t


def buckets(params: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of params by (device, dtype of the real view): one fused call each."""
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        out[(p.device, real(p).dtype)].append(i)
    return out


def zeros_like(p: Tensor) -> Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def scalar(value) -> float:
    """A hyperparameter that torch allows as a 1-element tensor, as a float."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def check_tensor_lr(lr) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def new_step() -> Tensor:
    """A step counter as torch's non-capturable optimizers keep it: a 0-d CPU tensor of
    the default scalar dtype (float32, float64 when that is the default dtype)."""
    from torch.optim.optimizer import _get_scalar_dtype

    return torch.tensor(0.0, dtype=_get_scalar_dtype())


class FusedOptimizer(Optimizer):
    """What every kiln optimizer's step does around its fused update: the closure (under
    grad mode, as torch's), the flags, and the group's parameters that have a gradient."""

    _name = "Optimizer"

    def _step_group(self, group: dict, params: list[Tensor]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            check_flags(self._name, group)
            self._step_group(group, params_with_grad(self._name, group))
        return loss

    def _steps_as_tensors(self) -> None:
        """State saved by old torch versions holds step as a number: make it torch's tensor."""
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = new_step().fill_(float(p_state["step"]))
