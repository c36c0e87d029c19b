"""Triton forms of softmax / log_softmax and cross_entropy, forward and backward.

Every kernel owns a block of BLOCK_R rows (BLOCK_R = 1 for wide rows, more when C is small,
so that a program always has about a tile of work) and streams over the columns in BLOCK_C
chunks, so any C runs in bounded registers.

* softmax_forward: pass 1 keeps an ONLINE max m and sum s = sum exp(x - m) per row (s is
  rescaled by exp(m_old - m_new) whenever the max grows); pass 2 re-reads x and writes
  y = (x - m) - log s (log) or its exp. What the op saves for backward is the
  output y alone: both derivatives are functions of y and the incoming gradient.
* softmax_backward: pass 1 sums g*y (softmax) or g (log_softmax) per row, pass 2 writes
  dx = y (g - sum g y) or dx = g - exp(y) sum g.
* cross_entropy_forward: ONE pass over the logits. Besides m and s it keeps, for label
  smoothing, a = sum_c w_c (x_c - m) relative to the running max (rescaled on each max
  change by W_seen * (m_old - m_new)); every term has the same sign, so
  sum_c w_c (lse - x_c) = W log s - a has no cancellation even when |x| ~ 1e4. The target
  term is (m - x_t) + log s, again without cancellation. It writes the per-row loss and TWO
  per-row statistics, row_max m and row_logsum l = log s (never their sum lse = m + l):
  they are all that backward needs besides the inputs (p = exp((x - m) - l) is recomputed,
  never stored), so the op saves logits, target, weight, row_max and row_logsum.
* cross_entropy_backward: one pass, dx = g ((1-eps) w_t (p - onehot) + eps/C (S_w p - w_c)).
  S_w = sum_c w_c is one torch reduction on the host side (no device sync).

  Why two statistics instead of lse: a float32 lse = m + log s is rounded to ulp(lse), an
  absolute error of up to |lse| * 2^-24 (~5e-4 at |lse| ~ 1e4) that enters every
  p = exp(x - lse) as a relative error, giving ~1e-4 gradient errors for near-tied large
  logits (e.g. 1e4 + 3 randn). With (m, l) saved separately, x - m is exact for x near the
  max (Sterbenz) and l is small, so p = exp((x - m) - l) keeps float32 relative accuracy.
  The loss is likewise formed from (m - x) and l without ever rounding m + l.
* cross_entropy_soft_forward / _backward: class-probability targets q (N, C) of the
  logits' dtype, mixed as torch does, u_c = w_c ((1 - eps) q_c + eps / C). Forward: one
  pass keeping m, s, a = sum_c u_c (x_c - m) (moved to each new max by U_seen (m_old -
  m_new)) and U = sum_c u_c; loss = U l - a, both terms >= 0. Backward: pass 1 sums U,
  pass 2 writes dx = g (U p - u). The same two statistics are saved.

Ignored rows (target == ignore_index) load nothing (their loads are masked off), get loss 0,
row_max 0, row_logsum 0 (never NaN) and a zero gradient row. Rows of -inf padding / fully masked chunks never make NaN:
the exponent shift is 0 while the running max is still -inf. A row that is entirely -inf
gives softmax 0 and log_softmax -inf (PyTorch gives NaN there).

Statistics, loss, row_max and row_logsum are float32 (float64 for float64 logits, which only the
interpreter runs); outputs y / dx have the input dtype. Scalars that must keep float64
precision (1 - eps, eps / C) travel as a float32 hi + lo pair, since Triton passes Python
floats as float32.

num_warps is autotuned on the GPU (key: C and the block shape); under TRITON_INTERPRET=1
(CPU tests) one config runs and the column block is capped at 2048 (the interpreter's cost
is per operation, so wider chunks are faster there: (2, 50257) takes ~0.3-0.5 s per call).
``MAX_BLOCK_C`` / ``TILE`` are read at each launch; tests lower them to force many chunks
and several rows per program on small shapes.
"""

import os
import struct

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Largest column chunk, and the target number of elements (BLOCK_R * BLOCK_C) per program.
MAX_BLOCK_C = 2048 if _INTERPRET else 4096
TILE = 2048 if _INTERPRET else 4096

_NUM_WARPS = [4, 8, 16]


def _configs():
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w) for w in _NUM_WARPS]


def _blocks(R, C):
    block_c = min(triton.next_power_of_2(max(C, 1)), MAX_BLOCK_C)
    block_r = min(triton.next_power_of_2(max(R, 1)), max(1, TILE // block_c))
    return block_r, block_c


def _acc(dtype):
    """(triton, torch) accumulation dtype: float64 stays float64, everything else float32."""
    if dtype == torch.float64:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _split(v: float):
    """A Python float as a float32 hi + lo pair (hi + lo == v to ~48 bits)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, float(v - hi)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _online_update(m, s, x):
    # One chunk x (BLOCK_R, BLOCK_C) into the running (max, sum exp(x - max)) of each row.
    # Returns (m_new, s_new, shift): shift is m_new, or 0 while the row max is still -inf
    # (all seen values -inf or masked), so that no -inf - -inf is ever formed.
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return m_new, s, shift


@triton.jit
def _scalar(hi, lo, ACC_DT: tl.constexpr):
    # hi + lo in ACC_DT as a (1,) tensor (hi / lo are float32 on the GPU, Python floats
    # under the interpreter).
    return tl.zeros((1,), ACC_DT) + hi + lo


@triton.jit
def _finish(m, s):
    # (shift, log s) with lse = shift + log s; (0, 0) for a row of nothing but -inf (s == 0).
    # Kept apart: x - shift is exact for x near the max, while lse rounded to the storage
    # precision would cost |lse| * 2^-24 absolute in every output.
    ok = s > 0
    return tl.where(ok, m, 0.0), tl.log(tl.where(ok, s, 1.0))


# ----------------------------------------------------------------------------- softmax


@triton.autotune(configs=_configs(), key=["C", "BLOCK_R", "BLOCK_C"])
@triton.jit
def _softmax_fwd_kernel(
    x_ptr, y_ptr, R, C, stride_x, stride_y,
    LOG: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cols0 = tl.arange(0, BLOCK_C)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    y_row = y_ptr + rows.to(tl.int64)[:, None] * stride_y

    m = tl.full((BLOCK_R,), float("-inf"), ACC_DT)
    s = tl.zeros((BLOCK_R,), ACC_DT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = row_mask[:, None] & (cols[None, :] < C)
        x = tl.load(x_row + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DT)
        m, s, _ = _online_update(m, s, x)
    shift, log_s = _finish(m, s)

    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = row_mask[:, None] & (cols[None, :] < C)
        # -inf padding keeps the masked lanes finite-or-zero after exp (no overflow).
        x = tl.load(x_row + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DT)
        y = (x - shift[:, None]) - log_s[:, None]
        if not LOG:
            y = tl.exp(y)
        tl.store(y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(), key=["C", "BLOCK_R", "BLOCK_C"])
@triton.jit
def _softmax_bwd_kernel(
    g_ptr, y_ptr, dx_ptr, R, C, stride_g, stride_y, stride_dx,
    LOG: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cols0 = tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)[:, None]
    g_row = g_ptr + rows64 * stride_g
    y_row = y_ptr + rows64 * stride_y
    dx_row = dx_ptr + rows64 * stride_dx

    # softmax: acc = sum g*y; log_softmax: acc = sum g.
    acc = tl.zeros((BLOCK_R,), ACC_DT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = row_mask[:, None] & (cols[None, :] < C)
        g = tl.load(g_row + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
        if LOG:
            acc += tl.sum(g, axis=1)
        else:
            y = tl.load(y_row + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
            acc += tl.sum(g * y, axis=1)

    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = row_mask[:, None] & (cols[None, :] < C)
        g = tl.load(g_row + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
        y = tl.load(y_row + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
        if LOG:
            dx = g - tl.exp(y) * acc[:, None]
        else:
            dx = y * (g - acc[:, None])
        tl.store(dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- cross entropy


@triton.autotune(configs=_configs(), key=["C", "BLOCK_R", "BLOCK_C", "HAS_WEIGHT", "HAS_SMOOTH"])
@triton.jit
def _ce_fwd_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, max_ptr, logsum_ptr,
    R, C, stride_x, ignore_index,
    keep_hi, keep_lo, smooth_hi, smooth_lo,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, ACC_DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    t = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (t != ignore_index)
    t = tl.where(valid, t, 0)
    cols0 = tl.arange(0, BLOCK_C)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x

    m = tl.full((BLOCK_R,), float("-inf"), ACC_DT)
    s = tl.zeros((BLOCK_R,), ACC_DT)
    a = tl.zeros((BLOCK_R,), ACC_DT)  # sum_c w_c (x_c - m), <= 0
    w_seen = tl.zeros((1,), ACC_DT)   # sum of w over the columns seen so far
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_mask = cols < C
        mask = valid[:, None] & col_mask[None, :]
        x = tl.load(x_row + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DT)
        m_old = m
        m, s, shift = _online_update(m, s, x)
        if HAS_SMOOTH:
            d = tl.where(mask, x - shift[:, None], 0.0)
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)
                d = d * w[None, :]
                w_chunk = tl.sum(w, axis=0)
            else:
                w_chunk = tl.sum(tl.where(col_mask, 1.0, 0.0).to(ACC_DT), axis=0)
            # move a from the old max to the new one: a -= W_seen (m_new - m_old)
            m_prev = tl.where(m_old == float("-inf"), shift, m_old)
            a = a + (m_prev - shift) * w_seen + tl.sum(d, axis=1)
            w_seen = w_seen + w_chunk

    m_f, log_s = _finish(m, s)
    x_t = tl.load(x_ptr + rows.to(tl.int64) * stride_x + t, mask=valid, other=0.0).to(ACC_DT)
    keep = _scalar(keep_hi, keep_lo, ACC_DT)
    nll = (m_f - x_t) + log_s  # lse - x_t, both parts >= 0, m + l never rounded
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t, mask=valid, other=0.0).to(ACC_DT)
        loss = keep * w_t * nll
    else:
        loss = keep * nll
    if HAS_SMOOTH:
        smooth = _scalar(smooth_hi, smooth_lo, ACC_DT)
        # eps/C * sum_c w_c (lse - x_c) = eps/C * (sum_c w_c (m - x_c) + S_w l)
        loss += smooth * (-a + w_seen * log_s)
    loss = tl.where(valid, loss, 0.0)
    m_f = tl.where(valid, m_f, 0.0)
    log_s = tl.where(valid, log_s, 0.0)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
    tl.store(max_ptr + rows, m_f.to(max_ptr.dtype.element_ty), mask=row_mask)
    tl.store(logsum_ptr + rows, log_s.to(logsum_ptr.dtype.element_ty), mask=row_mask)


@triton.autotune(configs=_configs(), key=["C", "BLOCK_R", "BLOCK_C", "HAS_WEIGHT", "HAS_SMOOTH"])
@triton.jit
def _ce_bwd_kernel(
    g_ptr, x_ptr, t_ptr, w_ptr, sw_ptr, max_ptr, logsum_ptr, dx_ptr,
    R, C, stride_x, stride_dx, ignore_index,
    keep_hi, keep_lo, smooth_hi, smooth_lo,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, ACC_DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    t = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (t != ignore_index)
    t = tl.where(valid, t, 0)
    g = tl.load(g_ptr + rows, mask=valid, other=0.0).to(ACC_DT)
    m = tl.load(max_ptr + rows, mask=valid, other=0.0).to(ACC_DT)
    log_s = tl.load(logsum_ptr + rows, mask=valid, other=0.0).to(ACC_DT)
    keep = _scalar(keep_hi, keep_lo, ACC_DT)
    # dx = p * coef_p - onehot * coef_t - w_c * coef_w
    coef_t = g * keep
    if HAS_WEIGHT:
        coef_t = coef_t * tl.load(w_ptr + t, mask=valid, other=0.0).to(ACC_DT)
    coef_p = coef_t
    if HAS_SMOOTH:
        smooth = _scalar(smooth_hi, smooth_lo, ACC_DT)
        coef_w = g * smooth
        if HAS_WEIGHT:
            s_w = tl.load(sw_ptr).to(ACC_DT)
        else:
            s_w = tl.zeros((1,), ACC_DT) + C  # C may arrive as a constexpr (C == 1)
        coef_p = coef_t + coef_w * s_w
    cols0 = tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)[:, None]
    x_row = x_ptr + rows64 * stride_x
    dx_row = dx_ptr + rows64 * stride_dx
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_mask = cols < C
        out_mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_row + cols[None, :], mask=valid[:, None] & col_mask[None, :],
                    other=float("-inf")).to(ACC_DT)
        # (x - m) is exact near the max; 0 on ignored rows (x = -inf, m = l = 0)
        p = tl.exp((x - m[:, None]) - log_s[:, None])
        dx = p * coef_p[:, None] - tl.where(cols[None, :] == t[:, None], coef_t[:, None], 0.0)
        if HAS_SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)
                dx = dx - w[None, :] * coef_w[:, None]
            else:
                dx = dx - coef_w[:, None]
        dx = tl.where(valid[:, None], dx, 0.0)
        tl.store(dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_configs(), key=["C", "BLOCK_R", "BLOCK_C", "HAS_WEIGHT"])
@triton.jit
def _ce_soft_fwd_kernel(
    x_ptr, q_ptr, w_ptr, loss_ptr, max_ptr, logsum_ptr,
    R, C, stride_x, stride_q,
    keep_hi, keep_lo, smooth_hi, smooth_lo,
    HAS_WEIGHT: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cols0 = tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)[:, None]
    x_row = x_ptr + rows64 * stride_x
    q_row = q_ptr + rows64 * stride_q
    keep = _scalar(keep_hi, keep_lo, ACC_DT)
    smooth = _scalar(smooth_hi, smooth_lo, ACC_DT)

    m = tl.full((BLOCK_R,), float("-inf"), ACC_DT)
    s = tl.zeros((BLOCK_R,), ACC_DT)
    a = tl.zeros((BLOCK_R,), ACC_DT)  # sum_c u_c (x_c - m), <= 0
    u_seen = tl.zeros((BLOCK_R,), ACC_DT)  # sum of u over the columns seen so far
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_row + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DT)
        q = tl.load(q_row + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
        u = keep[None, :] * q + smooth[None, :]
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)
            u = u * w[None, :]
        u = tl.where(mask, u, 0.0)
        m_old = m
        m, s, shift = _online_update(m, s, x)
        m_prev = tl.where(m_old == float("-inf"), shift, m_old)
        d = tl.where(mask, x - shift[:, None], 0.0)
        a = a + (m_prev - shift) * u_seen + tl.sum(u * d, axis=1)
        u_seen = u_seen + tl.sum(u, axis=1)

    m_f, log_s = _finish(m, s)
    loss = u_seen * log_s - a
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
    tl.store(max_ptr + rows, m_f.to(max_ptr.dtype.element_ty), mask=row_mask)
    tl.store(logsum_ptr + rows, log_s.to(logsum_ptr.dtype.element_ty), mask=row_mask)


@triton.autotune(configs=_configs(), key=["C", "BLOCK_R", "BLOCK_C", "HAS_WEIGHT"])
@triton.jit
def _ce_soft_bwd_kernel(
    g_ptr, x_ptr, q_ptr, w_ptr, max_ptr, logsum_ptr, dx_ptr,
    R, C, stride_x, stride_q, stride_dx,
    keep_hi, keep_lo, smooth_hi, smooth_lo,
    HAS_WEIGHT: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cols0 = tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)[:, None]
    x_row = x_ptr + rows64 * stride_x
    q_row = q_ptr + rows64 * stride_q
    dx_row = dx_ptr + rows64 * stride_dx
    keep = _scalar(keep_hi, keep_lo, ACC_DT)
    smooth = _scalar(smooth_hi, smooth_lo, ACC_DT)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(ACC_DT)
    m = tl.load(max_ptr + rows, mask=row_mask, other=0.0).to(ACC_DT)
    log_s = tl.load(logsum_ptr + rows, mask=row_mask, other=0.0).to(ACC_DT)

    u_total = tl.zeros((BLOCK_R,), ACC_DT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        q = tl.load(q_row + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
        u = keep[None, :] * q + smooth[None, :]
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)
            u = u * w[None, :]
        u_total += tl.sum(tl.where(mask, u, 0.0), axis=1)

    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_row + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DT)
        q = tl.load(q_row + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
        u = keep[None, :] * q + smooth[None, :]
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)
            u = u * w[None, :]
        p = tl.exp((x - m[:, None]) - log_s[:, None])
        dx = g[:, None] * (p * u_total[:, None] - u)
        tl.store(dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def softmax_forward(x, log: bool):
    """Row-wise softmax (log=False) or log_softmax (log=True) of x (R, C); x.dtype."""
    R, C = x.shape
    y = torch.empty_like(x)
    if R == 0 or C == 0:
        return y
    block_r, block_c = _blocks(R, C)
    _softmax_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, y, R, C, x.stride(0), y.stride(0),
        LOG=bool(log), ACC_DT=_acc(x.dtype)[0], BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return y


def softmax_backward(grad_y, y, log: bool):
    """dx from forward's output y: y (g - sum g y), or g - exp(y) sum g for log_softmax."""
    R, C = y.shape
    dx = torch.empty_like(y)
    if R == 0 or C == 0:
        return dx
    block_r, block_c = _blocks(R, C)
    _softmax_bwd_kernel[(triton.cdiv(R, block_r),)](
        grad_y, y, dx, R, C, grad_y.stride(0), y.stride(0), dx.stride(0),
        LOG=bool(log), ACC_DT=_acc(y.dtype)[0], BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return dx


def _ce_scalars(label_smoothing: float, C: int):
    eps = float(label_smoothing)
    return (*_split(1.0 - eps), *_split(eps / C if C > 0 else 0.0)), eps > 0.0


def cross_entropy_forward(logits, target, weight, ignore_index: int, label_smoothing: float):
    """(loss, row_max, row_logsum) per row of logits (N, C), targets (N,) int64, weight (C,) or None.

    m_i = max_c x_ic, l_i = log sum_c exp(x_ic - m_i), and
    loss_i = (1-eps) w[t_i] ((m_i - x[i,t_i]) + l_i) + eps/C (sum_c w_c (m_i - x[i,c]) + S_w l_i),
    never rounding m_i + l_i. Rows with t_i == ignore_index get loss 0, row_max 0 and
    row_logsum 0. All three float32 (float64 for float64 logits).
    """
    N, C = logits.shape
    tl_acc, torch_acc = _acc(logits.dtype)
    loss = torch.empty(N, dtype=torch_acc, device=logits.device)
    row_max = torch.empty(N, dtype=torch_acc, device=logits.device)
    row_logsum = torch.empty(N, dtype=torch_acc, device=logits.device)
    if N == 0:
        return loss, row_max, row_logsum
    scalars, has_smooth = _ce_scalars(label_smoothing, C)
    block_r, block_c = _blocks(N, C)
    _ce_fwd_kernel[(triton.cdiv(N, block_r),)](
        logits, target, weight if weight is not None else logits, loss, row_max, row_logsum,
        N, C, logits.stride(0), int(ignore_index), *scalars,
        HAS_WEIGHT=weight is not None, HAS_SMOOTH=has_smooth, ACC_DT=tl_acc,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return loss, row_max, row_logsum


def cross_entropy_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                           ignore_index: int, label_smoothing: float, out=None):
    """dlogits (N, C), logits.dtype, from dL/dloss_i = grad_loss (N,) and forward's row stats.

    dx[i,c] = g_i ((1-eps) w[t_i] (p_ic - [c == t_i]) + eps/C (S_w p_ic - w_c)),
    p_ic = exp((x_ic - m_i) - l_i);
    ignored rows are 0. Written into ``out`` when given, which may be ``logits`` itself
    (each tile is loaded before the same program stores it).
    """
    N, C = logits.shape
    dx = torch.empty_like(logits) if out is None else out
    if N == 0 or C == 0:
        return dx
    tl_acc, torch_acc = _acc(logits.dtype)
    scalars, has_smooth = _ce_scalars(label_smoothing, C)
    has_weight = weight is not None
    sw = weight.sum(dtype=torch_acc).reshape(1) if (has_weight and has_smooth) else row_max
    block_r, block_c = _blocks(N, C)
    _ce_bwd_kernel[(triton.cdiv(N, block_r),)](
        grad_loss, logits, target, weight if has_weight else logits, sw, row_max, row_logsum, dx,
        N, C, logits.stride(0), dx.stride(0), int(ignore_index), *scalars,
        HAS_WEIGHT=has_weight, HAS_SMOOTH=has_smooth, ACC_DT=tl_acc,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return dx


def cross_entropy_soft_forward(logits, target, weight, label_smoothing: float):
    """(loss, row_max, row_logsum) per row of logits (N, C) for class-probability targets (N, C)
    of the logits' dtype: loss_i = sum_c u_ic ((m_i - x_ic) + l_i), u_ic = w_c ((1-eps) q_ic + eps/C)."""
    N, C = logits.shape
    tl_acc, torch_acc = _acc(logits.dtype)
    loss = torch.empty(N, dtype=torch_acc, device=logits.device)
    row_max, row_logsum = torch.empty_like(loss), torch.empty_like(loss)
    if N == 0:
        return loss, row_max, row_logsum
    scalars, _ = _ce_scalars(label_smoothing, C)
    block_r, block_c = _blocks(N, C)
    _ce_soft_fwd_kernel[(triton.cdiv(N, block_r),)](
        logits, target, weight if weight is not None else logits, loss, row_max, row_logsum,
        N, C, logits.stride(0), target.stride(0), *scalars,
        HAS_WEIGHT=weight is not None, ACC_DT=tl_acc, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return loss, row_max, row_logsum


def cross_entropy_soft_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                                label_smoothing: float, out=None):
    """dlogits = g (U p - u) for class-probability targets, U = sum_c u_c; into ``out`` when
    given, which may be ``logits`` itself."""
    N, C = logits.shape
    dx = torch.empty_like(logits) if out is None else out
    if N == 0 or C == 0:
        return dx
    tl_acc, _ = _acc(logits.dtype)
    scalars, _ = _ce_scalars(label_smoothing, C)
    block_r, block_c = _blocks(N, C)
    _ce_soft_bwd_kernel[(triton.cdiv(N, block_r),)](
        grad_loss, logits, target, weight if weight is not None else logits, row_max, row_logsum, dx,
        N, C, logits.stride(0), target.stride(0), dx.stride(0), *scalars,
        HAS_WEIGHT=weight is not None, ACC_DT=tl_acc, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return dx
