"""CPU form of layer_norm, numba, rows in parallel.

Forward, per row while it sits in cache: the mean and the variance about it as two
float64 lane sums (float32 sums of 5120 values near 1e4 lose the digits a row with
std 1e-2 needs), then one pass writing y. The mean is kept in float64 (see
kiln/ops/layer_norm.py for why): y uses it as hi + lo, two float32 parts, so that
(x - hi) - lo stays float32 arithmetic (vectorized) yet exact near the mean. Wide
float32 rows (_BLOCKED_MIN_N) sum their deviations from a center near the mean in float32
blocks instead, added up in float64 (_forward_blocked): half the vector work of the
statistics pass, as accurate to within 1e-8 normwise.

Backward: fixed row parts (_PARTS, whatever the thread count: deterministic), each
part writes dx for its rows and adds dy * xhat and dy into its own column partials for
dweight and dbias (8 rows at a time in x's dtype, then into float64: normwise error 7e-8
against 5e-8 all-float64, for 12% of the kernel); a row's two sums for dx are in x's dtype
(see _row_sums); the partials are summed in a fixed
order at the end, in the same kernel after its parallel loop (numpy's sum, a cast and
two tensors cost more than that loop at 1024 columns).

y and dx come from memory.empty (2 MiB pages when large): at these sizes the page faults
of a fresh 4 KiB-page output cost more than the kernel (see memory.py).
"""

import numpy as np
import torch
from numba import njit, prange

from .fastmath import like
from .lanes import lane_shifted_sums_f64, lane_sum_f64, lane_sum_sq_dev_f64
from .memory import HUGE_MIN_BYTES, empty_like
from .parallel import sized_kernel

_PARTS = 16
_FLUSH_ROWS = 8  # rows of dweight / dbias summed in x's dtype before the float64 partials
# a * b + c as one FMA (one rounding, fewer instructions); never reassociation here, which
# could turn (x - hi) - lo back into x - (hi + lo)
_CONTRACT = {"fastmath": {"contract"}}


@njit(inline="always")
def _split(mean, like_x):
    hi = like(like_x, mean)
    return hi, like(like_x, mean - hi)


@njit(inline="always")
def _normalize_row(row, mu, r, w, b, out):
    """out = (row - mu) * r * w + b, the float64 mean applied as hi + lo (see _split)."""
    hi, lo = _split(mu, row[0])
    r_x = like(row[0], r)
    for j in range(row.size):
        out[j] = ((row[j] - hi) - lo) * r_x * w[j] + b[j]


@sized_kernel
def _forward(x, w, b, eps, y, mean, rstd):
    M, N = x.shape
    for i in prange(M):
        row = x[i]
        mu = lane_sum_f64(row) / N
        r = 1.0 / np.sqrt(lane_sum_sq_dev_f64(row, mu) / N + eps)
        mean[i], rstd[i] = mu, r
        _normalize_row(row, mu, r, w, b, y[i])


@sized_kernel(**_CONTRACT)
def _forward_one_pass(x, w, b, eps, y, mean, rstd):
    """_forward with the mean and variance from one pass of shifted float64 sums (for
    float32 rows: lanes.lane_shifted_sums_f64 keeps 7+ of their digits)."""
    M, N = x.shape
    for i in prange(M):
        row = x[i]
        center = np.float64(row[0])
        s1, s2 = lane_shifted_sums_f64(row, center)
        shift = s1 / N
        mu = center + shift
        r = 1.0 / np.sqrt(max(s2 / N - shift * shift, 0.0) + eps)
        mean[i], rstd[i] = mu, r
        _normalize_row(row, mu, r, w, b, y[i])


# Rows at least this wide (float32) take _forward_blocked: below it the head mean's scalar
# adds cost more than the float64 sums they replace (3072 x 128: 148 -> 182 us on one core).
_BLOCKED_MIN_N = 512
_BLOCK = 1024  # float32 elements summed before the block's sums go into float64


@njit(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)
def _blocked_shifted_sums(x, center):
    """(sum(d), sum(d^2)) in float64, d = x - center in x's dtype: each block of _BLOCK
    elements summed in float32 (8-wide lanes, 4 accumulators: 32 partial sums of 32 terms),
    the blocks added in float64. A function of its own for the reassociation (see
    _row_sums)."""
    s1, s2 = 0.0, 0.0
    n = x.size
    for j0 in range(0, n, _BLOCK):
        b1, b2 = like(center, 0.0), like(center, 0.0)
        for j in range(j0, min(n, j0 + _BLOCK)):
            d = x[j] - center
            b1 += d
            b2 += d * d
        s1 += np.float64(b1)
        s2 += np.float64(b2)
    return s1, s2


@sized_kernel(**_CONTRACT)
def _forward_blocked(x, w, b, eps, y, mean, rstd):
    """_forward_one_pass for wide float32 rows with float32 arithmetic in the statistics
    pass (_blocked_shifted_sums): 4 vector operations per 8 elements against 9 for the
    float64 lanes (float conversions, 4-wide adds), 1024 x 1024 on one core 245 -> 210 us.
    The center is the mean of the row's first 16 values, not one value: var = sum(d^2)/n -
    shift^2 cancels by a factor 1 + shift^2/var, and a 16-value mean is typically 1/4 of a
    standard deviation from the row's mean (one value: 1). It can be up to sqrt(n/16) of
    them off (rows that start with outliers: 16384 wide, 9.9e-6 normwise): a row whose
    shift^2 exceeds its variance sums again about its mean, so that the factor stays < 2.
    The center is rounded to float32 so that x - center is float32 arithmetic, exact for x
    near it; the mean itself stays float64 (center + shift). Against float64 the normwise
    error of y went 4.0e-8 -> 4.5e-8 (random rows), 3.9e-8 either way (mean 1e4, std 1e-2)."""
    M, N = x.shape
    head = min(N, 16)
    for i in prange(M):
        row = x[i]
        c64 = 0.0
        for j in range(head):
            c64 += np.float64(row[j])
        center = like(row[0], c64 / head)
        s1, s2 = _blocked_shifted_sums(row, center)
        shift = s1 / N
        if 2.0 * shift * shift > s2 / N:  # shift^2 > var: cancelling by over 2x; again about the mean
            center = like(row[0], np.float64(center) + shift)
            s1, s2 = _blocked_shifted_sums(row, center)
            shift = s1 / N
        mu = np.float64(center) + shift
        r = 1.0 / np.sqrt(max(s2 / N - shift * shift, 0.0) + eps)
        mean[i], rstd[i] = mu, r
        _normalize_row(row, mu, r, w, b, y[i])


@njit(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)
def _row_sums(xhat, wdy):
    """sum(w dy xhat) and sum(w dy) in x's dtype. A function of its own so that reassociation
    (what lets LLVM vectorize the two sums, into 8-wide float32 lanes) applies to these
    products and sums only: in the caller it could rewrite (x - hi) - lo as x - (hi + lo),
    which is the float32 mean again. float32 sums, as torch's: the two means are rounded to
    x's dtype for the dx pass anyway, and xhat (the part that needs the float64 mean) is
    already exact to float32 here; float64 sums (8 conversions and 4-wide adds per 8
    elements) made this kernel 8% (3072 x 128) to 17% (1024 x 1024) slower on one core for
    the same dx error against float64 torch (5.7e-8 vs 5.8e-8 normwise)."""
    s_xhat, s_one = like(xhat[0], 0.0), like(xhat[0], 0.0)
    for j in range(xhat.size):
        s_xhat += wdy[j] * xhat[j]
        s_one += wdy[j]
    return s_xhat, s_one


@njit(inline="always")
def _flush(acc, acc_f64):
    for j in range(acc.size):
        acc_f64[j] += np.float64(acc[j])
        acc[j] = 0


@sized_kernel(**_CONTRACT)
def _backward(dy, x, w, mean, rstd, need_dx, dx, dw, db):
    M, N = x.shape
    per_part = (M + _PARTS - 1) // _PARTS
    dw_parts = np.zeros((_PARTS, N))
    db_parts = np.zeros((_PARTS, N))
    for p in prange(_PARTS):
        xhat = np.empty(N, x.dtype)
        wdy = np.empty(N, x.dtype)
        # dy xhat and dy of up to _FLUSH_ROWS rows in x's dtype (vector FMAs 8 wide for
        # float32), then added into the part's float64 partials: float64 throughout cost
        # conversions and 4-wide arithmetic per element (this kernel at 1024 x 1024 on one
        # core: 0.59 -> 0.52 ms)
        dw_acc = np.zeros(N, x.dtype)
        db_acc = np.zeros(N, x.dtype)
        lo_row, hi_row = p * per_part, min(M, (p + 1) * per_part)
        for i in range(lo_row, hi_row):
            row, g = x[i], dy[i]
            hi, lo = _split(mean[i], row[0])
            r_x = like(row[0], rstd[i])
            for j in range(N):
                xh = ((row[j] - hi) - lo) * r_x
                xhat[j] = xh
                wdy[j] = g[j] * w[j]
                dw_acc[j] += g[j] * xh
                db_acc[j] += g[j]
            if (i - lo_row) % _FLUSH_ROWS == _FLUSH_ROWS - 1 or i == hi_row - 1:
                _flush(dw_acc, dw_parts[p])
                _flush(db_acc, db_parts[p])
            if need_dx:
                s_xhat, s_one = _row_sums(xhat, wdy)
                c_xhat = like(row[0], s_xhat / N)
                c_one = like(row[0], s_one / N)
                out = dx[i]
                for j in range(N):
                    out[j] = r_x * ((wdy[j] - xhat[j] * c_xhat) - c_one)
    _sum_parts(dw_parts, dw)
    _sum_parts(db_parts, db)


@njit(inline="always")
def _sum_parts(parts, out):
    """out = the parts' sum over the first axis, added in part order (after the prange:
    serial, deterministic), rounded once to out's dtype."""
    P, N = parts.shape
    for j in range(N):
        total = 0.0
        for p in range(P):
            total += parts[p, j]
        out[j] = total


# The per-row statistics and the parameter gradients are small arrays every element of
# which a kernel writes: numpy makes them (np.empty and torch.from_numpy, ~1 us, against
# ~2 us for torch.empty and Tensor.numpy on a fresh tensor). Each Tensor.numpy costs ~1 us
# too: forward_arrays hands back the arrays it made, and the eager autograd path of
# kiln/ops/layer_norm.py keeps them for backward_arrays, which then converts only dy.


def _output_like(x):
    # memory.empty's size test and pool cost ~2 us more than torch.empty below its threshold
    return torch.empty_like(x) if x.numel() * x.element_size() < HUGE_MIN_BYTES else empty_like(x)


def forward_arrays(x, weight, bias, eps: float):
    """forward's y, then the numpy arrays backward_arrays takes: x, weight (ones for None),
    mean (float64) and rstd."""
    M, N = x.shape
    y = _output_like(x)
    x_np = x.numpy()
    mean = np.empty(M, np.float64)
    rstd = np.empty(M, x_np.dtype)
    w = weight.numpy() if weight is not None else np.ones(N, x_np.dtype)
    b = bias.numpy() if bias is not None else np.zeros(N, x_np.dtype)
    if x_np.dtype != np.float32:
        kernel = _forward
    else:
        kernel = _forward_blocked if N >= _BLOCKED_MIN_N else _forward_one_pass
    kernel(x_np.size, x_np, w, b, float(eps), y.numpy(), mean, rstd)
    return y, x_np, w, mean, rstd


def forward(x, weight, bias, eps: float):
    y, _, _, mean, rstd = forward_arrays(x, weight, bias, eps)
    return y, torch.from_numpy(mean), torch.from_numpy(rstd)


def backward_arrays(dy, x_np, w, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    """backward on forward_arrays' arrays; dy a contiguous tensor."""
    M, N = x_np.shape
    dx = _output_like(dy) if need_dx else dy.new_empty((1, 1))
    dw, db = np.empty(N, x_np.dtype), np.empty(N, x_np.dtype)
    _backward(x_np.size, dy.numpy(), x_np, w, mean, rstd, need_dx, dx.numpy(), dw, db)
    return (dx if need_dx else None, torch.from_numpy(dw) if need_dw else None,
            torch.from_numpy(db) if need_db else None)


def backward(dy, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    N = x.shape[1]
    x_np = x.numpy()
    w = weight.numpy() if weight is not None else np.ones(N, x_np.dtype)
    return backward_arrays(dy, x_np, w, mean.numpy(), rstd.numpy(), need_dx, need_dw, need_db)
