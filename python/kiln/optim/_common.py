"""What the kiln optimizers share: torch's flags, grouping a step's tensors, state tensors."""

from __future__ import annotations

from collections import defaultdict
from itertools import repeat
from operator import attrgetter, is_, is_not

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks as _global_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_pre_hooks


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


def _no_step_hooks(optimizer) -> bool:
    """Whether torch's Optimizer.step wrapper would do nothing observable: no step hooks
    (global or the optimizer's), no profiler to name the step (record_function), not
    compiling (dynamo traces the wrapper as torch's own optimizers have it)."""
    # is_compiling first: dynamo folds it to True and must not trace the C calls after it
    return (not torch.compiler.is_compiling()
            and not (_global_pre_hooks or _global_post_hooks or optimizer._optimizer_step_pre_hooks
                     or optimizer._optimizer_step_post_hooks)
            and not torch._C._autograd._profiler_enabled())


class FusedOptimizer(Optimizer):
    """What every kiln optimizer's step does around its fused update: the closure (under
    grad mode, as torch's), the flags, and the group's parameters that have a gradient.

    torch wraps every Optimizer subclass's step (profile_hook_step: record_function, the
    step hooks), ~25 us a step. kiln's ``step`` is that wrapper around ``_step`` where
    anything could observe it (hooks, a profiler, compiling) and ``_step`` itself else;
    it is marked ``hooked`` so that torch does not wrap it again."""

    _name = "Optimizer"

    def _step_group(self, group: dict, params: list[Tensor], index: int) -> None:
        raise NotImplementedError

    def _step_planned(self, group: dict, index: int) -> bool:
        """Runs the group's step on its cached plan where the plan's quick check holds
        (kiln/optim/_common.py StepPlan.quick); False: the caller runs _step_group."""
        return False

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() as a decorator costs ~3 us a step
        planned = not torch.compiler.is_compiling()  # (a plan's checks are C calls dynamo must not trace)
        try:
            for index, group in enumerate(self.param_groups):
                check_flags(self._name, group)
                if not (planned and self._step_planned(group, index)):
                    self._step_group(group, params_with_grad(self._name, group), index)
        finally:
            torch._C._set_grad_enabled(grad_enabled)
        return loss

    def step(self, closure=None):
        if _profile_hook_step is None or not _no_step_hooks(self):
            return self._hooked_step(closure)
        loss = self._step(closure)
        self._optimizer_step_code()  # what the wrapper calls for torch.profiler's Python tracer
        return loss

    step.hooked = True  # torch's _patch_step_function: already wrapped (above)

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


# torch's wrapper (a staticmethod of Optimizer in every torch kiln supports; None: no hooks to run)
_profile_hook_step = getattr(Optimizer, "profile_hook_step", None)
FusedOptimizer._hooked_step = (_profile_hook_step(FusedOptimizer._step) if _profile_hook_step is not None
                               else FusedOptimizer._step)


# ---------------------------------------------------------------------------------------
# A group's step as the last one ran it. Rebuilding the step's lists (state lookups,
# grouping by dtype, 0-d step counters bumped by _foreach_add_, the op layer's checks of
# every list) cost ~0.3 ms per step at 20 tensors: as much as the update of their 1M
# float32 elements. A plan keeps them, and each step checks what could have changed.


try:  # torch.compile's C check of tensors' metadata (its guards on a compiled frame's inputs)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:
    _TensorGuards = None


def _layout_guard(tensors: list[Tensor]):
    """A C-level check that a list of tensors is like these, one by one: the same type (exactly),
    dispatch keys, dtype, device, requires_grad, sizes and strides; ~4x faster than the maps of
    StepPlan._grads_fit at 200 tensors (~0.1 us a tensor). None where this torch has none, or
    where it does not tell these tensors from None (then the maps check every step)."""
    if _TensorGuards is None:
        return None
    try:
        guard = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                              dynamic_dims_strides=[list(t.stride()) for t in tensors])
        if guard.check(*tensors) and not guard.check(None, *tensors[1:]):
            return guard
    except Exception:  # noqa: BLE001 - an internal API: any other signature means no guard
        pass
    return None


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
        # for quick(): the whole group's parameters (it checks no subset); the storages of the
        # parameters and state as planned, held so that no other tensor can be allocated at
        # the addresses the tables hold: an address found again is that memory, never a reuse
        self.whole_group = len(params) == len(group["params"])
        self.storages = [t.untyped_storage() for t in self.persistent]
        self.state = self.state_keys = self.state_values = None
        self.tables = self.grad_guard = None

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

    def remember_state(self, state) -> None:
        """The optimizer's state dict as it stands when the plan was found to hold: what
        quick() compares (every key and value the same objects: each parameter's dict)."""
        self.state, self.state_keys, self.state_values = state, list(state), list(state.values())

    def quick(self, group: dict, state) -> tuple[list[Tensor], list[int]] | None:
        """This step's gradients and their addresses where the plan holds for the whole group,
        else None (then the caller takes the full path: params_with_grad, holds, grads).

        holds() and grads() in fewer passes: the group's parameters the same objects, the
        optimizer's state dict the same keys and values (remember_state) and each parameter's
        dict the same state tensors, the parameters and state at their planned addresses
        (sizes need no check there: the plan holds their storages, so memory at those addresses
        is theirs; a parameter resized in place gets gradients of its new size, which fail
        below), and every gradient a plain contiguous tensor of its parameter's dtype and size.
        At 200 parameters with momentum buffers, 1 thread on the loaded 2-core VM: ~0.11 ms, where
        the full path's checks and lists took ~0.6 ms."""
        params = group["params"]
        if (group is not self.group or not self.whole_group or len(params) != len(self.params)
                or not all(map(is_, params, self.params))):
            return None
        if self.keys:
            if (state is not self.state or len(state) != len(self.state_keys)
                    or not all(map(is_, state, self.state_keys)) or not all(map(is_, state.values(), self.state_values))
                    or not all(map(is_, map(dict.get, self.entry_dicts, self.entry_keys), self.entries))):
                return None
            if self.steps is not None and tuple(map(_data_ptr, self.steps)) != self.step_addresses:
                return None
        if tuple(map(_data_ptr, self.persistent)) != self.addresses:
            return None
        grads = list(map(_grad, params))
        guard = self.grad_guard
        if guard is None or not guard.check(*grads):
            if not self._grads_fit(grads):
                return None
            self.grad_guard = _layout_guard(grads)  # the next steps' gradients are checked by it
        return grads, list(map(_data_ptr, grads))

    def _grads_fit(self, grads: list[Tensor]) -> bool:
        """What grads() checks, less the list: each a plain contiguous tensor of its parameter's
        size and dtype."""
        if not all(map(is_, map(type, grads), repeat(Tensor))):  # None, a subclass
            return False
        try:  # a sparse gradient has no is_contiguous: the full path names it
            return (tuple(map(_numel, grads)) == self.param_sizes and all(map(is_, map(_dtype, grads), self.dtypes))
                    and all(map(_is_contiguous, grads)))
        except RuntimeError:
            return False

    def tabled(self, step_table) -> list[tuple]:
        """The buckets with what a step on a table needs: (indices, lists, step counters,
        table or None, the tensors a step mutates), the tables made on first use by
        ``step_table`` (kiln.ops.optim.step_table) from [params, params as the grads' row
        until a step writes it, state lists...]."""
        if self.tables is None:
            self.tables = [(indices, lists, steps, step_table([lists[0], lists[0], *lists[1:]]),
                            [t for ts in lists for t in ts])
                           for indices, lists, steps in self.buckets]
        return self.tables

    @staticmethod
    def pick(values: list, indices: list[int] | None) -> list:
        """A bucket's share of a list over all parameters."""
        return values if indices is None else [values[i] for i in indices]

    def step_counts(self) -> list[float]:
        """Bumps every counter by one (through numpy: the counters' versions stay, as no
        autograd graph holds a step counter); their new values, as torch's step.item()."""
        self.counter_values += 1
        return self.counter_values.tolist()

    def bump_counts(self):
        """step_counts as the numpy array of the counters (float64 copy) itself."""
        self.counter_values += 1
        return self.counter_values.astype(float)


def plan_for(optimizer, index: int, group: dict, params: list[Tensor], keys: tuple[str, ...]) -> StepPlan | None:
    """Group ``index``'s cached plan if it still holds, else a new one where one can be
    built. Plans live in the optimizer's ``_kiln_plans`` (not in its state_dict or pickle),
    one per group position, so a replaced group or state drops the old plan's tensors."""
    plans = optimizer.__dict__.setdefault("_kiln_plans", {})
    plan = plans.get(index)
    if plan is not None and plan.holds(group, params, optimizer.state, keys):
        plan.remember_state(optimizer.state)
        return plan
    plans.pop(index, None)
    dicts = [optimizer.state.get(p) for p in params]
    if (keys and any(d is None for d in dicts)) or not StepPlan.usable(params, dicts, keys):
        return None
    plan = plans[index] = StepPlan(group, params, dicts, keys)
    plan.remember_state(optimizer.state)
    return plan


def current_plan(optimizer, index: int, keys: tuple[str, ...]) -> StepPlan | None:
    """Group ``index``'s cached plan if it is one for these state keys (quick() checks the rest)."""
    plan = optimizer.__dict__.get("_kiln_plans", {}).get(index)
    return plan if plan is not None and plan.keys == keys else None
