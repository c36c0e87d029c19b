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
def _slice_sums(x, partial):
    n, c, _ = x.shape
    for k in prange(n * c):
        partial[k // c, k % c] = lane_sum_f64(x[k // c, k % c])


@sized_kernel
def _slice_sq_dev(x, mean, partial):
    n, c, _ = x.shape
    for k in prange(n * c):
        partial[k // c, k % c] = lane_sum_sq_dev_f64(x[k // c, k % c], mean[k % c])


@sized_kernel
def _apply(x, mean, scale, shift, y):
    """y = (x - mean) * scale + shift per channel; scale = invstd * w, shift = b."""
    n, c, L = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        src, out = x[i, ch], y[i, ch]
        hi, lo = _split(mean[ch], src[0])
        s, t = like(src[0], scale[ch]), like(src[0], shift[ch])
        for j in range(L):
            out[j] = ((src[j] - hi) - lo) * s + t


@sized_kernel
def _grad_sums(dy, x, mean, invstd, sum_dy, sum_dy_xhat):
    """Per (n, c) slice: sum(dy) and sum(dy * xhat)."""
    n, c, L = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        src, g = x[i, ch], dy[i, ch]
        hi, lo = _split(mean[ch], src[0])
        r = like(src[0], invstd[ch])
        xhat = np.empty(L, x.dtype)
        for j in range(L):
            xhat[j] = ((src[j] - hi) - lo) * r
        sum_dy[i, ch] = lane_sum_f64(g)
        sum_dy_xhat[i, ch] = lane_dot_f64(g, xhat)


@sized_kernel
def _dx(dy, x, mean, invstd, w, c_one, c_xhat, training, dx):
    """training: dx = w invstd (dy - c_one - xhat c_xhat); eval: dx = w invstd dy."""
    n, c, L = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        src, g, out = x[i, ch], dy[i, ch], dx[i, ch]
        s = like(src[0], invstd[ch] * w[ch])
        if training:
            hi, lo = _split(mean[ch], src[0])
            r = like(src[0], invstd[ch])
            a, b = like(src[0], c_one[ch]), like(src[0], c_xhat[ch])
            for j in range(L):
                out[j] = s * ((g[j] - a) - ((src[j] - hi) - lo) * r * b)
        else:
            for j in range(L):
                out[j] = s * g[j]


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats(x):
    """Per-channel mean (float64) and biased variance of x (N, C, L)."""
    N, C, L = x.shape
    partial = np.empty((N, C), np.float64)
    xn = x.numpy()
    _slice_sums(xn.size, xn, partial)
    mean = partial.sum(0) / (N * L)
    _slice_sq_dev(xn.size, xn, mean, partial)
    var = partial.sum(0) / (N * L)
    return torch.from_numpy(mean), torch.from_numpy(var).to(_stats_dtype(x.dtype))


def apply(x, mean, invstd, weight, bias):
    C = x.shape[1]
    scale = invstd.double() * (weight.double() if weight is not None else 1.0)
    shift = bias.double() if bias is not None else torch.zeros(C, dtype=torch.float64)
    y = torch.empty_like(x)
    _apply(x.numel(), x.numpy(), mean.double().numpy(), scale.numpy(), shift.numpy(), y.numpy())
    return y


def backward(dy, x, mean, invstd, weight, training: bool, need_dx: bool, need_dw: bool, need_db: bool):
    N, C, L = x.shape
    mean_np, invstd_np = mean.double().numpy(), invstd.double().numpy()
    sums_needed = need_dw or need_db or (need_dx and training)
    sum_dy = sum_dy_xhat = None
    if sums_needed:
        part_dy, part_dy_xhat = np.empty((N, C), np.float64), np.empty((N, C), np.float64)
        _grad_sums(dy.numel(), dy.numpy(), x.numpy(), mean_np, invstd_np, part_dy, part_dy_xhat)
        sum_dy, sum_dy_xhat = part_dy.sum(0), part_dy_xhat.sum(0)
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        n = N * L
        w = weight.double().numpy() if weight is not None else np.ones(C)
        c_one = sum_dy / n if training else np.zeros(C)
        c_xhat = sum_dy_xhat / n if training else np.zeros(C)
        _dx(dy.numel(), dy.numpy(), x.numpy(), mean_np, invstd_np, w, c_one, c_xhat, training, dx.numpy())
    dw = torch.from_numpy(sum_dy_xhat).to(x.dtype) if need_dw else None
    db = torch.from_numpy(sum_dy).to(x.dtype) if need_db else None
    return dx, dw, db
