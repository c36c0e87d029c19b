"""CPU form of linear_act: y = act(x @ W^T + b), numba around torch's BLAS.

A hand-rolled GEMM in numba runs at a fraction of MKL's rate (DESIGN.md), so the
block products come from ``torch.mm`` and everything around them is numba:

* forward: rows in blocks small enough that a block of y stays in L2; each block's
  product is followed at once by one numba pass that adds the bias, applies the
  activation and (for gelu, gelu_tanh, silu) keeps z, while the block is in cache.
* backward: per row block, one numba pass makes dz = dy * act'(saved) and adds its
  column sums into db (columns split over threads: deterministic, no atomics);
  dx for the block is multiplied out while dz is in cache; dW = dz^T x is one GEMM
  at the end, which needs all of dz, so dz is one (M, N) buffer in backward.

float32 and float64; math accumulates in the storage dtype except db (float64).
"""

import math

import numpy as np
import torch
from numba import njit, prange

from ..activations import GELU, GELU_TANH, GELU_TANH_CUBIC, IDENTITY, INV_SQRT_2, INV_SQRT_2PI
from ..activations import RELU, SIGMOID, SILU, SQRT_2_OVER_PI, TANH

_BLOCK_BYTES = 1 << 19  # one block of y: half of a 1-2 MiB L2 leaves room for x's rows
_DB_COLUMNS = 256  # columns per thread in the dz pass


def _rows_per_block(n_cols: int, itemsize: int) -> int:
    return max(8, _BLOCK_BYTES // max(1, n_cols * itemsize))


@njit(inline="always", fastmath=False)
def _sigmoid(z):
    # exp of a non-positive argument only: no overflow for large |z|.
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@njit(inline="always")
def _act(z, code):
    if code == RELU:
        return z if z > 0 else 0.0 * z
    if code == GELU:
        return 0.5 * z * (1.0 + math.erf(z * INV_SQRT_2))
    if code == GELU_TANH:
        return 0.5 * z * (1.0 + math.tanh(SQRT_2_OVER_PI * (z + GELU_TANH_CUBIC * z * z * z)))
    if code == TANH:
        return math.tanh(z)
    if code == SIGMOID:
        return _sigmoid(z)
    if code == SILU:
        return z * _sigmoid(z)
    return z


@njit(inline="always")
def _act_grad(s, code):
    """act'(z) from ``s``: the output y for relu, tanh, sigmoid; z for the others."""
    if code == RELU:
        return 1.0 if s > 0 else 0.0
    if code == TANH:
        return 1.0 - s * s
    if code == SIGMOID:
        return s * (1.0 - s)
    if code == GELU:
        return 0.5 * (1.0 + math.erf(s * INV_SQRT_2)) + s * INV_SQRT_2PI * math.exp(-0.5 * s * s)
    if code == GELU_TANH:
        t = math.tanh(SQRT_2_OVER_PI * (s + GELU_TANH_CUBIC * s * s * s))
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_CUBIC * s * s)
        return 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * du
    if code == SILU:
        sg = _sigmoid(s)
        return sg * (1.0 + s * (1.0 - sg))
    return 1.0


@njit(parallel=True, cache=True)
def _epilogue(y, bias, has_bias, preact, save_preact, code):
    """In place on one block: y <- act(y + bias); preact <- y + bias when asked."""
    rows, cols = y.shape
    for i in prange(rows):
        for j in range(cols):
            z = y[i, j] + bias[j] if has_bias else y[i, j]
            if save_preact:
                preact[i, j] = z
            y[i, j] = _act(z, code)


@njit(parallel=True, cache=True)
def _grad_preact(dy, saved, has_saved, dz, db_acc, code, chunk):
    """dz = dy * act'(saved) for one block, and db_acc += column sums of dz."""
    rows, cols = dy.shape
    n_chunks = (cols + chunk - 1) // chunk
    for c in prange(n_chunks):
        j0 = c * chunk
        j1 = min(cols, j0 + chunk)
        col_sum = np.zeros(j1 - j0, np.float64)
        for i in range(rows):
            for j in range(j0, j1):
                g = dy[i, j] * _act_grad(saved[i, j], code) if has_saved else dy[i, j]
                dz[i, j] = g
                col_sum[j - j0] += g
        for j in range(j0, j1):
            db_acc[j] += col_sum[j - j0]


def forward(x, weight, bias, activation: int, save_preact: bool):
    M, N = x.shape[0], weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype)
    preact = torch.empty((M, N), dtype=x.dtype) if save_preact else None
    bias_np = (bias if bias is not None else out.new_empty(1)).numpy()
    dummy = out.new_empty((1, 1)).numpy()
    w_t = weight.t()
    step = _rows_per_block(N, x.element_size())
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        block = out[r0:r1]
        torch.mm(x[r0:r1], w_t, out=block)
        _epilogue(block.numpy(), bias_np, bias is not None,
                  preact[r0:r1].numpy() if save_preact else dummy, save_preact, activation)
    return out, preact


def backward(grad_out, x, weight, saved, activation: int, need_dx: bool, need_dw: bool, need_db: bool):
    M, N = grad_out.shape
    dz = torch.empty_like(grad_out)
    dx = torch.empty_like(x) if need_dx else None
    db_acc = np.zeros(N, np.float64)
    saved_np = saved.numpy() if saved is not None else grad_out.new_empty((1, 1)).numpy()
    step = _rows_per_block(N, grad_out.element_size())
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        dz_block = dz[r0:r1]
        _grad_preact(grad_out[r0:r1].numpy(), saved_np[r0:r1] if saved is not None else saved_np,
                     saved is not None, dz_block.numpy(), db_acc, activation, _DB_COLUMNS)
        if need_dx:
            torch.mm(dz_block, weight, out=dx[r0:r1])
    dw = torch.mm(dz.t(), x) if need_dw else None
    db = torch.from_numpy(db_acc).to(grad_out.dtype) if need_db else None
    return dx, dw, db
