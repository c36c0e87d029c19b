"""What the kiln optimizers share: torch's flags, grouping a step's tensors, state tensors."""

from __future__ import annotations

from collections import defaultdict
from itertools import repeat
from operator import attrgetter, is_, is_not

import torch
from torch import Tensor
from torch.optim import Optimizer


_data_ptr, _numel, _is_contiguous = Tensor.data_ptr, Tensor.numel, Tensor.is_contiguous
_grad, _dtype, _layout = attrgetter("grad"), attrgetter("dtype"), attrgetter("layout")


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
    params = group["params"]
    grads = list(map(_grad, params))
    # the common case in two C-level passes: every parameter has a dense gradient
    if all(map(is_not, grads, repeat(None))) and all(map(is_, map(_layout, grads), repeat(torch.strided))):
        return list(params)
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

    def _step_group(self, group: dict, params: list[Tensor], index: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            check_flags(self._name, group)
            self._step_group(group, params_with_grad(self._name, group), index)
        return loss

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("_kiln_plans", None)  # load_state_dict: the old state's plans go

    def _steps_as_tensors(self) -> None:
        """State saved by old torch versions holds step as a number: make it torch's tensor."""
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = new_step().fill_(float(p_state["step"]))


# ---------------------------------------------------------------------------------------
# A group's step as the last one ran it. Rebuilding the step's lists (state lookups,
# grouping by dtype, 0-d step counters bumped by _foreach_add_, the op layer's checks of
# every list) cost ~0.3 ms per step at 20 tensors: as much as the update of their 1M
# float32 elements. A plan keeps them, and each step checks what could have changed.



def _plain_real(t) -> bool:
    return type(t) in (Tensor, torch.nn.Parameter) and t.is_floating_point() and t.is_contiguous()


class StepPlan:
    """The lists of one group's fused calls while the group has the same parameters with a
    gradient, each the same state dict holding the same tensors (``keys``), and those at
    the same addresses with the same sizes. ``buckets``: (indices into the parameters,
    [params, state lists...]) for each (device, dtype), zero-size tensors left out.

    The step counters (``"step"`` in ``keys``) are re-pointed (``set_``) into one 1-D
    tensor, keeping each counter's identity and value, so that a step bumps them all with
    one add and reads them all with one tolist.

    Only for plain, real, contiguous tensors (complex or DTensor parameters, non-contiguous
    ones take the per-step path). The checks run as C-level maps: ~20 us at 20 tensors."""

    def __init__(self, group: dict, params: list[Tensor], dicts: list[dict], keys: tuple[str, ...]):
        self.group, self.params, self.dicts, self.keys = group, params, dicts, keys
        # the (dict, key) of every state tensor, and the tensor: what holds() compares
        self.entry_dicts = [d for d in dicts for _ in keys]
        self.entry_keys = [k for _ in dicts for k in keys]
        self.entries = list(map(dict.get, self.entry_dicts, self.entry_keys))
        state_keys = [k for k in keys if k != "step"]
        self.counters = self.steps = None
        if "step" in keys:
            self.steps = [d["step"] for d in dicts]
            self.counters = torch.tensor([s.item() for s in self.steps], dtype=self.steps[0].dtype)
            self.counter_values = self.counters.numpy()  # the same memory: a numpy add costs a fifth of add_
            storage = self.counters.untyped_storage()
            for i, s in enumerate(self.steps):
                s.set_(storage, i, (), ())
            self.step_addresses = tuple(map(_data_ptr, self.steps))
        self.persistent = params + [d[k] for d in dicts for k in state_keys]
        self.addresses = tuple(map(_data_ptr, self.persistent))
        self.sizes = tuple(map(_numel, self.persistent))
        self.param_sizes = self.sizes[:len(params)]
        self.dtypes = [p.dtype for p in params]
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            if self.param_sizes[i]:
                by_kind[(p.device, p.dtype)].append(i)
        # per bucket: indices (None: all parameters, in order), [params, state lists...], the step counters
        self.buckets = [(None if idx == list(range(len(params))) else idx,
                         [[params[i] for i in idx]] + [[dicts[i][k] for i in idx] for k in state_keys],
                         [self.steps[i] for i in idx] if self.steps else None)
                        for idx in by_kind.values()]

    @staticmethod
    def usable(params: list[Tensor], dicts: list[dict], keys: tuple[str, ...]) -> bool:
        """Whether a plan can hold these: every tensor plain, real and contiguous, the step
        counters distinct 0-d CPU tensors of one dtype."""
        if not params or torch.compiler.is_compiling():
            return False
        if not all(_plain_real(p) for p in params):
            return False
        if "step" in keys:  # distinct counters, each its own element (one bump each, as torch's)
            steps = [d.get("step") for d in dicts]
            if any(type(s) is not Tensor for s in steps) or len({s.data_ptr() for s in steps}) != len(steps):
                return False
        for p, d in zip(params, dicts):
            for k in keys:
                t = d.get(k)
                if k == "step":
                    if not (t.dim() == 0 and t.is_cpu and not t.requires_grad and t.dtype == dicts[0]["step"].dtype):
                        return False
                # a state tensor of its parameter's size, dtype and device (else the op layer's error)
                elif not (t is not None and _plain_real(t) and t.shape == p.shape and t.dtype == p.dtype
                          and t.device == p.device):
                    return False
        return True

    def holds(self, group: dict, params: list[Tensor], state, keys: tuple[str, ...]) -> bool:
        """Whether this plan is still the group's: same parameters, state and addresses."""
        if (group is not self.group or keys != self.keys or len(params) != len(self.params)
                or not all(map(is_, params, self.params))):
            return False
        if not all(map(is_, map(state.get, params), self.dicts)):
            return False
        if not all(map(is_, map(dict.get, self.entry_dicts, self.entry_keys), self.entries)):
            return False
        # a counter re-pointed elsewhere (a set_ or .data of its own) leaves the plan
        if self.steps is not None and tuple(map(_data_ptr, self.steps)) != self.step_addresses:
            return False
        return (tuple(map(_data_ptr, self.persistent)) == self.addresses
                and tuple(map(_numel, self.persistent)) == self.sizes)

    def grads(self, params: list[Tensor]) -> list[Tensor] | None:
        """This step's gradients, or None where one does not fit the plan (another size or
        dtype than its parameter, non-contiguous, a subclass): the per-step path then
        handles them. Their device is their parameter's: torch checks it on every
        assignment of .grad (and .data cannot move a tensor to another device)."""
        grads = list(map(_grad, params))
        if (all(map(is_, map(type, grads), repeat(Tensor))) and tuple(map(_numel, grads)) == self.param_sizes
                and all(map(is_, map(_dtype, grads), self.dtypes)) and all(map(_is_contiguous, grads))):
            return grads
        return None

    @staticmethod
    def pick(values: list, indices: list[int] | None) -> list:
        """A bucket's share of a list over all parameters."""
        return values if indices is None else [values[i] for i in indices]

    def step_counts(self) -> list[float]:
        """Bumps every counter by one (through numpy: the counters' versions stay, as no
        autograd graph holds a step counter); their new values, as torch's step.item()."""
        self.counter_values += 1
        return self.counter_values.tolist()


def plan_for(optimizer, index: int, group: dict, params: list[Tensor], keys: tuple[str, ...]) -> StepPlan | None:
    """Group ``index``'s cached plan if it still holds, else a new one where one can be
    built. Plans live in the optimizer's ``_kiln_plans`` (not in its state_dict or pickle),
    one per group position, so a replaced group or state drops the old plan's tensors."""
    plans = optimizer.__dict__.setdefault("_kiln_plans", {})
    plan = plans.get(index)
    if plan is not None and plan.holds(group, params, optimizer.state, keys):
        return plan
    plans.pop(index, None)
    dicts = [optimizer.state.get(p) for p in params]
    if (keys and any(d is None for d in dicts)) or not StepPlan.usable(params, dicts, keys):
        return None
    plan = plans[index] = StepPlan(group, params, dicts, keys)
    return plan
