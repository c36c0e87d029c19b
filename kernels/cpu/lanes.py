"""Row reductions that vectorize in numba: 16 (or 8 float64) independent accumulators.

One running sum or max is a serial dependency chain LLVM will not vectorize (it may
not reassociate floating-point adds); a fixed set of lanes, combined at the end, is
what it turns into SIMD code. The ``*_f64`` forms accumulate float32 rows in float64:
sums over thousands of values near 1e4 in float32 lose the digits a normalization
needs (layer_norm, batch_norm).
"""

import numpy as np
from numba import njit

LANES = 16
LANES_F64 = 8


@njit(inline="always")
def lane_max(x):
    lanes = np.full(LANES, -np.inf, x.dtype)
    n_full = x.size - x.size % LANES
    for j0 in range(0, n_full, LANES):
        for k in range(LANES):
            lanes[k] = max(lanes[k], x[j0 + k])
    m = lanes.max()
    for j in range(n_full, x.size):
        m = max(m, x[j])
    return m


@njit(inline="always")
def lane_sum(x, n):
    """Sum of x[:n] in x's dtype."""
    lanes = np.zeros(LANES, x.dtype)
    n_full = n - n % LANES
    for j0 in range(0, n_full, LANES):
        for k in range(LANES):
            lanes[k] += x[j0 + k]
    total = lanes.sum()
    for j in range(n_full, n):
        total += x[j]
    return total


@njit(inline="always")
def lane_sum_f64(x):
    lanes = np.zeros(LANES_F64, np.float64)
    n_full = x.size - x.size % LANES_F64
    for j0 in range(0, n_full, LANES_F64):
        for k in range(LANES_F64):
            lanes[k] += x[j0 + k]
    total = lanes.sum()
    for j in range(n_full, x.size):
        total += x[j]
    return total


@njit(inline="always")
def lane_sum_sq_dev_f64(x, center):
    """sum((x - center)^2) in float64."""
    lanes = np.zeros(LANES_F64, np.float64)
    n_full = x.size - x.size % LANES_F64
    for j0 in range(0, n_full, LANES_F64):
        for k in range(LANES_F64):
            d = x[j0 + k] - center
            lanes[k] += d * d
    total = lanes.sum()
    for j in range(n_full, x.size):
        d = x[j] - center
        total += d * d
    return total


@njit(inline="always")
def lane_dot_f64(a, b):
    """sum(a * b) in float64."""
    lanes = np.zeros(LANES_F64, np.float64)
    n_full = a.size - a.size % LANES_F64
    for j0 in range(0, n_full, LANES_F64):
        for k in range(LANES_F64):
            lanes[k] += np.float64(a[j0 + k]) * b[j0 + k]
    total = lanes.sum()
    for j in range(n_full, a.size):
        total += np.float64(a[j]) * b[j]
    return total
