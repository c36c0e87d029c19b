"""CPU form of attention: query blocks against key blocks, numba around torch's BLAS.

The block products (q k^T, p v, and in backward do v^T, p^T do, ds k, ds^T q) are
batched matmuls over every (batch, head) at once from torch (MKL); numba does the
rest in one pass over each score block, in place: scale, masks and the online-softmax
update in forward, p = exp(s - lse) and ds = p (dp - delta) in backward.

Blocks: BLOCK_Q query rows against BLOCK_K keys for all heads, so the scores held at
any time are BH x BLOCK_Q x BLOCK_K (8 MiB in float32 for 16 heads): memory is
O(T * D) plus that, never O(T^2). With ``causal``, key blocks wholly above the
diagonal are skipped (loop bound) and a query block stops at the last key its last
row sees. Forward keeps a running row max m, sum l and unnormalized output per query
block (the FlashAttention recurrence); lse = m + log l. Backward loops over query
blocks and, inside, key blocks; dk and dv accumulate over query blocks in order,
dq over key blocks: deterministic.

``attn_bias`` (an additive mask broadcastable to (B, Hq, Tq, Tk)) is added to each score
block right after its product, divided by ``scale`` because the numba passes scale the
whole block (s * scale + bias); -inf stays -inf, so a hidden key gets p = 0 as above.
"""

import math

import numpy as np
import torch
from numba import njit, prange

from .fastmath import KERNEL_OPTIONS, exp, like
from .lanes import lane_max

BLOCK_Q = 128
BLOCK_K = 256


@njit(**KERNEL_OPTIONS)
def _online_softmax_block(s, scale, mask, has_mask, causal, q0, k0, offset, heads, m, l, alpha):
    """s (BH, bq, bk) scores of keys k0.. for queries q0..: in place -> exp(s*scale - m_new).

    m, l (BH, bq): running max and sum, updated; alpha (BH, bq): exp(m_old - m_new), the
    factor the caller rescales its output accumulator by. Hidden keys get p = 0.
    """
    bh_count, bq, bk = s.shape
    for r in prange(bh_count * bq):
        bh, i = r // bq, r % bq
        row = s[bh, i]
        b = bh // heads
        # keys k0 + j with j < limit are not hidden by causality
        limit = bk if not causal else min(bk, max(0, q0 + i + offset + 1 - k0))
        neg_inf = like(row[0], -np.inf)
        sc = like(row[0], scale)
        for j in range(bk):
            hidden = j >= limit or (has_mask and mask[b, k0 + j])
            row[j] = neg_inf if hidden else row[j] * sc
        m_block = lane_max(row)
        m_old = m[bh, i]
        m_new = max(m_old, m_block)
        if m_new == -np.inf:  # nothing seen yet in this row
            for j in range(bk):
                row[j] = 0
            alpha[bh, i] = 1.0
            continue
        mn = like(row[0], m_new)
        total = 0.0
        for j in range(bk):
            row[j] = exp(row[j] - mn)
        for j in range(bk):
            total += row[j]
        a = math.exp(m_old - m_new)
        alpha[bh, i] = a
        l[bh, i] = l[bh, i] * a + total
        m[bh, i] = m_new


@njit(**KERNEL_OPTIONS)
def _probs_and_grad_scores(s, dp, lse, delta, scale, mask, has_mask, causal, q0, k0, offset, heads):
    """In place: s -> p = exp(s*scale - lse), dp -> ds = scale * p * (dp - delta)."""
    bh_count, bq, bk = s.shape
    for r in prange(bh_count * bq):
        bh, i = r // bq, r % bq
        row, g = s[bh, i], dp[bh, i]
        b = bh // heads
        limit = bk if not causal else min(bk, max(0, q0 + i + offset + 1 - k0))
        sc = like(row[0], scale)
        lse_i = like(row[0], lse[bh, i])
        d = like(row[0], delta[bh, i])
        for j in range(bk):
            hidden = j >= limit or (has_mask and mask[b, k0 + j])
            p = like(row[0], 0.0) if hidden else exp(row[j] * sc - lse_i)
            row[j] = p
            g[j] = sc * p * (g[j] - d)


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


def _add_bias(s, attn_bias, q0, q1, k0, k1, scale):
    """s (B * Hq, bq, bk) += attn_bias's tile / scale (the numba passes then scale s)."""
    if attn_bias is not None:
        B, Hq = attn_bias.shape[:2]
        s.view(B, Hq, q1 - q0, k1 - k0).add_(attn_bias[:, :, q0:q1, k0:k1], alpha=1.0 / scale)


def forward(q, k, v, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    if attn_bias is not None:
        attn_bias = attn_bias.expand(B, Hq, Tq, Tk)
    qf, kf, vf = _heads_flat(q, k, v)
    BH = B * Hq
    stats = _stats_dtype(q.dtype)
    o = torch.empty_like(qf)
    lse = torch.empty(BH, Tq, dtype=stats)
    mask, has_mask = _mask_np(key_padding_mask)
    for q0 in range(0, Tq, BLOCK_Q):
        q1 = min(Tq, q0 + BLOCK_Q)
        m = np.full((BH, q1 - q0), -np.inf, np.float64)
        l = np.zeros((BH, q1 - q0), np.float64)
        alpha = np.empty((BH, q1 - q0), np.float64)
        acc = torch.zeros(BH, q1 - q0, D, dtype=q.dtype)
        for k0 in range(0, _key_end(q1, Tq, Tk, causal), BLOCK_K):
            k1 = min(Tk, k0 + BLOCK_K)
            s = torch.bmm(qf[:, q0:q1], kf[:, k0:k1].transpose(1, 2))
            _add_bias(s, attn_bias, q0, q1, k0, k1, scale)
            _online_softmax_block(s.numpy(), scale, mask, has_mask, causal, q0, k0, Tk - Tq, Hq, m, l, alpha)
            acc.mul_(torch.from_numpy(alpha).to(q.dtype)[..., None]).baddbmm_(s, vf[:, k0:k1])
        seen = l > 0
        inv_l = np.where(seen, 1.0 / np.where(seen, l, 1.0), 0.0)
        o[:, q0:q1] = acc * torch.from_numpy(inv_l).to(q.dtype)[..., None]
        lse[:, q0:q1] = torch.from_numpy(np.where(seen, m + np.log(np.where(seen, l, 1.0)), np.inf))
    return o.reshape(q.shape), lse.reshape(B, Hq, Tq)


def backward(do, q, k, v, o, lse, causal: bool, key_padding_mask, scale: float, attn_bias=None):
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
    for q0 in range(0, Tq, BLOCK_Q):
        q1 = min(Tq, q0 + BLOCK_Q)
        q_blk, do_blk = qf[:, q0:q1], dof[:, q0:q1]
        for k0 in range(0, _key_end(q1, Tq, Tk, causal), BLOCK_K):
            k1 = min(Tk, k0 + BLOCK_K)
            s = torch.bmm(q_blk, kf[:, k0:k1].transpose(1, 2))
            _add_bias(s, attn_bias, q0, q1, k0, k1, scale)
            dp = torch.bmm(do_blk, vf[:, k0:k1].transpose(1, 2))
            _probs_and_grad_scores(s.numpy(), dp.numpy(), lse_np[:, q0:q1], delta[:, q0:q1], scale, mask,
                                   has_mask, causal, q0, k0, Tk - Tq, Hq)
            dv[:, k0:k1].baddbmm_(s.transpose(1, 2), do_blk)
            dk[:, k0:k1].baddbmm_(dp.transpose(1, 2), q_blk)
            dq[:, q0:q1].baddbmm_(dp, kf[:, k0:k1])
    group = Hq // Hkv
    dk = dk.reshape(B, Hkv, group, Tk, D).sum(2)
    dv = dv.reshape(B, Hkv, group, Tk, D).sum(2)
    return dq.reshape(q.shape), dk, dv
