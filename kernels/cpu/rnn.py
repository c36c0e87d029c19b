"""CPU form of LSTM, GRU and Elman RNN layers: torch's BLAS for the recurrent GEMM, numba for
everything pointwise around it, fused into one pass per step.

A step's gates need h_{t-1} W_hh^T (a GEMM: MKL through torch.mm, DESIGN.md) added to
the input projection gx_t that the op computes for all steps up front; one numba pass
then applies the gate nonlinearities and the state update and writes what backward
needs. Backward mirrors it: one numba pass turns (dh, dc) into the pre-activation
gradients, one GEMM carries them back through W_hh. State and gates are in the dtype
of h (float32 or float64).

This form offers the op's whole-sequence functions rather than step functions: the loop
over steps writes every GEMM and every numba pass straight into its step's slice of the
outputs and carries dh / dc in place, so nothing is copied or allocated per step (those
copies were a quarter of the step time at B 32, H 512)."""

import torch
from numba import njit, prange

from .blas import PackedLinear
from .fastmath import KERNEL_OPTIONS, exp, like, tanh


@njit(inline="always")
def _sigmoid(z):
    # Branch-free so the gate loops vectorize; exp(-z) saturates to a finite value (float32
    # fastmath clamps) or inf (float64), and 1 / (1 + inf) is the right limit, 0.
    one = like(z, 1.0)
    return one / (one + exp(-z))


@njit(**KERNEL_OPTIONS)
def _lstm_forward(hw, gx, c, gates, h_next, c_next):
    """gates (B, 4H) [i|f|g|o] = activations of hw + gx (hw = h W_hh^T); c_next = f c + i g;
    h_next = o tanh(c_next). One loop per gate over its contiguous H values: a loop
    touching all four streams did not vectorize."""
    B, H = c.shape
    for b in prange(B):
        p, x, a = hw[b], gx[b], gates[b]
        for j in range(2 * H):  # i, f, o: sigmoid; g: tanh
            a[j] = _sigmoid(p[j] + x[j])
        for j in range(3 * H, 4 * H):
            a[j] = _sigmoid(p[j] + x[j])
        i, f, g, o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
        for j in range(H):
            g[j] = tanh(p[2 * H + j] + x[2 * H + j])
        cb, cn, hn = c[b], c_next[b], h_next[b]
        for j in range(H):
            cn[j] = f[j] * cb[j] + i[j] * g[j]
        for j in range(H):
            hn[j] = o[j] * tanh(cn[j])


@njit(**KERNEL_OPTIONS)
def _lstm_backward(dh_out, dc_out, hw, gates, c, c_next, dpre, dc):
    """dh_next = dh_out (this step's output gradient) + hw (dpre_{t+1} W_hh, from the
    caller's GEMM); dc (B, H): in, dc carried from step t + 1; out, dc for step t - 1."""
    B, H = c.shape
    one = like(c[0, 0], 1.0)
    for b in prange(B):
        a, d = gates[b], dpre[b]
        i, f, g, o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
        di, df, dg, do = d[:H], d[H:2 * H], d[2 * H:3 * H], d[3 * H:]
        cb, cn, dcb = c[b], c_next[b], dc[b]
        for j in range(H):  # di holds dh_next until its own loop
            di[j] = dh_out[b, j] + hw[b, j]
        for j in range(H):  # do holds tanh(c_next) until its own loop
            do[j] = tanh(cn[j])
        for j in range(H):  # dcb holds dc_tot = dc_next + dh o (1 - tanh^2) until the end
            dcb[j] = dcb[j] + dc_out[b, j] + di[j] * o[j] * (one - do[j] * do[j])
        for j in range(H):
            do[j] = di[j] * do[j] * o[j] * (one - o[j])
        for j in range(H):
            di[j] = dcb[j] * g[j] * i[j] * (one - i[j])
        for j in range(H):
            df[j] = dcb[j] * cb[j] * f[j] * (one - f[j])
        for j in range(H):
            dg[j] = dcb[j] * i[j] * (one - g[j] * g[j])
        for j in range(H):
            dcb[j] = dcb[j] * f[j]


@njit(**KERNEL_OPTIONS)
def _gru_forward(gx, gh, h, h_next, saved):
    """gx, gh (B, 3H) [r|z|n] (gh = h W_hh^T + b_hh); saved (B, 4H) = [r|z|n|gh_n]."""
    B, H = h.shape
    one = like(h[0, 0], 1.0)
    for b in prange(B):
        x, y, s = gx[b], gh[b], saved[b]
        r, z, n, hn = s[:H], s[H:2 * H], s[2 * H:3 * H], s[3 * H:]
        for j in range(2 * H):  # r and z
            s[j] = _sigmoid(x[j] + y[j])
        for j in range(H):
            hn[j] = y[2 * H + j]
        for j in range(H):
            n[j] = tanh(x[2 * H + j] + r[j] * hn[j])
        hb, out = h[b], h_next[b]
        for j in range(H):
            out[j] = (one - z[j]) * n[j] + z[j] * hb[j]


@njit(**KERNEL_OPTIONS)
def _gru_backward(dh_out, hw, saved, h, dgx, dgh, dh):
    """dh_next = dh_out + dh + hw, where dh (B, H) carries dh_{t+1} z from step t + 1 and
    hw = dgh_{t+1} W_hh (the caller's GEMM); out: dh = dh_next z."""
    B, H = h.shape
    one = like(h[0, 0], 1.0)
    for b in prange(B):
        s, dx_, dy_ = saved[b], dgx[b], dgh[b]
        r, z, n, hn = s[:H], s[H:2 * H], s[2 * H:3 * H], s[3 * H:]
        g, hb = dh[b], h[b]
        dr, dz, dn = dx_[:H], dx_[H:2 * H], dx_[2 * H:]
        for j in range(H):
            g[j] += dh_out[b, j] + hw[b, j]
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
            g[j] = g[j] * z[j]


@njit(**KERNEL_OPTIONS)
def _rnn_forward(hw, gx, h_next, relu):
    """Elman: h_next = act(hw + gx) (hw = h W_hh^T), act relu or tanh."""
    B, H = h_next.shape
    zero = like(h_next[0, 0], 0.0)
    for b in prange(B):
        p, x, out = hw[b], gx[b], h_next[b]
        if relu:
            for j in range(H):  # NaN stays NaN, as torch.relu
                v = p[j] + x[j]
                out[j] = zero if v < zero else v
        else:
            for j in range(H):
                out[j] = tanh(p[j] + x[j])


@njit(**KERNEL_OPTIONS)
def _rnn_backward(dh_out, hw, h_next, dpre, relu):
    """dpre = (dh_out + hw) act'(pre), read from h_next (hw = dpre_{t+1} W_hh)."""
    B, H = h_next.shape
    one, zero = like(h_next[0, 0], 1.0), like(h_next[0, 0], 0.0)
    for b in prange(B):
        d, hn = dpre[b], h_next[b]
        if relu:
            for j in range(H):
                d[j] = dh_out[b, j] + hw[b, j] if hn[j] > zero else zero
        else:
            for j in range(H):
                d[j] = (dh_out[b, j] + hw[b, j]) * (one - hn[j] * hn[j])


# Whole-sequence functions (the op's interface for forms that run their own loop): every
# numba pass writes straight into its step's slice of the outputs and the carried
# gradients stay in place, so a step costs one GEMM (its weight packed once per
# sequence, blas.py), one numba call and no copies.


def lstm_sequence_forward(gx, h0, c0, w_hh):
    T, B = gx.shape[0], gx.shape[1]
    h_all, c_all = h0.new_empty((T, *h0.shape)), c0.new_empty((T, *c0.shape))
    gates = torch.empty_like(gx)
    recurrent = PackedLinear(w_hh, B)
    gx_np, gates_np, h_np, c_np = gx.numpy(), gates.numpy(), h_all.numpy(), c_all.numpy()
    h, c = h0, c0.numpy()
    for t in range(T):
        _lstm_forward(recurrent(h).numpy(), gx_np[t], c, gates_np[t], h_np[t], c_np[t])
        h, c = h_all[t], c_np[t]
    return h_all, c_all, gates


def lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh):
    T, B = gates.shape[0], gates.shape[1]
    dpre = torch.empty_like(gates)
    dc = torch.zeros_like(c0)
    recurrent_t = PackedLinear(w_hh.t(), B)
    dh_all_np, dc_all_np, gates_np, c_np, dpre_np = (dh_all.numpy(), dc_all.numpy(), gates.numpy(),
                                                     c_all.numpy(), dpre.numpy())
    hw = torch.zeros_like(h0)
    for t in reversed(range(T)):
        c_prev = c0.numpy() if t == 0 else c_np[t - 1]
        _lstm_backward(dh_all_np[t], dc_all_np[t], hw.numpy(), gates_np[t], c_prev, c_np[t], dpre_np[t],
                       dc.numpy())
        hw = recurrent_t(dpre[t])
    return dpre, hw, dc


def gru_sequence_forward(gx, h0, w_hh, b_hh):
    T, B, H = gx.shape[0], h0.shape[0], h0.shape[1]
    h_all, saved = h0.new_empty((T, B, H)), h0.new_empty((T, B, 4 * H))
    recurrent = PackedLinear(w_hh, B)
    gx_np, h_np, saved_np = gx.numpy(), h_all.numpy(), saved.numpy()
    h = h0
    for t in range(T):
        _gru_forward(gx_np[t], recurrent(h, b_hh).numpy(), h.numpy(), h_np[t], saved_np[t])
        h = h_all[t]
    return h_all, saved


def gru_sequence_backward(dh_all, saved, h0, h_all, w_hh):
    T, B, H = saved.shape[0], h0.shape[0], h0.shape[1]
    dgx, dgh = saved.new_empty((T, B, 3 * H)), saved.new_empty((T, B, 3 * H))
    dh, hw = torch.zeros_like(h0), torch.zeros_like(h0)
    recurrent_t = PackedLinear(w_hh.t(), B)
    dh_all_np, saved_np, h_np, dgx_np, dgh_np = (dh_all.numpy(), saved.numpy(), h_all.numpy(), dgx.numpy(),
                                                 dgh.numpy())
    for t in reversed(range(T)):
        h_prev = h0.numpy() if t == 0 else h_np[t - 1]
        _gru_backward(dh_all_np[t], hw.numpy(), saved_np[t], h_prev, dgx_np[t], dgh_np[t], dh.numpy())
        hw = recurrent_t(dgh[t])
    return dgx, dgh, dh.add_(hw)


def rnn_sequence_forward(gx, h0, w_hh, relu):
    T, B = gx.shape[0], gx.shape[1]
    h_all = h0.new_empty((T, *h0.shape))
    recurrent = PackedLinear(w_hh, B)
    gx_np, h_np = gx.numpy(), h_all.numpy()
    h = h0
    for t in range(T):
        _rnn_forward(recurrent(h).numpy(), gx_np[t], h_np[t], relu)
        h = h_all[t]
    return h_all


def rnn_sequence_backward(dh_all, h0, h_all, w_hh, relu):
    T, B = h_all.shape[0], h_all.shape[1]
    dpre = torch.empty_like(h_all)
    recurrent_t = PackedLinear(w_hh.t(), B)
    dh_all_np, h_np, dpre_np = dh_all.numpy(), h_all.numpy(), dpre.numpy()
    hw = torch.zeros_like(h0)
    for t in reversed(range(T)):
        _rnn_backward(dh_all_np[t], hw.numpy(), h_np[t], dpre_np[t], relu)
        hw = recurrent_t(dpre[t])
    return dpre, hw
