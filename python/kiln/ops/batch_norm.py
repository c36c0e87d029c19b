"""batch_norm: per-channel normalization over the batch (the notes, section 14.5), as
torch.nn.functional.batch_norm for (N, C), (N, C, L) and (N, C, H, W) inputs.

The kernels see x as (N, C, L) contiguous (a channels-last input is copied once).
Training: per-channel mean and biased variance over the N * L values (exact two-pass
statistics, parallel over (n, c) slices or blocks, partials added in a fixed order),
then one pass y = (x - mean) * invstd * w + b; the running statistics are updated
as PyTorch does, with the unbiased variance, by the public function (C values, plain
torch ops). Eval: the running statistics normalize, no reduction at all.

Backward, training: per channel sum(dy) and sum(dy xhat), then
    dx = w invstd (dy - sum(dy)/n - xhat sum(dy xhat)/n),
dweight = sum(dy xhat), dbias = sum(dy); eval: dx = w invstd dy.

Saved for backward: x, weight, and per channel the mean (float64, for the reason in
layer_norm.py) and invstd (float32; float64 for float64 input).

Double backward (a backward recorded with create_graph=True) runs differentiable PyTorch
ops from x and weight; in training the batch mean and invstd are recomputed from x (the
saved ones are outputs without a gradient), in eval they are the running statistics,
constants. Mixed precision as torch's: a float16 / bfloat16 x takes float32 weight, bias
and running statistics (the output keeps x's dtype, the parameter gradients are float32).
Autocast: torch's policy lists batch_norm for neither CPU nor CUDA (it runs in x's dtype,
mixed precision included), so kiln::batch_norm has no autocast rule either. An empty x has
no arithmetic: torch's own op gives its output, gradients and (untouched) running statistics.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln import backend

from . import _cpu_eager
from ._checks import check_floating, check_parameters
from ._cuda_launch import DTYPE_CODE, ptr, stream

OP = "batch_norm"


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference, in float64.


def reference_stats(x):
    xd = x.double()
    return xd.mean((0, 2)), xd.var((0, 2), correction=0).to(_stats_dtype(x.dtype))


def reference_apply(x, mean, invstd, weight, bias):
    y = (x.double() - mean.double()[:, None]) * invstd.double()[:, None]
    if weight is not None:
        y = y * weight.double()[:, None]
    if bias is not None:
        y = y + bias.double()[:, None]
    return y.to(x.dtype)


def reference_backward(dy, x, mean, invstd, weight, training: bool, need_dx, need_dw, need_db):
    dyd, invstd = dy.double(), invstd.double()[:, None]
    xhat = (x.double() - mean.double()[:, None]) * invstd
    scale = invstd * (weight.double()[:, None] if weight is not None else 1.0)
    dx = None
    if need_dx:
        dx = dyd
        if training:
            dx = dx - dyd.mean((0, 2), keepdim=True) - xhat * (dyd * xhat).mean((0, 2), keepdim=True)
        dx = (scale * dx).to(x.dtype)
    return (dx, (dyd * xhat).sum((0, 2)).to(x.dtype) if need_dw else None,
            dyd.sum((0, 2)).to(x.dtype) if need_db else None)


# ---------------------------------------------------------------------------------------
# The cuda backend.


def _workspace(size: int, device):
    return torch.empty(size, dtype=torch.float32, device=device)


def cuda_stats(x):
    ext = backend.cuda_extension()
    N, C, L = x.shape
    mean = torch.empty(C, dtype=torch.float64, device=x.device)
    var = torch.empty(C, dtype=torch.float32, device=x.device)
    workspace = _workspace(ext.batch_norm_stats_workspace(N, C, L), x.device)
    with torch.cuda.device(x.device):
        ext.batch_norm_stats(ptr(x), ptr(mean), ptr(var), ptr(workspace), N, C, L,
                             DTYPE_CODE[x.dtype], stream(x))
    return mean, var


def cuda_apply(x, mean, invstd, weight, bias):
    ext = backend.cuda_extension()
    N, C, L = x.shape
    y = torch.empty_like(x)
    with torch.cuda.device(x.device):
        ext.batch_norm_apply(ptr(x), ptr(mean), ptr(invstd), ptr(weight), ptr(bias), ptr(y), N, C, L,
                             DTYPE_CODE[x.dtype], stream(x))
    return y


def cuda_backward(dy, x, mean, invstd, weight, training: bool, need_dx, need_dw, need_db):
    ext = backend.cuda_extension()
    N, C, L = x.shape
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty(C, dtype=x.dtype, device=x.device) if need_dw else None
    db = torch.empty(C, dtype=x.dtype, device=x.device) if need_db else None
    workspace = _workspace(ext.batch_norm_backward_workspace(N, C, L), x.device)
    with torch.cuda.device(x.device):
        ext.batch_norm_backward(ptr(dy), ptr(x), ptr(mean), ptr(invstd), ptr(weight), ptr(dx), ptr(dw),
                                ptr(db), ptr(workspace), N, C, L, int(training), DTYPE_CODE[x.dtype],
                                stream(x))
    return dx, dw, db


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.batch_norm", "cpu": "kiln.kernels.cpu.batch_norm"}
_REFERENCE = SimpleNamespace(stats=reference_stats, apply=reference_apply, backward=reference_backward)
_CUDA = SimpleNamespace(stats=cuda_stats, apply=cuda_apply, backward=cuda_backward)


def _implementation(t: Tensor):
    return backend.implementation(OP, t, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA)


# ---------------------------------------------------------------------------------------
# The custom ops: x is (N, C, L) contiguous.


@torch.library.custom_op("kiln::batch_norm", mutates_args=())
def _batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, mean (float64), invstd, biased batch variance (empty in eval)). weight and
    bias may be float32 for a half-precision x."""
    kernels = _implementation(x)
    weight, bias = _as_dtype(weight, x.dtype), _as_dtype(bias, x.dtype)
    if training:
        mean, var = kernels.stats(x)
    else:
        mean = running_mean.to(torch.float64, copy=True)  # never the input itself: outputs may not alias
        var = x.new_empty(0, dtype=_stats_dtype(x.dtype))
    source_var = var if training else running_var.to(_stats_dtype(x.dtype))
    invstd = torch.rsqrt(source_var + eps)
    return kernels.apply(x, mean, invstd, weight, bias), mean, invstd, var


@_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps):
    C, stats = x.shape[1], _stats_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty(C, dtype=torch.float64), x.new_empty(C, dtype=stats),
            x.new_empty(C if training else 0, dtype=stats))


@torch.library.custom_op("kiln::batch_norm_backward", mutates_args=())
def _batch_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                         training: bool, need_dx: bool, need_dw: bool, need_db: bool
                         ) -> tuple[Tensor, Tensor, Tensor]:
    grads = _implementation(x).backward(dy, x, mean, invstd, _as_dtype(weight, x.dtype), training,
                                        need_dx, need_dw, need_db)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_batch_norm_backward.register_fake
def _(dy, x, weight, mean, invstd, training, need_dx, need_dw, need_db):
    C = x.shape[1]
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            x.new_empty(C) if need_dw else x.new_empty(0),
            x.new_empty(C) if need_db else x.new_empty(0))


def _as_dtype(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    # the dtype test first: Tensor.to costs ~1 us even when it returns t itself
    return t if t is None or t.dtype == dtype else t.to(dtype)


def differentiable_backward(dy, x, weight, mean, invstd, training: bool, eps: float,
                            need_dx: bool, need_dw: bool, need_db: bool):
    """(dx, dweight, dbias) in differentiable PyTorch ops from x (N, C, L) and weight: the
    double-backward form. Training recomputes the batch statistics from x; eval's mean and
    invstd (from the running statistics) are constants."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xc, dyc = x.to(compute), dy.to(compute)
    if training:
        centered = xc - xc.mean((0, 2), keepdim=True)
        invstd = torch.rsqrt((centered * centered).mean((0, 2), keepdim=True) + eps)
    else:
        centered = xc - mean.detach().to(compute)[:, None]
        invstd = invstd.detach().to(compute)[:, None]
    xhat = centered * invstd
    dx = dw = db = None
    if need_dx:
        scale = invstd * weight.to(compute)[:, None] if weight is not None else invstd
        g = dyc
        if training:
            g = g - dyc.mean((0, 2), keepdim=True) - xhat * (dyc * xhat).mean((0, 2), keepdim=True)
        dx = (scale * g).to(x.dtype)
    if need_dw:
        dw = (dyc * xhat).sum((0, 2))
    if need_db:
        db = dyc.sum((0, 2))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, eps = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.training, ctx.eps = training, eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, grad_mean, grad_invstd, grad_var):
    x, weight, mean, invstd = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_dw = need_dw and weight is not None
    need_db = need_db and ctx.bias_dtype is not None
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        dx, dw, db = differentiable_backward(dy, x, weight, mean, invstd, ctx.training, ctx.eps,
                                             need_dx, need_dw, need_db)
    else:
        dx, dw, db = _batch_norm_backward(dy.contiguous(), x, weight, mean, invstd, ctx.training,
                                          need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw.to(weight.dtype) if need_dw else None,
            db.to(ctx.bias_dtype) if need_db else None, None, None, None, None)


_batch_norm_call = _cpu_eager.autograd_op(_batch_norm, _backward, _setup_context)


# ---------------------------------------------------------------------------------------
# The public op.


def batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalization of x (N, C, *) over every dim but C, as
    ``torch.nn.functional.batch_norm``. In training, running_mean / running_var (when
    given) are updated in place: r <- (1 - momentum) r + momentum * batch statistic, with
    the unbiased batch variance; in eval they normalize x."""
    check_floating(OP, x=x)
    check_parameters(OP, x, weight=weight, bias=bias, running_mean=running_mean,
                     running_var=running_var)
    if x.dim() < 2:
        raise ValueError(f"{OP}: x must be (N, C, *) with at least 2 dims, got {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{OP}: {name} must have shape ({C},) for x {tuple(x.shape)} with "
                             f"{C} channels, got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: give both running_mean and running_var, or neither")
    values_per_channel = N * math.prod(x.shape[2:])  # as torch counts them, C = 0 included
    if training and values_per_channel == 1:
        raise ValueError(f"{OP}: training needs more than 1 value per channel to estimate a "
                         f"variance, got x of shape {tuple(x.shape)}")
    if x.numel() == 0:  # nothing to normalize: torch's op (its gradients, no running update)
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if not training and running_mean is None:
        raise ValueError(f"{OP}: eval mode (training=False) normalizes with running_mean and "
                         f"running_var, which are None")
    if not eps >= 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")
    x3 = x.reshape(N, C, -1).contiguous()
    y, mean, _, var = _batch_norm_call(x3, weight, bias, running_mean, running_var, training, float(eps))
    if training and running_mean is not None:
        n = values_per_channel
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
    return y.reshape(x.shape)
