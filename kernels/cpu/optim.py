"""numba forms of the fused optimizer steps: one parallel pass over all tensors of a group.

The tensors of a call are not copied or packed: kernels/multi_tensor.py's table gives
each tensor's address and size and cuts the group into chunks of CHUNK elements; one
``prange`` runs over all chunks of all tensors (load balance across cores whatever the
tensor sizes), and each chunk turns its addresses into arrays (``carray``) and updates
them in one vectorizable loop. Scalars arrive in the tensors' dtype, so float32 math
stays float32 as torch's CPU optimizers do; the per-tensor bias corrections are
computed in float64 on the host as torch computes them.

Signatures are those of kiln.ops.optim's reference forms (lists of contiguous tensors of
one dtype, mutated in place).
"""

from __future__ import annotations

import math
from itertools import chain

import numpy as np
import torch
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from kiln.kernels import multi_tensor

from .fastmath import KERNEL_OPTIONS

# Elements per unit of parallel work: large enough that a chunk's loop amortizes its
# setup, small enough that 20M elements make hundreds of chunks for the cores to share.
CHUNK = 1 << 16


@intrinsic
def _address_as_pointer(typingctx, address, like):
    """The int64 address as a pointer to like's element type."""
    pointer = types.CPointer(like.dtype)
    sig = pointer(address, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return sig, codegen


@njit(inline="always")
def _chunk_array(addresses, k, t, start, n, like):
    """Elements start .. start + n of tensor t of list k, as an array."""
    return carray(_address_as_pointer(addresses[k, t] + start * like.itemsize, like), (n,))


@njit(inline="always")
def _chunk_bounds(sizes, chunk_of, chunk_at, c, chunk):
    t = chunk_of[c]
    start = chunk_at[c]
    return t, start, min(chunk, sizes[t] - start)


@njit(**KERNEL_OPTIONS)
def _sgd(addresses, sizes, chunk_of, chunk_at, chunk, consts, nesterov, maximize, has_momentum, first_step,
         like):
    lr, weight_decay, momentum, damp_keep = consts[0], consts[1], consts[2], consts[3]
    for c in prange(chunk_of.shape[0]):
        t, start, n = _chunk_bounds(sizes, chunk_of, chunk_at, c, chunk)
        p = _chunk_array(addresses, 0, t, start, n, like)
        g = _chunk_array(addresses, 1, t, start, n, like)
        if has_momentum:
            buf = _chunk_array(addresses, 2, t, start, n, like)
            if not (first_step or nesterov or maximize) and weight_decay == 0:
                # the common step, without the invariant selects of the general loop
                # (same operations in the same order: the same bits)
                for i in range(n):
                    b = momentum * buf[i] + damp_keep * g[i]
                    buf[i] = b
                    p[i] = p[i] - lr * b
                continue
            for i in range(n):
                d = -g[i] if maximize else g[i]
                if weight_decay != 0:
                    d = d + weight_decay * p[i]
                b = d if first_step else momentum * buf[i] + damp_keep * d
                buf[i] = b
                d = d + momentum * b if nesterov else b
                p[i] = p[i] - lr * d
        else:
            for i in range(n):
                d = -g[i] if maximize else g[i]
                if weight_decay != 0:
                    d = d + weight_decay * p[i]
                p[i] = p[i] - lr * d


@njit(**KERNEL_OPTIONS)
def _adam(addresses, sizes, chunk_of, chunk_at, chunk, scaled_steps, scaled_eps, consts, amsgrad, maximize,
          decoupled, like):
    """p -= step_size m / (sqrt(v) / bc2_sqrt + eps) written with one division instead of two,
    as (step_size bc2_sqrt) m / (sqrt(v) + eps bc2_sqrt): the per-tensor products come from
    the host in float64, rounded once (a few ulps of the update, far below its bounds)."""
    beta2, weight_decay = consts[0], consts[2]
    keep1, keep2, decay = consts[3], consts[4], consts[5]  # 1 - beta1, 1 - beta2, 1 - lr wd: rounded once
    for c in prange(chunk_of.shape[0]):
        t, start, n = _chunk_bounds(sizes, chunk_of, chunk_at, c, chunk)
        p = _chunk_array(addresses, 0, t, start, n, like)
        g = _chunk_array(addresses, 1, t, start, n, like)
        m = _chunk_array(addresses, 2, t, start, n, like)
        v = _chunk_array(addresses, 3, t, start, n, like)
        vmax = _chunk_array(addresses, 4 if amsgrad else 3, t, start, n, like)
        step = scaled_steps[t]
        eps = scaled_eps[t]
        for i in range(n):
            d = -g[i] if maximize else g[i]
            w = p[i]
            if weight_decay != 0:
                if decoupled:
                    w = w * decay
                else:
                    d = d + weight_decay * w
            mi = m[i] + keep1 * (d - m[i])
            vi = beta2 * v[i] + keep2 * d * d
            m[i] = mi
            v[i] = vi
            if amsgrad:
                vi = vmax[i] if vmax[i] > vi else vi
                vmax[i] = vi
            p[i] = w - step * mi / (math.sqrt(vi) + eps)


@njit(**KERNEL_OPTIONS)
def _rmsprop(addresses, sizes, chunk_of, chunk_at, chunk, consts, centered, has_momentum, maximize, like):
    lr, alpha, eps, weight_decay, momentum = consts[0], consts[1], consts[2], consts[3], consts[4]
    keep = consts[5]  # 1 - alpha, rounded once
    for c in prange(chunk_of.shape[0]):
        t, start, n = _chunk_bounds(sizes, chunk_of, chunk_at, c, chunk)
        p = _chunk_array(addresses, 0, t, start, n, like)
        g = _chunk_array(addresses, 1, t, start, n, like)
        sq = _chunk_array(addresses, 2, t, start, n, like)
        # the optional lists follow square_avg: momentum_buffer, then grad_avg
        buf = _chunk_array(addresses, 3 if has_momentum else 2, t, start, n, like)
        gavg = _chunk_array(addresses, (4 if has_momentum else 3) if centered else 2, t, start, n, like)
        for i in range(n):
            d = -g[i] if maximize else g[i]
            if weight_decay != 0:
                d = d + weight_decay * p[i]
            s = alpha * sq[i] + keep * d * d
            sq[i] = s
            if centered:
                a = gavg[i] + keep * (d - gavg[i])
                gavg[i] = a
                s = s - a * a
            denom = math.sqrt(s) + eps
            if has_momentum:
                b = momentum * buf[i] + d / denom
                buf[i] = b
                p[i] = p[i] - lr * b
            else:
                p[i] = p[i] - lr * (d / denom)


@njit(**KERNEL_OPTIONS)
def _sum_squares(addresses, sizes, chunk_of, chunk_at, chunk, like):
    """Per chunk: the float64 sum of squares of list 0 (8 independent lanes, so it vectorizes)."""
    partial = np.empty(chunk_of.shape[0], np.float64)
    for c in prange(chunk_of.shape[0]):
        t, start, n = _chunk_bounds(sizes, chunk_of, chunk_at, c, chunk)
        g = _chunk_array(addresses, 0, t, start, n, like)
        lanes = np.zeros(8, np.float64)
        n_full = n - n % 8
        for j0 in range(0, n_full, 8):
            for k in range(8):
                x = np.float64(g[j0 + k])
                lanes[k] += x * x
        total = lanes.sum()
        for j in range(n_full, n):
            x = np.float64(g[j])
            total += x * x
        partial[c] = total
    return partial


@njit(**KERNEL_OPTIONS)
def _scaled_descent(addresses, sizes, chunk_of, chunk_at, chunk, scales, like):
    """p -= scale[t] * g for every tensor t (list 0 params, list 1 directions)."""
    for c in prange(chunk_of.shape[0]):
        t, start, n = _chunk_bounds(sizes, chunk_of, chunk_at, c, chunk)
        p = _chunk_array(addresses, 0, t, start, n, like)
        g = _chunk_array(addresses, 1, t, start, n, like)
        scale = scales[t]
        for i in range(n):
            p[i] = p[i] - scale * g[i]


_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


_LIKE = {dtype: np.empty(0, dtype=np_dtype) for dtype, np_dtype in _NUMPY_DTYPE.items()}
_data_ptr, _numel = torch.Tensor.data_ptr, torch.Tensor.numel


def _like(t):
    """An empty array of t's dtype: what tells a kernel the element type of its addresses
    (one per dtype, never written: a kernel reads only its dtype and itemsize)."""
    return _LIKE[t.dtype]


def _consts(like, *values):
    return np.array(values, dtype=like.dtype)


# Tables of recent calls by what determines them (every address, every size, the chunk):
# an optimizer passes the same tensors every step, and building the table (numpy and torch
# calls on 80 tensors: 0.12 ms) cost a third of a 1M-element Adam update. A table holds
# only numbers: a key seen again, whatever tensors now live at those addresses, gives the
# same table.
_TABLE_CACHE: dict = {}
_TABLE_CACHE_SIZE = 8


def _tables(lists, scalars=()):
    key = (tuple(map(_data_ptr, chain.from_iterable(lists))), tuple(map(_numel, lists[0])), CHUNK)
    if not scalars and key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    table = multi_tensor.build(lists, CHUNK, scalars)
    found = (table.addresses.numpy(), table.sizes.numpy(), table.chunk_of.numpy(), table.chunk_at.numpy(),
             table.chunk), table
    if not scalars:
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            del _TABLE_CACHE[next(iter(_TABLE_CACHE))]
        _TABLE_CACHE[key] = found
    return found


class PlanTable:
    """A multi-tensor table that a caller keeps from call to call (kiln.optim's step plans):
    list 1's row (the gradients) is written before each call, every other row is fixed.
    The caller guarantees that the tensors of the fixed rows still live at these addresses
    (and keeps their storages alive), and that each gradient fits its row."""

    __slots__ = ("args", "grad_row", "like", "tensors")

    def __init__(self, lists):
        table = multi_tensor.build(lists, CHUNK)
        addresses = table.addresses.numpy()
        self.args = (addresses, table.sizes.numpy(), table.chunk_of.numpy(), table.chunk_at.numpy(), table.chunk)
        self.grad_row = addresses[1]
        self.like = _like(lists[0][0])
        self.tensors = table.tensors

    def set_grads(self, addresses) -> None:
        """This call's gradient addresses (a list of ints, one per tensor)."""
        self.grad_row[:] = addresses


def sgd_step_table(table: PlanTable, lr, weight_decay, momentum, dampening, nesterov, maximize, first_step):
    """sgd_step on a PlanTable whose gradient row is set (lists: params, grads[, buffers])."""
    like = table.like
    _sgd(*table.args, _consts(like, lr, weight_decay, momentum, 1 - dampening), nesterov, maximize, momentum != 0,
         first_step, like)


def adam_step_table(table: PlanTable, step_sizes, bc2_sqrts, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                    decoupled_weight_decay):
    """adam_step on a PlanTable whose gradient row is set (lists: params, grads, exp_avgs,
    exp_avg_sqs[, max_exp_avg_sqs]); step_sizes, bc2_sqrts: float64 arrays, one per tensor."""
    like = table.like
    _adam(*table.args, (step_sizes * bc2_sqrts).astype(like.dtype), (eps * bc2_sqrts).astype(like.dtype),
          _consts(like, beta2, eps, weight_decay, 1 - beta1, 1 - beta2, 1 - lr * weight_decay), amsgrad, maximize,
          decoupled_weight_decay, like)


def sgd_step(params, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov, maximize,
             first_step):
    like = _like(params[0])
    has_momentum = momentum != 0
    lists = [params, grads] + ([momentum_buffers] if has_momentum else [])
    args, _ = _tables(lists)
    _sgd(*args, _consts(like, lr, weight_decay, momentum, 1 - dampening), nesterov, maximize, has_momentum,
         first_step, like)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bc2_sqrts, lr, beta1, beta2,
              eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
    like = _like(params[0])
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    args, _ = _tables(lists)
    bc2_sqrts = np.asarray(bc2_sqrts, np.float64)
    scaled_steps = (np.asarray(step_sizes, np.float64) * bc2_sqrts).astype(like.dtype)
    _adam(*args, scaled_steps, (eps * bc2_sqrts).astype(like.dtype),
          _consts(like, beta2, eps, weight_decay, 1 - beta1, 1 - beta2, 1 - lr * weight_decay), amsgrad, maximize,
          decoupled_weight_decay, like)


def rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, lr, alpha, eps, weight_decay, momentum,
                 centered, maximize):
    like = _like(params[0])
    has_momentum = momentum > 0
    lists = ([params, grads, square_avgs] + ([momentum_buffers] if has_momentum else [])
             + ([grad_avgs] if centered else []))
    args, _ = _tables(lists)
    _rmsprop(*args, _consts(like, lr, alpha, eps, weight_decay, momentum, 1 - alpha), centered, has_momentum,
             maximize, like)


def ngd_step(params, grads, lr, per_tensor, maximize):
    like = _like(params[0])
    args, table = _tables([params, grads])
    # the norms read list 0 of a table: pass the grads' addresses there
    partial = _sum_squares(args[0][1:], *args[1:], like)
    sums = np.bincount(args[2], weights=partial, minlength=table.tensors)
    _scaled_descent(*args, np.asarray(ngd_scales(sums, lr, per_tensor, maximize), like.dtype), like)


def ngd_scales(sums_of_squares, lr, per_tensor, maximize):
    """lr / ||g|| per tensor (per_tensor) or lr / ||all g|| for every tensor; 0 where the
    norm is 0 (no direction, no step); negated for maximize."""
    sums = np.asarray(sums_of_squares, dtype=np.float64)
    norms = np.sqrt(sums) if per_tensor else np.full(sums.shape, math.sqrt(sums.sum()))
    scales = np.divide(lr, norms, out=np.zeros_like(norms), where=norms > 0)
    return -scales if maximize else scales
