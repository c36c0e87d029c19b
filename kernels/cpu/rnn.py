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


@njit(parallel=True, cache=True)
def _lstm_forward(pre, c, h_next, c_next):
    """pre (B, 4H) [i|f|g|o] -> activated in place; c_next = f c + i g; h_next = o tanh(c_next)."""
    B, H = c.shape
    for b in prange(B):
        p = pre[b]
        for j in range(H):
            i = _sigmoid(p[j])
            f = _sigmoid(p[H + j])
            g = tanh(p[2 * H + j])
            o = _sigmoid(p[3 * H + j])
            p[j], p[H + j], p[2 * H + j], p[3 * H + j] = i, f, g, o
            cn = f * c[b, j] + i * g
            c_next[b, j] = cn
            h_next[b, j] = o * tanh(cn)


@njit(parallel=True, cache=True)
def _lstm_backward(dh_next, dc_next, gates, c, c_next, dpre, dc):
    B, H = c.shape
    one = like(c[0, 0], 1.0)
    for b in prange(B):
        a, d = gates[b], dpre[b]
        for j in range(H):
            i, f, g, o = a[j], a[H + j], a[2 * H + j], a[3 * H + j]
            tc = tanh(c_next[b, j])
            dh = dh_next[b, j]
            dc_tot = dc_next[b, j] + dh * o * (one - tc * tc)
            d[j] = dc_tot * g * i * (one - i)
            d[H + j] = dc_tot * c[b, j] * f * (one - f)
            d[2 * H + j] = dc_tot * i * (one - g * g)
            d[3 * H + j] = dh * tc * o * (one - o)
            dc[b, j] = dc_tot * f


@njit(parallel=True, cache=True)
def _gru_forward(gx, gh, h, h_next, saved):
    """gx, gh (B, 3H) [r|z|n]; saved (B, 4H) = [r|z|n|gh_n]."""
    B, H = h.shape
    one = like(h[0, 0], 1.0)
    for b in prange(B):
        x, y, s = gx[b], gh[b], saved[b]
        for j in range(H):
            r = _sigmoid(x[j] + y[j])
            z = _sigmoid(x[H + j] + y[H + j])
            n = tanh(x[2 * H + j] + r * y[2 * H + j])
            s[j], s[H + j], s[2 * H + j], s[3 * H + j] = r, z, n, y[2 * H + j]
            h_next[b, j] = (one - z) * n + z * h[b, j]


@njit(parallel=True, cache=True)
def _gru_backward(dh_next, saved, h, dgx, dgh, dh):
    B, H = h.shape
    one = like(h[0, 0], 1.0)
    for b in prange(B):
        s, dx_, dy_ = saved[b], dgx[b], dgh[b]
        for j in range(H):
            r, z, n, gh_n = s[j], s[H + j], s[2 * H + j], s[3 * H + j]
            g = dh_next[b, j]
            dn = g * (one - z) * (one - n * n)
            dz = g * (h[b, j] - n) * z * (one - z)
            dr = dn * gh_n * r * (one - r)
            dx_[j], dx_[H + j], dx_[2 * H + j] = dr, dz, dn
            dy_[j], dy_[H + j], dy_[2 * H + j] = dr, dz, dn * r
            dh[b, j] = g * z


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
