"""CPU form of attention: query blocks against key blocks, numba around torch's BLAS.

Two forms. Without attn_bias (``_fused``): forward and backward are each one numba
parallel region (prange over (head, query block) tasks forward, over heads backward)
whose tasks call MKL's GEMM themselves (blas.mkl_gemm, one thread each) on score blocks
that stay in the worker's cache. With attn_bias, the batched form below:

The block products (q k^T, p v, and in backward do v^T, p^T do, ds k, ds^T q) are
batched matmuls over a chunk of (batch, head) pairs at once from torch (MKL); numba does
the rest in one pass over each score block, in place: scale, masks and the online-softmax
update in forward (with the rescaling of the output rows), p = exp(s - lse) and
ds = p (dp - delta) in backward. Row max and sums are vectorized reductions (lanes.py).

Blocks (``_blocks``): at most SCORE_BYTES of scores at a time, so memory is O(T * D)
plus that, never O(T^2); within it, blocks are as large as possible, because every
block costs three parallel regions (six in backward) and each ends in a barrier. The
scores live in one scratch buffer per call (fresh 8 MiB blocks cost page faults). With
``causal``, key blocks wholly above the diagonal are skipped and the last key block
stops at the last key the block's last query sees. keeps the running row max m and sum l for every row, and normalizes o and writes
lse = m + log l in one pass at the end. Backward loops over query blocks and, inside,
key blocks; dk and dv accumulate over query blocks in order, dq over key blocks:
deterministic.

``attn_bias`` (an additive mask broadcastable to (B, Hq, Tq, Tk)) is added to each score
block right after its product, divided by ``scale`` because the numba passes scale the
whole block (s * scale + bias); -inf stays -inf, so a hidden key gets p = 0 as above.
"""

import math

import numpy as np
import torch
from numba import njit, prange

from .blas import MKL_THREADS, mkl_gemm, mkl_set_num_threads_local
from .fastmath import KERNEL_OPTIONS, _int_bits_as_f32, exp, like
from .lanes import lane_max, lane_sum_f64, maximum
from .memory import empty

BLOCK_Q = 128  # query rows per block, at least (grown in multiples of it)
BLOCK_K = 512
# Scores held at a time, in bytes (one float32 block over 64 heads x 128 x 512).
SCORE_BYTES = 16 << 20


@njit(inline="always")
def _visible(causal, nk, q, k0, offset):
    """Keys k0 + j with j < the result are not hidden by causality from query q."""
    return nk if not causal else min(nk, max(0, q + offset + 1 - k0))


@njit(inline="always")
def _hide_masked(row, limit, mask_row, k0, value):
    for j in range(limit):
        if mask_row[k0 + j]:
            row[j] = value


@njit(inline="always")
def _exp_scores_row(row, limit, scale, has_mask, mask_row, k0, m_old):
    """One query's scores of a key block, in place: times scale, masked keys hidden, then
    exp(s - m_new) for the first ``limit`` (visible) keys and 0 past them, with m_new =
    max(m_old, the row's max). Returns (m_new, the row's float64 sum); m_new -inf (nothing
    visible yet): the row is all 0 and the sum 0."""
    sc = like(row[0], scale)
    for j in range(limit):
        row[j] = row[j] * sc
    if has_mask:
        _hide_masked(row, limit, mask_row, k0, like(row[0], -np.inf))
    m_new = max(m_old, np.float64(lane_max(row[:limit])))
    if m_new == -np.inf:
        row[:] = 0
        return m_new, 0.0
    mn = like(row[0], m_new)
    for j in range(limit):
        row[j] = exp(row[j] - mn)
    row[limit:] = 0
    return m_new, lane_sum_f64(row[:limit])


@njit(inline="always")
def _rescale(out, a):
    """out *= a (the running output of a row whose max rose), skipped when a is 1."""
    if a != 1.0:
        a_x = like(out[0], a)
        for d in range(out.size):
            out[d] *= a_x


@njit(**KERNEL_OPTIONS)
def _online_softmax_block(s, acc, first, scale, mask, has_mask, causal, h0, q0, k0, offset, heads, m, l):
    """s (nh, nq, nk): scores of keys k0.. for queries q0.. of heads h0..; in place ->
    exp(s*scale - m_new), 0 for hidden keys. m, l (BH, Tq): running max and sum (float64),
    updated; with ``first`` they start here. acc (nh, nq, D): the block's unnormalized
    output, rescaled here by exp(m_old - m_new) unless ``first`` (the caller overwrites it)."""
    nh, nq, nk = s.shape
    for r in prange(nh * nq):
        h, i = r // nq, r % nq
        row = s[h, i]
        limit = _visible(causal, nk, q0 + i, k0, offset)
        mask_row = mask[(h0 + h) // heads] if has_mask else mask[0]
        hg, ig = h0 + h, q0 + i
        m_old = -np.inf if first else m[hg, ig]
        m_new, total = _exp_scores_row(row, limit, scale, has_mask, mask_row, k0, m_old)
        if m_new == -np.inf:  # nothing seen yet in this row
            if first:
                m[hg, ig], l[hg, ig] = -np.inf, 0.0
            continue
        if first:
            m[hg, ig], l[hg, ig] = m_new, total
        else:
            a = math.exp(m_old - m_new)
            m[hg, ig], l[hg, ig] = m_new, l[hg, ig] * a + total
            _rescale(acc[h, i], a)


@njit(**KERNEL_OPTIONS)
def _finish_rows(m, l, o, lse):
    """o /= l and lse = m + log l, every row; a row that saw no key (l = 0) gets o = 0 and
    lse = +inf."""
    BH, Tq, D = o.shape
    for r in prange(BH * Tq):
        h, i = r // Tq, r % Tq
        out = o[h, i]
        if l[h, i] > 0:
            inv = like(out[0], 1.0 / l[h, i])
            for d in range(D):
                out[d] *= inv
            lse[h, i] = m[h, i] + np.log(l[h, i])
        else:
            out[:] = 0
            lse[h, i] = np.inf


@njit(**KERNEL_OPTIONS)
def _probs_and_grad_scores(s, dp, lse, delta, scale, mask, has_mask, causal, h0, q0, k0, offset, heads):
    """In place: s -> p = exp(s*scale - lse), dp -> ds = scale * p * (dp - delta); 0 for
    hidden keys. lse and delta are the whole (BH, Tq) arrays."""
    nh, nq, nk = s.shape
    for r in prange(nh * nq):
        h, i = r // nq, r % nq
        row, g = s[h, i], dp[h, i]
        limit = _visible(causal, nk, q0 + i, k0, offset)
        sc = like(row[0], scale)
        lse_i = like(row[0], lse[h0 + h, q0 + i])
        d = like(row[0], delta[h0 + h, q0 + i])
        for j in range(limit):
            p = exp(row[j] * sc - lse_i)
            row[j] = p
            g[j] = sc * p * (g[j] - d)
        if has_mask:
            _hide_masked(row, limit, mask[(h0 + h) // heads], k0, like(row[0], 0.0))
            _hide_masked(g, limit, mask[(h0 + h) // heads], k0, like(row[0], 0.0))
        row[limit:] = 0
        g[limit:] = 0


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_flat(q, k, v):
    """(BH, T, D) views; k and v repeated over the query heads of their group (GQA)."""
    B, Hq, Tq, D = q.shape
    group = Hq // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return q.reshape(B * Hq, Tq, D), k.reshape(B * Hq, -1, D), v.reshape(B * Hq, -1, D)


def _key_end(q1, Tq, Tk, causal):
    """Keys [0, end) that some query in [.., q1) may see."""
    return Tk if not causal else min(Tk, max(0, q1 - 1 + Tk - Tq + 1))


def _mask_np(key_padding_mask):
    if key_padding_mask is None:
        return np.zeros((1, 1), np.bool_), False
    return key_padding_mask.numpy(), True


def _blocks(BH, Tq, Tk, itemsize):
    """(query rows, keys, heads) per block. Every block is three or more parallel regions
    (torch's GEMMs, the numba pass), each ending in a barrier that waits for the slowest
    thread, which on a busy machine can be a scheduler time slice: blocks are as large as
    SCORE_BYTES of scores allows. Heads first (all of them if BLOCK_Q rows fit), then
    query rows in multiples of BLOCK_Q."""
    bk = max(1, min(BLOCK_K, Tk))
    row_bytes = bk * itemsize
    heads = max(1, min(BH, SCORE_BYTES // max(1, BLOCK_Q * row_bytes)))
    bq = max(BLOCK_Q, SCORE_BYTES // max(1, heads * row_bytes) // BLOCK_Q * BLOCK_Q)
    return max(1, min(bq, Tq)), bk, heads


class _Scratch:
    """One allocation per call, handed out as contiguous views of the shape asked for."""

    def __init__(self, numel, dtype):
        self.flat = empty((max(1, numel),), dtype)

    def view(self, *shape):
        return self.flat[:math.prod(shape)].view(shape)


def _add_bias(s, attn_bias, h0, h1, q0, q1, k0, k1, scale):
    """s (flat heads h0..h1, bq, bk) += attn_bias's tile / scale (the numba passes then scale s).
    Per (batch, head) slice: a broadcast bias is never materialised over B x Hq."""
    if attn_bias is None:
        return
    B, Hq = attn_bias.shape[:2]
    for i, h in enumerate(range(h0, h1)):
        s[i].add_(attn_bias[h // Hq, h % Hq, q0:q1, k0:k1], alpha=1.0 / scale)


# ---------------------------------------------------------------------------------------
# The forward in one parallel region: numba prange over (head, query block) tasks, each
# running its key blocks with MKL's GEMM called from numba (blas.mkl_gemm, sequential
# inside a task: mkl_set_num_threads_local(1)) and the online softmax between the two
# products, on a score block that stays in the worker's cache for p v. The batched form
# below pays three parallel regions per block (torch's bmm, the numba pass, bmm), each
# ending in a barrier and handing the cores between two thread pools: with two threads on
# a busy machine it ran at half of SDPA's flash kernel (bench/results/attention_cpu.md).
# It runs when MKL is reachable, with no attn_bias (whose tiles the batched form adds with
# torch), in float32 / float64, every size nonzero and within BLAS's 32-bit ints.

FUSED_BLOCK_Q = 64  # query rows per task: 64 x 256 float32 scores are 64 KiB, in L2
FUSED_BLOCK_K = 256
# The non-causal forward skips no block, so its blocks are larger: fewer, larger GEMM calls
# (each packs its operands) and fewer row passes per score row. 128 x 512 float32 scores are
# 256 KiB, half of this machine's L2. On one thread at B4 H8 T1024 d64 the GEMMs alone took
# 105 ms at 64 x 256 and 102 ms at 128 x 512 (101 at 256 x 512, torch's flash CPU blocks).
FUSED_FULL_BLOCK_Q = 128
FUSED_FULL_BLOCK_K = 512

# float32 with scale > 0 runs the online softmax in base 2, as flash-attention kernels do:
# p = 2^(s c - m) with c = scale log2(e), so one FMA per score replaces the scaling pass
# over the block and the ln 2 range reduction inside exp, and the running max m is kept in
# units of log2 (lse = m ln 2 + log l at the end). On one core at B4 H8 T1024 d64 the
# whole forward went 135.7 -> 129.1 ms (the two GEMMs alone: 104 ms).
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# 2^f on |f| <= 1/2: a degree-5 polynomial fitted for least relative error (near-minimax:
# 7.5e-8 in exact arithmetic, 2.3e-7 evaluated in float32, as the degree-6 Taylor series it
# replaced), evaluated in Estrin's form: three FMAs deep instead of Horner's five, so the
# vectorized loop waits less on FMA latency.
_EXP2_C = tuple(np.float32(c) for c in (1.0000001192092896, 0.6931469440460205, 0.24022118747234344,
                                        0.05550709366798401, 0.009675553068518639, 0.0013277779798954725))
_EXP2_MIN = -127.0  # 2^n with n = -127 has exponent bits 0: the result is 0


@njit(inline="always")
def _exp2_f32(x):
    """2^x in float32 arithmetic (vectorizes), for x <= 0 up to rounding (a score less its row's
    max): 0 below -126.5 (and for -inf, a hidden key), NaN for NaN."""
    x = maximum(x, like(x, _EXP2_MIN))
    n = np.floor(x + np.float32(0.5))
    f = x - n
    c0, c1, c2, c3, c4, c5 = _EXP2_C
    f2 = f * f
    p = (c0 + f * c1) + f2 * ((c2 + f * c3) + f2 * (c4 + f * c5))
    return p * _int_bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(inline="always")
def _exp2_scores_row(row, limit, c, has_mask, mask_row, k0, m_old):
    """_exp_scores_row in base 2 (float32 rows, c = scale log2(e) > 0): masked keys hidden,
    then 2^(s c - m_new) for the first ``limit`` keys and 0 past them, m_new = max(m_old,
    c max(s)) in units of log2 (c > 0: the max of s c is c times the max of s)."""
    if has_mask:
        _hide_masked(row, limit, mask_row, k0, like(row[0], -np.inf))
    m_new = max(m_old, np.float64(lane_max(row[:limit])) * c)
    if m_new == -np.inf:
        row[:] = 0
        return m_new, 0.0
    total = _exp2_shifted_sum(row[:limit], like(row[0], c), like(row[0], m_new))
    row[limit:] = 0
    return m_new, total


@njit(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)
def _exp2_shifted_sum(row, c, m):
    """row = 2^(row c - m) in place, and its sum in float64, in one pass (a separate sum
    re-read the row). Compiled on its own with reassociation, as lanes.py's sums, so LLVM
    splits the sum into vector lanes."""
    total = np.float32(0.0)
    for j in range(row.size):
        p = _exp2_f32(row[j] * c - m)
        row[j] = p
        total += p
    return np.float64(total)


def _fused_blocks(full=False):
    """(query rows, keys) of a fused block, the larger ones for a ``full`` (non-causal)
    forward: at most the batched form's BLOCK_Q, BLOCK_K (so a test that shrinks those runs
    several blocks in both forms)."""
    bq, bk = (FUSED_FULL_BLOCK_Q, FUSED_FULL_BLOCK_K) if full else (FUSED_BLOCK_Q, FUSED_BLOCK_K)
    return min(bq, BLOCK_Q), min(bk, BLOCK_K)


@njit(inline="always")
def _key_end_nb(q1, Tq, Tk, causal):
    return Tk if not causal else min(Tk, max(0, q1 - 1 + Tk - Tq + 1))


@njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract"})
def _fused_forward(q, k, v, o, lse, causal, mask, has_mask, scale, heads, group, bq, bk, base2):
    """q, o (BH, Tq, D); k, v (B * heads // group, Tk, D); lse (BH, Tq). Task (bh, query
    block): scores s = q k^T of one key block at a time (nq x nk, row stride bk), online
    softmax in place, acc += p v; then o = acc / l, lse = m + log l. With ``base2``
    (float32, scale > 0) the softmax runs in base 2 and m in units of log2."""
    BH, Tq, D = q.shape
    Tk = k.shape[1]
    offset = Tk - Tq
    n_qb = (Tq + bq - 1) // bq
    for task in prange(BH * n_qb):
        previous = mkl_set_num_threads_local(1)
        bh, qb = task // n_qb, task % n_qb
        kvh = (bh // heads) * (heads // group) + (bh % heads) // group
        q0 = qb * bq
        q1 = min(Tq, q0 + bq)
        nq = q1 - q0
        s = np.empty((bq, bk), q.dtype)
        acc = np.zeros((bq, D), q.dtype)
        m = np.full(bq, -np.inf)
        l = np.zeros(bq)
        mask_row = mask[bh // heads] if has_mask else mask[0]
        key_end = _key_end_nb(q1, Tq, Tk, causal)
        for k0 in range(0, key_end, bk):
            nk = min(key_end, k0 + bk) - k0
            mkl_gemm(1, 0, nk, nq, D, k[kvh, k0:], D, q[bh, q0:], D, 0.0, s, bk)  # s = q k^T
            for i in range(nq):
                row = s[i, :nk]
                limit = _visible(causal, nk, q0 + i, k0, offset)
                m_old = m[i]
                if base2:
                    m_new, total = _exp2_scores_row(row, limit, scale * _LOG2E, has_mask, mask_row, k0, m_old)
                else:
                    m_new, total = _exp_scores_row(row, limit, scale, has_mask, mask_row, k0, m_old)
                if m_new == -np.inf:  # nothing seen yet in this row: p = 0
                    continue
                if m_new == m_old:  # the max did not rise (most key blocks): nothing to rescale
                    l[i] += total
                    continue
                # 0 when m_old is -inf: acc's row is 0 then
                a = 2.0 ** (m_old - m_new) if base2 else math.exp(m_old - m_new)
                m[i], l[i] = m_new, l[i] * a + total
                _rescale(acc[i], a)
            mkl_gemm(0, 0, D, nq, nk, v[kvh, k0:], D, s, bk, 1.0, acc, D)  # acc += p v
        for i in range(nq):
            out = o[bh, q0 + i]
            if l[i] > 0:
                inv = like(out[0], 1.0 / l[i])
                for d in range(D):
                    out[d] = acc[i, d] * inv
                lse[bh, q0 + i] = (m[i] * _LN2 if base2 else m[i]) + np.log(l[i])
            else:
                out[:] = 0
                lse[bh, q0 + i] = np.inf
        mkl_set_num_threads_local(previous)


_INT32_MAX = 2 ** 31 - 1


def _fused(q, k, attn_bias) -> bool:
    return (MKL_THREADS and attn_bias is None and q.dtype in (torch.float32, torch.float64)
            and all(0 < n <= _INT32_MAX for t in (q, k) for n in t.shape))


def _fused_forward_call(q, k, v, causal, key_padding_mask, scale):
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    qf = q.contiguous().reshape(B * Hq, Tq, D)
    kf, vf = k.contiguous().reshape(B * Hkv, -1, D), v.contiguous().reshape(B * Hkv, -1, D)
    o = empty(qf.shape, q.dtype)
    lse = empty((B * Hq, Tq), _stats_dtype(q.dtype))
    mask, has_mask = _mask_np(key_padding_mask)
    _fused_forward(qf.numpy(), kf.numpy(), vf.numpy(), o.numpy(), lse.numpy(), bool(causal), mask, has_mask,
                   float(scale), Hq, Hq // Hkv, *_fused_blocks(not causal), q.dtype == torch.float32 and scale > 0)
    return o.reshape(q.shape), lse.reshape(B, Hq, Tq)


def forward(q, k, v, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    if _fused(q, k, attn_bias):
        return _fused_forward_call(q, k, v, causal, key_padding_mask, scale)
    return _batched_forward(q, k, v, causal, key_padding_mask, scale, attn_bias)


def _batched_forward(q, k, v, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    if attn_bias is not None:
        attn_bias = attn_bias.expand(B, Hq, Tq, Tk)   # a view: broadcast dims keep stride 0
    qf, kf, vf = _heads_flat(q, k, v)
    BH = B * Hq
    o = empty(qf.shape, q.dtype)
    lse = empty((BH, Tq), _stats_dtype(q.dtype))
    if o.numel() == 0 and lse.numel() == 0:
        return o.reshape(q.shape), lse.reshape(B, Hq, Tq)
    mask, has_mask = _mask_np(key_padding_mask)
    bq, bk, hc = _blocks(BH, Tq, Tk, q.element_size())
    scores, acc = _Scratch(hc * bq * bk, q.dtype), _Scratch(hc * bq * D, q.dtype)
    m = np.full((BH, Tq), -np.inf)
    l = np.zeros((BH, Tq))
    o_np = o.numpy()
    for h0 in range(0, BH, hc):
        h1 = min(BH, h0 + hc)
        for q0 in range(0, Tq, bq):
            q1 = min(Tq, q0 + bq)
            q_blk, acc_blk = qf[h0:h1, q0:q1], acc.view(h1 - h0, q1 - q0, D)
            key_end = _key_end(q1, Tq, Tk, causal)
            for k0 in range(0, key_end, bk):
                k1 = min(key_end, k0 + bk)
                s = scores.view(h1 - h0, q1 - q0, k1 - k0)
                torch.bmm(q_blk, kf[h0:h1, k0:k1].transpose(1, 2), out=s)
                _add_bias(s, attn_bias, h0, h1, q0, q1, k0, k1, scale)
                first = k0 == 0
                _online_softmax_block(s.numpy(), acc_blk.numpy(), first, scale, mask, has_mask, causal, h0, q0, k0, Tk - Tq,
                                      Hq, m, l)
                if first:
                    torch.bmm(s, vf[h0:h1, k0:k1], out=acc_blk)
                else:
                    acc_blk.baddbmm_(s, vf[h0:h1, k0:k1])
            if key_end > 0:
                o[h0:h1, q0:q1] = acc_blk
    _finish_rows(m, l, o_np, lse.numpy())
    return o.reshape(q.shape), lse.reshape(B, Hq, Tq)


@njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract"})
def _fused_backward(do, q, k, v, lse, delta, dq, dk, dv, causal, mask, has_mask, scale, heads, group, bq, bk):
    """One task per (batch, query head) bh, which owns dq[bh], dk[bh] and dv[bh] (per query
    head: the caller sums a GQA group's), so no two tasks write the same rows. Per query
    block and key block: s = q k^T and dp = do v^T (MKL), then p = exp(s scale - lse),
    ds = scale p (dp - delta) in place, and dv += p^T do, dk += ds^T q, dq += ds k."""
    BH, Tq, D = q.shape
    Tk = k.shape[1]
    offset = Tk - Tq
    for bh in prange(BH):
        previous = mkl_set_num_threads_local(1)
        kvh = (bh // heads) * (heads // group) + (bh % heads) // group
        s = np.empty((bq, bk), q.dtype)
        dp = np.empty((bq, bk), q.dtype)
        mask_row = mask[bh // heads] if has_mask else mask[0]
        for q0 in range(0, Tq, bq):
            q1 = min(Tq, q0 + bq)
            nq = q1 - q0
            key_end = _key_end_nb(q1, Tq, Tk, causal)
            for k0 in range(0, key_end, bk):
                nk = min(key_end, k0 + bk) - k0
                mkl_gemm(1, 0, nk, nq, D, k[kvh, k0:], D, q[bh, q0:], D, 0.0, s, bk)  # s = q k^T
                mkl_gemm(1, 0, nk, nq, D, v[kvh, k0:], D, do[bh, q0:], D, 0.0, dp, bk)  # dp = do v^T
                for i in range(nq):
                    row, g = s[i, :nk], dp[i, :nk]
                    limit = _visible(causal, nk, q0 + i, k0, offset)
                    sc = like(row[0], scale)
                    lse_i = like(row[0], lse[bh, q0 + i])
                    d = like(row[0], delta[bh, q0 + i])
                    for j in range(limit):
                        p = exp(row[j] * sc - lse_i)
                        row[j] = p
                        g[j] = sc * p * (g[j] - d)
                    if has_mask:
                        _hide_masked(row, limit, mask_row, k0, like(row[0], 0.0))
                        _hide_masked(g, limit, mask_row, k0, like(row[0], 0.0))
                    row[limit:] = 0
                    g[limit:] = 0
                mkl_gemm(0, 1, D, nk, nq, do[bh, q0:], D, s, bk, 1.0, dv[bh, k0:], D)  # dv += p^T do
                mkl_gemm(0, 1, D, nk, nq, q[bh, q0:], D, dp, bk, 1.0, dk[bh, k0:], D)  # dk += ds^T q
                mkl_gemm(0, 0, D, nq, nk, k[kvh, k0:], D, dp, bk, 1.0, dq[bh, q0:], D)  # dq += ds k
        mkl_set_num_threads_local(previous)


def backward(do, q, k, v, o, lse, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    if not _fused(q, k, attn_bias):
        return _batched_backward(do, q, k, v, o, lse, causal, key_padding_mask, scale, attn_bias)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    BH = B * Hq
    qf = q.contiguous().reshape(BH, Tq, D)
    kf, vf = k.contiguous().reshape(B * Hkv, Tk, D), v.contiguous().reshape(B * Hkv, Tk, D)
    dof = do.contiguous().reshape(BH, Tq, D)
    delta = (dof.to(lse.dtype) * o.reshape(BH, Tq, D).to(lse.dtype)).sum(-1)
    dq = torch.zeros_like(qf)
    dk = torch.zeros(BH, Tk, D, dtype=q.dtype)
    dv = torch.zeros(BH, Tk, D, dtype=q.dtype)
    mask, has_mask = _mask_np(key_padding_mask)
    _fused_backward(dof.numpy(), qf.numpy(), kf.numpy(), vf.numpy(), lse.reshape(BH, Tq).contiguous().numpy(),
                    delta.numpy(), dq.numpy(), dk.numpy(), dv.numpy(), bool(causal), mask, has_mask, float(scale), Hq,
                    Hq // Hkv, *_fused_blocks())
    group = Hq // Hkv
    if group == 1:  # no GQA group to sum: a view, not the copy .sum(2) makes
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
    dk = dk.reshape(B, Hkv, group, Tk, D).sum(2)
    dv = dv.reshape(B, Hkv, group, Tk, D).sum(2)
    return dq.reshape(q.shape), dk, dv


def _batched_backward(do, q, k, v, o, lse, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if attn_bias is not None:
        attn_bias = attn_bias.expand(B, Hq, Tq, Tk)
    qf, kf, vf = _heads_flat(q, k, v)
    BH = B * Hq
    dof = do.reshape(BH, Tq, D)
    delta = (dof.to(lse.dtype) * o.reshape(BH, Tq, D).to(lse.dtype)).sum(-1).numpy()
    lse_np = lse.reshape(BH, Tq).numpy()
    dq = torch.zeros_like(qf)
    dk = torch.zeros(BH, Tk, D, dtype=q.dtype)
    dv = torch.zeros(BH, Tk, D, dtype=q.dtype)
    mask, has_mask = _mask_np(key_padding_mask)
    bq, bk, hc = _blocks(BH, Tq, Tk, q.element_size())
    scores, grads = _Scratch(hc * bq * bk, q.dtype), _Scratch(hc * bq * bk, q.dtype)
    for h0 in range(0, BH, hc):
        h1 = min(BH, h0 + hc)
        for q0 in range(0, Tq, bq):
            q1 = min(Tq, q0 + bq)
            q_blk, do_blk = qf[h0:h1, q0:q1], dof[h0:h1, q0:q1]
            key_end = _key_end(q1, Tq, Tk, causal)
            for k0 in range(0, key_end, bk):
                k1 = min(key_end, k0 + bk)
                s = scores.view(h1 - h0, q1 - q0, k1 - k0)
                dp = grads.view(h1 - h0, q1 - q0, k1 - k0)
                torch.bmm(q_blk, kf[h0:h1, k0:k1].transpose(1, 2), out=s)
                _add_bias(s, attn_bias, h0, h1, q0, q1, k0, k1, scale)
                torch.bmm(do_blk, vf[h0:h1, k0:k1].transpose(1, 2), out=dp)
                _probs_and_grad_scores(s.numpy(), dp.numpy(), lse_np, delta, scale, mask, has_mask, causal, h0,
                                       q0, k0, Tk - Tq, Hq)
                dv[h0:h1, k0:k1].baddbmm_(s.transpose(1, 2), do_blk)
                dk[h0:h1, k0:k1].baddbmm_(dp.transpose(1, 2), q_blk)
                dq[h0:h1, q0:q1].baddbmm_(dp, kf[h0:h1, k0:k1])
    group = Hq // Hkv
    dk = dk.reshape(B, Hkv, group, Tk, D).sum(2)
    dv = dv.reshape(B, Hkv, group, Tk, D).sum(2)
    return dq.reshape(q.shape), dk, dv
