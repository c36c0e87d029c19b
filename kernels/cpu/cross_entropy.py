"""CPU form of the softmax family and cross-entropy, numba, rows in parallel.

Each row's statistics (max and log-sum-exp): the row's max (a vectorized max
reduction, which leaves the row in cache), then exp(x - m) per chunk, summed in float64.
softmax writes exp(x - m) into its output row and scales it by 1 / sum, one exp per
element; log_softmax and cross-entropy's backward recompute what they need from the
row's statistics. float32 and float64; the statistics (row max, row log-sum, loss per
row) are float32 for float32 input and float64 for float64 input. Large outputs come
from memory.empty (2 MiB pages, see memory.py).

Class-probability (soft) targets q (N, C), mixed with label smoothing as torch does,
q' = (1 - eps) q + eps / C, and weighted, u_c = w_c q'_c:
loss = sum_c u_c (m - x_c) + l sum_c u_c (each term >= 0: no cancellation at |x| ~ 1e4),
dx_c = g (p_c sum_c u_c - u_c). Sums over a row of u accumulate in float64.
"""

import numpy as np
import torch
from numba import njit, prange

from .fastmath import exp, like
from .lanes import lane_dot_f64, lane_max, lane_sum_f64
from .memory import empty_like
from .parallel import sized_kernel

CHUNK = 512
# Rows per parallel task of the loss kernels: each task allocates its exp scratch once, not
# once per row (a heap allocation per 128-class row cost as much as the row's arithmetic).
ROWS_PER_TASK = 32

# Contraction (a * b + c as one FMA) in the kernels and the exp they inline: the
# polynomial of fastmath.exp in half the instructions (12% faster on 4M float32) and no
# less accurate (one rounding per FMA instead of two). No reassociation here: the float64
# sums reassociate in their own functions (lanes.py).


@njit(inline="always")
def _row_stats(x, scratch):
    """(m, l): the row's max and log(sum(exp(x - m))), stable for any finite x.

    Kept apart rather than as lse = m + l: rounding m + l near |x| ~ 1e4 would cost
    ~ulp(1e4) in every probability exp(x - lse). The max first (a vmaxps reduction,
    ~0.1 ns per element, and it leaves the row in cache), then per chunk exp(x - m) goes
    to ``scratch`` (CHUNK values, in L1) in a plain map loop and is summed in float64
    after: exp inside a floating-point reduction loop runs scalar (3.8x slower on
    8192 x 32000). Knowing m up front saves the rescaling exp per chunk an online max
    needs, and the float64 sum (lanes.lane_sum_f64, vectorized) is exact to ~1e-16.
    """
    m = lane_max(x)
    s = 0.0
    for c0 in range(0, x.size, CHUNK):
        chunk = x[c0:c0 + CHUNK]
        for j in range(chunk.size):
            scratch[j] = exp(chunk[j] - m)
        s += lane_sum_f64(scratch[:chunk.size])
    return m, like(x[0], np.log(s))


@sized_kernel(fastmath={"contract"})
def _softmax_forward(x, y, log):
    for i in prange(x.shape[0]):
        row, out = x[i], y[i]
        m = lane_max(row)
        # exp(x - m) once per element, into the output row (in cache), summed in float64:
        # then a scale by 1 / sum (softmax) or the log form (log_softmax). exp(x - m) / s is
        # within ~2 ulps of the exact probability; the rows of 32000 (128 KiB) stay in L2.
        for j in range(row.size):
            out[j] = exp(row[j] - m)
        s = lane_sum_f64(out)
        if log:
            logsum = like(row[0], np.log(s))
            for j in range(row.size):
                out[j] = (row[j] - m) - logsum
        else:
            inv = like(row[0], 1.0 / s)
            for j in range(row.size):
                out[j] = out[j] * inv


@sized_kernel(fastmath={"contract"})
def _softmax_backward(g, y, dx, log):
    for i in prange(g.shape[0]):
        gi, yi, di = g[i], y[i], dx[i]
        # the row sums in float64 (lanes.py: vectorized), rounded once to the row's dtype
        if log:
            total = like(gi[0], lane_sum_f64(gi))
            for j in range(gi.size):
                di[j] = gi[j] - exp(yi[j]) * total
        else:
            dot = like(gi[0], lane_dot_f64(gi, yi))
            for j in range(gi.size):
                di[j] = yi[j] * (gi[j] - dot)


@sized_kernel(fastmath={"contract"})
def _ce_forward(x, target, weight, has_weight, ignore_index, smoothing, loss, row_max, row_logsum):
    n, c = x.shape
    w_sum = weight.sum() if has_weight else c
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        scratch = np.empty(min(CHUNK, c), x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            row = x[i]
            t = target[i]
            if t == ignore_index:
                loss[i] = row_max[i] = row_logsum[i] = 0
                continue
            m, logsum = _row_stats(row, scratch)
            row_max[i], row_logsum[i] = m, logsum
            w_t = weight[t] if has_weight else 1.0
            # -log p_t = (m - x_t) + l: both terms small and exact-ish, no lse - x_t cancellation.
            value = (1.0 - smoothing) * w_t * ((m - row[t]) + logsum)
            if smoothing > 0:
                spread = 0.0  # sum_c w_c (m - x_c)
                for j in range(c):
                    spread += (weight[j] if has_weight else 1.0) * (m - row[j])
                value += smoothing / c * (spread + w_sum * logsum)
            loss[i] = value


@sized_kernel(fastmath={"contract"})
def _ce_backward(grad_loss, x, target, weight, has_weight, row_max, row_logsum, ignore_index, smoothing, dx,
                 in_place):
    """in_place: dx is x itself. Then the loops read and write x alone: a loop storing to
    dx[i] what it computed from x[i] vectorizes only behind LLVM's runtime check that the
    two rows do not overlap, which fails when they are the same row, and it ran scalar (exp
    too): linear_cross_entropy's 512 x 8192 dlogits took 21 ms against 2.8 ms."""
    n, c = x.shape
    w_sum = weight.sum() if has_weight else c
    for i in prange(n):
        out = dx[i]
        t = target[i]
        if t == ignore_index:
            out[:] = 0
            continue
        row = x[i]
        g = grad_loss[i]
        m, logsum = row_max[i], row_logsum[i]
        hard = g * (1.0 - smoothing) * (weight[t] if has_weight else 1.0)
        soft = g * smoothing / c
        # dL/dx_c = hard (p_c - [c = t]) + soft (S_w p_c - w_c)
        p_scale = like(row[0], hard + soft * w_sum)
        soft_c = like(row[0], soft)
        if in_place:
            if has_weight:
                for j in range(c):
                    row[j] = p_scale * exp((row[j] - m) - logsum) - soft_c * weight[j]
            else:
                for j in range(c):
                    row[j] = p_scale * exp((row[j] - m) - logsum) - soft_c
        elif has_weight:
            for j in range(c):
                out[j] = p_scale * exp((row[j] - m) - logsum) - soft_c * weight[j]
        else:
            for j in range(c):
                out[j] = p_scale * exp((row[j] - m) - logsum) - soft_c
        out[t] -= hard


@njit(inline="always")
def _soft_weight(q, weight, has_weight, keep, spread, j):
    """u_j = w_j ((1 - eps) q_j + eps / C), in float64."""
    u = keep * np.float64(q[j]) + spread
    return u * np.float64(weight[j]) if has_weight else u


@sized_kernel(fastmath={"contract"})
def _ce_soft_forward(x, q, weight, has_weight, smoothing, loss, row_max, row_logsum):
    n, c = x.shape
    keep, spread = 1.0 - smoothing, smoothing / c
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        scratch = np.empty(min(CHUNK, c), x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            row, qi = x[i], q[i]
            m, logsum = _row_stats(row, scratch)
            row_max[i], row_logsum[i] = m, logsum
            spread_sum = 0.0  # sum_c u_c (m - x_c)
            u_sum = 0.0
            for j in range(c):
                u = _soft_weight(qi, weight, has_weight, keep, spread, j)
                spread_sum += u * np.float64(m - row[j])
                u_sum += u
            loss[i] = spread_sum + u_sum * logsum


@sized_kernel(fastmath={"contract"})
def _ce_soft_backward(grad_loss, x, q, weight, has_weight, row_max, row_logsum, smoothing, dx, in_place):
    """in_place: dx is x itself, written by a loop over x alone (see _ce_backward)."""
    n, c = x.shape
    keep, spread = 1.0 - smoothing, smoothing / c
    for i in prange(n):
        row, qi, out = x[i], q[i], dx[i]
        u_sum = 0.0
        for j in range(c):
            u_sum += _soft_weight(qi, weight, has_weight, keep, spread, j)
        g = grad_loss[i]
        m, logsum = row_max[i], row_logsum[i]
        p_scale = like(row[0], g * u_sum)
        if in_place:
            for j in range(c):
                u = like(row[0], g * _soft_weight(qi, weight, has_weight, keep, spread, j))
                row[j] = p_scale * exp((row[j] - m) - logsum) - u
        else:
            for j in range(c):
                u = like(row[0], g * _soft_weight(qi, weight, has_weight, keep, spread, j))
                out[j] = p_scale * exp((row[j] - m) - logsum) - u


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_forward(x, log: bool):
    y = empty_like(x)
    _softmax_forward(x.numel(), x.numpy(), y.numpy(), log)
    return y


def softmax_backward(grad_y, y, log: bool):
    dx = empty_like(y)
    _softmax_backward(grad_y.numel(), grad_y.numpy(), y.numpy(), dx.numpy(), log)
    return dx


def _weight_np(weight, like_tensor):
    w = weight if weight is not None else like_tensor.new_ones(1)
    return w.to(like_tensor.dtype).numpy()


def cross_entropy_forward(logits, target, weight, ignore_index: int, label_smoothing: float):
    n = logits.shape[0]
    loss = torch.empty(n, dtype=_stats_dtype(logits.dtype))
    row_max, row_logsum = torch.empty_like(loss), torch.empty_like(loss)
    _ce_forward(logits.numel(), logits.numpy(), target.numpy(), _weight_np(weight, logits), weight is not None,
                ignore_index, label_smoothing, loss.numpy(), row_max.numpy(), row_logsum.numpy())
    return loss, row_max, row_logsum


def cross_entropy_backward(grad_loss, logits, target, weight, row_max, row_logsum, ignore_index: int,
                           label_smoothing: float, out=None):
    """dlogits into a new tensor, or into ``out`` (which may be ``logits`` itself: each
    element is read before it is written, by the same thread)."""
    dx = empty_like(logits) if out is None else out
    _ce_backward(logits.numel(), grad_loss.to(row_max.dtype).numpy(), logits.numpy(), target.numpy(),
                 _weight_np(weight, logits), weight is not None, row_max.numpy(), row_logsum.numpy(),
                 ignore_index, label_smoothing, dx.numpy(), dx.data_ptr() == logits.data_ptr())
    return dx


def cross_entropy_soft_forward(logits, target, weight, label_smoothing: float):
    """(loss, row_max, row_logsum) per row for class-probability targets (N, C) of logits' dtype."""
    n = logits.shape[0]
    loss = torch.empty(n, dtype=_stats_dtype(logits.dtype))
    row_max, row_logsum = torch.empty_like(loss), torch.empty_like(loss)
    _ce_soft_forward(logits.numel(), logits.numpy(), target.numpy(), _weight_np(weight, logits), weight is not None,
                     label_smoothing, loss.numpy(), row_max.numpy(), row_logsum.numpy())
    return loss, row_max, row_logsum


def cross_entropy_soft_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                                label_smoothing: float, out=None):
    """dlogits for class-probability targets, into a new tensor or ``out`` (may be ``logits``)."""
    dx = empty_like(logits) if out is None else out
    _ce_soft_backward(logits.numel(), grad_loss.to(row_max.dtype).numpy(), logits.numpy(), target.numpy(),
                      _weight_np(weight, logits), weight is not None, row_max.numpy(), row_logsum.numpy(),
                      label_smoothing, dx.numpy(), dx.data_ptr() == logits.data_ptr())
    return dx
