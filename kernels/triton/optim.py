"""Triton forms of the fused optimizer steps: one launch over all tensors of a group.

As apex's and Liger's multi_tensor_apply: kernels/multi_tensor.py's table (int64 on the
device: every tensor's address per list, sizes, a chunk -> (tensor, first element) map,
per-tensor float64 scalars and the float64 hyperparameters) is copied to the device once,
and program c of the grid updates chunk c, CHUNK elements of one tensor, BLOCK at a time.
An address loaded from the table becomes a pointer by a bitcast (``int64.to(pointer,
bitcast=True)``), which TRITON_INTERPRET=1 also runs on CPU tensors (what the CPU tests
use). Hyperparameters are read from the table in float64 (Triton would pass Python floats
as float32) and the math runs in float32, float64 for float64 tensors; storage keeps the
tensors' dtype. ngd_step: a sum-of-squares launch, a segmented sum per tensor and the
scales on the device (no copy to the host), then the update launch.

Signatures are those of kiln.ops.optim's reference forms. ``CHUNK`` and ``BLOCK`` are
read at each launch; tests lower them to cross chunk and block edges on small tensors.
"""

import os

import torch
import triton
import triton.language as tl

from kiln.kernels import multi_tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per program and per loop iteration.
CHUNK = 256 if _INTERPRET else 16384
BLOCK = 128 if _INTERPRET else 1024

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


@triton.jit
def _tensor_pointer(table, n_tensors, k, t, start, DTYPE: tl.constexpr):
    """Tensor t of list k, from element start on."""
    address = tl.load(table + k * n_tensors + t)
    return address.to(tl.pointer_type(DTYPE), bitcast=True) + start


@triton.jit
def _sqrt(x):
    """IEEE-rounded square root (tl.sqrt may lower to an approximation in float32)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _chunk(table, n_tensors, n_chunks, CHUNK: tl.constexpr, K: tl.constexpr):
    """(tensor, first element, elements) of this program's chunk; the table's sizes
    section follows the K lists of addresses, the chunk map follows the sizes."""
    c = tl.program_id(0)
    t = tl.load(table + (K + 1) * n_tensors + c)
    start = tl.load(table + (K + 1) * n_tensors + n_chunks + c)
    size = tl.load(table + K * n_tensors + t)
    return t, start, tl.minimum(size - start, CHUNK)


@triton.jit
def _sgd_kernel(table, floats, n_tensors, n_chunks, consts_at, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, FIRST: tl.constexpr, DTYPE: tl.constexpr,
                MATH: tl.constexpr, K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n = _chunk(table, n_tensors, n_chunks, CHUNK, K)
    lr = tl.load(floats + consts_at).to(MATH)
    weight_decay = tl.load(floats + consts_at + 1).to(MATH)
    momentum = tl.load(floats + consts_at + 2).to(MATH)
    damp_keep = tl.load(floats + consts_at + 3).to(MATH)
    p_ptr = _tensor_pointer(table, n_tensors, 0, t, start, DTYPE)
    g_ptr = _tensor_pointer(table, n_tensors, 1, t, start, DTYPE)
    b_ptr = _tensor_pointer(table, n_tensors, K - 1, t, start, DTYPE)
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(MATH)
        d = tl.load(g_ptr + offs, mask=mask).to(MATH)
        if MAXIMIZE:
            d = -d
        d = d + weight_decay * p
        if HAS_MOMENTUM:
            if FIRST:
                b = d
            else:
                b = momentum * tl.load(b_ptr + offs, mask=mask).to(MATH) + damp_keep * d
            tl.store(b_ptr + offs, b.to(DTYPE), mask=mask)
            if NESTEROV:
                d = d + momentum * b
            else:
                d = b
        tl.store(p_ptr + offs, (p - lr * d).to(DTYPE), mask=mask)


@triton.jit
def _adam_kernel(table, floats, n_tensors, n_chunks, scalars_at, consts_at, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, DTYPE: tl.constexpr, MATH: tl.constexpr,
                 K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n = _chunk(table, n_tensors, n_chunks, CHUNK, K)
    lr = tl.load(floats + consts_at).to(MATH)
    beta1 = tl.load(floats + consts_at + 1).to(MATH)
    beta2 = tl.load(floats + consts_at + 2).to(MATH)
    eps = tl.load(floats + consts_at + 3).to(MATH)
    weight_decay = tl.load(floats + consts_at + 4).to(MATH)
    keep1 = tl.load(floats + consts_at + 5).to(MATH)  # 1 - beta1, 1 - beta2, 1 - lr wd: rounded once
    keep2 = tl.load(floats + consts_at + 6).to(MATH)
    decay = tl.load(floats + consts_at + 7).to(MATH)
    step_size = tl.load(floats + scalars_at + t).to(MATH)
    bc2_sqrt = tl.load(floats + scalars_at + n_tensors + t).to(MATH)
    p_ptr = _tensor_pointer(table, n_tensors, 0, t, start, DTYPE)
    g_ptr = _tensor_pointer(table, n_tensors, 1, t, start, DTYPE)
    m_ptr = _tensor_pointer(table, n_tensors, 2, t, start, DTYPE)
    v_ptr = _tensor_pointer(table, n_tensors, 3, t, start, DTYPE)
    vmax_ptr = _tensor_pointer(table, n_tensors, K - 1, t, start, DTYPE)
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(MATH)
        d = tl.load(g_ptr + offs, mask=mask).to(MATH)
        m = tl.load(m_ptr + offs, mask=mask).to(MATH)
        v = tl.load(v_ptr + offs, mask=mask).to(MATH)
        if MAXIMIZE:
            d = -d
        if DECOUPLED:
            p = p * decay
        else:
            d = d + weight_decay * p
        m = m + keep1 * (d - m)
        v = beta2 * v + keep2 * d * d
        tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)
        if AMSGRAD:
            v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(MATH), v)
            tl.store(vmax_ptr + offs, v.to(DTYPE), mask=mask)
        p = p - step_size * (m / (_sqrt(v) / bc2_sqrt + eps))
        tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)


@triton.jit
def _rmsprop_kernel(table, floats, n_tensors, n_chunks, consts_at, CENTERED: tl.constexpr,
                    HAS_MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr, DTYPE: tl.constexpr, MATH: tl.constexpr,
                    K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n = _chunk(table, n_tensors, n_chunks, CHUNK, K)
    lr = tl.load(floats + consts_at).to(MATH)
    alpha = tl.load(floats + consts_at + 1).to(MATH)
    eps = tl.load(floats + consts_at + 2).to(MATH)
    weight_decay = tl.load(floats + consts_at + 3).to(MATH)
    momentum = tl.load(floats + consts_at + 4).to(MATH)
    keep = tl.load(floats + consts_at + 5).to(MATH)  # 1 - alpha, rounded once
    p_ptr = _tensor_pointer(table, n_tensors, 0, t, start, DTYPE)
    g_ptr = _tensor_pointer(table, n_tensors, 1, t, start, DTYPE)
    sq_ptr = _tensor_pointer(table, n_tensors, 2, t, start, DTYPE)
    # the optional lists follow square_avg: momentum_buffer, then grad_avg (the last)
    b_ptr = _tensor_pointer(table, n_tensors, 3, t, start, DTYPE)
    a_ptr = _tensor_pointer(table, n_tensors, K - 1, t, start, DTYPE)
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(MATH)
        d = tl.load(g_ptr + offs, mask=mask).to(MATH)
        if MAXIMIZE:
            d = -d
        d = d + weight_decay * p
        s = alpha * tl.load(sq_ptr + offs, mask=mask).to(MATH) + keep * d * d
        tl.store(sq_ptr + offs, s.to(DTYPE), mask=mask)
        if CENTERED:
            a = tl.load(a_ptr + offs, mask=mask).to(MATH)
            a = a + keep * (d - a)
            tl.store(a_ptr + offs, a.to(DTYPE), mask=mask)
            s = s - a * a
        u = d / (_sqrt(s) + eps)
        if HAS_MOMENTUM:
            u = momentum * tl.load(b_ptr + offs, mask=mask).to(MATH) + u
            tl.store(b_ptr + offs, u.to(DTYPE), mask=mask)
        tl.store(p_ptr + offs, (p - lr * u).to(DTYPE), mask=mask)


@triton.jit
def _sum_squares_kernel(table, partial, n_tensors, n_chunks, LIST: tl.constexpr, DTYPE: tl.constexpr,
                        MATH: tl.constexpr, K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n = _chunk(table, n_tensors, n_chunks, CHUNK, K)
    g_ptr = _tensor_pointer(table, n_tensors, LIST, t, start, DTYPE)
    acc = tl.zeros((BLOCK,), dtype=MATH)
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0).to(MATH)
        acc += g * g
    tl.store(partial + tl.program_id(0), tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _scaled_descent_kernel(table, floats, n_tensors, n_chunks, scalars_at, DTYPE: tl.constexpr,
                           MATH: tl.constexpr, K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n = _chunk(table, n_tensors, n_chunks, CHUNK, K)
    scale = tl.load(floats + scalars_at + t).to(MATH)
    p_ptr = _tensor_pointer(table, n_tensors, 0, t, start, DTYPE)
    g_ptr = _tensor_pointer(table, n_tensors, 1, t, start, DTYPE)
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(MATH)
        g = tl.load(g_ptr + offs, mask=mask).to(MATH)
        tl.store(p_ptr + offs, (p - scale * g).to(DTYPE), mask=mask)


def _launch(kernel, lists, scalars=(), constants=(), **meta):
    """Builds the table of lists on their device and runs kernel over its chunks."""
    first = lists[0][0]
    table = multi_tensor.build(lists, CHUNK, scalars, constants).to(first.device)
    at = table.offsets()
    floats = table.data.view(torch.float64)
    extra = {"scalars_at": at[4]} if "scalars_at" in kernel.arg_names else {}
    if "consts_at" in kernel.arg_names:
        extra["consts_at"] = at[5]
    kernel[(table.chunks,)](table.data, floats, table.tensors, table.chunks, **extra,
                            DTYPE=_TL_DTYPE[first.dtype],
                            MATH=tl.float64 if first.dtype == torch.float64 else tl.float32,
                            K=table.lists, CHUNK=CHUNK, BLOCK=BLOCK, **meta)
    return table


def sgd_step(params, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov, maximize,
             first_step):
    has_momentum = momentum != 0
    lists = [params, grads] + ([momentum_buffers] if has_momentum else [])
    _launch(_sgd_kernel, lists, constants=(lr, weight_decay, momentum, 1 - dampening), HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), FIRST=bool(first_step))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bc2_sqrts, lr, beta1, beta2,
              eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    constants = (lr, beta1, beta2, eps, weight_decay, 1 - beta1, 1 - beta2, 1 - lr * weight_decay)
    _launch(_adam_kernel, lists, (step_sizes, bc2_sqrts), constants,
            AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled_weight_decay))


def rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, lr, alpha, eps, weight_decay, momentum,
                 centered, maximize):
    has_momentum = momentum > 0
    lists = ([params, grads, square_avgs] + ([momentum_buffers] if has_momentum else [])
             + ([grad_avgs] if centered else []))
    _launch(_rmsprop_kernel, lists, constants=(lr, alpha, eps, weight_decay, momentum, 1 - alpha),
            CENTERED=bool(centered),
            HAS_MOMENTUM=has_momentum, MAXIMIZE=bool(maximize))


def ngd_step(params, grads, lr, per_tensor, maximize):
    first = params[0]
    table = multi_tensor.build([params, grads], CHUNK, ([0.0] * len(params),)).to(first.device)
    math_dtype = tl.float64 if first.dtype == torch.float64 else tl.float32
    meta = dict(DTYPE=_TL_DTYPE[first.dtype], MATH=math_dtype, K=2, CHUNK=CHUNK, BLOCK=BLOCK)
    partial = torch.empty(table.chunks, dtype=torch.float64, device=first.device)
    _sum_squares_kernel[(table.chunks,)](table.data, partial, table.tensors, table.chunks, LIST=1, **meta)
    # chunks of one tensor are consecutive in the table: a segmented sum gives each tensor's
    counts = torch.tensor([-(-g.numel() // CHUNK) for g in grads], device=first.device)
    sums = torch.segment_reduce(partial, "sum", lengths=counts)
    table.scalars[0].copy_(multi_tensor.device_ngd_scales(sums, lr, per_tensor, maximize))
    _scaled_descent_kernel[(table.chunks,)](table.data, table.data.view(torch.float64), table.tensors,
                                            table.chunks, table.offsets()[4], **meta)
