"""The gated activations of LLM feed-forward layers, elementwise and fused:
swiglu(gate, up) = silu(gate) * up and geglu(gate, up) = gelu(gate) * up.

Forward reads gate and up once and writes y; backward reads dy, gate and up once and
writes
    dgate = dy * up * act'(gate),   dup = dy * act(gate),
recomputing act and act' from gate instead of saving act(gate) (one tensor of memory
fewer per layer, for a few flops).

Saved for backward: gate and up (the inputs) only.
Autocast: torch's equivalent composite, F.silu(g) * u or F.gelu(g) * u, is in none of
autocast's lists (it runs in its inputs' dtype), so no rule is registered: kiln follows.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from kiln import backend
from kiln.kernels.activations import CODE

from . import _cpu_eager
from ._checks import check_floating, check_same_device_dtype
from ._cuda_launch import DTYPE_CODE, ptr, stream
from .linear_act import TORCH_ACTIVATIONS, _act_grad_reference

# The activation each op applies to gate; the op names are what kiln.backend.use(ops=[...]) takes.
OP_OF_ACTIVATION = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu"}
_ACTIVATION_OF_CODE = {CODE[name]: name for name in OP_OF_ACTIVATION}


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference, in float64.


def reference_forward(gate, up, activation: int):
    act = TORCH_ACTIVATIONS[_ACTIVATION_OF_CODE[activation]]
    return (act(gate.double()) * up.double()).to(gate.dtype)


def reference_backward(dy, gate, up, activation: int, need_dgate: bool, need_dup: bool):
    name = _ACTIVATION_OF_CODE[activation]
    g, dyd = gate.double(), dy.double()
    dgate = (dyd * up.double() * _act_grad_reference(g, name)).to(gate.dtype) if need_dgate else None
    dup = (dyd * TORCH_ACTIVATIONS[name](g)).to(gate.dtype) if need_dup else None
    return dgate, dup


# ---------------------------------------------------------------------------------------
# The cuda backend.


def cuda_forward(gate, up, activation: int):
    ext = backend.cuda_extension()
    y = torch.empty_like(gate)
    with torch.cuda.device(gate.device):
        ext.gated_forward(ptr(gate), ptr(up), ptr(y), gate.numel(), activation, DTYPE_CODE[gate.dtype],
                          stream(gate))
    return y


def cuda_backward(dy, gate, up, activation: int, need_dgate: bool, need_dup: bool):
    ext = backend.cuda_extension()
    dgate = torch.empty_like(gate) if need_dgate else None
    dup = torch.empty_like(gate) if need_dup else None
    with torch.cuda.device(gate.device):
        ext.gated_backward(ptr(dy), ptr(gate), ptr(up), ptr(dgate), ptr(dup), gate.numel(), activation,
                           DTYPE_CODE[gate.dtype], stream(gate))
    return dgate, dup


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.gated", "cpu": "kiln.kernels.cpu.gated"}

_REFERENCE = SimpleNamespace(forward=reference_forward, backward=reference_backward)
_CUDA = SimpleNamespace(forward=cuda_forward, backward=cuda_backward)


def _implementation(activation: str, t: Tensor):
    return backend.implementation(OP_OF_ACTIVATION[activation], t, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA)


# ---------------------------------------------------------------------------------------
# The custom ops: gate and up flat, contiguous, of one dtype; the public functions reshape.


@torch.library.custom_op("kiln::gated_act", mutates_args=())
def _gated_act(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    return _implementation(activation, gate).forward(gate, up, CODE[activation])


@_gated_act.register_fake
def _(gate, up, activation):
    return torch.empty_like(gate)


@torch.library.custom_op("kiln::gated_act_backward", mutates_args=())
def _gated_act_backward(dy: Tensor, gate: Tensor, up: Tensor, activation: str, need_dgate: bool,
                        need_dup: bool) -> tuple[Tensor, Tensor]:
    """Returns (dgate, dup), each empty when not needed."""
    grads = _implementation(activation, gate).backward(dy, gate, up, CODE[activation], need_dgate, need_dup)
    return tuple(g if g is not None else gate.new_empty(0) for g in grads)


@_gated_act_backward.register_fake
def _(dy, gate, up, activation, need_dgate, need_dup):
    return (torch.empty_like(gate) if need_dgate else gate.new_empty(0),
            torch.empty_like(gate) if need_dup else gate.new_empty(0))


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    need_dgate, need_dup = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():  # autograd records this backward: double backward, in torch ops
        dgate = dy * up * _act_grad_reference(gate, ctx.activation) if need_dgate else None
        dup = dy * TORCH_ACTIVATIONS[ctx.activation](gate) if need_dup else None
        return dgate, dup, None
    dgate, dup = _gated_act_backward(dy.contiguous(), gate, up, ctx.activation, need_dgate, need_dup)
    return (dgate if need_dgate else None, dup if need_dup else None, None)


_gated_act_call = _cpu_eager.autograd_op(_gated_act, _backward, _setup_context)


# ---------------------------------------------------------------------------------------
# The public ops.


def _gated(op: str, gate: Tensor, up: Tensor, activation: str) -> Tensor:
    check_floating(op, gate=gate, up=up)
    check_same_device_dtype(op, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate and up must have the same shape: gate {tuple(gate.shape)} vs up "
                         f"{tuple(up.shape)}")
    if gate.numel() == 0:  # nothing to launch: torch's empty result, and empty gradients
        return TORCH_ACTIVATIONS[activation](gate) * up
    y = _gated_act_call(_flat(gate), _flat(up), activation)
    return y if gate.dim() == 1 else y.view_as(gate)  # view(torch.Size) costs 3x view_as


def _flat(t: Tensor) -> Tensor:
    # a 1-D contiguous t as it is: each torch call costs ~1 us from Python, a quarter of
    # torch's whole silu(g) * u at small sizes
    if t.dim() == 1 and t.is_contiguous():
        return t
    return t.reshape(-1).contiguous()


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (SwiGLU, LLaMA's feed-forward gate), for gate and up of one shape."""
    return _gated("swiglu", gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate) * up (GeGLU), for gate and up of one shape; approximate is
    F.gelu's: "none" (erf, its default) or "tanh" (Gemma's gelu_pytorch_tanh)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gated("geglu", gate, up, "gelu" if approximate == "none" else "gelu_tanh")
