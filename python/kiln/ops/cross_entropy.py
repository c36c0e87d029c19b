"""The numerically stable softmax family (notes 2.5 and 12): softmax, log_softmax, cross_entropy.

Every kernel gets a row's max and log-sum-exp in one online pass, so |x| ~ 1e4 is safe.

* softmax / log_softmax save their output y only: softmax' needs y, and log_softmax'
  needs exp(y) = softmax.
* cross_entropy saves the logits, the targets and two float32 statistics per row
  (float64 for float64 logits): the max m and l = log(sum(exp(x - m))). Not their sum
  lse = m + l: rounded to float32 near |x| ~ 1e4 it would be off by ~ulp(1e4) = 1e-3, and
  so would every probability. Backward rebuilds p = exp((x - m) - l) and writes
  dlogits = g (p - onehot) (with class weights and label smoothing) in one pass, never
  storing the (N, C) probabilities. The custom op returns the loss per row; the
  reduction (sum, or the weighted mean) is plain torch on N values, so its gradient
  reaches the kernel as the per-row g.
* Class-probability targets q (a float target of the input's shape, as torch tells them
  apart) are their own custom op, kiln::cross_entropy_soft, in every backend: with torch's
  mixing u = w ((1 - eps) q + eps / C), loss = sum_c u_c ((m - x_c) + l) and dlogits =
  g (p sum_c u_c - u). It saves the same statistics. The target's gradient, when the target
  requires one, is g (1 - eps) w ((m - x) + l) = -g (1 - eps) w log p, formed with torch ops
  from the saved statistics. torch's mean for such targets divides by the number of rows,
  not by a sum of class weights; so does reduce_soft_loss.

The fidelity contract: under create_graph (torch.is_grad_enabled() inside backward) the
gradients come from differentiable torch ops on the inputs (softmax: on its differentiable
output y), with the row statistics recomputed, so double backward is exact. Autocast as
torch's policy: cross_entropy in float32 on CPU and CUDA, softmax / log_softmax in float32
on CUDA only (CPU autocast leaves them in the input's dtype). Zero-size inputs return what
torch returns (the mean of no rows is nan) without launching a kernel.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from kiln import backend

from . import _autocast, _cpu_eager
from ._checks import check_floating, check_same_device_dtype
from ._cuda_launch import DTYPE_CODE, ptr, stream

# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference.


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_softmax_forward(x, log: bool):
    return torch.log_softmax(x, -1) if log else torch.softmax(x, -1)


def reference_softmax_backward(grad_y, y, log: bool):
    if log:
        return grad_y - torch.exp(y) * grad_y.sum(-1, keepdim=True)
    return y * (grad_y - (grad_y * y).sum(-1, keepdim=True))


def _class_weights(weight, x):
    return x.new_ones(x.shape[1]) if weight is None else weight.to(x.dtype)


def reference_cross_entropy_forward(logits, target, weight, ignore_index: int, label_smoothing: float):
    x = logits.to(_stats_dtype(logits.dtype))
    C = x.shape[1]
    w = _class_weights(weight, x)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    row_max = x.max(-1).values
    shifted = x - row_max[:, None]  # x - m <= 0
    row_logsum = torch.log(torch.exp(shifted).sum(-1))
    nll = row_logsum - shifted.gather(1, t[:, None])[:, 0]
    smooth = w.sum() * row_logsum - shifted @ w  # sum_c w_c (lse - x_c)
    loss = (1 - label_smoothing) * w[t] * nll + label_smoothing / C * smooth
    zero = torch.zeros_like(row_max)
    return (torch.where(valid, loss, zero), torch.where(valid, row_max, zero),
            torch.where(valid, row_logsum, zero))


def reference_cross_entropy_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                                     ignore_index: int, label_smoothing: float, out=None):
    x = logits.to(row_max.dtype)
    C = x.shape[1]
    w = _class_weights(weight, x)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    g = torch.where(valid, grad_loss.to(row_max.dtype), 0)
    hard = g * (1 - label_smoothing) * w[t]
    soft = g * label_smoothing / C
    p = torch.exp((x - row_max[:, None]) - row_logsum[:, None])
    dx = (hard + soft * w.sum())[:, None] * p - soft[:, None] * w[None, :]
    dx[torch.arange(len(t), device=x.device), t] -= hard
    return dx.to(logits.dtype) if out is None else out.copy_(dx)


def _soft_weights(target, weight, x, label_smoothing: float):
    """u = w ((1 - eps) q + eps / C), torch's mixing of smoothing into probability targets."""
    C = x.shape[1]
    mixed = (1 - label_smoothing) * target.to(x.dtype) + label_smoothing / C
    return mixed if weight is None else mixed * weight.to(x.dtype)


def _differentiable_row_stats(x):
    """(m, l) with l = log sum exp(x - m): m is a shift only (p does not depend on it), so it is
    detached; l carries the gradient."""
    row_max = x.detach().max(-1).values
    return row_max, torch.log(torch.exp(x - row_max[:, None]).sum(-1))


def reference_cross_entropy_soft_forward(logits, target, weight, label_smoothing: float):
    """loss_i = sum_c u_ic ((m_i - x_ic) + l_i): every term >= 0, no cancellation."""
    x = logits.to(_stats_dtype(logits.dtype))
    u = _soft_weights(target, weight, x, label_smoothing)
    row_max = x.max(-1).values
    shifted = x - row_max[:, None]
    row_logsum = torch.log(torch.exp(shifted).sum(-1))
    loss = (u * -shifted).sum(-1) + u.sum(-1) * row_logsum
    return loss, row_max, row_logsum


def reference_cross_entropy_soft_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                                          label_smoothing: float, out=None):
    """dlogits = g (U p - u), U = sum_c u_c."""
    x = logits.to(row_max.dtype)
    u = _soft_weights(target, weight, x, label_smoothing)
    g = grad_loss.to(row_max.dtype)[:, None]
    p = torch.exp((x - row_max[:, None]) - row_logsum[:, None])
    dx = g * (u.sum(-1, keepdim=True) * p - u)
    return dx.to(logits.dtype) if out is None else out.copy_(dx)


def soft_target_gradient(grad_loss, logits, weight, row_max, row_logsum, label_smoothing: float):
    """d loss_i / d q_ic = -g_i (1 - eps) w_c log p_ic = g_i (1 - eps) w_c ((m_i - x_ic) + l_i),
    torch ops from the saved statistics (every backend; the target's gradient is rarely wanted)."""
    x = logits.to(row_max.dtype)
    neg_log_p = (row_max[:, None] - x) + row_logsum[:, None]
    scale = grad_loss.to(row_max.dtype)[:, None] * (1 - label_smoothing)
    grad = scale * neg_log_p if weight is None else scale * neg_log_p * weight.to(x.dtype)
    return grad.to(logits.dtype)


# ---------------------------------------------------------------------------------------
# The cuda backend.


def cuda_softmax_forward(x, log: bool):
    ext = backend.cuda_extension()
    y = torch.empty_like(x)
    with torch.cuda.device(x.device):
        ext.softmax_forward(ptr(x), ptr(y), x.shape[0], x.shape[1], int(log), DTYPE_CODE[x.dtype], stream(x))
    return y


def cuda_softmax_backward(grad_y, y, log: bool):
    ext = backend.cuda_extension()
    dx = torch.empty_like(y)
    with torch.cuda.device(y.device):
        ext.softmax_backward(ptr(grad_y), ptr(y), ptr(dx), y.shape[0], y.shape[1], int(log),
                             DTYPE_CODE[y.dtype], stream(y))
    return dx


def _cuda_weight(weight):
    return None if weight is None else weight.float().contiguous()


def cuda_cross_entropy_forward(logits, target, weight, ignore_index: int, label_smoothing: float):
    ext = backend.cuda_extension()
    N, C = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    row_max, row_logsum = torch.empty_like(loss), torch.empty_like(loss)
    weight = _cuda_weight(weight)
    with torch.cuda.device(logits.device):
        ext.cross_entropy_forward(ptr(logits), ptr(target), ptr(weight), ptr(loss), ptr(row_max),
                                  ptr(row_logsum), N, C, ignore_index, label_smoothing,
                                  DTYPE_CODE[logits.dtype], stream(logits))
    return loss, row_max, row_logsum


def cuda_cross_entropy_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                                ignore_index: int, label_smoothing: float, out=None):
    ext = backend.cuda_extension()
    N, C = logits.shape
    dx = torch.empty_like(logits) if out is None else out
    weight = _cuda_weight(weight)
    grad_loss = grad_loss.float().contiguous()
    with torch.cuda.device(logits.device):
        ext.cross_entropy_backward(ptr(grad_loss), ptr(logits), ptr(target), ptr(weight), ptr(row_max),
                                   ptr(row_logsum), ptr(dx), N, C, ignore_index, label_smoothing,
                                   DTYPE_CODE[logits.dtype], stream(logits))
    return dx


def cuda_cross_entropy_soft_forward(logits, target, weight, label_smoothing: float):
    ext = backend.cuda_extension()
    N, C = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    row_max, row_logsum = torch.empty_like(loss), torch.empty_like(loss)
    weight = _cuda_weight(weight)
    with torch.cuda.device(logits.device):
        ext.cross_entropy_soft_forward(ptr(logits), ptr(target), ptr(weight), ptr(loss), ptr(row_max),
                                       ptr(row_logsum), N, C, label_smoothing, DTYPE_CODE[logits.dtype],
                                       stream(logits))
    return loss, row_max, row_logsum


def cuda_cross_entropy_soft_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                                     label_smoothing: float, out=None):
    ext = backend.cuda_extension()
    N, C = logits.shape
    dx = torch.empty_like(logits) if out is None else out
    weight = _cuda_weight(weight)
    grad_loss = grad_loss.float().contiguous()
    with torch.cuda.device(logits.device):
        ext.cross_entropy_soft_backward(ptr(grad_loss), ptr(logits), ptr(target), ptr(weight), ptr(row_max),
                                        ptr(row_logsum), ptr(dx), N, C, label_smoothing,
                                        DTYPE_CODE[logits.dtype], stream(logits))
    return dx


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.cross_entropy", "cpu": "kiln.kernels.cpu.cross_entropy"}
_REFERENCE = SimpleNamespace(
    softmax_forward=reference_softmax_forward, softmax_backward=reference_softmax_backward,
    cross_entropy_forward=reference_cross_entropy_forward,
    cross_entropy_backward=reference_cross_entropy_backward,
    cross_entropy_soft_forward=reference_cross_entropy_soft_forward,
    cross_entropy_soft_backward=reference_cross_entropy_soft_backward)
_CUDA = SimpleNamespace(
    softmax_forward=cuda_softmax_forward, softmax_backward=cuda_softmax_backward,
    cross_entropy_forward=cuda_cross_entropy_forward,
    cross_entropy_backward=cuda_cross_entropy_backward,
    cross_entropy_soft_forward=cuda_cross_entropy_soft_forward,
    cross_entropy_soft_backward=cuda_cross_entropy_soft_backward)


_SELECTORS = {op: backend.selector(op, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA) for op in ("softmax", "cross_entropy")}


def _implementation(op: str, t: Tensor):
    """The kernels of the backend that runs ``op`` ("softmax" or "cross_entropy") on t."""
    return _SELECTORS[op](t)


# ---------------------------------------------------------------------------------------
# The custom ops: 2-D contiguous rows; the public functions move the class dim last.


@torch.library.custom_op("kiln::softmax", mutates_args=())
def _softmax(x: Tensor, log: bool) -> Tensor:
    return _implementation("softmax", x).softmax_forward(x, log)


@_softmax.register_fake
def _(x, log):
    return torch.empty_like(x)


@torch.library.custom_op("kiln::softmax_backward", mutates_args=())
def _softmax_backward(grad_y: Tensor, y: Tensor, log: bool) -> Tensor:
    return _implementation("softmax", y).softmax_backward(grad_y, y, log)


@_softmax_backward.register_fake
def _(grad_y, y, log):
    return torch.empty_like(y)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.log = inputs[1]


def _softmax_grad(ctx, grad_y):
    (y,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph: torch ops on y, a differentiable output (its grad_fn is this op), so the
        # second derivative flows through y back to x.
        return reference_softmax_backward(grad_y, y, ctx.log), None
    if _cpu_eager.direct(grad_y, y):  # grad mode is off here: nothing to record, skip the dispatch
        return _implementation("softmax", y).softmax_backward(grad_y.contiguous(), y, ctx.log), None
    return _softmax_backward(grad_y.contiguous(), y, ctx.log), None


_softmax_call = _cpu_eager.autograd_op(_softmax, _softmax_grad, _softmax_setup)
# torch's autocast runs softmax / log_softmax in float32 on CUDA; on CPU it leaves them alone.
_autocast.register("kiln::softmax", "fp32", device_types=("cuda",))


@torch.library.custom_op("kiln::cross_entropy", mutates_args=())
def _cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                   label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss per row, row max, row log-sum)."""
    return _implementation("cross_entropy", logits).cross_entropy_forward(
        logits, target, weight, ignore_index, label_smoothing)


@_cross_entropy.register_fake
def _(logits, target, weight, ignore_index, label_smoothing):
    stats = logits.new_empty(logits.shape[0], dtype=_stats_dtype(logits.dtype))
    return stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.custom_op("kiln::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                            row_max: Tensor, row_logsum: Tensor, ignore_index: int,
                            label_smoothing: float) -> Tensor:
    return _implementation("cross_entropy", logits).cross_entropy_backward(
        grad_loss, logits, target, weight, row_max, row_logsum, ignore_index, label_smoothing)


@_cross_entropy_backward.register_fake
def _(grad_loss, logits, target, weight, row_max, row_logsum, ignore_index, label_smoothing):
    return torch.empty_like(logits)


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing


def _cross_entropy_grad(ctx, grad_loss, grad_row_max, grad_row_logsum):
    logits, target, weight, row_max, row_logsum = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph: the saved statistics are outputs without a gradient, so they are
        # recomputed from the logits and the gradient is formed with differentiable torch ops.
        row_max, row_logsum = _differentiable_row_stats(logits.to(_stats_dtype(logits.dtype)))
        dlogits = reference_cross_entropy_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                                                   ctx.ignore_index, ctx.label_smoothing)
    else:
        dlogits = _cross_entropy_backward(grad_loss.contiguous(), logits, target, weight, row_max,
                                          row_logsum, ctx.ignore_index, ctx.label_smoothing)
    return dlogits, None, None, None, None


_cross_entropy_call = _cpu_eager.autograd_op(_cross_entropy, _cross_entropy_grad, _cross_entropy_setup)
_autocast.register("kiln::cross_entropy", "fp32")


@torch.library.custom_op("kiln::cross_entropy_soft", mutates_args=())
def _cross_entropy_soft(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                        label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """Class-probability targets (N, C): returns (loss per row, row max, row log-sum)."""
    return _implementation("cross_entropy", logits).cross_entropy_soft_forward(
        logits, target, weight, label_smoothing)


@_cross_entropy_soft.register_fake
def _(logits, target, weight, label_smoothing):
    stats = logits.new_empty(logits.shape[0], dtype=_stats_dtype(logits.dtype))
    return stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.custom_op("kiln::cross_entropy_soft_backward", mutates_args=())
def _cross_entropy_soft_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                                 row_max: Tensor, row_logsum: Tensor, label_smoothing: float) -> Tensor:
    return _implementation("cross_entropy", logits).cross_entropy_soft_backward(
        grad_loss, logits, target, weight, row_max, row_logsum, label_smoothing)


@_cross_entropy_soft_backward.register_fake
def _(grad_loss, logits, target, weight, row_max, row_logsum, label_smoothing):
    return torch.empty_like(logits)


def _cross_entropy_soft_setup(ctx, inputs, output):
    logits, target, weight, label_smoothing = inputs
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    ctx.label_smoothing = label_smoothing


def _cross_entropy_soft_grad(ctx, grad_loss, grad_row_max, grad_row_logsum):
    logits, target, weight, row_max, row_logsum = ctx.saved_tensors
    need_logits, need_target = ctx.needs_input_grad[:2]
    eps = ctx.label_smoothing
    dlogits = dtarget = None
    if torch.is_grad_enabled():  # create_graph: see _cross_entropy_grad
        row_max, row_logsum = _differentiable_row_stats(logits.to(_stats_dtype(logits.dtype)))
        if need_logits:
            dlogits = reference_cross_entropy_soft_backward(grad_loss, logits, target, weight, row_max,
                                                            row_logsum, eps)
    elif need_logits:
        dlogits = _cross_entropy_soft_backward(grad_loss.contiguous(), logits, target, weight, row_max,
                                               row_logsum, eps)
    if need_target:
        dtarget = soft_target_gradient(grad_loss, logits, weight, row_max, row_logsum, eps).to(target.dtype)
    return dlogits, dtarget, None, None


_cross_entropy_soft_call = _cpu_eager.autograd_op(_cross_entropy_soft, _cross_entropy_soft_grad,
                                                  _cross_entropy_soft_setup)
_autocast.register("kiln::cross_entropy_soft", "fp32")


# ---------------------------------------------------------------------------------------
# The public ops.


def _rows_last(x: Tensor, dim: int) -> tuple[Tensor, tuple]:
    moved = x.movedim(dim, -1)
    return moved.reshape(math.prod(moved.shape[:-1]), x.shape[dim]).contiguous(), moved.shape


def _softmax_family(name: str, x: Tensor, dim: int, log: bool) -> Tensor:
    check_floating(name, x=x)
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"{name}: dim {dim} is out of range for x of shape {tuple(x.shape)}")
    if x.numel() == 0:
        return x * 0  # empty: what torch returns, with a gradient path
    rows, moved_shape = _rows_last(x, dim)
    y = _softmax_call(rows, log)
    return y.reshape(moved_shape).movedim(-1, dim)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """exp(x - logsumexp(x)) along ``dim``, stable for any finite x."""
    return _softmax_family("softmax", x, dim, log=False)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """x - logsumexp(x) along ``dim``, stable for any finite x."""
    return _softmax_family("log_softmax", x, dim, log=True)


_REDUCTIONS = ("none", "mean", "sum")


def loss_dtype(t: Tensor) -> torch.dtype:
    """The dtype torch's cross-entropy returns for input t: float32 inside an autocast region
    for t's device when t is float16 / bfloat16 (torch's "fp32" policy), else t's dtype."""
    if t.dtype in (torch.float16, torch.bfloat16) and t.device.type in ("cpu", "cuda") \
            and torch.is_autocast_enabled(t.device.type):
        return torch.float32
    return t.dtype


def _shape(t) -> tuple:
    return tuple(t.shape)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """torch.nn.functional.cross_entropy, same arguments.

    input (N, C) or (N, C, d1, ...) or (C,) of logits. target: class indices (N,) / (N, d1, ...)
    / () of int64 (or uint8), or class probabilities of input's shape and dtype. ``size_average``
    and ``reduce`` are torch's deprecated spellings of ``reduction`` (they warn as torch does).
    """
    op = "cross_entropy"
    check_floating(op, input=input)
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    check_same_device_dtype(op, input=input, weight=weight)
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if input.dim() == 0:
        raise ValueError(f"{op}: input must have a class dimension, got a scalar")
    if target.device != input.device:
        raise ValueError(f"{op}: target is on {target.device} but input is on {input.device} "
                         f"(target {_shape(target)}, input {_shape(input)})")
    class_dim = 1 if input.dim() >= 2 else 0
    C = input.shape[class_dim]
    if weight is not None and weight.shape != (C,):
        raise ValueError(f"{op}: weight must have shape ({C},) for input {_shape(input)}, "
                         f"got {_shape(weight)}")
    if target.is_floating_point():
        return _cross_entropy_probabilities(input, target, weight, ignore_index, reduction,
                                            float(label_smoothing), class_dim)
    if target.dtype == torch.uint8:
        target = target.long()  # torch takes Byte class indices too
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must hold class indices as int64 (or class probabilities as "
                        f"floats), got dtype {str(target.dtype).removeprefix('torch.')} "
                        f"(target {_shape(target)}, input {_shape(input)})")
    expected = input.shape[:class_dim] + input.shape[class_dim + 1:]
    if target.shape != expected:
        raise ValueError(f"{op}: target shape {_shape(target)} does not match input {_shape(input)} "
                         f"(class indices: expected {tuple(expected)}, the input without the class dim "
                         f"{class_dim}; class probabilities: {_shape(input)}, floating point)")
    rows, _ = _rows_last(input, class_dim)
    flat_target = target.reshape(-1).contiguous()
    if rows.shape[0] == 0:
        loss = _empty_rows_loss(rows)  # no kernel; mean of nothing is 0 / 0 = nan, as in torch
    else:
        if C == 0:
            raise IndexError(f"{op}: input {_shape(input)} has no classes for target {_shape(target)}")
        check_target_range(op, flat_target, C, ignore_index)
        loss, _, _ = _cross_entropy_call(rows, flat_target, weight, ignore_index, float(label_smoothing))
    return reduce_loss(loss, flat_target, weight, ignore_index, reduction, target.shape, loss_dtype(input))


def _empty_rows_loss(rows: Tensor, *more: Tensor) -> Tensor:
    """Zero losses for rows with no work (no rows, or no classes), through torch ops so that
    the gradients are the zeros torch gives."""
    loss = rows.to(_stats_dtype(rows.dtype)).sum(-1) * 0
    for t in more:
        loss = loss + t.to(loss.dtype).sum(-1) * 0
    return loss


def _cross_entropy_probabilities(input, target, weight, ignore_index, reduction, label_smoothing, class_dim):
    op = "cross_entropy"
    if target.shape != input.shape:
        expected = input.shape[:class_dim] + input.shape[class_dim + 1:]
        raise ValueError(f"{op}: target shape {_shape(target)} does not match input {_shape(input)} "
                         f"(class probabilities: expected {_shape(input)}; class indices: "
                         f"{tuple(expected)} of int64)")
    if target.dtype != input.dtype:
        raise TypeError(f"{op}: class-probability target has dtype {str(target.dtype).removeprefix('torch.')} "
                        f"but input has dtype {str(input.dtype).removeprefix('torch.')} (target "
                        f"{_shape(target)}, input {_shape(input)}); cast them to one dtype")
    if ignore_index != -100:
        raise ValueError(f"{op}: ignore_index ({ignore_index}) is not supported for class-probability "
                         f"targets (target {_shape(target)} is floating point), as in torch")
    rows, moved_shape = _rows_last(input, class_dim)
    probabilities, _ = _rows_last(target, class_dim)
    if rows.numel() == 0:
        loss = _empty_rows_loss(rows, probabilities)
    else:
        loss, _, _ = _cross_entropy_soft_call(rows, probabilities, weight, label_smoothing)
    return reduce_soft_loss(loss, reduction, moved_shape[:-1], input.shape[class_dim], loss_dtype(input))


def reduce_soft_loss(loss: Tensor, reduction: str, shape, classes: int, dtype: torch.dtype) -> Tensor:
    """torch's reductions for class-probability targets: the mean divides by the number of
    rows N d1 ... dK (torch's input.numel() / C: nan when C is 0), not by a sum of weights."""
    if reduction == "none":
        return loss.reshape(shape).to(dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(dtype)
    return (total / (loss.shape[0] if classes else math.nan)).to(dtype)


def check_target_range(op: str, flat_target: Tensor, C: int, ignore_index: int) -> None:
    """On CPU, a target outside [0, C) that is not ignore_index is an error (on GPU the
    check would cost a sync; the kernels write NaN for such rows instead)."""
    if flat_target.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ((flat_target < 0) | (flat_target >= C)) & (flat_target != ignore_index)
        if bad.any():
            value = flat_target[bad][0].item()
            raise ValueError(f"{op}: target value {value} is out of range for {C} classes "
                             f"(and is not ignore_index={ignore_index})")


def reduce_loss(loss: Tensor, flat_target: Tensor, weight: Optional[Tensor], ignore_index: int,
                reduction: str, shape, dtype: torch.dtype) -> Tensor:
    """torch's reductions of per-row losses: none, sum, or the (weighted) mean over kept rows."""
    if reduction == "none":
        return loss.reshape(shape).to(dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(dtype)
    valid = flat_target != ignore_index
    if weight is None:
        denominator = valid.sum().to(total.dtype)
    else:
        denominator = torch.where(valid, weight.to(total.dtype)[torch.where(valid, flat_target, 0)], 0).sum()
    return (total / denominator).to(dtype)
