"""CPU form of rms_norm, numba, rows in parallel.

Forward, per row while it sits in cache: sum(x^2) in float64 (lanes.lane_sum_sq_f64,
which LLVM vectorizes: 16 float32 lanes in an array ran scalar), rstd from it in float64
and rounded once to x's dtype, then one pass writing y = x * rstd * (offset + w) in
float32 (float64 for float64 x).

Backward: fixed row parts (_PARTS, whatever the thread count: deterministic), each part
writes dx for its rows and adds dy * xhat into its own float64 column partials for
dweight; the partials are summed in a fixed order at the end.
"""

import numpy as np
import torch
from numba import prange

from .fastmath import like
from .lanes import lane_dot_f64, lane_sum_sq_f64
from .memory import empty_like
from .parallel import sized_kernel

_PARTS = 16


@sized_kernel
def _forward(x, scale, eps, y, rstd):
    M, N = x.shape
    for i in prange(M):
        row = x[i]
        r = like(row[0], 1.0 / np.sqrt(lane_sum_sq_f64(row) / N + eps))
        rstd[i] = r
        out = y[i]
        for j in range(N):
            out[j] = row[j] * r * scale[j]


@sized_kernel
def _backward(dy, x, scale, rstd, need_dx, need_dw, dx, dw_parts):
    M, N = x.shape
    per_part = (M + _PARTS - 1) // _PARTS
    for p in prange(_PARTS):
        xhat = np.empty(N, x.dtype)
        g = np.empty(N, x.dtype)
        dw_acc = dw_parts[p]
        for i in range(p * per_part, min(M, (p + 1) * per_part)):
            row, d = x[i], dy[i]
            r = rstd[i]
            for j in range(N):
                xhat[j] = row[j] * r
                g[j] = d[j] * scale[j]
            if need_dw:
                for j in range(N):
                    dw_acc[j] += np.float64(d[j]) * xhat[j]
            if need_dx:
                c = like(row[0], lane_dot_f64(g, xhat) / N)
                out = dx[i]
                for j in range(N):
                    out[j] = r * (g[j] - xhat[j] * c)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(x, weight, offset: float):
    """offset + weight in x's dtype (ones without a weight)."""
    N = x.shape[1]
    return weight + offset if weight is not None else x.new_ones(N)


def forward(x, weight, eps: float, offset: float):
    M, N = x.shape
    y = empty_like(x)
    rstd = torch.empty(M, dtype=_stats_dtype(x.dtype))
    _forward(x.numel(), x.numpy(), _scale(x, weight, offset).numpy(), float(eps), y.numpy(), rstd.numpy())
    return y, rstd


def backward(dy, x, weight, rstd, offset: float, need_dx: bool, need_dw: bool):
    M, N = x.shape
    need_dw = bool(need_dw) and weight is not None
    dx = empty_like(x) if need_dx else x.new_empty((1, 1))
    dw_parts = np.zeros((_PARTS, N if need_dw else 0), np.float64)
    _backward(dy.numel(), dy.numpy(), x.numpy(), _scale(x, weight, offset).numpy(), rstd.numpy(), bool(need_dx),
              need_dw, dx.numpy(), dw_parts)
    dw = torch.from_numpy(dw_parts.sum(0)).to(x.dtype) if need_dw else None
    return dx if need_dx else None, dw
