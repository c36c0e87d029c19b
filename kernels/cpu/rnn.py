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

import math

import numpy as np
import torch
from numba import get_num_threads, njit, prange, types
from numba.extending import overload

from .blas import MKL_GEMM, MKL_THREADS, PackedLinear, mkl_gemm, mkl_set_num_threads_local
from .fastmath import KERNEL_OPTIONS, exp, like
from .spin import SPIN_BARRIER, STATE_SIZE, barrier, join_team

# The gates' tanh. float64: math.tanh. float32: a rational minimax approximation (the one
# Eigen and XLA use: odd degree-13 numerator over even degree-6 denominator on
# |x| <= 7.905, +-1 past it), within 3e-7 relative of tanh everywhere: one division and a
# dozen FMAs, no exp, 0.42 ns a value against fastmath.tanh's 1.02 (an exp, a select
# between two branches and a division; one thread, AVX2). The sigmoid stays
# 1 / (1 + exp(-z)) (0.60 ns; 1/2 + tanh(z/2)/2 would be 0.49 ns but only accurate in
# absolute terms for z < -10).
_F32 = np.float32
_TANH_CLAMP = _F32(7.90531110763549805)
_TANH_P = tuple(_F32(a) for a in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                  5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                  4.89352455891786e-03))
_TANH_Q = tuple(_F32(b) for b in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                  4.89352518554385e-03))
_ONE = _F32(1.0)


def _tanh_f32(x):
    # Past the clamp +-1 exactly (tanh there is within 3e-7 of it; the polynomials would
    # give 1 - 2.4e-7 for every larger x). NaN fails every comparison and stays NaN.
    c = _TANH_CLAMP if x > _TANH_CLAMP else x
    c = -_TANH_CLAMP if c < -_TANH_CLAMP else c
    c2 = c * c
    p13, p11, p9, p7, p5, p3, p1 = _TANH_P
    p = c * (p1 + c2 * (p3 + c2 * (p5 + c2 * (p7 + c2 * (p9 + c2 * (p11 + c2 * p13))))))
    q6, q4, q2, q0 = _TANH_Q
    y = p / (q0 + c2 * (q2 + c2 * (q4 + c2 * q6)))
    y = _ONE if x >= _TANH_CLAMP else y
    return -_ONE if x <= -_TANH_CLAMP else y


def tanh(x):
    return math.tanh(x)


@overload(tanh)
def _tanh_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return _tanh_f32
    return lambda x: math.tanh(x)


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
    for b in prange(c.shape[0]):
        _lstm_forward_row(hw[b], gx[b], c[b], gates[b], h_next[b], c_next[b])


@njit(inline="always")
def _lstm_forward_row(p, x, cb, a, hn, cn):
    H = cb.shape[0]
    for j in range(2 * H):  # i, f, o: sigmoid; g: tanh
        a[j] = _sigmoid(p[j] + x[j])
    for j in range(3 * H, 4 * H):
        a[j] = _sigmoid(p[j] + x[j])
    i, f, g, o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
    for j in range(H):
        g[j] = tanh(p[2 * H + j] + x[2 * H + j])
    for j in range(H):
        cn[j] = f[j] * cb[j] + i[j] * g[j]
    for j in range(H):
        hn[j] = o[j] * tanh(cn[j])


@njit(**KERNEL_OPTIONS)
def _lstm_backward(dh_out, dc_out, hw, gates, c, c_next, dpre, dc):
    """dh_next = dh_out (this step's output gradient) + hw (dpre_{t+1} W_hh, from the
    caller's GEMM); dc (B, H): in, dc carried from step t + 1; out, dc for step t - 1."""
    for b in prange(c.shape[0]):
        _lstm_backward_row(dh_out[b], dc_out[b], True, hw[b], gates[b], c[b], c_next[b], dpre[b], dc[b])


@njit(inline="always")
def _lstm_backward_row(dh_out, dc_out, has_dc_out, hw, a, cb, cn, d, dcb):
    """One batch row of a step's LSTM backward; dc_out, this step's output gradient of c, is
    read only when has_dc_out (the layer kernel has none: dcb carries all of dc in)."""
    _lstm_backward_units(dh_out, dc_out, has_dc_out, hw, a, cb, cn, d, dcb, 0, cb.shape[0])


@njit(inline="always")
def _lstm_backward_units(dh_out, dc_out, has_dc_out, hw, a, cb, cn, d, dcb, j0, j1):
    """_lstm_backward_row for hidden units [j0, j1) only: one worker's share of a step when
    the step loop is split over the hidden units (the whole row: 0, H)."""
    H = cb.shape[0]
    one = like(cb[0], 1.0)
    i, f, g, o = a[j0:j1], a[H + j0:H + j1], a[2 * H + j0:2 * H + j1], a[3 * H + j0:3 * H + j1]
    di, df, dg, do = d[j0:j1], d[H + j0:H + j1], d[2 * H + j0:2 * H + j1], d[3 * H + j0:3 * H + j1]
    dy, carried, c, c_next, dc = dh_out[j0:j1], hw[j0:j1], cb[j0:j1], cn[j0:j1], dcb[j0:j1]
    n = j1 - j0
    for j in range(n):  # di holds dh_next until its own loop
        di[j] = dy[j] + carried[j]
    for j in range(n):  # do holds tanh(c_next) until its own loop
        do[j] = tanh(c_next[j])
    # dc holds dc_tot = dc_next (+ dc_out) + dh o (1 - tanh^2) until the end
    if has_dc_out:
        dc_step = dc_out[j0:j1]
        for j in range(n):
            dc[j] = dc[j] + dc_step[j] + di[j] * o[j] * (one - do[j] * do[j])
    else:
        for j in range(n):
            dc[j] = dc[j] + di[j] * o[j] * (one - do[j] * do[j])
    for j in range(n):
        do[j] = di[j] * do[j] * o[j] * (one - o[j])
    for j in range(n):
        di[j] = dc[j] * g[j] * i[j] * (one - i[j])
    for j in range(n):
        df[j] = dc[j] * c[j] * f[j] * (one - f[j])
    for j in range(n):
        dg[j] = dc[j] * i[j] * (one - g[j] * g[j])
    for j in range(n):
        dc[j] = dc[j] * f[j]


@njit(**KERNEL_OPTIONS)
def _gru_forward(gx, gh, h, h_next, saved):
    """gx, gh (B, 3H) [r|z|n] (gh = h W_hh^T + b_hh); saved (B, 4H) = [r|z|n|gh_n]."""
    for b in prange(h.shape[0]):
        _gru_forward_row(gx[b], gh[b], h[b], h_next[b], saved[b])


@njit(inline="always")
def _gru_forward_row(x, y, hb, out, s):
    H = hb.shape[0]
    one = like(hb[0], 1.0)
    r, z, n, hn = s[:H], s[H:2 * H], s[2 * H:3 * H], s[3 * H:]
    for j in range(2 * H):  # r and z
        s[j] = _sigmoid(x[j] + y[j])
    for j in range(H):
        hn[j] = y[2 * H + j]
    for j in range(H):
        n[j] = tanh(x[2 * H + j] + r[j] * hn[j])
    for j in range(H):
        out[j] = (one - z[j]) * n[j] + z[j] * hb[j]


@njit(**KERNEL_OPTIONS)
def _gru_backward(dh_out, hw, saved, h, dgx, dgh, dh):
    """dh_next = dh_out + dh + hw, where dh (B, H) carries dh_{t+1} z from step t + 1 and
    hw = dgh_{t+1} W_hh (the caller's GEMM); out: dh = dh_next z."""
    for b in prange(h.shape[0]):
        _gru_backward_row(dh_out[b], hw[b], saved[b], h[b], dgx[b], dgh[b], dh[b])


@njit(inline="always")
def _gru_backward_row(dh_out, hw, s, hb, dx_, dy_, g):
    H = hb.shape[0]
    one = like(hb[0], 1.0)
    r, z, n, hn = s[:H], s[H:2 * H], s[2 * H:3 * H], s[3 * H:]
    dr, dz, dn = dx_[:H], dx_[H:2 * H], dx_[2 * H:]
    for j in range(H):
        g[j] += dh_out[j] + hw[j]
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
    for b in prange(h_next.shape[0]):
        _rnn_forward_row(hw[b], gx[b], h_next[b], relu)


@njit(inline="always")
def _rnn_forward_row(p, x, out, relu):
    H = out.shape[0]
    zero = like(out[0], 0.0)
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
    for b in prange(h_next.shape[0]):
        _rnn_backward_row(dh_out[b], hw[b], h_next[b], dpre[b], relu)


@njit(inline="always")
def _rnn_backward_row(dh_out, hw, hn, d, relu):
    H = hn.shape[0]
    one, zero = like(hn[0], 1.0), like(hn[0], 0.0)
    if relu:
        for j in range(H):
            d[j] = dh_out[j] + hw[j] if hn[j] > zero else zero
    else:
        for j in range(H):
            d[j] = (dh_out[j] + hw[j]) * (one - hn[j] * hn[j])


# The whole sequence in one numba call: per step one MKL GEMM (blas.mkl_gemm, torch's own
# BLAS, called from numba) and one serial pass over the rows. A Python step loop paid a
# torch call (~70-100 us of dispatch and oneDNN setup at B 8) and a numba call per step,
# and the two thread pools (torch's OpenMP for the GEMM, numba's for the pass) handed the
# cores back and forth every step; here MKL threads its GEMM itself and the pass (a few
# percent of a step's FLOPs) runs on the calling thread (bench/results/rnn_cpu_issue14.md).

# contract: LLVM may fuse a multiply and an add into one FMA (no other fast-math licence:
# NaN and inf keep their IEEE meaning). The gate pass is polynomials and divisions, and
# fusing took it from ~2.6 to ~1.2 ns a transcendental at H 256 (one thread).
_SEQUENCE_OPTIONS = dict(cache=True, error_model="numpy", fastmath={"contract"})


@njit(**_SEQUENCE_OPTIONS)
def _lstm_sequence_forward(gx, h0, c0, w_hh, h_all, c_all, gates, hw):
    T, B, G = gx.shape
    H = G // 4
    for t in range(T):
        h, c = (h0, c0) if t == 0 else (h_all[t - 1], c_all[t - 1])
        mkl_gemm(1, 0, G, B, H, w_hh, H, h, H, 0.0, hw, G)  # hw = h W_hh^T
        for b in range(B):
            _lstm_forward_row(hw[b], gx[t, b], c[b], gates[t, b], h_all[t, b], c_all[t, b])


@njit(**_SEQUENCE_OPTIONS)
def _lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh, dpre, dc, hw, dw_hh):
    """dc, hw (B, H) zero in; out dc0, dh0, and dw_hh (4H, H) = sum_t dpre_t^T h_{t-1}."""
    T, B, G = gates.shape
    H = G // 4
    for t in range(T - 1, -1, -1):
        c = c0 if t == 0 else c_all[t - 1]
        for b in range(B):
            _lstm_backward_row(dh_all[t, b], dc_all[t, b], True, hw[b], gates[t, b], c[b], c_all[t, b], dpre[t, b], dc[b])
        mkl_gemm(0, 0, H, B, G, w_hh, H, dpre[t], G, 0.0, hw, H)  # hw = dpre_t W_hh
    # dw_hh, row-major (G, H), is the column-major (H x G) h_prev^T dpre: h0 against step 0,
    # then h_all[:T-1] (contiguous) against steps 1.. (no concatenated h_prev copy).
    mkl_gemm(0, 1, H, G, B, h0, H, dpre[0], G, 0.0, dw_hh, H)
    if T > 1:
        mkl_gemm(0, 1, H, G, (T - 1) * B, h_all, H, dpre[1], G, 1.0, dw_hh, H)


# A whole LSTM layer in one numba call each way (lstm_layer_forward / _backward below): the
# input projection is one GEMM over all T steps into a scratch gx, each step's recurrent GEMM
# adds h_{t-1} W_hh^T into its slice of gx in place (beta 1), and the gate pass activates
# that slice in place (gx becomes the saved gates). Backward carries dh / dc in place and
# forms every weight gradient and dx as one GEMM over all steps. At T 32, B 8, H 64 a layer's own work is
# ~0.35 ms, and the torch calls, custom-op dispatch and autograd nodes of the op-per-piece
# form (projection, sequence op, output copies) cost as much again
# (bench/results/lstm_cpu_issue14_session6.md).


@njit(inline="always")
def _lstm_forward_row_inplace(a, bias, cb, hn, cn):
    """_lstm_forward_row with the pre-activations x W_ih^T + h W_hh^T already summed in a
    (the bias (4H,) is added here), which the activated gates overwrite. In place, one
    array read and written by the same index (LLVM sees one pointer and vectorizes): at
    B 32, H 256 the 64 steps' gate passes took 1.8 ms against 2.4 ms reading gx and
    writing a separate gates array, and the layer saves that array's 8 MB of allocation
    and first-touch writes (bench/results/lstm_cpu_issue14_session7.md)."""
    H = cb.shape[0]
    i, f, g, o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
    for j in range(2 * H):  # i, f
        a[j] = _sigmoid(a[j] + bias[j])
    for j in range(H):
        o[j] = _sigmoid(o[j] + bias[3 * H + j])
    for j in range(H):
        g[j] = tanh(g[j] + bias[2 * H + j])
    for j in range(H):
        cn[j] = f[j] * cb[j] + i[j] * g[j]
    for j in range(H):
        hn[j] = o[j] * tanh(cn[j])


@njit(inline="always")
def _lstm_forward_units_inplace(a, bias, cb, hn, cn, j0, j1):
    """_lstm_forward_row_inplace for hidden units [j0, j1) only (their four gates' entries
    of a, of cb, hn and cn): one worker's share of a step when the step loop is split over
    the hidden units."""
    H = cb.shape[0]
    i, f, g, o = a[j0:j1], a[H + j0:H + j1], a[2 * H + j0:2 * H + j1], a[3 * H + j0:3 * H + j1]
    bi, bf, bg, bo = bias[j0:j1], bias[H + j0:H + j1], bias[2 * H + j0:2 * H + j1], bias[3 * H + j0:3 * H + j1]
    c, h_out, c_out = cb[j0:j1], hn[j0:j1], cn[j0:j1]
    for j in range(j1 - j0):
        i[j] = _sigmoid(i[j] + bi[j])
    for j in range(j1 - j0):
        f[j] = _sigmoid(f[j] + bf[j])
    for j in range(j1 - j0):
        o[j] = _sigmoid(o[j] + bo[j])
    for j in range(j1 - j0):
        g[j] = tanh(g[j] + bg[j])
    for j in range(j1 - j0):
        c_out[j] = f[j] * c[j] + i[j] * g[j]
    for j in range(j1 - j0):
        h_out[j] = o[j] * tanh(c_out[j])


# The step loop over a block of batch rows [b0, b1): the rows of a batch never meet in a
# recurrence, so with more than one thread each worker runs the whole sequence over its own
# rows (MKL sequential inside it) and the steps need no synchronisation at all. Threading
# each step instead (MKL's threads for the 32 x 256 x 1024 GEMM, then the gate pass) ended
# every step in a barrier and handed the cores between two OpenMP runtimes (torch's libgomp
# for MKL, numba's own): at 2 threads, T64 B32 H256, the forward took 20.8 ms against
# torch's 17.6 (bench/results/lstm_cpu_issue14_session7.md). A block has at least
# _MIN_CHUNK_ROWS rows (the per-row GEMM rate falls with fewer); a batch too small for two
# blocks, or one thread, runs the loop serially as before.
_MIN_CHUNK_ROWS = 8
# The layer kernels' options: only their explicit prange (the batch blocks) runs in
# parallel; numba's conversion of array expressions and np.zeros into parallel loops stays
# off (a parallel region for a (4H,) bias sum costs more than the sum).
_LAYER_OPTIONS = dict(_SEQUENCE_OPTIONS, parallel=dict(prange=True, comprehension=False, setitem=False,
                                                       reduction=False, numpy=False, stencil=False,
                                                       fusion=False, inplace_binop=False))


def _batch_chunks(B):
    """How many blocks of rows the step loop runs in parallel (numba's thread count, read
    here: numba.get_num_threads inside a kernel keeps it out of the on-disk cache)."""
    return max(1, min(get_num_threads(), B // _MIN_CHUNK_ROWS))


# The step loop split over hidden units instead (_lstm_steps_*_units): with batch blocks
# each worker's step GEMM has B / threads rows and reads all of W_hh; split over units,
# worker k computes the four gates of its units [j_k, j_k+1) for all B rows (its rows of
# W_hh, 4 x 128 x 256 at H 256, one GEMM per gate), and the workers meet at a spin barrier
# (spin.py) once a step, since every unit's next step reads all of h. At T64 B32 H256 one
# worker's 64 step GEMMs took 6.9 ms as 4 x (128 x 32 x 256) against 8.7 ms as one
# 16 x 256 x 1024 (one thread, 78 against 62 GFLOP/s; backward 7.2 against 8.5 ms); 128
# barriers cost ~40 us (bench/results/lstm_cpu_issue14_session8.md). Taken when every
# numba thread gets at least _MIN_PART_UNITS units and the batch would be split anyway
# (B >= 2 _MIN_CHUNK_ROWS); else batch blocks as before.
_MIN_PART_UNITS = 128


def _unit_parts(B, H):
    """How many workers split the step loop over hidden units (1: none, batch blocks)."""
    if not SPIN_BARRIER or B < 2 * _MIN_CHUNK_ROWS or H < 2 * _MIN_PART_UNITS:
        return 1
    threads = get_num_threads()
    return threads if 2 <= threads <= H // _MIN_PART_UNITS else 1


@njit(inline="always")
def _part_bounds(k, parties, H):
    """Hidden units [j0, j1) of part k of parties, boundaries on multiples of 16 (whole
    vectors and cache lines of every gate block)."""
    j0 = 0 if k == 0 else min(H, (k * H // parties + 15) // 16 * 16)
    j1 = H if k == parties - 1 else min(H, ((k + 1) * H // parties + 15) // 16 * 16)
    return j0, j1


@njit(inline="always")
def _step_and_previous_state(s, T, reverse, h0, c0, h_all, c_all):
    """The s-th step's time index (counting down when reverse) and the (h, c) it starts from."""
    t = T - 1 - s if reverse else s
    if s == 0:
        return t, h0, c0
    tp = t + 1 if reverse else t - 1
    return t, h_all[tp], c_all[tp]


@njit(inline="always")
def _lstm_steps_forward(gx, bias, h0, c0, w_hh, h_all, c_all, reverse, b0, b1):
    T, H = gx.shape[0], h0.shape[1]
    G = 4 * H
    for s in range(T):
        t, h, c = _step_and_previous_state(s, T, reverse, h0, c0, h_all, c_all)
        mkl_gemm(1, 0, G, b1 - b0, H, w_hh, H, h[b0:], H, 1.0, gx[t, b0:], G)  # gx_t += h W_hh^T
        for b in range(b0, b1):
            _lstm_forward_row_inplace(gx[t, b], bias, c[b], h_all[t, b], c_all[t, b])


@njit(inline="always")
def _lstm_steps_forward_units(gx, bias, h0, c0, w_hh, h_all, c_all, reverse, j0, j1, state, parties):
    """_lstm_steps_forward for hidden units [j0, j1) of every batch row, one part of a team
    (spin.join_team) that meets at a barrier after every step."""
    T, B, H = gx.shape[0], h0.shape[0], h0.shape[1]
    G = 4 * H
    for s in range(T):
        t, h, c = _step_and_previous_state(s, T, reverse, h0, c0, h_all, c_all)
        for q in range(4 if j1 > j0 else 0):  # gate q of units j0:j1 += h W_hh[q H + j0 : q H + j1]^T
            mkl_gemm(1, 0, j1 - j0, B, H, w_hh[q * H + j0:], H, h, H, 1.0, gx[t, :, q * H + j0:], G)
        for b in range(B):
            _lstm_forward_units_inplace(gx[t, b], bias, c[b], h_all[t, b], c_all[t, b], j0, j1)
        barrier(state, parties)  # h_all[t] complete before any part's next GEMM reads it


@njit(inline="always")
def _lstm_steps_backward(dh_all, dh, dc, gates, c0, c_all, w_hh, dpre, reverse, b0, b1):
    T, G = gates.shape[0], gates.shape[2]
    H = G // 4
    for s in range(T):
        t = s if reverse else T - 1 - s
        first = t == T - 1 if reverse else t == 0
        c = c0 if first else (c_all[t + 1] if reverse else c_all[t - 1])
        for b in range(b0, b1):
            _lstm_backward_row(dh_all[t, b], dh_all[t, b], False, dh[b], gates[t, b], c[b], c_all[t, b], dpre[t, b], dc[b])
        mkl_gemm(0, 0, H, b1 - b0, G, w_hh, H, dpre[t, b0:], G, 0.0, dh[b0:], H)  # dh = dpre_t W_hh (last: dh0)


@njit(inline="always")
def _lstm_steps_backward_units(dh_all, dh, dc, gates, c0, c_all, w_hh, dpre, reverse, j0, j1, state, parties):
    """_lstm_steps_backward for hidden units [j0, j1) of every batch row, one part of a
    team: each step's gate pass writes this part's units of dpre_t, the barrier waits for
    all of dpre_t, and the GEMM forms this part's units of dh = dpre_t W_hh[:, j0:j1] (the
    next step's gate pass reads only those, so one barrier a step)."""
    T, B, G = gates.shape
    H = G // 4
    for s in range(T):
        t = s if reverse else T - 1 - s
        first = t == T - 1 if reverse else t == 0
        c = c0 if first else (c_all[t + 1] if reverse else c_all[t - 1])
        for b in range(B):
            _lstm_backward_units(dh_all[t, b], dh_all[t, b], False, dh[b], gates[t, b], c[b], c_all[t, b], dpre[t, b], dc[b], j0, j1)
        barrier(state, parties)
        if j1 > j0:
            mkl_gemm(0, 0, j1 - j0, B, G, w_hh[:, j0:], H, dpre[t], G, 0.0, dh[:, j0:], H)


@njit(**_LAYER_OPTIONS)
def _lstm_layer_forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, reverse, T, h_n, c_n, chunks, parties):
    """x (T*B, I) -> (h_all, c_all (T, B, H) in time order, gates (T, B, 4H)), allocated
    here (a torch allocation and .numpy() per buffer cost ~3 us each); the gates are the
    pre-activation buffer gx, activated in place; b_ih, b_hh (4H,) or empty for none;
    h_n, c_n (B, H) get the final states (reverse: step T-1 runs first and reads h0);
    chunks: blocks of batch rows whose step loops run in parallel (_batch_chunks); parties
    > 1: the step loop split over hidden units instead (_unit_parts)."""
    B, H = h0.shape
    G = 4 * H
    h_all, c_all = np.empty((T, B, H), h0.dtype), np.empty((T, B, H), h0.dtype)
    gx = np.empty((T, B, G), h0.dtype)
    I = x.shape[1]
    bias = np.zeros(G, h0.dtype)
    if b_ih.shape[0]:
        bias += b_ih
    if b_hh.shape[0]:
        bias += b_hh
    # gx = x W_ih^T, all steps (beta 0: the gate pass adds the bias, so nothing fills gx
    # ahead of the GEMM)
    gx2 = gx.reshape((T * B, G))
    if chunks > 1 or parties > 1:
        # the projection in blocks of rows on numba's threads too (MKL sequential), so the
        # layer's parallel work stays in one thread pool: after a threaded MKL GEMM, torch's
        # OpenMP workers spin a while before they sleep, on the cores the step blocks want
        blocks = max(chunks, parties)
        for k in prange(blocks):
            previous = mkl_set_num_threads_local(1)
            r0, r1 = k * T * B // blocks, (k + 1) * T * B // blocks
            mkl_gemm(1, 0, G, r1 - r0, I, w_ih, I, x[r0:], I, 0.0, gx2[r0:], G)
            mkl_set_num_threads_local(previous)
    if parties > 1:
        state = np.zeros(STATE_SIZE, np.int64)
        for k in prange(parties):
            role = join_team(state, k, parties)
            if role != 0:
                previous = mkl_set_num_threads_local(1)
                if role == 1:
                    j0, j1 = _part_bounds(k, parties, H)
                    _lstm_steps_forward_units(gx, bias, h0, c0, w_hh, h_all, c_all, reverse, j0, j1, state, parties)
                else:  # no team: this part runs every unit
                    _lstm_steps_forward(gx, bias, h0, c0, w_hh, h_all, c_all, reverse, 0, B)
                mkl_set_num_threads_local(previous)
    elif chunks > 1:
        for k in prange(chunks):
            previous = mkl_set_num_threads_local(1)
            _lstm_steps_forward(gx, bias, h0, c0, w_hh, h_all, c_all, reverse, k * B // chunks,
                                (k + 1) * B // chunks)
            mkl_set_num_threads_local(previous)
    else:
        mkl_gemm(1, 0, G, T * B, I, w_ih, I, x, I, 0.0, gx2, G)
        _lstm_steps_forward(gx, bias, h0, c0, w_hh, h_all, c_all, reverse, 0, B)
    last = 0 if reverse else T - 1
    h_n[:] = h_all[last]
    c_n[:] = c_all[last]
    return h_all, c_all, gx


@njit(inline="always")
def _lstm_gradients_after_steps(dpre, h0, h_all, x, w_ih, dx, dw_ih, dw_hh, db, reverse, need_x, need_w, r0, r1,
                                g0, g1):
    """Rows r0:r1 of dx = dpre W_ih (need_x) and rows g0:g1 of dw_ih = dpre^T x, dw_hh =
    sum_t dpre_t^T h_prev(t) and db (need_w), each one GEMM (two for dw_hh) over all steps."""
    T, B, G = dpre.shape
    H, I = h0.shape[1], x.shape[1]
    dpre2 = dpre.reshape((T * B, G))
    if need_x and r1 > r0:
        mkl_gemm(0, 0, I, r1 - r0, G, w_ih, I, dpre2[r0:], G, 0.0, dx[r0:], I)
    if need_w and g1 > g0:
        n = g1 - g0
        mkl_gemm(0, 1, I, n, T * B, x, I, dpre2[:, g0:], G, 0.0, dw_ih[g0:], I)
        # dw_hh: the step that read h0, then the other T - 1 steps against the contiguous
        # block of h_all they read
        first = T - 1 if reverse else 0
        mkl_gemm(0, 1, H, n, B, h0, H, dpre[first, :, g0:], G, 0.0, dw_hh[g0:], H)
        if T > 1:
            if reverse:
                mkl_gemm(0, 1, H, n, (T - 1) * B, h_all[1], H, dpre[0, :, g0:], G, 1.0, dw_hh[g0:], H)
            else:
                mkl_gemm(0, 1, H, n, (T - 1) * B, h_all[0], H, dpre[1, :, g0:], G, 1.0, dw_hh[g0:], H)
        for j in range(g0, g1):
            db[j] = 0.0
        for r in range(T * B):
            for j in range(g0, g1):
                db[j] += dpre2[r, j]


@njit(**_LAYER_OPTIONS)
def _lstm_layer_backward(dh_all, dh, dc, gates, h0, c0, h_all, c_all, w_hh, x, w_ih, reverse, need_x, need_w, chunks,
                         parties):
    """dh, dc (B, H): in, the final states' gradients; out, dh0 and dc0. -> (dx (T*B, I) =
    dpre W_ih if need_x, dw_ih, dw_hh, db if need_w; 0-size arrays where not needed);
    chunks, parties as in _lstm_layer_forward (with chunks > 1 or parties > 1 the GEMMs
    over all steps also run in blocks on numba's threads)."""
    T, B, G = gates.shape
    H = G // 4
    I = x.shape[1]
    dpre = np.empty((T, B, G), gates.dtype)
    dx = np.empty((T * B if need_x else 0, I), gates.dtype)
    n = G if need_w else 0
    dw_ih, dw_hh, db = np.empty((n, I), gates.dtype), np.empty((n, H), gates.dtype), np.empty(n, gates.dtype)
    if parties > 1:
        state = np.zeros(STATE_SIZE, np.int64)
        for k in prange(parties):
            role = join_team(state, k, parties)
            if role != 0:
                previous = mkl_set_num_threads_local(1)
                if role == 1:
                    j0, j1 = _part_bounds(k, parties, H)
                    _lstm_steps_backward_units(dh_all, dh, dc, gates, c0, c_all, w_hh, dpre, reverse, j0, j1, state,
                                               parties)
                else:  # no team: this part runs every unit
                    _lstm_steps_backward(dh_all, dh, dc, gates, c0, c_all, w_hh, dpre, reverse, 0, B)
                mkl_set_num_threads_local(previous)
        chunks = max(chunks, parties)
    elif chunks > 1:
        for k in prange(chunks):
            previous = mkl_set_num_threads_local(1)
            _lstm_steps_backward(dh_all, dh, dc, gates, c0, c_all, w_hh, dpre, reverse, k * B // chunks,
                                 (k + 1) * B // chunks)
            mkl_set_num_threads_local(previous)
    else:
        _lstm_steps_backward(dh_all, dh, dc, gates, c0, c_all, w_hh, dpre, reverse, 0, B)
    if chunks > 1:  # rows of dx and rows of the weight gradients by block, as the forward
        for k in prange(chunks):
            previous = mkl_set_num_threads_local(1)
            _lstm_gradients_after_steps(dpre, h0, h_all, x, w_ih, dx, dw_ih, dw_hh, db, reverse, need_x, need_w,
                                        k * T * B // chunks, (k + 1) * T * B // chunks, k * n // chunks,
                                        (k + 1) * n // chunks)
            mkl_set_num_threads_local(previous)
    else:
        _lstm_gradients_after_steps(dpre, h0, h_all, x, w_ih, dx, dw_ih, dw_hh, db, reverse, need_x, need_w,
                                    0, T * B, 0, n)
    return dx, dw_ih, dw_hh, db


@njit(**_SEQUENCE_OPTIONS)
def _gru_sequence_forward(gx, h0, w_hh, b_hh, h_all, saved, gh):
    T, B, G = gx.shape
    H = G // 3
    for t in range(T):
        h = h0 if t == 0 else h_all[t - 1]
        for b in range(B):  # gh = b_hh + h W_hh^T (beta 1)
            gh[b] = b_hh
        mkl_gemm(1, 0, G, B, H, w_hh, H, h, H, 1.0, gh, G)
        for b in range(B):
            _gru_forward_row(gx[t, b], gh[b], h[b], h_all[t, b], saved[t, b])


@njit(**_SEQUENCE_OPTIONS)
def _gru_sequence_backward(dh_all, saved, h0, h_all, w_hh, dgx, dgh, dh, hw):
    """dh, hw (B, H) zero in; out dh carries dh_0 z, hw dgh_0 W_hh."""
    T, B, G = saved.shape[0], saved.shape[1], dgx.shape[2]
    H = G // 3
    for t in range(T - 1, -1, -1):
        h = h0 if t == 0 else h_all[t - 1]
        for b in range(B):
            _gru_backward_row(dh_all[t, b], hw[b], saved[t, b], h[b], dgx[t, b], dgh[t, b], dh[b])
        mkl_gemm(0, 0, H, B, G, w_hh, H, dgh[t], G, 0.0, hw, H)


@njit(**_SEQUENCE_OPTIONS)
def _rnn_sequence_forward(gx, h0, w_hh, relu, h_all, hw):
    T, B, H = gx.shape
    for t in range(T):
        h = h0 if t == 0 else h_all[t - 1]
        mkl_gemm(1, 0, H, B, H, w_hh, H, h, H, 0.0, hw, H)
        for b in range(B):
            _rnn_forward_row(hw[b], gx[t, b], h_all[t, b], relu)


@njit(**_SEQUENCE_OPTIONS)
def _rnn_sequence_backward(dh_all, h_all, w_hh, relu, dpre, hw):
    T, B, H = h_all.shape
    for t in range(T - 1, -1, -1):
        for b in range(B):
            _rnn_backward_row(dh_all[t, b], hw[b], h_all[t, b], dpre[t, b], relu)
        mkl_gemm(0, 0, H, B, H, w_hh, H, dpre[t], H, 0.0, hw, H)


_INT32_MAX = 2 ** 31 - 1


def _fused(w_hh, *tensors) -> bool:
    """Whether the one-call sequence kernels run: MKL's GEMM reachable, the weights in the
    state's dtype, no empty dimension, every size within BLAS's 32-bit ints."""
    return (MKL_GEMM and w_hh.dtype == tensors[0].dtype in (torch.float32, torch.float64)
            and all(0 < n <= _INT32_MAX for t in tensors for n in t.shape))


def _np(t):
    return t.contiguous().numpy()


# The op's whole-sequence functions (ops/rnn.py calls these in place of its step loops).


def lstm_sequence_forward(gx, h0, c0, w_hh):
    if not _fused(w_hh, gx, h0):
        return _stepwise_lstm_sequence_forward(gx, h0, c0, w_hh)
    T = gx.shape[0]
    h_all, c_all, gates = h0.new_empty((T, *h0.shape)), c0.new_empty((T, *c0.shape)), torch.empty_like(gx)
    _lstm_sequence_forward(_np(gx), _np(h0), _np(c0), _np(w_hh), h_all.numpy(), c_all.numpy(), gates.numpy(),
                           gx.new_empty(gx.shape[1:]).numpy())
    return h_all, c_all, gates


def lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh):
    if not _fused(w_hh, gates, h0):
        return _stepwise_lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh)
    dpre, dc, hw = torch.empty_like(gates), torch.zeros_like(c0), torch.zeros_like(h0)
    dw_hh = torch.empty_like(w_hh)
    _lstm_sequence_backward(_np(dh_all), _np(dc_all), _np(gates), _np(h0), _np(c0), _np(h_all), _np(c_all), _np(w_hh),
                            dpre.numpy(), dc.numpy(), hw.numpy(), dw_hh.numpy())
    return dpre, hw, dc, dw_hh


def gru_sequence_forward(gx, h0, w_hh, b_hh):
    if not _fused(w_hh, gx, h0):
        return _stepwise_gru_sequence_forward(gx, h0, w_hh, b_hh)
    T, B, H = gx.shape[0], h0.shape[0], h0.shape[1]
    h_all, saved = h0.new_empty((T, B, H)), h0.new_empty((T, B, 4 * H))
    bias = h0.new_zeros(3 * H) if b_hh is None else b_hh.to(h0.dtype)
    _gru_sequence_forward(_np(gx), _np(h0), _np(w_hh), _np(bias), h_all.numpy(), saved.numpy(),
                          h0.new_empty((B, 3 * H)).numpy())
    return h_all, saved


def gru_sequence_backward(dh_all, saved, h0, h_all, w_hh):
    if not _fused(w_hh, saved, h0):
        return _stepwise_gru_sequence_backward(dh_all, saved, h0, h_all, w_hh)
    T, B, H = saved.shape[0], h0.shape[0], h0.shape[1]
    dgx, dgh = saved.new_empty((T, B, 3 * H)), saved.new_empty((T, B, 3 * H))
    dh, hw = torch.zeros_like(h0), torch.zeros_like(h0)
    _gru_sequence_backward(_np(dh_all), _np(saved), _np(h0), _np(h_all), _np(w_hh), dgx.numpy(), dgh.numpy(),
                           dh.numpy(), hw.numpy())
    return dgx, dgh, dh.add_(hw)


def rnn_sequence_forward(gx, h0, w_hh, relu):
    if not _fused(w_hh, gx, h0):
        return _stepwise_rnn_sequence_forward(gx, h0, w_hh, relu)
    h_all = h0.new_empty((gx.shape[0], *h0.shape))
    _rnn_sequence_forward(_np(gx), _np(h0), _np(w_hh), bool(relu), h_all.numpy(), torch.empty_like(h0).numpy())
    return h_all


def rnn_sequence_backward(dh_all, h0, h_all, w_hh, relu):
    if not _fused(w_hh, h_all, h0):
        return _stepwise_rnn_sequence_backward(dh_all, h0, h_all, w_hh, relu)
    dpre, hw = torch.empty_like(h_all), torch.zeros_like(h0)
    _rnn_sequence_backward(_np(dh_all), _np(h_all), _np(w_hh), bool(relu), dpre.numpy(), hw.numpy())
    return dpre, hw


def lstm_layer_fits(x, h0, w_ih, w_hh) -> bool:
    """Whether lstm_layer_forward / _backward run: the sequence kernels' conditions, MKL's
    per-thread thread count reachable (the batch-split step loop sets it), x and the state
    in the weights' dtype."""
    return (MKL_THREADS and x.dtype == h0.dtype and w_ih.dtype == w_hh.dtype and _fused(w_hh, x, h0)
            and 0 < x.shape[2] <= _INT32_MAX and x.shape[0] * x.shape[1] <= _INT32_MAX)


def lstm_layer_forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, reverse, h_n=None, c_n=None):
    """One LSTM layer (input projection and recurrence), x (T, B, I) contiguous, b_ih, b_hh
    (4H,) or None; h_n, c_n: None or (B, H) buffers for the final states.
    -> (h_all, c_all (T, B, H), gates (T, B, 4H), h_n, c_n)."""
    T, B, I = x.shape
    h_n = torch.empty_like(h0) if h_n is None else h_n
    c_n = torch.empty_like(c0) if c_n is None else c_n
    none = _NO_BIAS[h0.dtype]
    h_all, c_all, gates = _lstm_layer_forward(x.numpy().reshape(T * B, I), w_ih.numpy(),
                                              none if b_ih is None else b_ih.numpy(),
                                              none if b_hh is None else b_hh.numpy(), h0.numpy(), c0.numpy(),
                                              w_hh.numpy(), bool(reverse), T, h_n.numpy(), c_n.numpy(),
                                              _batch_chunks(B), _unit_parts(B, h0.shape[1]))
    return torch.from_numpy(h_all), torch.from_numpy(c_all), torch.from_numpy(gates), h_n, c_n


_NO_BIAS = {torch.float32: np.zeros(0, np.float32), torch.float64: np.zeros(0, np.float64)}


def lstm_layer_backward(dh_all, dh, dc, gates, h0, c0, h_all, c_all, w_hh, x, w_ih, reverse, need_x, need_w):
    """dh_all (T, B, H) contiguous; dh, dc (B, H): in, the final states' gradients (zeros
    where None), out, dh0 and dc0 (updated in place). -> (dx (T, B, I) or None, dw_ih,
    dw_hh, db (None each unless need_w))."""
    T, B, I = x.shape
    dx, dw_ih, dw_hh, db = _lstm_layer_backward(
        dh_all.numpy(), dh.numpy(), dc.numpy(), gates.numpy(), h0.numpy(), c0.numpy(), h_all.numpy(), c_all.numpy(),
        w_hh.numpy(), x.numpy().reshape(T * B, I), w_ih.numpy(), bool(reverse), bool(need_x), bool(need_w),
        _batch_chunks(B), _unit_parts(B, h0.shape[1]))
    dx = torch.from_numpy(dx).view(T, B, I) if need_x else None
    if not need_w:
        return dx, None, None, None
    return dx, torch.from_numpy(dw_ih), torch.from_numpy(dw_hh), torch.from_numpy(db)


# The step loop in Python, one oneDNN linear (blas.PackedLinear) and one parallel numba pass
# per step: what runs when torch has no MKL GEMM to call from numba (blas.MKL_GEMM), or a
# dimension is 0 or past BLAS's 32-bit sizes. Every numba pass writes straight into its
# step's slice of the outputs and the carried gradients stay in place.


def _stepwise_lstm_sequence_forward(gx, h0, c0, w_hh):
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


def _stepwise_lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh):
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


def _stepwise_gru_sequence_forward(gx, h0, w_hh, b_hh):
    T, B, H = gx.shape[0], h0.shape[0], h0.shape[1]
    h_all, saved = h0.new_empty((T, B, H)), h0.new_empty((T, B, 4 * H))
    recurrent = PackedLinear(w_hh, B)
    gx_np, h_np, saved_np = gx.numpy(), h_all.numpy(), saved.numpy()
    h = h0
    for t in range(T):
        _gru_forward(gx_np[t], recurrent(h, b_hh).numpy(), h.numpy(), h_np[t], saved_np[t])
        h = h_all[t]
    return h_all, saved


def _stepwise_gru_sequence_backward(dh_all, saved, h0, h_all, w_hh):
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


def _stepwise_rnn_sequence_forward(gx, h0, w_hh, relu):
    T, B = gx.shape[0], gx.shape[1]
    h_all = h0.new_empty((T, *h0.shape))
    recurrent = PackedLinear(w_hh, B)
    gx_np, h_np = gx.numpy(), h_all.numpy()
    h = h0
    for t in range(T):
        _rnn_forward(recurrent(h).numpy(), gx_np[t], h_np[t], relu)
        h = h_all[t]
    return h_all


def _stepwise_rnn_sequence_backward(dh_all, h0, h_all, w_hh, relu):
    T, B = h_all.shape[0], h_all.shape[1]
    dpre = torch.empty_like(h_all)
    recurrent_t = PackedLinear(w_hh.t(), B)
    dh_all_np, h_np, dpre_np = dh_all.numpy(), h_all.numpy(), dpre.numpy()
    hw = torch.zeros_like(h0)
    for t in reversed(range(T)):
        _rnn_backward(dh_all_np[t], hw.numpy(), h_np[t], dpre_np[t], relu)
        hw = recurrent_t(dpre[t])
    return dpre, hw
