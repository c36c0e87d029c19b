"""Triton form of linear_act: y = act(x @ W^T + b), and its backward.

Forward is one tiled GEMM (grouped program order for L2 reuse, float32 accumulation) whose
epilogue adds the bias and applies the activation. It writes y and, when asked
(``save_preact``), the pre-activation z. What the op saves for backward follows
``kernels/activations.py``: y itself for relu / tanh / sigmoid (act' is a function of y),
z for gelu / gelu_tanh / silu, nothing for identity.

Backward never materialises dz = dy * act'(z): each gradient GEMM recomputes it in its
prologue, right after it loads a tile of dy and the matching tile of the saved tensor.
dz is a pointwise function of two tiles the GEMM reads anyway, so recomputing it in both
kernels costs a few FLOPs per element, while a separate pointwise kernel would write and
re-read an (M, N) buffer (and need the memory for it). The two kernels are

* dx = dz @ W      tiles over (M, K), loops over N;
* dW = dz^T @ x    tiles over (N, K), loops over M; the programs of the first K tile also
  sum their dz tiles over M into db (each db element is written by exactly one program:
  deterministic, no atomics).

Dropout (DROPOUT, p > 0) is fused too: the forward epilogue multiplies act(z) by scale =
1/(1-p) or 0, the keep bit of element (m, n) from ``tl.randint(seed, offset + m N + n)``
(dropout.py's rule, bit for bit the other forms); both gradient prologues regenerate the
same bits, dz = dy * factor * act'(saved). The mask is never stored. With dropout, the second
output for tanh / sigmoid is act(z) before dropout (SAVE_ACT), since their y is scaled.

Block sizes are autotuned on the GPU; under TRITON_INTERPRET=1 (CPU tests) one small
config is used. For float32 inputs tl.dot follows torch.backends.cuda.matmul.allow_tf32.
"""

import os

import torch
import triton
import triton.language as tl

from .dropout import keep_mask
from ..activations import (
    GELU,
    GELU_TANH,
    GELU_TANH_CUBIC,
    IDENTITY,
    INV_SQRT_2,
    INV_SQRT_2PI,
    RELU,
    SIGMOID,
    SILU,
    SQRT_2_OVER_PI,
    TANH,
)

# Globals read inside @triton.jit code must be constexpr. Under TRITON_INTERPRET=1 a
# constexpr on the LEFT of a tensor product wraps the result in a constexpr and breaks
# (triton 3.9), so products below are written tensor-first: `z * _C`, never `_C * z`.
_IDENTITY = tl.constexpr(IDENTITY)
_RELU = tl.constexpr(RELU)
_GELU = tl.constexpr(GELU)
_GELU_TANH = tl.constexpr(GELU_TANH)
_TANH = tl.constexpr(TANH)
_SIGMOID = tl.constexpr(SIGMOID)
_SILU = tl.constexpr(SILU)
_SQRT_2_OVER_PI = tl.constexpr(SQRT_2_OVER_PI)
_CUBIC = tl.constexpr(GELU_TANH_CUBIC)
_INV_SQRT_2 = tl.constexpr(INV_SQRT_2)
_INV_SQRT_2PI = tl.constexpr(INV_SQRT_2PI)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter (triton 3.9) stores bfloat16 as uint16 and its tl.dot multiplies those raw
# bits as integers; there the operands are widened to float32 first (exact).
_UPCAST_BF16_DOT = tl.constexpr(_INTERPRET)

# (rows, cols) of the output tile, reduction block, num_warps, num_stages. The gradient
# kernels keep a dz tile (and the saved tile it comes from) live in registers next to the
# accumulator, so they use a narrower reduction block and more warps. Checked with ptxas -v
# (sm_90a, triton 3.9, every activation): no spills in fp16 / bf16 / fp32, except dW at
# 128x128x32 with fp32 + tf32 (8-12 bytes).
_FWD_TILES = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 8, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 32, 4, 5),
]
_BWD_TILES = [
    (128, 128, 32, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 64, 32, 8, 4),
    (64, 128, 32, 8, 4),
    (64, 128, 64, 8, 3),
    (64, 64, 32, 4, 4),
]
_INTERPRET_TILES = [(32, 32, 32, 4, 1)]


def _configs(rows, cols, red, tiles):
    tiles = _INTERPRET_TILES if _INTERPRET else tiles
    return [
        triton.Config({rows: r, cols: c, red: k, "GROUP": 8}, num_warps=w, num_stages=s)
        for r, c, k, w, s in tiles
    ]


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    # Grouped ordering: GROUP consecutive row tiles sweep the column tiles together, so
    # the column operand's tiles are reused from L2.
    width = GROUP * n_cols
    first = (pid // width) * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _dot(a, b, acc, ACC_DT: tl.constexpr, PREC: tl.constexpr):
    if _UPCAST_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC_DT)


@triton.jit
def _tanh(u):
    # exp of a non-positive argument never overflows; below |u| = 0.05 the odd Taylor
    # series (to u^9) avoids the cancellation in 1 - e.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0, -t, t)
    u2 = u * u
    p = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(u) < 0.05, p, t)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))  # exp overflow gives 1/inf = 0, the right limit


@triton.jit
def _act(z, ACT: tl.constexpr):
    y = z
    if ACT == _RELU:
        y = tl.maximum(z, 0.0)
    elif ACT == _GELU:
        y = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT_2))
    elif ACT == _GELU_TANH:
        y = 0.5 * z * (1.0 + _tanh((z + z * z * z * _CUBIC) * _SQRT_2_OVER_PI))
    elif ACT == _TANH:
        y = _tanh(z)
    elif ACT == _SIGMOID:
        y = _sigmoid(z)
    elif ACT == _SILU:
        y = z * _sigmoid(z)
    return y


@triton.jit
def _act_grad(s, ACT: tl.constexpr):
    # act'(z) from the saved tensor s: y for relu / tanh / sigmoid, z for the others.
    d = s
    if ACT == _RELU:
        d = tl.where(s > 0, 1.0, 0.0)
    elif ACT == _TANH:
        d = 1.0 - s * s
    elif ACT == _SIGMOID:
        d = s * (1.0 - s)
    elif ACT == _GELU:
        d = 0.5 * (1.0 + tl.math.erf(s * _INV_SQRT_2)) + s * tl.exp(-0.5 * s * s) * _INV_SQRT_2PI
    elif ACT == _GELU_TANH:
        s2 = s * s
        t = _tanh((s + s2 * s * _CUBIC) * _SQRT_2_OVER_PI)
        d = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * (1.0 + s2 * (3.0 * _CUBIC)) * _SQRT_2_OVER_PI
    elif ACT == _SILU:
        sg = _sigmoid(s)
        d = sg * (1.0 + s * (1.0 - sg))
    return d


@triton.jit
def _dropout_factor(index, seed, threshold, scale, ACC_DT: tl.constexpr):
    # scale or 0 per element of an int64 tile of counters (offset + m N + n).
    return tl.where(keep_mask(seed, index, threshold), scale, 0.0).to(ACC_DT)


@triton.jit
def _load_dz(dy_ptrs, s_ptrs, mask, ACT: tl.constexpr, ACC_DT: tl.constexpr,
             DROPOUT: tl.constexpr, index, seed, threshold, scale):
    # The gradient GEMMs' prologue: dz = dy * dropout factor * act'(saved) for one tile.
    dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(ACC_DT)
    if DROPOUT:
        dz = dz * _dropout_factor(index, seed, threshold, scale, ACC_DT)
    if ACT != _IDENTITY:
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(ACC_DT)
        dz = dz * _act_grad(s, ACT)
    return dz


# ----------------------------------------------------------------------------- kernels


@triton.autotune(configs=_configs("BLOCK_M", "BLOCK_N", "BLOCK_K", _FWD_TILES), key=["M", "N", "K"])
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    seed, offset, threshold, scale,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_Z: tl.constexpr, SAVE_ACT: tl.constexpr,
    DROPOUT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past M / N wrap around (valid memory); only the K tail needs a mask in the loop.
    x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)  # (BLOCK_K, BLOCK_N) of W^T
        acc = _dot(a, b, acc, ACC_DT, PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DT)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SAVE_Z:
        if not SAVE_ACT:
            tl.store(z_ptr + out, acc.to(z_ptr.dtype.element_ty), mask=mask)
    y = _act(acc, ACT)
    if SAVE_Z:
        if SAVE_ACT:
            tl.store(z_ptr + out, y.to(z_ptr.dtype.element_ty), mask=mask)
    if DROPOUT:
        index = offset + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        y = y * _dropout_factor(index, seed, threshold, scale, ACC_DT)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs("BLOCK_M", "BLOCK_K", "BLOCK_N", _BWD_TILES), key=["M", "N", "K"])
@triton.jit
def _dx_kernel(
    dy_ptr, s_ptr, w_ptr, dx_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_sm, stride_sn, stride_wn, stride_wk, stride_dxm, stride_dxk,
    seed, offset, threshold, scale,
    ACT: tl.constexpr, DROPOUT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_k = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)[:, None]
    dy_ptrs = dy_ptr + rows * stride_dym + offs_n[None, :] * stride_dyn
    s_ptrs = s_ptr + rows * stride_sm + offs_n[None, :] * stride_sn
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (offs_k % K)[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DT)
    index = offset + rows * N + offs_n[None, :]  # dropout counters of the dz tile
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_left = N - n * BLOCK_N
        dz = _load_dz(dy_ptrs, s_ptrs, offs_n[None, :] < n_left, ACT, ACC_DT,
                      DROPOUT, index, seed, threshold, scale)
        w = tl.load(w_ptrs, mask=offs_n[:, None] < n_left, other=0.0)
        acc = _dot(dz.to(w.dtype), w, acc, ACC_DT, PREC)
        dy_ptrs += BLOCK_N * stride_dyn
        s_ptrs += BLOCK_N * stride_sn
        index += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs("BLOCK_N", "BLOCK_K", "BLOCK_M", _BWD_TILES), key=["M", "N", "K", "HAS_DW"])
@triton.jit
def _dw_kernel(
    dy_ptr, s_ptr, x_ptr, dw_ptr, db_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_sm, stride_sn, stride_xm, stride_xk, stride_dwn, stride_dwk,
    seed, offset, threshold, scale,
    ACT: tl.constexpr, DROPOUT: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    # Without HAS_DW the grid has one program per N tile and only db is computed.
    num_k = 1
    if HAS_DW:
        num_k = tl.cdiv(K, BLOCK_K)
    pid_n, pid_k = _tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_k, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    cols = (offs_n % N)[None, :]
    dy_ptrs = dy_ptr + rows * stride_dym + cols * stride_dyn
    s_ptrs = s_ptr + rows * stride_sm + cols * stride_sn
    if HAS_DW:
        x_ptrs = x_ptr + rows * stride_xm + (offs_k % K)[None, :] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DT)
    db = tl.zeros((BLOCK_N,), dtype=ACC_DT)
    index = offset + rows * N + cols  # dropout counters of the dz tile
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        mask_m = offs_m[:, None] < M - m * BLOCK_M
        dz = _load_dz(dy_ptrs, s_ptrs, mask_m, ACT, ACC_DT,  # (BLOCK_M, BLOCK_N)
                      DROPOUT, index, seed, threshold, scale)
        if HAS_DW:
            xt = tl.load(x_ptrs, mask=mask_m, other=0.0)
            acc = _dot(tl.trans(dz.to(xt.dtype)), xt, acc, ACC_DT, PREC)
            x_ptrs += BLOCK_M * stride_xm
        if HAS_DB:
            if pid_k == 0:
                db += tl.sum(dz, axis=0)
        dy_ptrs += BLOCK_M * stride_dym
        s_ptrs += BLOCK_M * stride_sm
        index += BLOCK_M * N
    if HAS_DW:
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        dw_ptrs = dw_ptr + offs_n.to(tl.int64)[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if HAS_DB:
        if pid_k == 0:
            tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=offs_n < N)


# ----------------------------------------------------------------------------- launchers


def _dot_args(dtype, operand_dtype=None):
    """(ACC_DT, PREC) of a dot accumulating in ``dtype``'s precision over operands of
    ``operand_dtype`` (default: dtype): float64 stays float64 (interpreter only); float32
    operands honour allow_tf32."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if (operand_dtype or dtype) == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return tl.float32, "tf32"
    return tl.float32, "ieee"


def _dropout_kwargs(p: float, seed: int, offset: int, threshold: int):
    """The kernels' dropout arguments; p == 0 compiles the dropout out (DROPOUT=False)."""
    return dict(seed=seed, offset=offset, threshold=threshold,
                scale=1.0 / (1.0 - p) if p > 0 else 1.0, DROPOUT=p > 0)


def forward(x, weight, bias, activation: int, save_preact: bool, p: float = 0.0, seed: int = 0,
            offset: int = 0, threshold: int = 0):
    """y = act(x @ weight^T + bias) for x (M, K), weight (N, K), bias (N,) or None, dropped
    out when p > 0 (element (m, n) by counter offset + m N + n).

    Returns (y, s) with s, when save_preact, what act' reads: z for gelu / gelu_tanh / silu,
    act(z) before dropout for relu / tanh / sigmoid; else None. Both x.dtype.
    """
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if save_preact else None
    if M == 0 or N == 0:
        return y, z
    acc_dt, prec = _dot_args(x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fwd_kernel[grid](
        x, weight, bias if bias is not None else y, y, z if save_preact else y,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        **_dropout_kwargs(p, seed, offset, threshold),
        HAS_BIAS=bias is not None, ACT=activation, SAVE_Z=save_preact,
        SAVE_ACT=activation in (RELU, TANH, SIGMOID), ACC_DT=acc_dt, PREC=prec,
    )
    return y, z


def backward(grad_out, x, weight, saved, activation: int, need_dx: bool, need_dw: bool, need_db: bool,
             p: float = 0.0, seed: int = 0, offset: int = 0, threshold: int = 0):
    """Gradients of linear_act given dy = grad_out (M, N).

    saved is forward's y for relu / tanh / sigmoid (act(z) before dropout for tanh /
    sigmoid when p > 0), its pre-activation z for gelu / gelu_tanh / silu, and None for
    identity. Returns (dx, dW, db), None where not needed.
    """
    M, K = x.shape
    N = weight.shape[0]
    dev = x.device
    dx = torch.empty((M, K), device=dev, dtype=x.dtype) if need_dx else None
    dw = torch.empty((N, K), device=dev, dtype=weight.dtype) if need_dw else None
    db = torch.empty((N,), device=dev, dtype=weight.dtype) if need_db else None
    if M == 0 or N == 0:  # empty sums
        return tuple(None if t is None else t.zero_() for t in (dx, dw, db))
    if saved is None:  # identity: the kernels never read it
        saved = grad_out
    acc_dt, prec = _dot_args(x.dtype)
    common = dict(ACT=activation, ACC_DT=acc_dt, PREC=prec, **_dropout_kwargs(p, seed, offset, threshold))
    dy_strides = (grad_out.stride(0), grad_out.stride(1), saved.stride(0), saved.stride(1))
    if need_dx and K > 0:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
        _dx_kernel[grid](
            grad_out, saved, weight, dx, M, N, K,
            *dy_strides, weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
            **common,
        )
    has_dw = need_dw and K > 0
    if has_dw or need_db:
        grid = lambda meta: (
            triton.cdiv(N, meta["BLOCK_N"]) * (triton.cdiv(K, meta["BLOCK_K"]) if has_dw else 1),
        )
        dw_arg = dw if has_dw else grad_out
        _dw_kernel[grid](
            grad_out, saved, x, dw_arg, db if need_db else grad_out, M, N, K,
            *dy_strides, x.stride(0), x.stride(1), dw_arg.stride(0), dw_arg.stride(1),
            HAS_DW=has_dw, HAS_DB=need_db, **common,
        )
    return dx, dw, db
