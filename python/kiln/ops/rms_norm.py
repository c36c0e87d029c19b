"""rms_norm: y = x / sqrt(mean(x^2) + eps) * (offset + weight) over the trailing dims, as
torch.nn.functional.rms_norm (offset = 0); Gemma's norm is offset = 1.

Forward reads each row once for mean(x^2) and once more, still on chip or in cache, to
write y. Backward writes dx in one pass per row,
    dx = rstd * (g - xhat mean(g xhat)),   xhat = x rstd,   g = dy (offset + weight),
and dweight = sum_rows dy xhat from per-block partial sums that a second step adds up in
a fixed order (deterministic, no atomics), as layer_norm.

Precision. Every form computes in float32 (float64 for float64 x) and rounds once, at the
end: torch's rms_norm (opmath: x, rstd and the product with weight in float32) and
Liger-Kernel's "gemma" casting mode. Liger's "llama" mode, HF's LlamaRMSNorm, rounds x rstd
to the storage dtype before the weight multiply: one more bfloat16 rounding, which kiln
does not reproduce (its outputs stay within the bf16 bound of both). eps=None is torch's
default, the machine epsilon of the computation dtype (float32's for float16 / bfloat16
input, as torch's opmath kernel uses it).

Saved for backward: x, weight and per row rstd (float32; float64 for float64 input).
Autocast: torch's CPU autocast leaves F.rms_norm in the input dtype (neither in its lower
nor its fp32 list; checked on torch 2.13: float32 in, float32 out; bfloat16 in, bfloat16
out), so no rule is registered: kiln follows.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from kiln import backend

from . import _cpu_eager
from ._checks import check_floating, check_same_device_dtype
from ._cuda_launch import DTYPE_CODE, ptr, stream

OP = "rms_norm"


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_eps(dtype: torch.dtype) -> float:
    """torch's eps=None: the epsilon of the dtype rms_norm computes in."""
    return torch.finfo(_stats_dtype(dtype)).eps


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference, in float64.


def reference_forward(x, weight, eps: float, offset: float):
    xd = x.double()
    rstd = torch.rsqrt(xd.square().mean(-1) + eps)
    y = xd * rstd[:, None]
    if weight is not None:
        y = y * (offset + weight.double())
    return y.to(x.dtype), rstd.to(_stats_dtype(x.dtype))


def reference_backward(dy, x, weight, rstd, offset: float, need_dx: bool, need_dw: bool):
    dyd, rstd = dy.double(), rstd.double()[:, None]
    xhat = x.double() * rstd
    g = dyd * (offset + weight.double()) if weight is not None else dyd
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return (dx.to(x.dtype) if need_dx else None,
            (dyd * xhat).sum(0).to(x.dtype) if need_dw else None)


# ---------------------------------------------------------------------------------------
# The cuda backend.


def cuda_forward(x, weight, eps: float, offset: float):
    ext = backend.cuda_extension()
    M, N = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        ext.rms_norm_forward(ptr(x), ptr(weight), ptr(y), ptr(rstd), M, N, float(eps), float(offset),
                             DTYPE_CODE[x.dtype], stream(x))
    return y, rstd


def cuda_backward(dy, x, weight, rstd, offset: float, need_dx: bool, need_dw: bool):
    ext = backend.cuda_extension()
    M, N = x.shape
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty(N, dtype=x.dtype, device=x.device) if need_dw else None
    workspace = torch.empty(ext.rms_norm_backward_workspace(M, N) if need_dw else 0,
                            dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        ext.rms_norm_backward(ptr(dy), ptr(x), ptr(weight), ptr(rstd), ptr(dx), ptr(dw),
                              ptr(workspace) if need_dw else 0, M, N, float(offset),
                              DTYPE_CODE[x.dtype], stream(x))
    return dx, dw


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.rms_norm", "cpu": "kiln.kernels.cpu.rms_norm"}

_REFERENCE = SimpleNamespace(forward=reference_forward, backward=reference_backward)
_CUDA = SimpleNamespace(forward=cuda_forward, backward=cuda_backward)


def _implementation(t: Tensor):
    return backend.implementation(OP, t, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA)


# ---------------------------------------------------------------------------------------
# The custom ops: x is (M, N) contiguous; the public function flattens.


@torch.library.custom_op("kiln::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, offset: float) -> tuple[Tensor, Tensor]:
    """Returns (y, rstd)."""
    return _implementation(x).forward(x, weight, eps, offset)


@_rms_norm.register_fake
def _(x, weight, eps, offset):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=_stats_dtype(x.dtype))


@torch.library.custom_op("kiln::rms_norm_backward", mutates_args=())
def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, offset: float,
                       need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    """Returns (dx, dweight), each empty when not needed."""
    return _backward_body(dy, x, weight, rstd, offset, need_dx, need_dw)


def _backward_body(dy, x, weight, rstd, offset: float, need_dx: bool, need_dw: bool):
    grads = _implementation(x).backward(dy, x, weight, rstd, offset, need_dx, need_dw)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_rms_norm_backward.register_fake
def _(dy, x, weight, rstd, offset, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            x.new_empty(x.shape[1]) if need_dw else x.new_empty(0))


def _differentiable_backward(dy, x, weight, eps: float, offset: float):
    """(dx, dweight) from the inputs alone with torch ops, for double backward: rstd is an
    output without a gradient, so it is recomputed here, never taken from the forward."""
    acc = _stats_dtype(x.dtype)
    xa, dya = x.to(acc), dy.to(acc)
    rstd = torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps)
    xhat = xa * rstd
    g = dya * (offset + weight.to(acc)) if weight is not None else dya
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (dya * xhat).sum(0) if weight is not None else None
    return dx.to(x.dtype), None if dw is None else dw.to(x.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps, ctx.offset = eps, offset


def _backward(ctx, dy, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    need_dw = need_dw and weight is not None
    if torch.is_grad_enabled():  # autograd records this backward: double backward
        dx, dw = _differentiable_backward(dy, x, weight, ctx.eps, ctx.offset)
    else:
        backward = _backward_body if _cpu_eager.direct(dy, x, weight) else _rms_norm_backward
        dx, dw = backward(dy.contiguous(), x, weight, rstd, ctx.offset, need_dx, need_dw)
    return (dx if need_dx else None, dw if need_dw else None, None, None)


_rms_norm_call = _cpu_eager.autograd_op(_rms_norm, _backward, _setup_context)


# ---------------------------------------------------------------------------------------
# The public op.


def _shape_tuple(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(d) for d in normalized_shape)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None, offset: float = 0.0,
             normalized_shape: Union[int, Sequence[int], None] = None) -> Tensor:
    """RMS normalization of x over the trailing dims: ``x / sqrt(mean(x^2) + eps) * (offset +
    weight)``; torch.nn.functional.rms_norm for offset 0, Gemma's RMSNorm for offset 1.

    normalized_shape defaults to weight's shape (x's last dim without a weight); weight None:
    no scale (offset is then unused). eps None: torch's default, finfo(float32).eps for
    float32 / float16 / bfloat16 x and finfo(float64).eps for float64.
    """
    check_floating(OP, x=x)
    check_same_device_dtype(OP, x=x, weight=weight)
    if normalized_shape is None:
        shape = tuple(weight.shape) if weight is not None else tuple(x.shape[-1:])
    else:
        shape = _shape_tuple(normalized_shape)
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"{OP}: normalized_shape must be one or more sizes >= 0, got {normalized_shape}")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{OP}: x's trailing dims must equal normalized_shape: x {tuple(x.shape)} "
                         f"vs normalized_shape {shape}")
    if weight is not None and tuple(weight.shape) != shape:
        raise ValueError(f"{OP}: weight must have shape normalized_shape {shape}, got {tuple(weight.shape)}")
    eps = default_eps(x.dtype) if eps is None else eps
    if not eps >= 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")
    N = math.prod(shape)
    if x.numel() == 0:  # no rows or no columns: torch's empty result, and empty gradients
        return x * weight if weight is not None else x.clone()
    rows = x.reshape(-1, N).contiguous()
    w = None if weight is None else weight.reshape(N).contiguous()
    y, _ = _rms_norm_call(rows, w, float(eps), float(offset))
    return y.reshape(x.shape)
