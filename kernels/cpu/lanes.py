"""Row reductions that vectorize in numba.

One running sum or max is a serial dependency chain LLVM will not vectorize: it may not
reassociate floating-point adds, and numba's max() or a compare-and-select needs no-NaN
attributes numba never sets on a function. Accumulating into a small array of
independent lanes (this file's first form) did not help in numba 0.68: the array stays
in memory and the loop ran scalar (0.33 ns per float32 element, no ymm instruction in its
assembly). What vectorizes:

* ``lane_max``: a loop of ``maximum``, the llvm.maximum intrinsic (IEEE 754-2019,
  NaN-propagating), which LLVM reduces with vmaxps (0.08 ns per element, from 0.3-0.45).
* the ``*_f64`` sums, which accumulate float32 rows in float64 (sums over thousands of
  values near 1e4 in float32 lose the digits a normalization needs: layer_norm,
  batch_norm): compiled on their own with ``fastmath={"reassoc"}``, LLVM splits the one
  sum into 4 x 4 float64 vector lanes itself (0.08 ns per element). The split is fixed at
  compile time: deterministic, and as accurate as 16 explicit lanes. They stay separate
  functions (not ``inline="always"``, which would compile them under the caller's
  flags), and a caller never passes them an expression to reassociate: only the sum.

``lane_sum`` (float32) is still the array-of-lanes form.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

LANES = 16

# Only reassociation: no nnan/ninf (NaN and inf propagate as IEEE says), no contraction
# beyond what the code writes.
_REDUCTION = dict(fastmath={"reassoc"}, error_model="numpy", cache=True)


def _neg_inf_of(x):
    """-inf in the dtype of the array x (without reading an element of it)."""
    return -np.inf


@overload(_neg_inf_of)
def _neg_inf_of_impl(x):
    if x.dtype == types.float32:
        return lambda x: np.float32(-np.inf)
    return lambda x: -np.inf


@intrinsic
def maximum(typingctx, a, b):
    """IEEE 754-2019 maximum (NaN if either is NaN), as the LLVM intrinsic: a loop of these
    is a reduction LLVM vectorizes (vmaxps), where numba's max() and a compare-and-select
    stay scalar even under fastmath (LLVM wants function-wide no-NaN attributes for those)."""
    if a != b or not isinstance(a, types.Float):
        return None
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maximum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args)

    return sig, codegen


@njit(inline="always")
def lane_max(x):
    """max(x), -inf for an empty x, NaN if any element is NaN."""
    m = _neg_inf_of(x)
    for j in range(x.size):
        m = maximum(m, x[j])
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


# The sums below also contract d * d + s into one FMA (one rounding instead of two, and
# 0.127 against 0.167 ms on 1024 x 1024 float32).
_REDUCTION_FMA = dict(_REDUCTION, fastmath={"reassoc", "contract"})


@njit(**_REDUCTION_FMA)
def lane_shifted_sums_f64(x, center):
    """(sum(d), sum(d^2)) in float64, d = x - center: a row's mean and variance in one pass,
    mean = center + sum(d) / n, var = sum(d^2) / n - (sum(d) / n)^2. With center one of
    the row's own values the subtraction loses little: (x_k - mean)^2 <= n var for any
    element x_k, so sum(d^2) / n <= (n + 1) var and var keeps all but log10(n + 1) of
    float64's 16 digits (7+ digits left for n up to 1e8: float32 rows need 7)."""
    s1, s2 = 0.0, 0.0
    for j in range(x.size):
        d = np.float64(x[j]) - center
        s1 += d
        s2 += d * d
    return s1, s2


@njit(**_REDUCTION_FMA)
def lane_sum_sq_f64(x):
    """sum(x^2) in float64 (every term >= 0: no cancellation)."""
    total = 0.0
    for j in range(x.size):
        v = np.float64(x[j])
        total += v * v
    return total
