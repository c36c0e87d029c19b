"""CPU form of batch_norm on x viewed as (N, C, L), numba.

Every reduction runs over (n, c) slices of L contiguous values in parallel, each slice
summed in float64 lanes into its own slot of an (N, C) partials array, and the
partials are then added over n in a fixed order: deterministic, and parallel even
when C is 3 and N * L is millions. The statistics are exact two-pass: the mean, then
the sum of squared deviations about it (never E[x^2] - E[x]^2). The mean is float64
(see kiln/ops/layer_norm.py: float32 would round a channel near 1e4 by 5% of a 1e-2
std); the elementwise passes use it as hi + lo float32 parts.
"""

import numpy as np
import torch
from numba import njit, prange

from .fastmath import like
from .lanes import lane_dot_f64, lane_sum_f64, lane_sum_sq_dev_f64
from .parallel import sized_kernel


@njit(inline="always")
def _split(mean, like_x):
    hi = like(like_x, mean)
    return hi, like(like_x, mean - hi)


@sized_kernel
def _backward(dy, x, mean, invstd, w, has_w, training, need_sums, need_dx, partial, sum_dy, sum_dy_xhat, dx):
    """Per channel sum(dy) and sum(dy xhat) (when need_sums: the (n, c) slices in parallel,
    added over n in order), then dx (when need_dx): training, dx = w invstd (dy - sum(dy)/m -
    xhat sum(dy xhat)/m) with m = N L values; eval, dx = w invstd dy."""
    n, c, L = x.shape
    if need_sums:
        for k in prange(n * c):
            i, ch = k // c, k % c
            src, g = x[i, ch], dy[i, ch]
            hi, lo = _split(mean[ch], src[0])
            r = like(src[0], invstd[ch])
            xhat = np.empty(L, x.dtype)
            for j in range(L):
                xhat[j] = ((src[j] - hi) - lo) * r
            partial[0, i, ch] = lane_sum_f64(g)
            partial[1, i, ch] = lane_dot_f64(g, xhat)
        _sum_over_batch(partial[0], sum_dy, 1)
        _sum_over_batch(partial[1], sum_dy_xhat, 1)
    if not need_dx:
        return
    count = n * L
    for k in prange(n * c):
        i, ch = k // c, k % c
        src, g, out = x[i, ch], dy[i, ch], dx[i, ch]
        s = like(src[0], np.float64(invstd[ch]) * (np.float64(w[ch]) if has_w else 1.0))
        if training:
            hi, lo = _split(mean[ch], src[0])
            r = like(src[0], invstd[ch])
            a, b = like(src[0], sum_dy[ch] / count), like(src[0], sum_dy_xhat[ch] / count)
            for j in range(L):
                out[j] = s * ((g[j] - a) - ((src[j] - hi) - lo) * r * b)
        else:
            for j in range(L):
                out[j] = s * g[j]


@sized_kernel
def _statistics(x, partial, mean, var):
    """mean (float64) and biased variance of each channel of x (N, C, L): the (n, c) slices'
    sums in parallel, added over n in order; then the squared deviations the same way."""
    n, c, L = x.shape
    for k in prange(n * c):
        partial[k // c, k % c] = lane_sum_f64(x[k // c, k % c])
    _sum_over_batch(partial, mean, n * L)
    for k in prange(n * c):
        partial[k // c, k % c] = lane_sum_sq_dev_f64(x[k // c, k % c], mean[k % c])
    _sum_over_batch(partial, var, n * L)


@njit(inline="always")
def _sum_over_batch(partial, out, count):
    """out[c] = (partial[0, c] + partial[1, c] + ...) / count, the rows added in order."""
    n, c = partial.shape
    for ch in range(c):
        total = 0.0
        for i in range(n):
            total += partial[i, ch]
        out[ch] = total / count


@sized_kernel
def _apply(x, mean, invstd, w, b, has_w, has_b, y):
    """y = (x - mean) * invstd * w + b per channel; the scale and shift formed in float64."""
    n, c, L = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        src, out = x[i, ch], y[i, ch]
        hi, lo = _split(mean[ch], src[0])
        scale = np.float64(invstd[ch]) * (np.float64(w[ch]) if has_w else 1.0)
        s, t = like(src[0], scale), like(src[0], np.float64(b[ch]) if has_b else 0.0)
        for j in range(L):
            out[j] = ((src[j] - hi) - lo) * s + t


def stats(x):
    """Per-channel mean (float64) and biased variance of x (N, C, L)."""
    N, C, _ = x.shape
    mean, var = np.empty(C, np.float64), np.empty(C, np.float64)
    xn = x.numpy()
    _statistics(xn.size, xn, np.empty((N, C), np.float64), mean, var)
    return torch.from_numpy(mean), torch.from_numpy(var.astype(xn.dtype, copy=False))


def apply(x, mean, invstd, weight, bias):
    y = torch.empty_like(x)
    xn = x.numpy()
    absent = xn[0, :, 0]  # a placeholder of the right dtype where weight or bias is None
    _apply(xn.size, xn, mean.numpy(), invstd.numpy(), absent if weight is None else weight.numpy(),
           absent if bias is None else bias.numpy(), weight is not None, bias is not None, y.numpy())
    return y


def backward(dy, x, mean, invstd, weight, training: bool, need_dx: bool, need_dw: bool, need_db: bool):
    N, C, _ = x.shape
    need_sums = need_dw or need_db or (need_dx and training)
    sum_dy, sum_dy_xhat = np.empty(C, np.float64), np.empty(C, np.float64)
    dx = torch.empty_like(x) if need_dx else None
    xn = x.numpy()
    _backward(xn.size, dy.numpy(), xn, mean.numpy(), invstd.numpy(), xn[0, :, 0] if weight is None else weight.numpy(),
              weight is not None, bool(training), need_sums, bool(need_dx),
              np.empty((2, N, C) if need_sums else (2, 1, 1), np.float64), sum_dy, sum_dy_xhat,
              dx.numpy() if need_dx else xn)
    dw = torch.from_numpy(sum_dy_xhat).to(x.dtype) if need_dw else None
    db = torch.from_numpy(sum_dy).to(x.dtype) if need_db else None
    return dx, dw, db
