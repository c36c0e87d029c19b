"""linear_act: y = act(x @ W^T + b), the fused affine layer of the notes (section 5.6).

Forward runs one GEMM with the bias and the activation in its epilogue. Backward
needs dz = dy * act'(z) and forms it inside the gradient GEMMs (Triton, CUDA) or
block by block in cache (cpu), never as a separate pass over memory:
dx = dz W, dW = dz^T x, db = sum over rows of dz.

Saved for backward: x and W (the GEMM operands), and one (M, N) tensor for act':
the output y itself for relu, tanh, sigmoid (their derivative is a function of y, and
y exists anyway), the pre-activation z for gelu, gelu_tanh, silu (forward writes it
as a second output), nothing for identity.

Dropout (``dropout=p``, inverted as torch's) is fused into the epilogue: y = act(z) * mask
/ (1 - p), the mask a pure function of (seed, offset, row * N + col) (ops/random.py's
Philox, the same bits in every form), so it is never stored: the op also saves the int64
pair [seed, offset], and the gradient GEMMs regenerate the mask in their prologue, dz =
dy * mask / (1 - p) * act'(z). With dropout, tanh and sigmoid save act(z) before dropout
as their second output (their y is scaled and zeroed); relu still uses y (y > 0 exactly
where z > 0 and the element was kept).

Double backward (a backward recorded with create_graph=True, e.g. for a gradient-norm
penalty) runs differentiable PyTorch ops from x, W and b: z is recomputed (the saved z
is an output whose gradient the backward does not take), the mask rebuilt from the pair. Autocast: "lower", as torch's
F.linear (the region's dtype). An empty product (a zero batch, in or out size) has no
work for a kernel: torch's F.linear and activation give its result and gradients.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln import backend
from kiln.kernels.activations import ACTIVATIONS, CODE, SAVED

from . import _autocast, _cpu_eager
from . import random as kiln_random
from ._checks import check_floating, check_same_device_dtype
from .dropout import check_probability
from .dropout import multiplier as dropout_multiplier
from ._cuda_launch import DTYPE_CODE, ptr, stream

OP = "linear_act"

# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference: obviously right, any device and dtype.


# Each activation as torch computes it: the reference's forward, and the tests' oracle.
TORCH_ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
}


def _act_grad_reference(saved: Tensor, activation: str) -> Tensor:
    """act'(z) from the saved tensor (y for relu/tanh/sigmoid, z for the others)."""
    s = saved
    if activation == "relu":
        return (s > 0).to(s.dtype)
    if activation == "tanh":
        return 1 - s * s
    if activation == "sigmoid":
        return s * (1 - s)
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(s / 2**0.5)) + s * torch.exp(-0.5 * s * s) / (2 * torch.pi) ** 0.5
    if activation == "gelu_tanh":
        c = (2 / torch.pi) ** 0.5
        t = torch.tanh(c * (s + 0.044715 * s**3))
        return 0.5 * (1 + t) + 0.5 * s * (1 - t * t) * c * (1 + 3 * 0.044715 * s * s)
    if activation == "silu":
        sg = torch.sigmoid(s)
        return sg * (1 + s * (1 - sg))
    raise AssertionError(activation)


def reference_forward(x, weight, bias, activation: int, save_preact: bool, p: float = 0.0,
                      seed: int = 0, offset: int = 0, threshold: int = 0):
    name = ACTIVATIONS[activation]
    z = F.linear(x, weight, bias)
    a = TORCH_ACTIVATIONS[name](z)
    y = a * dropout_multiplier(a, p, seed, offset) if p > 0 else a
    return y, ((z if SAVED[name] == "preact" else a) if save_preact else None)


def reference_backward(grad_out, x, weight, saved, activation: int, need_dx, need_dw, need_db,
                       p: float = 0.0, seed: int = 0, offset: int = 0, threshold: int = 0):
    name = ACTIVATIONS[activation]
    dz = grad_out * dropout_multiplier(grad_out, p, seed, offset) if p > 0 else grad_out
    dz = dz if SAVED[name] is None else dz * _act_grad_reference(saved, name)
    return (dz @ weight if need_dx else None,
            dz.t() @ x if need_dw else None,
            dz.sum(0) if need_db else None)


# ---------------------------------------------------------------------------------------
# The cuda backend: kiln._cuda takes raw pointers, sizes and the stream.

def cuda_forward(x, weight, bias, activation: int, save_preact: bool, p: float = 0.0,
                 seed: int = 0, offset: int = 0, threshold: int = 0):
    ext = backend.cuda_extension()
    M, K, N = x.shape[0], x.shape[1], weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    preact = torch.empty_like(out) if save_preact else None
    with torch.cuda.device(x.device):
        ext.linear_act_forward(ptr(x), ptr(weight), ptr(bias), ptr(out), ptr(preact), M, N, K,
                               DTYPE_CODE[x.dtype], activation, p, seed, offset, threshold, stream(x))
    return out, preact


def cuda_backward(grad_out, x, weight, saved, activation: int, need_dx, need_dw, need_db,
                  p: float = 0.0, seed: int = 0, offset: int = 0, threshold: int = 0):
    ext = backend.cuda_extension()
    M, K, N = x.shape[0], x.shape[1], weight.shape[0]
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty((N,), dtype=x.dtype, device=x.device) if need_db else None
    with torch.cuda.device(x.device):
        ext.linear_act_backward(ptr(grad_out), ptr(x), ptr(weight), ptr(saved), ptr(dx), ptr(dw),
                                ptr(db), M, N, K, DTYPE_CODE[x.dtype], activation, p, seed, offset,
                                threshold, stream(x))
    return dx, dw, db


# ---------------------------------------------------------------------------------------
# The table of implementations: module (or this file) and the dtypes each covers.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.linear_act", "cpu": "kiln.kernels.cpu.linear_act"}


_REFERENCE = SimpleNamespace(forward=reference_forward, backward=reference_backward)
_CUDA = SimpleNamespace(forward=cuda_forward, backward=cuda_backward)


_implementation = backend.selector(OP, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA)  # of a tensor


# ---------------------------------------------------------------------------------------
# The custom ops: 2-D contiguous operands; the public function reshapes. Dropout: p in
# [0, 1) and seed_offset the int64 CPU pair [seed, offset] (None when p == 0).


def _dropout_args(p: float, seed_offset: Optional[Tensor]) -> tuple:
    """(p, seed, offset, threshold) as every form's forward / backward takes them."""
    if p == 0.0 or seed_offset is None:
        return 0.0, 0, 0, 0
    seed, offset = kiln_random.seed_offset(seed_offset)
    return p, seed, offset, kiln_random.keep_threshold(p)


def _saves_second_output(activation: str, p: float) -> bool:
    """Whether act' needs the second output (z, or act(z) before dropout) over y."""
    kind = SAVED[activation]
    return kind == "preact" or (kind == "output" and p > 0 and activation != "relu")


@torch.library.custom_op("kiln::linear_act", mutates_args=())
def _linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                save_preact: bool, p: float = 0.0, seed_offset: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor]:
    """Returns (y, s); s is empty unless save_preact: what act' reads when y cannot serve
    (z for gelu / gelu_tanh / silu; act(z) before dropout for tanh / sigmoid)."""
    forward = _implementation(x).forward
    out, preact = forward(x, weight, bias, CODE[activation], save_preact, *_dropout_args(p, seed_offset))
    return out, (preact if preact is not None else x.new_empty(0))


@_linear_act.register_fake
def _(x, weight, bias, activation, save_preact, p=0.0, seed_offset=None):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return out, (torch.empty_like(out) if save_preact else x.new_empty(0))


@torch.library.custom_op("kiln::linear_act_backward", mutates_args=())
def _linear_act_backward(grad_out: Tensor, x: Tensor, weight: Tensor, saved: Optional[Tensor],
                         activation: str, need_dx: bool, need_dw: bool, need_db: bool,
                         p: float = 0.0, seed_offset: Optional[Tensor] = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dW, db), each empty when not needed."""
    return _backward_body(grad_out, x, weight, saved, activation, need_dx, need_dw, need_db, p, seed_offset)


def _backward_body(grad_out, x, weight, saved, activation: str, need_dx, need_dw, need_db, p, seed_offset):
    backward = _implementation(x).backward
    grads = backward(grad_out, x, weight, saved, CODE[activation], need_dx, need_dw, need_db,
                     *_dropout_args(p, seed_offset))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_linear_act_backward.register_fake
def _(grad_out, x, weight, saved, activation, need_dx, need_dw, need_db, p=0.0, seed_offset=None):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(weight) if need_dw else x.new_empty(0),
            x.new_empty(weight.shape[0]) if need_db else x.new_empty(0))


def differentiable_backward(grad_out, x, weight, bias, activation: str, need_dx, need_dw, need_db,
                            p: float = 0.0, seed_offset: Optional[Tensor] = None):
    """(dx, dW, db) in differentiable PyTorch ops from the inputs, z recomputed and the
    dropout mask rebuilt from (seed, offset): the double-backward form."""
    z = F.linear(x, weight, bias)
    p, seed, offset, _ = _dropout_args(p, seed_offset)
    if p > 0:
        grad_out = grad_out * dropout_multiplier(grad_out, p, seed, offset)
    if SAVED[activation] is None:
        dz = grad_out
    else:  # act' from what _act_grad_reference takes: z, or act(z) for relu / tanh / sigmoid
        saved = z if SAVED[activation] == "preact" else TORCH_ACTIVATIONS[activation](z)
        dz = grad_out * _act_grad_reference(saved, activation)
    return (dz @ weight if need_dx else None,
            dz.t() @ x if need_dw else None,
            dz.sum(0) if need_db else None)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, _, p, seed_offset = inputs
    # the second outputs are internal (saved for backward, never returned to the caller): no
    # zero-filled gradient is made for them
    ctx.set_materialize_grads(False)
    out, preact = output
    if SAVED[activation] is None:
        saved = None
    else:
        saved = preact if _saves_second_output(activation, p) else out
    ctx.save_for_backward(x, weight, bias, saved, seed_offset)
    ctx.activation = activation
    ctx.p = p


def _backward(ctx, grad_out, grad_preact):
    if grad_out is None:  # only an internal output reached backward: nothing flows to the inputs
        return (None, None, None, None, None, None, None)
    x, weight, bias, saved, seed_offset = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and bias is not None
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        dx, dw, db = differentiable_backward(grad_out, x, weight, bias, ctx.activation,
                                             need_dx, need_dw, need_db, ctx.p, seed_offset)
    elif _cpu_eager.direct(grad_out, x, weight, saved):
        # grad mode is off here: where nothing could observe the dispatch, skip it (_cpu_eager),
        # and the op's empty placeholders for the gradients not needed with it
        return (*_implementation(x).backward(grad_out.contiguous(), x, weight, saved, CODE[ctx.activation],
                                             need_dx, need_dw, need_db, *_dropout_args(ctx.p, seed_offset)),
                None, None, None, None)
    else:
        dx, dw, db = _linear_act_backward(grad_out.contiguous(), x, weight, saved, ctx.activation,
                                          need_dx, need_dw, need_db, ctx.p, seed_offset)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None)


_linear_act_call = _cpu_eager.autograd_op(_linear_act, _backward, _setup_context)
_autocast.register("kiln::linear_act", "lower")


# ---------------------------------------------------------------------------------------
# The public op.

_PLAIN_TYPES, _EAGER_DTYPES = _cpu_eager.PLAIN_TYPES, _cpu_eager.FAST_DTYPES
_HAS_EAGER = getattr(_linear_act_call, "apply", None) is not None  # a torch with _cpu_eager's checks


class _EagerLinearAct(torch.autograd.Function):
    """The op's body and setup_context (`_linear_act`, `_setup_context`) for the call `_eager_cpu`
    takes (no dropout), in one forward with one output, and the op's own backward.

    The custom op returns a second output (z, or an empty placeholder) because an op can hand
    setup_context nothing else; here forward saves z itself, so neither the placeholder nor
    autograd's bookkeeping of a second output is paid (~5 us of a small layer's ~45 us forward).
    z is an intermediate, not an output: double backward never reads it (_backward recomputes
    z from x, weight and bias under create_graph)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, save_preact, p, seed_offset):
        out, preact = _implementation(x).forward(x, weight, bias, CODE[activation], save_preact, 0.0, 0, 0, 0)
        kind = SAVED[activation]  # as _setup_context with p = 0: z for "preact", y for "output"
        ctx.save_for_backward(x, weight, bias, None if kind is None else preact if kind == "preact" else out, None)
        ctx.activation = activation
        ctx.p = 0.0
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # _backward's direct path in its fewest steps: forward ran direct, so x, weight, bias and
        # the saved tensor are plain CPU tensors and only grad_out and the modes need a look
        if grad_out is None or torch.is_grad_enabled() or not _cpu_eager.direct(grad_out):
            return _backward(ctx, grad_out, None)
        x, weight, bias, saved, _ = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        return (*_implementation(x).backward(grad_out.contiguous(), x, weight, saved, CODE[ctx.activation],
                                             need_dx, need_dw, need_db and bias is not None, 0.0, 0, 0, 0),
                None, None, None, None)


# Function.apply's C form, as _cpu_eager.autograd_op takes it (its Python wrapper costs ~10 us)
_c_apply = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
_EAGER_APPLY = _c_apply.__get__(None, _EagerLinearAct) if _c_apply is not None else _EagerLinearAct.apply


def _eager_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Optional[Tensor]:
    """The common call of eager CPU training, without dropout, in its fewest steps, or None
    where it is not that call and linear_act's checks must run.

    At the sizes of a small model every step of the general path counts: its checks,
    reshapes and dispatch came to ~75 us a call against 7 us for F.linear (a digits MLP's
    step, 3 layers, at 0.45x torch's speed). Here: x (2-D or 3-D), weight and bias
    contiguous float32 / float64 CPU tensors of one dtype with matching shapes, a known
    activation, nothing that `_cpu_eager.direct` rules out; then the kernels of the selected
    backend run on them directly (no gradient needed) or under `_EagerLinearAct`. Anything
    else returns None.
    """
    code = CODE.get(activation) if _HAS_EAGER and activation.__class__ is str else None
    if code is None:
        return None
    dtype, dims = x.dtype, x.dim()
    # size(i), not shape[i]: no torch.Size built
    if (dtype not in _EAGER_DTYPES or weight.dtype != dtype or weight.dim() != 2
            or not 2 <= dims <= 3 or x.size(-1) != weight.size(1) or not x.is_contiguous()
            or not weight.is_contiguous() or x.numel() == 0 or weight.numel() == 0):
        return None
    if bias is not None and (bias.dtype != dtype or bias.dim() != 1 or bias.size(0) != weight.size(0)
                             or not bias.is_contiguous()):
        return None
    if not _cpu_eager.direct(x, weight, bias):
        return None
    x2 = x if dims == 2 else x.view(-1, x.size(-1))
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        # the op's body, less its empty second output: inference never saves z
        out = _implementation(x2).forward(x2, weight, bias, code, False, 0.0, 0, 0, 0)[0]
    else:
        out = _EAGER_APPLY(x2, weight, bias, activation, SAVED[activation] == "preact", 0.0, None)
    return out if dims == 2 else out.view(*x.shape[:-1], weight.size(0))


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               activation: str = "relu", *, dropout: float = 0.0) -> Tensor:
    """act(x @ weight.T + bias) for x (..., in), weight (out, in), bias (out,) or None.

    activation: one of identity, relu, gelu (erf), gelu_tanh, tanh, sigmoid, silu.
    dropout: p in [0, 1]; when p > 0 each output element is zeroed with probability p
    and the rest scaled by 1 / (1 - p) (inverted dropout, applied whenever p > 0: the
    caller decides training vs eval, as kiln.nn.Linear does from its training flag).
    p == 1 gives zeros (act(...) * 0), as torch's dropout.
    """
    if (dropout.__class__ in (float, int) and dropout == 0 and x.__class__ in _PLAIN_TYPES
            and weight.__class__ in _PLAIN_TYPES and (bias is None or bias.__class__ in _PLAIN_TYPES)):
        out = _eager_cpu(x, weight, bias, activation)
        if out is not None:
            return out
    p = check_probability(OP, dropout)
    if activation not in CODE:
        raise ValueError(f"linear_act: unknown activation {activation!r}; "
                         f"expected one of {', '.join(ACTIVATIONS)}")
    check_floating(OP, x=x, weight=weight)
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        # as F.linear in an autocast region: every operand in the region's dtype (float64 kept),
        # so a low-precision activation may meet a float32 weight, as in any torch model
        region = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(region) if t is not None and t.dtype != torch.float64 else t
                           for t in (x, weight, bias))
    check_same_device_dtype(OP, x=x, weight=weight, bias=bias)
    if weight.dim() != 2:
        raise ValueError(f"linear_act: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_act: x's last dim must equal weight's in dim: "
                         f"x {tuple(x.shape)} vs weight {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"linear_act: bias must have shape ({weight.shape[0]},) to match weight "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    if x.numel() == 0 or weight.numel() == 0:  # a zero batch, in or out size: no kernel
        out = TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))
        return out * 0.0 if p == 1.0 else out
    if p == 1.0:  # torch's dropout(p=1): input * 0 (zero gradients, NaN kept)
        return linear_act(x, weight, bias, activation) * 0.0
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    # Inference (no grad wanted) never writes z, even for the activations that save it.
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    seed_offset = kiln_random.next_seed_offset(x2.shape[0] * weight.shape[0]) if p > 0 else None
    out, _ = _linear_act_call(x2, weight.contiguous(), None if bias is None else bias.contiguous(),
                         activation, wants_grad and _saves_second_output(activation, p), p, seed_offset)
    return out.reshape(*lead, weight.shape[0])
