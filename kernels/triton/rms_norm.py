"""Triton form of rms_norm over the last dim of x (M, N), forward and backward.

* forward: y = x * rstd * (offset + w), rstd = 1 / sqrt(mean(x^2) + eps). It writes y and
  the per-row rstd: with x and w all that backward needs.
* backward: xhat = x * rstd, g = dy * (offset + w), dx = rstd (g - xhat mean(g xhat));
  dw = sum over rows of dy xhat.

A row that fits in BLOCK_N (<= MAX_BLOCK_N) stays in registers; a longer one is streamed:
chunk sums of x^2, then y chunk by chunk (backward: the sum of g x, then dx). Every sum
is float32 (float64 for float64 x, which only the interpreter runs); y, dx, dw have x's
dtype.

dw is deterministic, without atomics, as in layer_norm: program p owns rows [p R, (p + 1)
R) and sums dy xhat over them into row p of a (programs, N) float32 buffer; a second
kernel (layer_norm's) sums the buffer's rows in a fixed order. The launch helpers
(autotune over num_warps, block shapes, partial-row update, the row sum) are layer_norm's.
``MAX_BLOCK_N``, ``MAX_BLOCK_N_BWD``, ``CHUNK_N_BWD`` and ``PROGRAMS`` are read at each
launch; tests lower them to reach the streamed path and several partial rows.
"""

import torch
import triton
import triton.language as tl

from .layer_norm import _INTERPRET, _acc, _add_partial, _autotune, _blocks, _rsqrt, _sm_count, _sum_rows

MAX_BLOCK_N = 2048 if _INTERPRET else 8192
MAX_BLOCK_N_BWD = 2048 if _INTERPRET else 4096
CHUNK_N_BWD = 2048
PROGRAMS = 3 if _INTERPRET else None


@triton.jit
def _scale(w_ptr, cols, col_mask, offset, HAS_W: tl.constexpr, ACC_DT: tl.constexpr):
    # offset + w for the columns (1 without a weight), as a row vector.
    if HAS_W:
        s = offset + tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)
    else:
        s = tl.full(cols.shape, 1.0, ACC_DT)
    return s[None, :]


@_autotune(key=["N", "BLOCK_R", "BLOCK_N", "HAS_W"])
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, M, N, eps, offset,
    HAS_W: tl.constexpr, ONE_CHUNK: tl.constexpr, ACC_DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    row_off = rows.to(tl.int64)[:, None] * N
    cols0 = tl.arange(0, BLOCK_N)
    if ONE_CHUNK:
        col_mask = cols0 < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + row_off + cols0[None, :], mask=mask, other=0.0).to(ACC_DT)
        rstd = _rsqrt(tl.sum(x * x, axis=1) / N + eps, ACC_DT)
        y = x * rstd[:, None] * _scale(w_ptr, cols0, col_mask, offset, HAS_W, ACC_DT)
        tl.store(y_ptr + row_off + cols0[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ss = tl.zeros((BLOCK_R,), ACC_DT)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + cols0
            mask = row_mask[:, None] & (cols[None, :] < N)
            x = tl.load(x_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
            ss += tl.sum(x * x, axis=1)
        rstd = _rsqrt(ss / N + eps, ACC_DT)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + cols0
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
            y = x * rstd[:, None] * _scale(w_ptr, cols, col_mask, offset, HAS_W, ACC_DT)
            tl.store(y_ptr + row_off + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=row_mask)


@_autotune(key=["N", "BLOCK_R", "BLOCK_N", "HAS_W", "NEED_DX", "NEED_DW"], per_thread=8)
@triton.jit
def _bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, N, offset, rows_per_prog,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    ONE_CHUNK: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    part = pid.to(tl.int64) * N  # this program's row of the dw partial buffer
    cols0 = tl.arange(0, BLOCK_N)

    if ONE_CHUNK:
        col_mask = cols0 < N
        scale = _scale(w_ptr, cols0, col_mask, offset, HAS_W, ACC_DT)
        dw_acc = tl.zeros((BLOCK_N,), ACC_DT)
        for r0 in range(row_start, row_end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols0[None, :]
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(ACC_DT)
            xhat = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DT) * rstd[:, None]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
            if NEED_DX:
                g = dy * scale
                c = tl.sum(g * xhat, axis=1) / N
                dx = (g - xhat * c[:, None]) * rstd[:, None]
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw_acc += tl.sum(dy * xhat, axis=0)
        if NEED_DW:
            tl.store(dw_ptr + part + cols0, dw_acc, mask=col_mask)
    else:
        for r0 in range(row_start, row_end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < row_end
            row_off = rows.to(tl.int64)[:, None] * N
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(ACC_DT)
            c = tl.zeros((BLOCK_R,), ACC_DT)
            if NEED_DX:  # pass 1: mean(g xhat)
                for c0 in range(0, N, BLOCK_N):
                    cols = c0 + cols0
                    col_mask = cols < N
                    mask = row_mask[:, None] & col_mask[None, :]
                    xhat = tl.load(x_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(ACC_DT) * rstd[:, None]
                    dy = tl.load(dy_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
                    c += tl.sum(dy * _scale(w_ptr, cols, col_mask, offset, HAS_W, ACC_DT) * xhat, axis=1)
                c = c / N
            # pass 2: dx, and this program's partial sums, chunk by chunk
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + cols0
                col_mask = cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                offs = row_off + cols[None, :]
                xhat = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DT) * rstd[:, None]
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
                if NEED_DX:
                    g = dy * _scale(w_ptr, cols, col_mask, offset, HAS_W, ACC_DT)
                    dx = (g - xhat * c[:, None]) * rstd[:, None]
                    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if NEED_DW:
                    _add_partial(dw_ptr + part + cols, tl.sum(dy * xhat, axis=0), col_mask, r0 == row_start)
            # the next rows' reads of the partial row must see these writes from every thread
            tl.debug_barrier()


def forward(x, weight, eps: float, offset: float):
    """(y, rstd) of rms_norm over the last dim of x (M, N); weight (N,) or None.

    y has x's dtype; rstd (M,) is float32 (float64 for float64 x).
    """
    M, N = x.shape
    tl_acc, torch_acc = _acc(x.dtype)
    y = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch_acc, device=x.device)
    if M == 0 or N == 0:
        return y, rstd
    block_r, block_n = _blocks(M, N, MAX_BLOCK_N)
    _fwd_kernel[(triton.cdiv(M, block_r),)](
        x, weight if weight is not None else x, y, rstd, M, N, float(eps), float(offset),
        HAS_W=weight is not None, ONE_CHUNK=N <= block_n, ACC_DT=tl_acc, BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return y, rstd


def backward(dy, x, weight, rstd, offset: float, need_dx: bool, need_dw: bool):
    """(dx, dw) of rms_norm from dy (M, N) and forward's rstd; None where not needed.

    need_dw is ignored without a weight.
    """
    M, N = x.shape
    need_dw = bool(need_dw) and weight is not None
    dx = torch.empty_like(x) if need_dx else None
    if M == 0 or N == 0:  # empty sums
        return dx, torch.zeros(N, dtype=x.dtype, device=x.device) if need_dw else None
    if not (need_dx or need_dw):
        return None, None
    tl_acc, torch_acc = _acc(x.dtype)
    block_r, block_n = _blocks(M, N, MAX_BLOCK_N_BWD, CHUNK_N_BWD)
    steps = triton.cdiv(M, block_r)
    programs = PROGRAMS if PROGRAMS is not None else 4 * _sm_count(x.device.index)
    rows_per_prog = triton.cdiv(steps, min(steps, max(1, programs))) * block_r
    grid = triton.cdiv(M, rows_per_prog)  # every program owns at least one row
    dw_part = torch.empty((grid, N), dtype=torch_acc, device=x.device) if need_dw else None
    _bwd_kernel[(grid,)](
        dy, x, weight if weight is not None else x, rstd, dx if need_dx else x, dw_part if need_dw else x,
        M, N, float(offset), rows_per_prog,
        HAS_W=weight is not None, NEED_DX=bool(need_dx), NEED_DW=need_dw,
        ONE_CHUNK=N <= block_n, ACC_DT=tl_acc, BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return dx, _sum_rows(dw_part, x.dtype) if need_dw else None
