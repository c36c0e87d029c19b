"""Row reductions that vectorize in numba.

One running sum or max is a serial dependency chain LLVM will not vectorize (it may
not reassociate floating-point adds). ``lane_max`` and ``lane_sum`` keep 16 independent
accumulators, combined at the end. The ``*_f64`` forms accumulate float32 rows in
float64 (sums over thousands of values near 1e4 in float32 lose the digits a
normalization needs: layer_norm, batch_norm) and are compiled on their own with
``fastmath={"reassoc"}``: numba 0.68 keeps an accumulator *array* in memory, so the
independent-lane form ran scalar (0.33 ns per float32 element, no ymm instruction in its
assembly); allowed to reassociate, LLVM splits the one sum into 4 x 4 float64 vector
lanes itself (0.08 ns per element). The split is fixed at compile time: results are
deterministic, and as accurate as 16 explicit lanes. They must stay separate functions
(not ``inline="always"``): numba IR inlining would compile them under the caller's flags.
"""

import numpy as np
from numba import njit

LANES = 16

# Only reassociation: no nnan/ninf (NaN and inf propagate as IEEE says), no contraction
# beyond what the code writes.
_REDUCTION = dict(fastmath={"reassoc"}, error_model="numpy", cache=True)


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


@njit(**_REDUCTION)
def lane_sum_f64(x):
    """sum(x) in float64."""
    total = 0.0
    for j in range(x.size):
        total += np.float64(x[j])
    return total


@njit(**_REDUCTION)
def lane_sum_sq_dev_f64(x, center):
    """sum((x - center)^2) in float64."""
    total = 0.0
    for j in range(x.size):
        d = np.float64(x[j]) - center
        total += d * d
    return total


@njit(**_REDUCTION)
def lane_dot_f64(a, b):
    """sum(a * b) in float64."""
    total = 0.0
    for j in range(a.size):
        total += np.float64(a[j]) * np.float64(b[j])
    return total
