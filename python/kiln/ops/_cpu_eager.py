"""When a CPU call may skip torch.library's dispatch and run its op's body directly.

A custom op's Python dispatch (autograd, ADInplaceOrView, the backend kernel, each a
Python layer) costs ~0.03-0.07 ms per call, ~0.02 ms more in its backward, and ~0.35 ms
for an optimizer step over lists of 120 tensors: a fifth of a 1024 x 1024 layer_norm
forward, as much as a 1M-element Adam update, a third of a digits-MLP training step. It
buys nothing where nothing could observe the difference: eager mode (not tracing or
compiling), no dispatch or function mode (FakeTensorMode, FlopCounterMode, a vmap
transform), no profiler (its trace names the custom ops), no CPU autocast, plain CPU
tensors. Then `autograd_op`'s caller runs the body directly when no gradient is needed and
under an autograd.Function built from the op's own setup_context / backward (what
torch.library.register_autograd builds, less the dispatch) when one is. In-place updates
(optimizer steps) add their own condition: grad mode off and the versions of the mutated
tensors bumped as the custom op's ADInplaceOrView step bumps them (``bump_versions``).
"""

from __future__ import annotations

import torch
from torch import Tensor

_C = torch._C
# Each check is one C call, together ~1.5 us a call: they run twice per op call of a training step.
_HAS_CHECKS = all(hasattr(_C, name) for name in ("_len_torch_dispatch_stack", "_is_torch_function_mode_enabled")) \
    and hasattr(_C, "_functorch") and hasattr(_C._functorch, "peek_interpreter_stack")
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
PLAIN_TYPES = _PLAIN_TYPES  # the tensor classes an op's eager fast path accepts
FAST_DTYPES = (torch.float32, torch.float64)  # the dtypes of the numba forms
# a functorch wrapper that outlived its transform (no interpreter left to see it) is still one
_is_functorch_wrapped = getattr(getattr(_C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # an older torch: no device argument
        return torch.is_autocast_cpu_enabled()


# autocast on any device (then the custom op's autocast registration must run)
_autocast_any = getattr(_C, "_is_any_autocast_enabled", None) or _autocast_cpu


# the C checks of `direct`, bound once (each attribute chain looked up per call cost ~0.1 us)
if _HAS_CHECKS:
    _dispatch_stack_len, _function_mode_enabled = _C._len_torch_dispatch_stack, _C._is_torch_function_mode_enabled
    _functorch_interpreter, _profiler_enabled = _C._functorch.peek_interpreter_stack, _C._autograd._profiler_enabled
_is_compiling = torch.compiler.is_compiling
_STRIDED = torch.strided


def direct(*tensors) -> bool:
    """Whether a call on these tensors (None skipped) may run its op's body directly.

    No mode could see the call (dispatch or function mode, a functorch transform, whose
    wrapped tensors are plain torch.Tensors on the outside, torch.compile, a profiler,
    autocast), and every tensor is a strided CPU tensor of torch's own class (a subclass,
    FakeTensor included, has a type of its own).
    """
    # is_compiling first: dynamo folds it to True and must not trace the C calls after it
    if (not _HAS_CHECKS or _is_compiling() or _dispatch_stack_len() or _function_mode_enabled()
            or _functorch_interpreter() is not None or _profiler_enabled() or _autocast_any()):
        return False
    for t in tensors:  # a loop, not all() over a generator: ~0.3 us less per tensor
        if t is not None and (type(t) not in _PLAIN_TYPES or not t.is_cpu or t.layout != _STRIDED
                              or _is_functorch_wrapped(t)):
            return False
    return True


_grad_enabled = torch.is_grad_enabled


def no_grad_needed(*tensors) -> bool:
    """No autograd graph to record: grad mode off, or no tensor (None skipped) requires grad."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def bump_versions(lists) -> None:
    """The version counters of every tensor of these lists, each up by one."""
    tensors = [t for ts in lists for t in ts]
    try:  # one call for all (torch >= 2.6 takes an iterable)
        torch.autograd.graph.increment_version(tensors)
    except TypeError:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def bump_versions_of(tensors: list) -> None:
    """bump_versions of one list, without copying it (a cached list of an optimizer plan)."""
    try:
        _C._increment_version(tensors)
    except TypeError:  # an older torch: one tensor a call
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def autograd_op(op, backward, setup_context):
    """Register ``backward`` / ``setup_context`` as the autograd formula of the custom op ``op``
    (mutating nothing) and return the function callers use in its place: the same
    arguments, positionally, as ``op``.

    Where `direct` allows, the caller runs the op's body itself, under an autograd.Function
    made of the same two functions when a gradient is needed, so eager CPU training pays
    one Python function call instead of three dispatch layers; anywhere else it calls ``op``.
    """
    torch.library.register_autograd(f"{op._namespace}::{op._name}", backward, setup_context=setup_context)
    body = getattr(op, "_init_fn", None)
    if body is None or not _HAS_CHECKS:  # a torch without them: always dispatch
        return op
    params = body.__code__.co_argcount
    defaults = body.__defaults__ or ()

    class _EagerCpu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = body(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _EagerCpu.__name__ = _EagerCpu.__qualname__ = f"{op._name}_eager_cpu"
    # The C apply itself: Function.apply's Python wrapper only binds defaults for a
    # setup_context-style Function (not this one) and unwraps functorch wrappers, which
    # `direct` has ruled out; it costs ~10 us a call.
    c_apply = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
    apply = c_apply.__get__(None, _EagerCpu) if c_apply is not None else _EagerCpu.apply

    def call(*args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if not direct(*tensors):
            return call.op(*args)  # looked up per call: tests count the dispatches by replacing it
        if len(args) < params:  # the inputs as setup_context sees them from the dispatcher: defaults filled
            args = args + defaults[len(defaults) - (params - len(args)):]
        if _grad_enabled():  # no_grad_needed inlined: a loop, no generator, no call (~1 us a call)
            for t in tensors:
                if t.requires_grad:
                    return apply(*args)
        return body(*args)

    call.__name__ = call.__qualname__ = op._name
    call.__doc__ = body.__doc__
    call.op = op
    # for a caller that has checked `direct` itself and passes every argument: the body
    # (no gradient needed) and the autograd.Function's apply (one needed)
    call.body, call.apply = body, apply
    return call
