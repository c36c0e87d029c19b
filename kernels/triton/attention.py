"""Triton form of attention (FlashAttention-2 style): forward and recompute-based backward.

Shapes: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0 (grouped-query attention:
query head h reads kv head h // (Hq // Hkv)); D in 16..128 (80 and 96 are padded to a
power-of-2 head-dim block, the padding masked off). Every tensor must be contiguous in its
last dim.

forward computes, per query row i of every (batch, query head),

    s_ij = scale * q_i . k_j        for the keys j the row may see,
    o_i  = sum_j softmax_j(s_i) v_j,       lse_i = log sum_j exp(s_ij)   (natural log).

With ``attn_bias`` (an additive mask broadcastable to (B, Hq, Tq, Tk), read through its
strides, 0 along broadcast dims) s_ij += bias[b, h, i, j] (times log2(e) in log2 units), tile
by tile, in forward, dq and dkdv alike. Key j is hidden from row i when key_padding_mask[b, j]
is True, or, with ``causal``, when j > i + (Tk - Tq) (bottom-right alignment, as FlashAttention and a KV cache need). A row that
sees no key at all gets o_i = 0 exactly and lse_i = +inf, so that backward's
p_ij = exp(s_ij - lse_i) is 0 there with no special case. It returns (o, lse): the op saves
q, k, v, o and lse (float32; float64 for float64 inputs) for backward and nothing of size
Tq x Tk, which is never materialised.

Kernels (each program owns one block of one head of one batch; grids are (blocks, heads, B),
so B and the head counts must stay within CUDA's 65535 for grid axes y and z):

* ``_fwd_kernel``     grid (cdiv(Tq, BLOCK_M), Hq, B). Keeps its q tile on chip and
  streams key/value blocks with the online softmax (running row max m, running sum l,
  accumulator rescaled by exp(m_old - m_new)). Scores are kept in log2 units (log2(e) folded
  into the scale, exp2 on the hot path) except for float64, which uses exp / log. Key blocks
  come in two stages: blocks every row of the q block sees in full run with no mask (only
  the key padding mask, when given), then the blocks that cut the causal diagonal or the
  Tk tail run masked. Causal key blocks wholly above the diagonal are never visited (loop
  bound), and under causal the q blocks run last-first (the longest rows start first).
* ``_bwd_delta_kernel`` grid (cdiv(Tq, BLOCK_M), Hq, B): delta_i = sum_d do_id o_id.
* ``_bwd_dkdv_kernel`` grid (cdiv(Tk, BLOCK_N), Hkv, B). Keeps its k, v tiles on chip,
  loops over the Hq // Hkv query heads of its kv group and, for each, over the query blocks
  that see the key block (causal: from the first query whose diagonal reaches it; the
  diagonal blocks masked, the rest not), recomputing p^T = exp(k q^T scale - lse) tile by
  tile: dv += p^T do, dk += scale * (p^T * (v do^T - delta)) q. The GQA sum over the group
  is a plain loop: deterministic, no atomics. Keys hidden by the padding mask get dk = dv = 0
  (their column of p is 0 for every row), written once at the end; a key block hidden
  entirely skips its loops.
* ``_bwd_dq_kernel``   grid (cdiv(Tq, BLOCK_M), Hq, B), the forward's loop bounds and masks:
  dq += scale * (p * (do v^T - delta)) k. Separate from dkdv, so no atomics anywhere and
  every gradient is deterministic.

Accumulation is float32 (float64 for float64 inputs, which only the interpreter runs); p and
ds are cast to the storage dtype for their products with v / do / q / k (fp16/bf16 tensor-core
inputs), and dots on float32 inputs follow torch.backends.cuda.matmul.allow_tf32. Scales
travel as float32 hi + lo pairs (Triton passes Python floats as float32; float64 needs more).
The interpreter's tl.dot ignores input_precision (no tf32 rounding on CPU), so tf32 error only
shows on a GPU.

Block sizes and num_warps / num_stages are autotuned on the GPU (key: head dim, causal,
padding mask, power-of-2 buckets of Tq and Tk, dtypes); under TRITON_INTERPRET=1 (CPU
tests) the blocks are ``INTERPRET_BLOCKS``, read at each launch so that tests can change them.
"""

import math
import os
import struct

import torch
import triton
import triton.language as tl

from .linear_act import _dot  # tl.dot with the interpreter's bf16 workaround

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Constants read inside @triton.jit code are constexpr; products put them on the RIGHT
# (`x * _LN2`): under TRITON_INTERPRET=1 a constexpr on the left breaks (triton 3.9).
_LOG2E_F = 1.0 / math.log(2.0)
_LN2 = tl.constexpr(math.log(2.0))
_LOG2E = tl.constexpr(_LOG2E_F)

# (BLOCK_M, BLOCK_N) under the interpreter: (query block, key block) for every kernel.
INTERPRET_BLOCKS = (32, 16)

# GPU tiles: fwd / dq (BLOCK_M queries, BLOCK_N keys per step, num_warps, num_stages); dkdv
# (BLOCK_N keys held, BLOCK_M queries per step, num_warps, num_stages). One list per kernel,
# operand class and head-dim block (64: BLOCK_D <= 64; 128: BLOCK_D = 128). "half" = fp16 /
# bf16; "tf32" = float32 with allow_tf32; "fp32" = float32 without, whose ieee tl.dot runs on
# FMA units and needs small tiles. Checked with ptxas -v under triton's own flags (13.4,
# sm_90a, -lineinfo --regAllocOptLevel=2), triton 3.9, causal + key padding mask (the most live
# values), D = 64 for the 64 lists and D = 80, 96, 128 for the 128 lists, fp16 and bf16 alike:
# every tile fits the H100's 227 KiB of shared memory and none spills, except 8-16 bytes in
# tf32 dkdv at BLOCK_D = 128 (no larger tile is spill-free there), fp32 dkdv (32, 16, 8, 2) /
# (16, 32, 4, 2) at BLOCK_D = 64 and fp32 dq (32, 16, 8, 2) at BLOCK_D = 128. Those few bytes
# are values ptxas stores before the loops and reloads after them (SASS), at 80-168
# registers: no traffic inside the loops.
_TILES = {
    "fwd": {
        ("half", 64): [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4),
                       (64, 64, 4, 3), (64, 32, 4, 4), (64, 32, 4, 3)],
        ("half", 128): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 32, 4, 3)],
        ("tf32", 64): [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4),
                       (64, 32, 8, 3), (64, 32, 4, 4)],
        ("tf32", 128): [(128, 32, 8, 3), (64, 32, 8, 3), (64, 16, 4, 3)],
        ("fp32", 64): [(64, 32, 8, 2), (64, 16, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2),
                       (16, 16, 4, 2)],
        ("fp32", 128): [(32, 16, 8, 2), (16, 16, 4, 2)],
    },
    "dkdv": {
        ("half", 64): [(128, 32, 8, 3), (128, 32, 8, 2), (128, 16, 8, 3), (64, 64, 8, 3),
                       (64, 32, 8, 3), (64, 32, 4, 2), (32, 32, 4, 3)],
        ("half", 128): [(128, 16, 8, 3), (128, 16, 8, 2), (64, 32, 8, 2), (64, 16, 8, 3),
                        (32, 32, 8, 3), (32, 16, 4, 3)],
        ("tf32", 64): [(128, 32, 8, 3), (128, 32, 8, 2), (128, 16, 8, 3), (64, 32, 8, 3),
                       (64, 32, 4, 4), (64, 16, 4, 3), (32, 32, 4, 3)],
        ("tf32", 128): [(32, 16, 8, 2), (32, 16, 8, 3), (16, 16, 4, 3)],
        ("fp32", 64): [(32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 4, 2)],
        ("fp32", 128): [(32, 16, 8, 2)],
    },
    "dq": {
        ("half", 64): [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                       (64, 32, 8, 3), (64, 32, 4, 4)],
        ("half", 128): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 8, 3), (64, 32, 4, 4)],
        ("tf32", 64): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 8, 3), (64, 32, 4, 4),
                       (32, 32, 4, 3)],
        ("tf32", 128): [(128, 32, 8, 3), (128, 16, 8, 3), (64, 32, 8, 3), (64, 16, 4, 3), (32, 32, 4, 3)],
        ("fp32", 64): [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)],
        ("fp32", 128): [(32, 16, 8, 2), (16, 16, 4, 2)],
    },
}
_NAMES = {"fwd": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_N", "BLOCK_M"), "dq": ("BLOCK_M", "BLOCK_N")}


def _configs(kernel):
    if _INTERPRET:  # the launcher passes the blocks (INTERPRET_BLOCKS)
        return [triton.Config({}, num_warps=4, num_stages=1)]
    a, b = _NAMES[kernel]
    tiles = dict.fromkeys(t for ts in _TILES[kernel].values() for t in ts)  # ordered union
    return [triton.Config({a: x, b: y}, num_warps=w, num_stages=s) for x, y, w, s in tiles]


def _pruner(kernel):
    """Keep the tiles of the launch's (operand class, head-dim block) list."""
    a, b = _NAMES[kernel]

    def prune(configs, named_args, **kwargs):
        if named_args["q_ptr"].dtype == torch.float32:
            cls = "tf32" if kwargs["PREC"] == "tf32" else "fp32"
        else:
            cls = "half"
        allowed = set(_TILES[kernel][(cls, 64 if kwargs["BLOCK_D"] <= 64 else 128)])
        return [c for c in configs if (c.kwargs[a], c.kwargs[b], c.num_warps, c.num_stages) in allowed]

    return {"early_config_prune": prune}


_TUNE_KEY = ["TUNE_TQ", "TUNE_TK", "HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_BIAS"]


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _scalar(hi, lo, ACC_DT: tl.constexpr):
    # hi + lo as a 0-d ACC_DT value (hi / lo are float32 on the GPU).
    return tl.sum(tl.zeros((1,), ACC_DT) + hi + lo, axis=0)


@triton.jit
def _exp(x, EXP2: tl.constexpr):
    if EXP2:
        return tl.math.exp2(x)
    else:
        return tl.exp(x)


@triton.jit
def _load(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          CHECK_ROWS: tl.constexpr):
    # A (rows, BLOCK_D) tile; masked only where it can run out of bounds, padding = 0.
    if BLOCK_D == HEAD_DIM:
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs)
    else:
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr):
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _bias_tile(bias_base, rows, n_rows, cols, n_cols, stride_r, stride_c, EXP2: tl.constexpr,
               ACC_DT: tl.constexpr):
    # The (rows, cols) tile of the additive mask, in the scores' units; 0 out of bounds.
    b = tl.load(bias_base + rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c,
                mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0).to(ACC_DT)
    if EXP2:
        b = b * _LOG2E
    return b


@triton.jit
def _key_range(start_m, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # For the query block at start_m: (n_full, hi). Key blocks [0, n_full) are seen whole by
    # every query of the block (no causal / Tk mask needed); [n_full, hi) need the mask; keys
    # >= hi are seen by none of its queries. Row i sees key j iff j <= i + Tk - Tq (causal).
    hi = Tk
    full_end = Tk
    if CAUSAL:
        diag = Tk - Tq
        last_row = tl.minimum(start_m + BLOCK_M, Tq) - 1
        hi = tl.maximum(tl.minimum(last_row + diag + 1, Tk), 0)
        full_end = tl.maximum(tl.minimum(start_m + diag + 1, Tk), 0)
    n_full = (full_end // BLOCK_N) * BLOCK_N
    return n_full, hi


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, kpm_base, bias_base, qk_scale,
    offs_m, offs_d, lo, hi, Tq, Tk, stride_kt, stride_vt, stride_bq, stride_bk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
    EXP2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_DT: tl.constexpr, PREC: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        rows = offs_n.to(tl.int64)[:, None]
        k = _load(k_base + rows * stride_kt + offs_d[None, :], offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), ACC_DT), ACC_DT, PREC) * qk_scale
        if HAS_BIAS:
            s = s + _bias_tile(bias_base, offs_m, Tq, offs_n, Tk, stride_bq, stride_bk, EXP2, ACC_DT)
        if MASKED:
            keep = offs_n[None, :] < Tk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            s = tl.where(keep, s, float("-inf"))
        if HAS_KPM:
            hidden = tl.load(kpm_base + offs_n, mask=offs_n < Tk, other=1)
            s = tl.where(hidden[None, :] == 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # shift = m_new, or 0 while the row has seen nothing (never -inf - -inf)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp(m_i - shift, EXP2)
        p = _exp(s - shift[:, None], EXP2)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load(v_base + rows * stride_vt + offs_d[None, :], offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], ACC_DT, PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY, prune_configs_by=_pruner("fwd"))
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpm_ptr, bias_ptr,
    qk_hi, qk_lo,
    Hq, Tq, Tk, GROUP,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_kpm,
    stride_bb, stride_bh, stride_bq, stride_bk,
    TUNE_TQ, TUNE_TK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr, EXP2: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows first
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    bh = b * Hq + h

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qt + offs_d[None, :]
    q = _load(q_ptrs, offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_base = kpm_ptr + b * stride_kpm
    bias_base = bias_ptr + b * stride_bb + h * stride_bh
    qk_scale = _scalar(qk_hi, qk_lo, ACC_DT)

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DT)
    l_i = tl.zeros((BLOCK_M,), ACC_DT)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DT)
    n_full, hi = _key_range(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, kpm_base, bias_base, qk_scale, offs_m, offs_d, 0, n_full,
        Tq, Tk, stride_kt, stride_vt, stride_bq, stride_bk, False, CAUSAL, HAS_KPM, HAS_BIAS, EXP2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC_DT, PREC,
    )
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, kpm_base, bias_base, qk_scale, offs_m, offs_d, n_full, hi,
        Tq, Tk, stride_kt, stride_vt, stride_bq, stride_bk, True, CAUSAL, HAS_KPM, HAS_BIAS, EXP2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC_DT, PREC,
    )

    seen = l_i > 0  # False: the row saw no key; acc is exactly 0 there
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    if EXP2:
        lse = (m_i + tl.math.log2(l_safe)) * _LN2
    else:
        lse = m_i + tl.log(l_safe)
    lse = tl.where(seen, lse, float("inf"))
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_ot + offs_d[None, :]
    _store(o_ptrs, o, offs_m, Tq, offs_d, HEAD_DIM)
    tl.store(lse_ptr + bh * Tq + offs_m, lse.to(lse_ptr.dtype.element_ty), mask=offs_m < Tq)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, Hq, Tq,
    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * Hq + h
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]
    o = _load(o_ptr + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :],
              offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True).to(ACC_DT)
    do = _load(do_ptr + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :],
               offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True).to(ACC_DT)
    tl.store(delta_ptr + bh * Tq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Tq)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, qk_scale,
    offs_n, offs_d, lo, hi, Tq, Tk, stride_qt, stride_dot, stride_bq, stride_bk,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, EXP2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_DT: tl.constexpr, PREC: tl.constexpr,
):
    # Transposed orientation: the (BLOCK_N, BLOCK_M) tiles have the block's keys as rows.
    # Query rows past Tq load as 0 with lse = +inf, so their p is 0.
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        rows = offs_m.to(tl.int64)[:, None]
        q = _load(q_base + rows * stride_qt + offs_d[None, :], offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < Tq, other=float("inf"))
        if EXP2:
            lse = lse * _LOG2E
        s_t = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), ACC_DT), ACC_DT, PREC) * qk_scale
        if HAS_BIAS:
            s_t = s_t + _bias_tile(bias_base, offs_n, Tk, offs_m, Tq, stride_bk, stride_bq, EXP2, ACC_DT)
        p_t = _exp(s_t - lse[None, :], EXP2)
        if MASKED:  # causal diagonal
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (Tk - Tq), p_t, 0.0)
        do = _load(do_base + rows * stride_dot + offs_d[None, :], offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
        dv = _dot(p_t.to(do.dtype), do, dv, ACC_DT, PREC)
        delta = tl.load(delta_base + offs_m, mask=offs_m < Tq, other=0.0)
        dp_t = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), ACC_DT), ACC_DT, PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, ACC_DT, PREC)
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_TUNE_KEY, prune_configs_by=_pruner("dkdv"))
@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr, bias_ptr,
    qk_hi, qk_lo, sm_hi, sm_lo,
    Hq, Tq, Tk, GROUP,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt, stride_kpm,
    stride_bb, stride_bh, stride_bq, stride_bk,
    TUNE_TQ, TUNE_TK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr, EXP2: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_n.to(tl.int64)[:, None]
    k = _load(k_ptr + b * stride_kb + hk * stride_kh + rows * stride_kt + offs_d[None, :],
              offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load(v_ptr + b * stride_vb + hk * stride_vh + rows * stride_vt + offs_d[None, :],
              offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D, True)
    qk_scale = _scalar(qk_hi, qk_lo, ACC_DT)

    # Query blocks [lo, mid) cut the causal diagonal of this key block (masked); [mid, Tq) see
    # all of it. Queries below lo see none of it and are never visited.
    lo = 0
    mid = 0
    if CAUSAL:
        diag = Tk - Tq
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        last_key = tl.minimum(start_n + BLOCK_N, Tk) - 1
        mid = tl.minimum(tl.cdiv(tl.maximum(last_key - diag, 0), BLOCK_M) * BLOCK_M, Tq)
        mid = tl.maximum(mid, lo)
    if HAS_KPM:  # a key block hidden entirely by the padding mask: dk = dv = 0, no loop
        hidden = tl.load(kpm_ptr + b * stride_kpm + offs_n, mask=offs_n < Tk, other=1)
        none_seen = tl.min(hidden, axis=0) != 0
        lo = tl.where(none_seen, Tq, lo)
        mid = tl.where(none_seen, Tq, mid)

    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC_DT)
    dv = tl.zeros((BLOCK_N, BLOCK_D), ACC_DT)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        stat = (b * Hq + h) * Tq
        bias_base = bias_ptr + b * stride_bb + h * stride_bh
        if CAUSAL:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_ptr + stat, delta_ptr + stat, bias_base, qk_scale,
                offs_n, offs_d, lo, mid, Tq, Tk, stride_qt, stride_dot, stride_bq, stride_bk, True, HAS_BIAS,
                EXP2, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC_DT, PREC,
            )
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_ptr + stat, delta_ptr + stat, bias_base, qk_scale,
            offs_n, offs_d, mid, Tq, Tq, Tk, stride_qt, stride_dot, stride_bq, stride_bk, False, HAS_BIAS, EXP2,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC_DT, PREC,
        )
    dk = dk * _scalar(sm_hi, sm_lo, ACC_DT)
    if HAS_KPM:  # a hidden key's column of p is 0 in every row
        dk = tl.where(hidden[:, None] == 0, dk, 0.0)
        dv = tl.where(hidden[:, None] == 0, dv, 0.0)
    _store(dk_ptr + b * stride_dkb + hk * stride_dkh + rows * stride_dkt + offs_d[None, :],
           dk, offs_n, Tk, offs_d, HEAD_DIM)
    _store(dv_ptr + b * stride_dvb + hk * stride_dvh + rows * stride_dvt + offs_d[None, :],
           dv, offs_n, Tk, offs_d, HEAD_DIM)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, kpm_base, bias_base, qk_scale,
    offs_m, offs_d, lo, hi, Tq, Tk, stride_kt, stride_vt, stride_bq, stride_bk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
    EXP2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_DT: tl.constexpr, PREC: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        rows = offs_n.to(tl.int64)[:, None]
        k = _load(k_base + rows * stride_kt + offs_d[None, :], offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), ACC_DT), ACC_DT, PREC) * qk_scale
        if HAS_BIAS:
            s = s + _bias_tile(bias_base, offs_m, Tq, offs_n, Tk, stride_bq, stride_bk, EXP2, ACC_DT)
        p = _exp(s - lse[:, None], EXP2)
        if MASKED:
            keep = offs_n[None, :] < Tk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            p = tl.where(keep, p, 0.0)
        if HAS_KPM:
            hidden = tl.load(kpm_base + offs_n, mask=offs_n < Tk, other=1)
            p = tl.where(hidden[None, :] == 0, p, 0.0)
        v = _load(v_base + rows * stride_vt + offs_d[None, :], offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), ACC_DT), ACC_DT, PREC)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, ACC_DT, PREC)
    return dq


@triton.autotune(configs=_configs("dq"), key=_TUNE_KEY, prune_configs_by=_pruner("dq"))
@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr, bias_ptr,
    qk_hi, qk_lo, sm_hi, sm_lo,
    Hq, Tq, Tk, GROUP,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt, stride_kpm,
    stride_bb, stride_bh, stride_bq, stride_bk,
    TUNE_TQ, TUNE_TK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_BIAS: tl.constexpr, EXP2: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    bh = b * Hq + h

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]
    q = _load(q_ptr + b * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :],
              offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load(do_ptr + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :],
               offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    stat = bh * Tq + offs_m
    lse = tl.load(lse_ptr + stat, mask=offs_m < Tq, other=float("inf"))
    if EXP2:
        lse = lse * _LOG2E
    delta = tl.load(delta_ptr + stat, mask=offs_m < Tq, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_base = kpm_ptr + b * stride_kpm
    bias_base = bias_ptr + b * stride_bb + h * stride_bh
    qk_scale = _scalar(qk_hi, qk_lo, ACC_DT)

    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC_DT)
    n_full, hi = _key_range(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, kpm_base, bias_base, qk_scale, offs_m, offs_d, 0, n_full,
        Tq, Tk, stride_kt, stride_vt, stride_bq, stride_bk, False, CAUSAL, HAS_KPM, HAS_BIAS, EXP2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC_DT, PREC,
    )
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, kpm_base, bias_base, qk_scale, offs_m, offs_d, n_full, hi,
        Tq, Tk, stride_kt, stride_vt, stride_bq, stride_bk, True, CAUSAL, HAS_KPM, HAS_BIAS, EXP2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC_DT, PREC,
    )
    dq = dq * _scalar(sm_hi, sm_lo, ACC_DT)
    _store(dq_ptr + b * stride_dqb + h * stride_dqh + rows * stride_dqt + offs_d[None, :],
           dq, offs_m, Tq, offs_d, HEAD_DIM)


# ----------------------------------------------------------------------------- launchers


def _split(v: float):
    """A Python float as a float32 hi + lo pair (hi + lo == v to ~48 bits)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, float(v - hi)


def _bias_args(q, k, attn_bias):
    """(pointer, 4 strides): the bias viewed as (B, Hq, Tq, Tk), stride 0 where it broadcasts."""
    if attn_bias is None:
        return q, (0, 0, 0, 0)
    B, Hq, Tq, _ = q.shape
    return attn_bias, attn_bias.expand(B, Hq, Tq, k.shape[2]).stride()


def _common(q, k, causal, key_padding_mask, scale):
    """Launch arguments shared by every kernel."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    f64 = q.dtype == torch.float64
    if f64:
        acc, prec = tl.float64, "ieee"
    else:
        acc = tl.float32
        prec = "tf32" if q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    exp2 = not f64  # float64 keeps natural exp / log: no float32-rounded log2(e) anywhere
    qk = float(scale) * (_LOG2E_F if exp2 else 1.0)
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask.view(torch.uint8) if has_kpm else q
    meta = {
        "TUNE_TQ": triton.next_power_of_2(Tq), "TUNE_TK": triton.next_power_of_2(Tk),
        "HEAD_DIM": D, "BLOCK_D": max(16, triton.next_power_of_2(D)), "CAUSAL": bool(causal),
        "HAS_KPM": has_kpm, "EXP2": exp2, "ACC_DT": acc, "PREC": prec,
    }
    return B, Hq, Hkv, Tq, Tk, kpm, (kpm.stride(0) if has_kpm else 0), _split(qk), _split(float(scale)), meta


def _blocks():
    if _INTERPRET:
        return {"BLOCK_M": INTERPRET_BLOCKS[0], "BLOCK_N": INTERPRET_BLOCKS[1]}
    return {}


def _s3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    """(o, lse) of attention: o = softmax(q k^T * scale + mask) v, lse its row log-sum-exp.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); key_padding_mask None or (B, Tk) bool (True =
    hidden); attn_bias None or broadcastable to (B, Hq, Tq, Tk), added to the scaled scores;
    causal aligns bottom-right. o has q's dtype and shape, lse (B, Hq, Tq) float32
    (float64 for float64 inputs); rows that see no key get o = 0 and lse = +inf.
    """
    B, Hq, Hkv, Tq, Tk, kpm, s_kpm, qk, _, meta = _common(q, k, causal, key_padding_mask, scale)
    bias, s_bias = _bias_args(q, k, attn_bias)
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, Tq), device=q.device,
                      dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    if o.numel() == 0 or Tk == 0:
        return o.zero_(), lse.fill_(float("inf"))
    grid = lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), Hq, B)
    _fwd_kernel[grid](
        q, k, v, o, lse, kpm, bias, *qk, Hq, Tq, Tk, Hq // Hkv,
        *_s3(q), *_s3(k), *_s3(v), *_s3(o), s_kpm, *s_bias,
        HAS_BIAS=attn_bias is not None, **meta, **_blocks(),
    )
    return o, lse


def backward(do, q, k, v, o, lse, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    """(dq, dk, dv) of attention from forward's o and lse; shapes and dtypes of q, k, v."""
    B, Hq, Hkv, Tq, Tk, kpm, s_kpm, qk, sm, meta = _common(q, k, causal, key_padding_mask, scale)
    bias, s_bias = _bias_args(q, k, attn_bias)
    meta = {**meta, "HAS_BIAS": attn_bias is not None}
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    block_m = INTERPRET_BLOCKS[0] if _INTERPRET else (64 if meta["BLOCK_D"] <= 64 else 32)
    _bwd_delta_kernel[(triton.cdiv(Tq, block_m), Hq, B)](
        o, do, delta, Hq, Tq, *_s3(o), *_s3(do),
        HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], ACC_DT=meta["ACC_DT"], BLOCK_M=block_m,
        num_warps=4,
    )
    grid = lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), Hkv, B)
    _bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, dk, dv, kpm, bias, *qk, *sm, Hq, Tq, Tk, Hq // Hkv,
        *_s3(q), *_s3(k), *_s3(v), *_s3(do), *_s3(dk), *_s3(dv), s_kpm, *s_bias,
        **meta, **_blocks(),
    )
    grid = lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), Hq, B)
    _bwd_dq_kernel[grid](
        q, k, v, do, lse, delta, dq, kpm, bias, *qk, *sm, Hq, Tq, Tk, Hq // Hkv,
        *_s3(q), *_s3(k), *_s3(v), *_s3(do), *_s3(dq), s_kpm, *s_bias,
        **meta, **_blocks(),
    )
    return dq, dk, dv
