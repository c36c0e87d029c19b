"""layer_norm: y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing dims
(the notes, section 14.5), as torch.nn.functional.layer_norm.

Forward reads each row once for its statistics (the mean, then the biased variance
about it: never E[x^2] - E[x]^2) and once more, still on chip or in cache, to write y.
Backward writes dx in one pass per row,
    dx = rstd * (w dy - xhat mean(w dy xhat) - mean(w dy)),   xhat = (x - mean) rstd,
and dweight = sum_rows dy xhat, dbias = sum_rows dy from per-block partial sums that a
second step adds up in a fixed order (deterministic, no atomics).

Saved for backward: x, weight, and per row the mean and rstd. The mean is float64 for
every input dtype: a row near 1e4 with std 1e-2 has its mean rounded by ulp(1e4)/2 =
5e-4 in float32, 5% of the std, and every xhat with it (torch's float32 layer_norm is off
by 5e-2 there). The kernels use it as two float32 parts hi + lo, (x - hi) - lo, so the
per-element arithmetic stays in the storage precision. rstd is float32 (float64 for
float64 input).

Double backward (a backward recorded with create_graph=True) runs differentiable PyTorch
ops from x and weight, the mean and rstd recomputed (the saved ones are outputs without a
gradient). Mixed precision as torch's: a float16 / bfloat16 x takes float32 weight and bias
(cast to x's dtype inside the op; their gradients come back float32). Autocast: torch runs
layer_norm in float32 under CUDA autocast and leaves it alone under CPU autocast (there a
bfloat16 x with float32 parameters is the mixed case above); kiln::layer_norm does the same.
An empty x has no arithmetic: torch's own op gives its output and (zero) gradients.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln import backend

from . import _autocast, _cpu_eager
from ._checks import check_floating, check_parameters
from ._cuda_launch import DTYPE_CODE, ptr, stream

OP = "layer_norm"


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference, in float64.


def reference_forward(x, weight, bias, eps: float):
    xd = x.double()
    mean = xd.mean(-1)
    rstd = torch.rsqrt(xd.var(-1, correction=0) + eps)
    y = (xd - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype), mean, rstd.to(_stats_dtype(x.dtype))


def reference_backward(dy, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    dyd, rstd = dy.double(), rstd.double()[:, None]
    xhat = (x.double() - mean.double()[:, None]) * rstd
    wdy = dyd * weight.double() if weight is not None else dyd
    dx = rstd * (wdy - xhat * (wdy * xhat).mean(-1, keepdim=True) - wdy.mean(-1, keepdim=True))
    return (dx.to(x.dtype) if need_dx else None,
            (dyd * xhat).sum(0).to(x.dtype) if need_dw else None,
            dyd.sum(0).to(x.dtype) if need_db else None)


# ---------------------------------------------------------------------------------------
# The cuda backend.


def cuda_forward(x, weight, bias, eps: float):
    ext = backend.cuda_extension()
    M, N = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(M, dtype=torch.float64, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        ext.layer_norm_forward(ptr(x), ptr(weight), ptr(bias), ptr(y), ptr(mean), ptr(rstd), M, N,
                               float(eps), DTYPE_CODE[x.dtype], stream(x))
    return y, mean, rstd


def cuda_backward(dy, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    ext = backend.cuda_extension()
    M, N = x.shape
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty(N, dtype=x.dtype, device=x.device) if need_dw else None
    db = torch.empty(N, dtype=x.dtype, device=x.device) if need_db else None
    workspace = torch.empty(ext.layer_norm_backward_workspace(M, N), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        ext.layer_norm_backward(ptr(dy), ptr(x), ptr(weight), ptr(mean), ptr(rstd), ptr(dx), ptr(dw),
                                ptr(db), ptr(workspace), M, N, DTYPE_CODE[x.dtype], stream(x))
    return dx, dw, db


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.layer_norm", "cpu": "kiln.kernels.cpu.layer_norm"}


_REFERENCE = SimpleNamespace(forward=reference_forward, backward=reference_backward)
_CUDA = SimpleNamespace(forward=cuda_forward, backward=cuda_backward)


def _implementation(t: Tensor):
    return backend.implementation(OP, t, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA)


# ---------------------------------------------------------------------------------------
# The custom ops: x is (M, N) contiguous; the public function flattens.


@torch.library.custom_op("kiln::layer_norm", mutates_args=())
def _layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean (float64), rstd). weight and bias may be float32 for a half-precision x."""
    return _implementation(x).forward(x, _as_dtype(weight, x.dtype), _as_dtype(bias, x.dtype), eps)


@_layer_norm.register_fake
def _(x, weight, bias, eps):
    M = x.shape[0]
    return (torch.empty_like(x), x.new_empty(M, dtype=torch.float64),
            x.new_empty(M, dtype=_stats_dtype(x.dtype)))


@torch.library.custom_op("kiln::layer_norm_backward", mutates_args=())
def _layer_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                         need_dx: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias) in x's dtype, each empty when not needed."""
    return _backward_body(dy, x, weight, mean, rstd, need_dx, need_dw, need_db)


def _backward_body(dy, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    grads = _implementation(x).backward(dy, x, _as_dtype(weight, x.dtype), mean, rstd, need_dx, need_dw,
                                        need_db)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd, need_dx, need_dw, need_db):
    N = x.shape[1]
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            x.new_empty(N) if need_dw else x.new_empty(0),
            x.new_empty(N) if need_db else x.new_empty(0))


def _as_dtype(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    # the dtype test first: Tensor.to costs ~1 us even when it returns t itself
    return t if t is None or t.dtype == dtype else t.to(dtype)


def differentiable_backward(dy, x, weight, eps: float, need_dx: bool, need_dw: bool, need_db: bool):
    """(dx, dweight, dbias) in differentiable PyTorch ops from x and weight, the mean and
    rstd recomputed (float32 arithmetic for half-precision input): the double-backward form."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xc, dyc = x.to(compute), dy.to(compute)
    centered = xc - xc.mean(-1, keepdim=True)
    rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    xhat = centered * rstd
    wdy = dyc * weight.to(compute) if weight is not None else dyc
    dx = dw = db = None
    if need_dx:
        dx = (rstd * (wdy - xhat * (wdy * xhat).mean(-1, keepdim=True) - wdy.mean(-1, keepdim=True))
              ).to(x.dtype)
    if need_dw:
        dw = (dyc * xhat).sum(0)
    if need_db:
        db = dyc.sum(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    # the second outputs are internal (saved for backward, never returned to the caller): no
    # zero-filled gradient is made for them
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.eps = eps


def _backward(ctx, dy, grad_mean, grad_rstd):
    if dy is None:  # only an internal output reached backward: nothing flows to the inputs
        return (None, None, None, None)
    x, weight, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_dw = need_dw and weight is not None
    need_db = need_db and ctx.bias_dtype is not None
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        dx, dw, db = differentiable_backward(dy, x, weight, ctx.eps, need_dx, need_dw, need_db)
    else:
        args = (dy.contiguous(), x, weight, mean, rstd, need_dx, need_dw, need_db)
        backward = _backward_body if _cpu_eager.direct(dy, x, weight) else _layer_norm_backward
        dx, dw, db = backward(*args)
    return (dx if need_dx else None, dw.to(weight.dtype) if need_dw else None,
            db.to(ctx.bias_dtype) if need_db else None, None)


_layer_norm_call = _cpu_eager.autograd_op(_layer_norm, _backward, _setup_context)
# torch's policy: float32 under CUDA autocast; CPU autocast leaves layer_norm alone.
_autocast.register("kiln::layer_norm", "fp32", device_types=("cuda",))


# ---------------------------------------------------------------------------------------
# The public op.


def _shape_tuple(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(d) for d in normalized_shape)


_PLAIN_TYPES, _EAGER_DTYPES = _cpu_eager.PLAIN_TYPES, _cpu_eager.FAST_DTYPES
_EAGER_BODY = getattr(_layer_norm_call, "body", None)
_EAGER_APPLY = getattr(_layer_norm_call, "apply", None)


class _CpuKernelsFunction(torch.autograd.Function):
    """The eager call's autograd node when the cpu kernels run it: what `_layer_norm_call`'s
    autograd.Function does, in fewer steps. One output (y: the statistics stay in ctx, so
    the engine tracks one output, not three), the kernel module chosen at forward (the
    backward runs the same backend's kernels), and the numpy arrays forward made kept for
    the backward kernel (each Tensor.numpy costs ~1 us). x and weight are still saved as
    tensors: their version counters catch an in-place change before backward as torch does.
    At the charlm rows (3072 x 128) this was ~100 us of the backward's ~370 us on one
    loaded core (bench/results/layer_norm_cpu_issue14_session8.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernels):
        y, x_np, w_np, mean, rstd = kernels.forward_arrays(x, weight, bias, eps)
        ctx.save_for_backward(x, weight)
        ctx.arrays = (x_np, w_np, mean, rstd)
        ctx.kernels, ctx.eps, ctx.has_bias = kernels, eps, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors  # unpacking checks the versions
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_dw = need_dw and weight is not None
        need_db = need_db and ctx.has_bias
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            dx, dw, db = differentiable_backward(dy, x, weight, ctx.eps, need_dx, need_dw, need_db)
        elif _cpu_eager.direct(dy):
            dx, dw, db = ctx.kernels.backward_arrays(dy.contiguous(), *ctx.arrays, need_dx, need_dw, need_db)
        else:  # a mode that must see the custom op (a profiler, a dispatch mode) came on since forward
            x_np, w_np, mean, rstd = ctx.arrays
            dx, dw, db = _layer_norm_backward(dy.contiguous(), x, weight, torch.from_numpy(mean),
                                              torch.from_numpy(rstd), need_dx, need_dw, need_db)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None)


# The C apply (see _cpu_eager.autograd_op: Function.apply's Python wrapper costs ~10 us).
_c_apply = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
_CPU_KERNELS_APPLY = (_c_apply.__get__(None, _CpuKernelsFunction) if _c_apply is not None
                      else _CpuKernelsFunction.apply)


def _eager_cpu(x: Tensor, normalized_shape, weight: Optional[Tensor], bias: Optional[Tensor],
               eps) -> Optional[Tensor]:
    """The common call of eager CPU training in its fewest steps, or None where it is not that
    call and layer_norm's checks must run: one normalized dim, x contiguous float32 / float64,
    weight and bias None or contiguous vectors of that size and dtype, nothing that
    `_cpu_eager.direct` rules out. The general path's checks and reshapes cost ~15 us a call
    against 5 us for torch's whole layer_norm of a small model's rows."""
    if _EAGER_BODY is None or eps.__class__ is not float or not eps >= 0:
        return None
    N = normalized_shape if normalized_shape.__class__ is int else \
        (normalized_shape[0] if len(normalized_shape) == 1 else -1)
    dtype = x.dtype
    if (x.__class__ not in _PLAIN_TYPES or dtype not in _EAGER_DTYPES or x.dim() < 1 or x.shape[-1] != N
            or not x.is_contiguous() or x.numel() == 0):
        return None
    for t in (weight, bias):
        if t is not None and (t.__class__ not in _PLAIN_TYPES or t.dtype != dtype or t.dim() != 1
                              or t.shape[0] != N or not t.is_contiguous()):
            return None
    if not _cpu_eager.direct(x, weight, bias):
        return None
    rows = x if x.dim() == 2 else x.view(-1, N)
    kernels = _implementation(rows)
    if getattr(kernels, "forward_arrays", None) is None:  # another backend: the op's own body
        call = _EAGER_BODY if _cpu_eager.no_grad_needed(x, weight, bias) else _EAGER_APPLY
        y = call(rows, weight, bias, eps)[0]
    elif _cpu_eager.no_grad_needed(x, weight, bias):
        y = kernels.forward_arrays(rows, weight, bias, eps)[0]
    else:
        y = _CPU_KERNELS_APPLY(rows, weight, bias, eps, kernels)
    return y if rows is x else y.view_as(x)


def layer_norm(x: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims of x, as
    ``torch.nn.functional.layer_norm``; weight and bias have shape ``normalized_shape``."""
    if x.__class__ in _PLAIN_TYPES:
        y = _eager_cpu(x, normalized_shape, weight, bias, eps)
        if y is not None:
            return y
    check_floating(OP, x=x)
    check_parameters(OP, x, weight=weight, bias=bias)
    shape = _shape_tuple(normalized_shape)
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"{OP}: normalized_shape must be one or more sizes >= 0, got {normalized_shape}")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{OP}: x's trailing dims must equal normalized_shape: x {tuple(x.shape)} "
                         f"vs normalized_shape {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{OP}: {name} must have shape normalized_shape {shape}, got "
                             f"{tuple(t.shape)} (x {tuple(x.shape)})")
    if not eps >= 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")
    if x.numel() == 0:  # nothing to normalize: torch's op, for its zero parameter gradients
        return F.layer_norm(x, shape, weight, bias, eps)
    N = math.prod(shape)
    rows = _matrix(x, N)
    y, _, _ = _layer_norm_call(rows, _vector(weight, N), _vector(bias, N), float(eps))
    return y if rows is x else y.view_as(x)  # view(torch.Size) costs 3x view_as


# Each torch call costs ~1 us from Python, a fifth of torch's whole layer_norm at small
# sizes: the common 2-D contiguous x and 1-D parameters pass as they are.


def _matrix(x: Tensor, N: int) -> Tensor:
    if x.dim() == 2 and x.shape[1] == N and x.is_contiguous():
        return x
    return x.reshape(-1, N).contiguous()


def _vector(t: Optional[Tensor], N: int) -> Optional[Tensor]:
    if t is None or (t.dim() == 1 and t.is_contiguous()):
        return t
    return t.reshape(N).contiguous()
