"""Triton form of rotary_embedding over x (B, S1, S2, D) contiguous, cos / sin (CB, T, D).

A program takes BLOCK_R rows (each one head of one token) and all D/2 pairs of each:
(i, i + D/2) for rotate-half, (2i, 2i + 1) interleaved. The row's position is s2
(SEQ_DIM 2, x (B, H, T, D)) or s1 (SEQ_DIM 1, x (B, T, H, D)); its cos / sin row is read
in full (both members of each pair), so that backward, INVERSE, is the exact transpose
dx_a = dy_a c_a + dy_b s_b, dx_b = dy_b c_b - dy_a s_a for any table. float32 math
(float64 for float64, which only the interpreter runs). num_warps autotuned on the GPU.
"""

import os

import torch
import triton
import triton.language as tl

from .layer_norm import _acc

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TILE = 2048 if _INTERPRET else 4096  # pairs per program


def _autotune(key):
    if _INTERPRET:
        return triton.autotune(configs=[triton.Config({}, num_warps=4, num_stages=1)], key=key)
    return triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (1, 2, 4, 8)], key=key)


@_autotune(["HALF", "BLOCK_R", "INTERLEAVED", "INVERSE", "SEQ_DIM"])
@triton.jit
def _kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, rows, S1, S2, T, HALF,
            PER_BATCH: tl.constexpr, SEQ_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
            ACC_DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = r < rows
    s2 = r % S2
    s1 = (r // S2) % S1
    b = r // (S1 * S2)
    if SEQ_DIM == 2:
        t = s2
    else:
        t = s1
    if PER_BATCH:
        table = (b * T + t) * (2 * HALF)
    else:
        table = t * (2 * HALF)
    i = tl.arange(0, BLOCK_H)
    if INTERLEAVED:
        ca = 2 * i
        cb = 2 * i + 1
    else:
        ca = i
        cb = i + HALF
    mask = row_mask[:, None] & (i < HALF)[None, :]
    xrow = r[:, None] * (2 * HALF)
    xa = tl.load(x_ptr + xrow + ca[None, :], mask=mask, other=0.0).to(ACC_DT)
    xb = tl.load(x_ptr + xrow + cb[None, :], mask=mask, other=0.0).to(ACC_DT)
    cos_a = tl.load(cos_ptr + table[:, None] + ca[None, :], mask=mask, other=0.0).to(ACC_DT)
    cos_b = tl.load(cos_ptr + table[:, None] + cb[None, :], mask=mask, other=0.0).to(ACC_DT)
    sin_a = tl.load(sin_ptr + table[:, None] + ca[None, :], mask=mask, other=0.0).to(ACC_DT)
    sin_b = tl.load(sin_ptr + table[:, None] + cb[None, :], mask=mask, other=0.0).to(ACC_DT)
    if INVERSE:
        ya = xa * cos_a + xb * sin_b
        yb = xb * cos_b - xa * sin_a
    else:
        ya = xa * cos_a - xb * sin_a
        yb = xb * cos_b + xa * sin_b
    tl.store(y_ptr + xrow + ca[None, :], ya.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + xrow + cb[None, :], yb.to(y_ptr.dtype.element_ty), mask=mask)


def _run(x, cos, sin, seq_dim: int, interleaved: bool, inverse: bool):
    y = torch.empty_like(x)
    B, S1, S2, D = x.shape
    rows = B * S1 * S2
    if rows == 0 or D == 0:
        return y
    half = D // 2
    block_h = triton.next_power_of_2(half)
    block_r = min(triton.next_power_of_2(rows), max(1, TILE // block_h))
    _kernel[(triton.cdiv(rows, block_r),)](
        x, cos, sin, y, rows, S1, S2, S2 if seq_dim == 2 else S1, half,
        PER_BATCH=cos.shape[0] != 1, SEQ_DIM=seq_dim, INTERLEAVED=bool(interleaved), INVERSE=inverse,
        ACC_DT=_acc(x.dtype)[0], BLOCK_R=block_r, BLOCK_H=block_h,
    )
    return y


def forward(x, cos, sin, seq_dim: int, interleaved: bool):
    """x rotated by the cos / sin of each row's position."""
    return _run(x, cos, sin, seq_dim, interleaved, False)


def backward(dy, cos, sin, seq_dim: int, interleaved: bool):
    """The transpose of forward applied to dy: the gradient in x."""
    return _run(dy, cos, sin, seq_dim, interleaved, True)
