"""When a CPU call may skip torch.library's dispatch and run its op's body directly.

A custom op's Python dispatch (autograd, ADInplaceOrView, the backend kernel, each a
Python layer) costs ~0.07 ms per call, and ~0.35 ms for an optimizer step over lists of
120 tensors: a fifth of a 1024 x 1024 layer_norm forward, as much as a 1M-element Adam
update. It buys nothing where nothing could observe the difference: eager mode (not
tracing or compiling), no dispatch or function mode (FakeTensorMode, FlopCounterMode, a
vmap transform), no CPU autocast, plain CPU tensors. Callers add their own condition:
no gradient needed (a forward under no_grad or on tensors that do not require grad), or,
for in-place updates, grad mode off and the versions of the mutated tensors bumped as the
custom op's ADInplaceOrView step bumps them (``bump_versions``).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
except ImportError:  # a torch without it: always dispatch
    _get_current_dispatch_mode_stack = None

_PLAIN_KEYS: dict = {}


def _plain_cpu(t: Tensor) -> bool:
    keys = _PLAIN_KEYS.get(t.dtype)
    if keys is None:
        keys = _PLAIN_KEYS[t.dtype] = torch._C._dispatch_keys(torch.empty(0, dtype=t.dtype))
    return type(t) in (Tensor, torch.nn.Parameter) and torch._C._dispatch_keys(t) == keys


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # an older torch: no device argument
        return torch.is_autocast_cpu_enabled()


def direct(*tensors) -> bool:
    """Whether a call on these tensors (None skipped) may run its op's body directly."""
    return (_get_current_dispatch_mode_stack is not None and not torch.compiler.is_compiling()
            and not _get_current_dispatch_mode_stack() and not torch._C._is_torch_function_mode_enabled()
            and not _autocast_cpu() and all(t is None or _plain_cpu(t) for t in tensors))


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
