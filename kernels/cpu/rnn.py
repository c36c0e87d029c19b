"""CPU form of the LSTM and GRU steps: torch's BLAS for the recurrent GEMM, numba for
everything pointwise around it, fused into one pass per step.

A step's gates need h_{t-1} W_hh^T (a GEMM: MKL through torch.mm, DESIGN.md) added to
the input projection gx_t that the op computes for all steps up front; one numba pass
then applies the gate nonlinearities and the state update and writes what backward
needs. Backward mirrors it: one numba pass turns (dh, dc) into the pre-activation
gradients, one GEMM carries them back through W_hh. State and gates are in the dtype
of h (float32 or float64).
"""

import torch
from numba import njit, prange

from .fastmath import exp, like, tanh


@njit(inline="always")
def _sigmoid(z):
    # Branch-free so the gate loops vectorize; exp(-z) saturates to a finite value (float32
    # fastmath clamps) or inf (float64), and 1 / (1 + inf) is the right limit, 0.
    one = like(z, 1.0)
    return one / (one + exp(-z))


@njit(inline="always")
def _sigmoid_inplace(v):
    for j in range(v.size):
        v[j] = _sigmoid(v[j])


@njit(parallel=True, cache=True)
def _lstm_forward(pre, c, h_next, c_next):
    """pre (B, 4H) [i|f|g|o] -> activated in place; c_next = f c + i g; h_next = o tanh(c_next).
    One loop per gate over its contiguous H values: a loop touching all four streams did
    not vectorize."""
    B, H = c.shape
    for b in prange(B):
        p = pre[b]
        i, f, g, o = p[:H], p[H:2 * H], p[2 * H:3 * H], p[3 * H:]
        _sigmoid_inplace(i)
        _sigmoid_inplace(f)
        _sigmoid_inplace(o)
        for j in range(H):
            g[j] = tanh(g[j])
        cb, cn, hn = c[b], c_next[b], h_next[b]
        for j in range(H):
            cn[j] = f[j] * cb[j] + i[j] * g[j]
        for j in range(H):
            hn[j] = o[j] * tanh(cn[j])


@njit(parallel=True, cache=True)
def _lstm_backward(dh_next, dc_next, gates, c, c_next, dpre, dc):
    B, H = c.shape
    one = like(c[0, 0], 1.0)
    for b in prange(B):
        a, d = gates[b], dpre[b]
        i, f, g, o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
        di, df, dg, do = d[:H], d[H:2 * H], d[2 * H:3 * H], d[3 * H:]
        dh, cb, cn, dcb = dh_next[b], c[b], c_next[b], dc[b]
        for j in range(H):  # do holds tanh(c_next) until its own loop
            do[j] = tanh(cn[j])
        for j in range(H):  # dcb holds dc_tot = dc_next + dh o (1 - tanh^2) until the end
            dcb[j] = dc_next[b, j] + dh[j] * o[j] * (one - do[j] * do[j])
        for j in range(H):
            di[j] = dcb[j] * g[j] * i[j] * (one - i[j])
        for j in range(H):
            df[j] = dcb[j] * cb[j] * f[j] * (one - f[j])
        for j in range(H):
            dg[j] = dcb[j] * i[j] * (one - g[j] * g[j])
        for j in range(H):
            do[j] = dh[j] * do[j] * o[j] * (one - o[j])
        for j in range(H):
            dcb[j] = dcb[j] * f[j]


@njit(parallel=True, cache=True)
def _gru_forward(gx, gh, h, h_next, saved):
    """gx, gh (B, 3H) [r|z|n]; saved (B, 4H) = [r|z|n|gh_n]."""
    B, H = h.shape
    one = like(h[0, 0], 1.0)
    for b in prange(B):
        x, y, s = gx[b], gh[b], saved[b]
        r, z, n, hn = s[:H], s[H:2 * H], s[2 * H:3 * H], s[3 * H:]
        for j in range(H):
            r[j] = _sigmoid(x[j] + y[j])
        for j in range(H):
            z[j] = _sigmoid(x[H + j] + y[H + j])
        for j in range(H):
            hn[j] = y[2 * H + j]
        for j in range(H):
            n[j] = tanh(x[2 * H + j] + r[j] * hn[j])
        hb, out = h[b], h_next[b]
        for j in range(H):
            out[j] = (one - z[j]) * n[j] + z[j] * hb[j]


@njit(parallel=True, cache=True)
def _gru_backward(dh_next, saved, h, dgx, dgh, dh):
    B, H = h.shape
    one = like(h[0, 0], 1.0)
    for b in prange(B):
        s, dx_, dy_ = saved[b], dgx[b], dgh[b]
        r, z, n, hn = s[:H], s[H:2 * H], s[2 * H:3 * H], s[3 * H:]
        g, hb, dhb = dh_next[b], h[b], dh[b]
        dr, dz, dn = dx_[:H], dx_[H:2 * H], dx_[2 * H:]
        for j in range(H):
            dn[j] = g[j] * (one - z[j]) * (one - n[j] * n[j])
        for j in range(H):
            dz[j] = g[j] * (hb[j] - n[j]) * z[j] * (one - z[j])
        for j in range(H):
            dr[j] = dn[j] * hn[j] * r[j] * (one - r[j])
        for j in range(2 * H):
            dy_[j] = dx_[j]
        for j in range(H):
            dy_[2 * H + j] = dn[j] * r[j]
        for j in range(H):
            dhb[j] = g[j] * z[j]


def lstm_step_forward(gx, h, c, w_hh):
    pre = torch.addmm(gx, h, w_hh.t())
    h_next, c_next = torch.empty_like(h), torch.empty_like(c)
    _lstm_forward(pre.numpy(), c.numpy(), h_next.numpy(), c_next.numpy())
    return h_next, c_next, pre


def lstm_step_backward(dh_next, dc_next, gates, c, c_next, w_hh):
    dpre, dc = torch.empty_like(gates), torch.empty_like(c)
    _lstm_backward(dh_next.numpy(), dc_next.numpy(), gates.numpy(), c.numpy(), c_next.numpy(),
                   dpre.numpy(), dc.numpy())
    return dpre, torch.mm(dpre, w_hh), dc


def gru_step_forward(gx, h, w_hh, b_hh):
    gh = torch.mm(h, w_hh.t()) if b_hh is None else torch.addmm(b_hh, h, w_hh.t())
    h_next = torch.empty_like(h)
    saved = h.new_empty((h.shape[0], 4 * h.shape[1]))
    _gru_forward(gx.numpy(), gh.numpy(), h.numpy(), h_next.numpy(), saved.numpy())
    return h_next, saved


def gru_step_backward(dh_next, saved, h, w_hh):
    B, H = h.shape
    dgx, dgh = h.new_empty((B, 3 * H)), h.new_empty((B, 3 * H))
    dh = torch.empty_like(h)
    _gru_backward(dh_next.numpy(), saved.numpy(), h.numpy(), dgx.numpy(), dgh.numpy(), dh.numpy())
    return dgx, dgh, dh.addmm_(dgh, w_hh)
