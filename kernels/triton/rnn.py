"""Triton form of the LSTM, GRU and Elman RNN cell steps: the recurrent GEMM fused with the
gate math.

The op layer computes the input projection of every time step up front with one big GEMM,
gx = x W_ih^T + b_ih (+ b_hh for the LSTM), and the weight gradients at the end with one big
GEMM over all steps' gate gradients. A step is then one kernel: a GEMM against w_hh whose
epilogue (forward) or prologue (backward) does the cell's pointwise math, so no (B, 4H)
pre-activation buffer is written in forward, and the gate gradients are formed where the
dh GEMM reads them. Gate order and layout are torch's: LSTM [i | f | g | o], GRU [r | z | n]
along the gate dimension of gx and w_hh (gates * H, H).

* ``lstm_step_forward(gx, h, c, w_hh) -> (h_next, c_next, gates)``. One program owns a
  (BLOCK_B rows x BLOCK_H hidden units j) tile and keeps FOUR accumulators, the products of
  h with the columns j, H + j, 2H + j, 3H + j of w_hh^T, over K = H. The epilogue adds gx,
  applies sigmoid / sigmoid / tanh / sigmoid, forms c_next = f c + i g and
  h_next = o tanh(c_next), and writes the activated gates (B, 4H): all backward needs
  besides c, c_next and w_hh.
* ``lstm_step_backward(dh_next, dc_next, gates, c, c_next, w_hh) -> (dpre, dh, dc)``.
  One kernel: dh = dpre @ w_hh tiles over (B, H) and loops over the hidden units k in
  chunks of BLOCK_K; its prologue forms the four dpre tiles of chunk k (columns k, H + k,
  2H + k, 3H + k) from the pointwise inputs and multiplies each with its rows of w_hh into
  one accumulator. dpre and dc are written by the same kernel: of the programs that share
  a row tile (they all form every chunk), the one with pid_h == k_chunk % n_h_tiles stores
  that chunk, so each element is written exactly once, deterministic, and the stores are
  spread over the programs.
* ``gru_step_forward(gx, h, w_hh, b_hh) -> (h_next, saved)``: three accumulators
  (r, z, n columns of w_hh^T); the epilogue adds b_hh, forms r, z, n and
  h_next = (1 - z) n + z h, and writes saved = [r | z | n | gh_n] (B, 4H).
* ``gru_step_backward(dh_next, saved, h, w_hh) -> (dgx, dgh, dh)``: like the LSTM
  backward, the prologue forms dr, dz, dn for a chunk, stores dgx = [dr | dz | dn] and
  dgh = [dr | dz | dn r] (chunk owner only) and multiplies dgh with w_hh; the epilogue
  adds dh_next z.
* ``rnn_step_forward(gx, h, w_hh, relu) -> h_next`` (Elman, one gate): one accumulator,
  the epilogue adds gx and applies tanh or relu. Nothing else is saved: backward reads
  act' from h_next (1 - h^2, or h > 0).
* ``rnn_step_backward(dh_next, h_next, w_hh, relu) -> (dpre, dh)``: the prologue forms
  dpre = dh_next act' for a chunk (stored by the chunk owner, as above) and multiplies it
  with w_hh's rows.

Dtypes. The state (h, c, gx and every output) may be float32 while w_hh is float32, fp16
or bf16: the accumulation dtype comes from h (float32, float64 for float64 state, which
only the interpreter runs), the dot operands are cast to w_hh's dtype (the state tile to
bf16 for bf16 weights: tensor cores; accumulation stays float32). For float32 weights the
dot follows torch.backends.cuda.matmul.allow_tf32. Every output has the state's dtype.

Grids are 1-D over cdiv(B, BLOCK_B) * cdiv(H, BLOCK_H) programs in grouped order (GROUP
row tiles sweep the hidden tiles together, so w_hh tiles are reused from L2). Per-step
batches are small, so the autotuned tiles include BLOCK_B = 16 and BLOCK_H = 32 to give
the GPU enough programs; under TRITON_INTERPRET=1 one small config (16 x 16, BLOCK_K 32)
is used so that test shapes reach several row, column and reduction tiles.

A persistent whole-sequence kernel (not implemented). The step kernels re-read w_hh
(gates * H * H elements) from L2 / HBM at every step, which dominates for small B. A
persistent form would launch one program per (hidden tile j) -- at most one wave, e.g.
H / BLOCK_H <= number of SMs -- each keeping its gate slice of w_hh (the rows q H + j of
every gate, gates * BLOCK_H * H elements: 4 * 32 * 1024 bf16 = 256 KiB, so it must live in
shared memory split across a cluster or be restricted to H <= ~512 per SM) on chip for
the whole sequence, and loop over t: read h_{t-1} (B, H) from global memory, do the
epilogue, write its slice of h_t, then a grid-wide barrier (an atomic counter per step in
global memory, spin-waited; all programs must be co-resident, so the grid is sized to the
SM count and launched cooperatively) before the next step reads h_t. The backward runs
the same way over reversed t with the w_hh row slices (the dh GEMM's K dimension split
across programs needs either the column split used here, each program owning dh[:, j],
with all dpre of step t visible after the barrier, or a split-K reduction).
"""

import os

import torch
import triton
import triton.language as tl

from .linear_act import _dot, _dot_args, _sigmoid, _tanh, _tile  # shared GEMM / activation helpers

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages). Per-step batches are small (B ~ 16 to
# 256), so narrow tiles keep enough programs in flight. The forward holds four (three)
# accumulators per tile; the backward prologue holds eight pointwise tiles, four gate
# gradients and four w_hh tiles per chunk, so BLOCK_K is 16 and the pipeline shallow.
# ptxas -v (sm_90a, triton 3.9, fp32 state): forward spill-free with fp32 (ieee) and bf16
# weights at these tiles (BLOCK_K 32 spilled at most of them); lstm backward spill-free
# with fp32 ieee except 16x64 (24 B); with tf32 / bf16, 8-52 B at some tiles; gru
# backward spill-free except 32x64 with fp32 weights (8-12 B). The forward's four pointer
# tiles, each advanced along k, are deliberate: one shared tile plus a per-gate offset
# (fewer lines) spilled 28-76 B at 32x64 and 64x64.
_FWD_TILES = [
    (16, 32, 16, 4, 3),
    (16, 64, 16, 4, 3),
    (32, 64, 16, 4, 3),
    (64, 64, 16, 8, 3),
]
_BWD_TILES = [
    (16, 32, 16, 4, 1),
    (16, 32, 16, 4, 2),
    (16, 64, 16, 4, 2),
    (32, 64, 16, 4, 2),
    (64, 64, 16, 8, 2),
]
_INTERPRET_TILES = [(16, 16, 32, 4, 1)]


def _autotune(tiles):
    tiles = _INTERPRET_TILES if _INTERPRET else tiles
    configs = [
        triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": k, "GROUP": 8}, num_warps=w, num_stages=s)
        for b, h, k, w, s in tiles
    ]
    return triton.autotune(configs=configs, key=["B", "H"])


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _w_t_ptrs(w_ptr, q, H, cols, offs_k):
    # (BLOCK_K, BLOCK_H) tile of w^T for gate q: w[q H + cols, offs_k] (row-major (G H, H)).
    return w_ptr + (cols + q * H).to(tl.int64)[None, :] * H + offs_k[:, None]


@triton.jit
def _gate_dot(acc, d, w_ptr, q, H, k, cols, ACC_DT: tl.constexpr, PREC: tl.constexpr):
    # Backward: acc += d @ gate q's (BLOCK_K, BLOCK_H) tile of w, w[q H + k, cols].
    w = tl.load(w_ptr + (k + q * H).to(tl.int64)[:, None] * H + cols[None, :], mask=k[:, None] < H, other=0.0)
    return _dot(d.to(w.dtype), w, acc, ACC_DT, PREC)


@triton.jit
def _load_gate(ptr, offs, q, H, mask, ACC_DT: tl.constexpr):
    # Gate q's tile of a (rows, G H) buffer; offs addresses gate 0. mask None: unmasked
    # (the epilogues' wrapped rows and units stay inside the buffer).
    if mask is None:
        v = tl.load(ptr + offs + q * H)
    else:
        v = tl.load(ptr + offs + q * H, mask=mask, other=0.0)
    return v.to(ACC_DT)


@triton.jit
def _store_gate(ptr, offs, q, H, value, mask):
    tl.store(ptr + offs + q * H, value.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- LSTM


@_autotune(_FWD_TILES)
@triton.jit
def _lstm_fwd_kernel(
    gx_ptr, h_ptr, c_ptr, w_ptr, h_out_ptr, c_out_ptr, gates_ptr,
    B, H,
    ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_b, pid_h = _tile(tl.program_id(0), tl.cdiv(B, BLOCK_B), tl.cdiv(H, BLOCK_H), GROUP)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past B and units past H wrap around (valid memory, never stored); only the K
    # tail is masked in the loop.
    rows = (offs_b % B).to(tl.int64)[:, None]
    cols = offs_j % H
    h_ptrs = h_ptr + rows * H + offs_k[None, :]
    wi_ptrs = _w_t_ptrs(w_ptr, 0, H, cols, offs_k)
    wf_ptrs = _w_t_ptrs(w_ptr, 1, H, cols, offs_k)
    wg_ptrs = _w_t_ptrs(w_ptr, 2, H, cols, offs_k)
    wo_ptrs = _w_t_ptrs(w_ptr, 3, H, cols, offs_k)
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_left = H - k * BLOCK_K
        kmask = offs_k[:, None] < k_left
        wi = tl.load(wi_ptrs, mask=kmask, other=0.0)
        wf = tl.load(wf_ptrs, mask=kmask, other=0.0)
        wg = tl.load(wg_ptrs, mask=kmask, other=0.0)
        wo = tl.load(wo_ptrs, mask=kmask, other=0.0)
        a = tl.load(h_ptrs, mask=offs_k[None, :] < k_left, other=0.0).to(wi.dtype)
        acc_i = _dot(a, wi, acc_i, ACC_DT, PREC)
        acc_f = _dot(a, wf, acc_f, ACC_DT, PREC)
        acc_g = _dot(a, wg, acc_g, ACC_DT, PREC)
        acc_o = _dot(a, wo, acc_o, ACC_DT, PREC)
        h_ptrs += BLOCK_K
        wi_ptrs += BLOCK_K
        wf_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wo_ptrs += BLOCK_K
    # Epilogue: the whole cell update.
    gx_ptrs = gx_ptr + rows * (4 * H) + cols[None, :]
    i = _sigmoid(acc_i + tl.load(gx_ptrs).to(ACC_DT))
    f = _sigmoid(acc_f + tl.load(gx_ptrs + H).to(ACC_DT))
    g = _tanh(acc_g + tl.load(gx_ptrs + 2 * H).to(ACC_DT))
    o = _sigmoid(acc_o + tl.load(gx_ptrs + 3 * H).to(ACC_DT))
    st = rows * H + cols[None, :]
    c = tl.load(c_ptr + st).to(ACC_DT)
    c_next = f * c + i * g
    h_next = o * _tanh(c_next)
    mask = (offs_b[:, None] < B) & (offs_j[None, :] < H)
    tl.store(c_out_ptr + st, c_next.to(c_out_ptr.dtype.element_ty), mask=mask)
    tl.store(h_out_ptr + st, h_next.to(h_out_ptr.dtype.element_ty), mask=mask)
    g_ptrs = gates_ptr + rows * (4 * H) + cols[None, :]
    gdt = gates_ptr.dtype.element_ty
    tl.store(g_ptrs, i.to(gdt), mask=mask)
    tl.store(g_ptrs + H, f.to(gdt), mask=mask)
    tl.store(g_ptrs + 2 * H, g.to(gdt), mask=mask)
    tl.store(g_ptrs + 3 * H, o.to(gdt), mask=mask)


@_autotune(_BWD_TILES)
@triton.jit
def _lstm_bwd_kernel(
    dhn_ptr, dcn_ptr, gates_ptr, c_ptr, cn_ptr, w_ptr, dpre_ptr, dh_ptr, dc_ptr,
    B, H,
    ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    n_h = tl.cdiv(H, BLOCK_H)
    pid_b, pid_h = _tile(tl.program_id(0), tl.cdiv(B, BLOCK_B), n_h, GROUP)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_b % B).to(tl.int64)[:, None]
    rows_ok = offs_b[:, None] < B
    cols = offs_j % H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    for kk in range(0, tl.cdiv(H, BLOCK_K)):
        k = kk * BLOCK_K + offs_k
        kmask = k[None, :] < H
        # Prologue: the pre-activation gradients of hidden units k, all four gates.
        st = rows * H + k[None, :]
        gt = rows * (4 * H) + k[None, :]
        dhn = tl.load(dhn_ptr + st, mask=kmask, other=0.0).to(ACC_DT)
        dcn = tl.load(dcn_ptr + st, mask=kmask, other=0.0).to(ACC_DT)
        c = tl.load(c_ptr + st, mask=kmask, other=0.0).to(ACC_DT)
        tc = _tanh(tl.load(cn_ptr + st, mask=kmask, other=0.0).to(ACC_DT))
        i = _load_gate(gates_ptr, gt, 0, H, kmask, ACC_DT)
        f = _load_gate(gates_ptr, gt, 1, H, kmask, ACC_DT)
        g = _load_gate(gates_ptr, gt, 2, H, kmask, ACC_DT)
        o = _load_gate(gates_ptr, gt, 3, H, kmask, ACC_DT)
        dct = dcn + dhn * o * (1.0 - tc * tc)
        di = dct * g * (i * (1.0 - i))
        df = dct * c * (f * (1.0 - f))
        dg = dct * i * (1.0 - g * g)
        do = dhn * tc * (o * (1.0 - o))
        if kk % n_h == pid_h:  # this chunk's owner among the programs of the row tile
            smask = rows_ok & kmask
            _store_gate(dpre_ptr, gt, 0, H, di, smask)
            _store_gate(dpre_ptr, gt, 1, H, df, smask)
            _store_gate(dpre_ptr, gt, 2, H, dg, smask)
            _store_gate(dpre_ptr, gt, 3, H, do, smask)
            _store_gate(dc_ptr, st, 0, H, dct * f, smask)
        acc = _gate_dot(acc, di, w_ptr, 0, H, k, cols, ACC_DT, PREC)
        acc = _gate_dot(acc, df, w_ptr, 1, H, k, cols, ACC_DT, PREC)
        acc = _gate_dot(acc, dg, w_ptr, 2, H, k, cols, ACC_DT, PREC)
        acc = _gate_dot(acc, do, w_ptr, 3, H, k, cols, ACC_DT, PREC)
    mask = rows_ok & (offs_j[None, :] < H)
    tl.store(dh_ptr + rows * H + cols[None, :], acc.to(dh_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- GRU


@_autotune(_FWD_TILES)
@triton.jit
def _gru_fwd_kernel(
    gx_ptr, h_ptr, w_ptr, b_ptr, h_out_ptr, saved_ptr,
    B, H,
    HAS_BIAS: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_b, pid_h = _tile(tl.program_id(0), tl.cdiv(B, BLOCK_B), tl.cdiv(H, BLOCK_H), GROUP)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_b % B).to(tl.int64)[:, None]
    cols = offs_j % H
    h_ptrs = h_ptr + rows * H + offs_k[None, :]
    wr_ptrs = _w_t_ptrs(w_ptr, 0, H, cols, offs_k)
    wz_ptrs = _w_t_ptrs(w_ptr, 1, H, cols, offs_k)
    wn_ptrs = _w_t_ptrs(w_ptr, 2, H, cols, offs_k)
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_left = H - k * BLOCK_K
        kmask = offs_k[:, None] < k_left
        wr = tl.load(wr_ptrs, mask=kmask, other=0.0)
        wz = tl.load(wz_ptrs, mask=kmask, other=0.0)
        wn = tl.load(wn_ptrs, mask=kmask, other=0.0)
        a = tl.load(h_ptrs, mask=offs_k[None, :] < k_left, other=0.0).to(wr.dtype)
        acc_r = _dot(a, wr, acc_r, ACC_DT, PREC)
        acc_z = _dot(a, wz, acc_z, ACC_DT, PREC)
        acc_n = _dot(a, wn, acc_n, ACC_DT, PREC)
        h_ptrs += BLOCK_K
        wr_ptrs += BLOCK_K
        wz_ptrs += BLOCK_K
        wn_ptrs += BLOCK_K
    if HAS_BIAS:
        acc_r += tl.load(b_ptr + cols).to(ACC_DT)[None, :]
        acc_z += tl.load(b_ptr + H + cols).to(ACC_DT)[None, :]
        acc_n += tl.load(b_ptr + 2 * H + cols).to(ACC_DT)[None, :]
    gx_ptrs = gx_ptr + rows * (3 * H) + cols[None, :]
    r = _sigmoid(tl.load(gx_ptrs).to(ACC_DT) + acc_r)
    z = _sigmoid(tl.load(gx_ptrs + H).to(ACC_DT) + acc_z)
    n = _tanh(tl.load(gx_ptrs + 2 * H).to(ACC_DT) + r * acc_n)
    st = rows * H + cols[None, :]
    h = tl.load(h_ptr + st).to(ACC_DT)
    h_next = (1.0 - z) * n + z * h
    mask = (offs_b[:, None] < B) & (offs_j[None, :] < H)
    tl.store(h_out_ptr + st, h_next.to(h_out_ptr.dtype.element_ty), mask=mask)
    s_ptrs = saved_ptr + rows * (4 * H) + cols[None, :]
    sdt = saved_ptr.dtype.element_ty
    tl.store(s_ptrs, r.to(sdt), mask=mask)
    tl.store(s_ptrs + H, z.to(sdt), mask=mask)
    tl.store(s_ptrs + 2 * H, n.to(sdt), mask=mask)
    tl.store(s_ptrs + 3 * H, acc_n.to(sdt), mask=mask)


@_autotune(_BWD_TILES)
@triton.jit
def _gru_bwd_kernel(
    dhn_ptr, saved_ptr, h_ptr, w_ptr, dgx_ptr, dgh_ptr, dh_ptr,
    B, H,
    ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    n_h = tl.cdiv(H, BLOCK_H)
    pid_b, pid_h = _tile(tl.program_id(0), tl.cdiv(B, BLOCK_B), n_h, GROUP)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_b % B).to(tl.int64)[:, None]
    rows_ok = offs_b[:, None] < B
    cols = offs_j % H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    for kk in range(0, tl.cdiv(H, BLOCK_K)):
        k = kk * BLOCK_K + offs_k
        kmask = k[None, :] < H
        st = rows * H + k[None, :]
        sv = rows * (4 * H) + k[None, :]
        dhn = tl.load(dhn_ptr + st, mask=kmask, other=0.0).to(ACC_DT)
        h = tl.load(h_ptr + st, mask=kmask, other=0.0).to(ACC_DT)
        r = _load_gate(saved_ptr, sv, 0, H, kmask, ACC_DT)
        z = _load_gate(saved_ptr, sv, 1, H, kmask, ACC_DT)
        n = _load_gate(saved_ptr, sv, 2, H, kmask, ACC_DT)
        ghn = _load_gate(saved_ptr, sv, 3, H, kmask, ACC_DT)
        dn = dhn * (1.0 - z) * (1.0 - n * n)
        dz = dhn * (h - n) * (z * (1.0 - z))
        dr = dn * ghn * (r * (1.0 - r))
        dnr = dn * r
        if kk % n_h == pid_h:  # this chunk's owner among the programs of the row tile
            smask = rows_ok & kmask
            g3 = rows * (3 * H) + k[None, :]
            _store_gate(dgx_ptr, g3, 0, H, dr, smask)
            _store_gate(dgx_ptr, g3, 1, H, dz, smask)
            _store_gate(dgx_ptr, g3, 2, H, dn, smask)
            _store_gate(dgh_ptr, g3, 0, H, dr, smask)
            _store_gate(dgh_ptr, g3, 1, H, dz, smask)
            _store_gate(dgh_ptr, g3, 2, H, dnr, smask)
        acc = _gate_dot(acc, dr, w_ptr, 0, H, k, cols, ACC_DT, PREC)
        acc = _gate_dot(acc, dz, w_ptr, 1, H, k, cols, ACC_DT, PREC)
        acc = _gate_dot(acc, dnr, w_ptr, 2, H, k, cols, ACC_DT, PREC)
    st = rows * H + cols[None, :]
    dhn = tl.load(dhn_ptr + st).to(ACC_DT)
    z = _load_gate(saved_ptr, rows * (4 * H) + cols[None, :], 1, H, None, ACC_DT)
    dh = acc + dhn * z
    mask = rows_ok & (offs_j[None, :] < H)
    tl.store(dh_ptr + st, dh.to(dh_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- Elman RNN


@triton.jit
def _act(z, RELU: tl.constexpr):
    if RELU:
        return tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu
    return _tanh(z)


@triton.jit
def _act_grad(h, RELU: tl.constexpr):
    # act'(pre) from the activation's output h.
    if RELU:
        return tl.where(h > 0.0, 1.0, 0.0)
    return 1.0 - h * h


@_autotune(_FWD_TILES)
@triton.jit
def _rnn_fwd_kernel(
    gx_ptr, h_ptr, w_ptr, h_out_ptr,
    B, H,
    RELU: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_b, pid_h = _tile(tl.program_id(0), tl.cdiv(B, BLOCK_B), tl.cdiv(H, BLOCK_H), GROUP)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_b % B).to(tl.int64)[:, None]
    cols = offs_j % H
    h_ptrs = h_ptr + rows * H + offs_k[None, :]
    w_ptrs = _w_t_ptrs(w_ptr, 0, H, cols, offs_k)
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_left = H - k * BLOCK_K
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a = tl.load(h_ptrs, mask=offs_k[None, :] < k_left, other=0.0).to(w.dtype)
        acc = _dot(a, w, acc, ACC_DT, PREC)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    st = rows * H + cols[None, :]
    h_next = _act(acc + tl.load(gx_ptr + st).to(ACC_DT), RELU)
    mask = (offs_b[:, None] < B) & (offs_j[None, :] < H)
    tl.store(h_out_ptr + st, h_next.to(h_out_ptr.dtype.element_ty), mask=mask)


@_autotune(_BWD_TILES)
@triton.jit
def _rnn_bwd_kernel(
    dhn_ptr, hn_ptr, w_ptr, dpre_ptr, dh_ptr,
    B, H,
    RELU: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    n_h = tl.cdiv(H, BLOCK_H)
    pid_b, pid_h = _tile(tl.program_id(0), tl.cdiv(B, BLOCK_B), n_h, GROUP)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_b % B).to(tl.int64)[:, None]
    rows_ok = offs_b[:, None] < B
    cols = offs_j % H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DT)
    for kk in range(0, tl.cdiv(H, BLOCK_K)):
        k = kk * BLOCK_K + offs_k
        kmask = k[None, :] < H
        st = rows * H + k[None, :]
        dhn = tl.load(dhn_ptr + st, mask=kmask, other=0.0).to(ACC_DT)
        hn = tl.load(hn_ptr + st, mask=kmask, other=0.0).to(ACC_DT)
        d = dhn * _act_grad(hn, RELU)
        if kk % n_h == pid_h:  # this chunk's owner among the programs of the row tile
            _store_gate(dpre_ptr, st, 0, H, d, rows_ok & kmask)
        acc = _gate_dot(acc, d, w_ptr, 0, H, k, cols, ACC_DT, PREC)
    mask = rows_ok & (offs_j[None, :] < H)
    tl.store(dh_ptr + rows * H + cols[None, :], acc.to(dh_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _grid(B, H):
    return lambda meta: (triton.cdiv(B, meta["BLOCK_B"]) * triton.cdiv(H, meta["BLOCK_H"]),)


def lstm_step_forward(gx, h, c, w_hh, out=None):
    """One LSTM step: gx (B, 4H) = x W_ih^T + b_ih + b_hh, h (B, H), c (B, H), w_hh (4H, H).

    Returns (h_next, c_next, gates): gates (B, 4H) the activated [i | f | g | o]; all in
    the state's dtype. ``out``: three contiguous tensors to write them into instead.
    """
    B, H = h.shape
    h_next, c_next, gates = out or (torch.empty_like(h), torch.empty_like(c),
                                    torch.empty((B, 4 * H), device=h.device, dtype=h.dtype))
    if B == 0 or H == 0:
        return h_next, c_next, gates
    acc_dt, prec = _dot_args(h.dtype, w_hh.dtype)
    _lstm_fwd_kernel[_grid(B, H)](
        gx, h, c, w_hh, h_next, c_next, gates, B, H, ACC_DT=acc_dt, PREC=prec,
    )
    return h_next, c_next, gates


def lstm_step_backward(dh_next, dc_next, gates, c, c_next, w_hh, out=None):
    """Gradients of one LSTM step given dh_next, dc_next (B, H).

    Returns (dpre, dh, dc): dpre (B, 4H) the pre-activation gradients [di | df | dg | do]
    (the op forms dW_hh, dW_ih, the biases and dx from them), dh = dpre @ w_hh and
    dc = dc_tot * f, all in the state's dtype.
    """
    B, H = c.shape
    dpre, dh, dc = out or (torch.empty((B, 4 * H), device=c.device, dtype=dh_next.dtype),
                           torch.empty((B, H), device=c.device, dtype=dh_next.dtype),
                           torch.empty((B, H), device=c.device, dtype=c.dtype))
    if B == 0 or H == 0:
        return dpre, dh, dc
    acc_dt, prec = _dot_args(dh_next.dtype, w_hh.dtype)
    _lstm_bwd_kernel[_grid(B, H)](
        dh_next, dc_next, gates, c, c_next, w_hh, dpre, dh, dc, B, H, ACC_DT=acc_dt, PREC=prec,
    )
    return dpre, dh, dc


def gru_step_forward(gx, h, w_hh, b_hh, out=None):
    """One GRU step: gx (B, 3H) = x W_ih^T + b_ih, h (B, H), w_hh (3H, H), b_hh (3H,) or None.

    Returns (h_next, saved): saved (B, 4H) = [r | z | n | gh_n], gh_n = (h w_hh^T + b_hh)
    of the n gate; both in the state's dtype.
    """
    B, H = h.shape
    h_next, saved = out or (torch.empty_like(h), torch.empty((B, 4 * H), device=h.device, dtype=h.dtype))
    if B == 0 or H == 0:
        return h_next, saved
    acc_dt, prec = _dot_args(h.dtype, w_hh.dtype)
    _gru_fwd_kernel[_grid(B, H)](
        gx, h, w_hh, b_hh if b_hh is not None else h, h_next, saved, B, H,
        HAS_BIAS=b_hh is not None, ACC_DT=acc_dt, PREC=prec,
    )
    return h_next, saved


def gru_step_backward(dh_next, saved, h, w_hh, out=None):
    """Gradients of one GRU step given dh_next (B, H) and forward's saved (B, 4H).

    Returns (dgx, dgh, dh): dgx = [dr | dz | dn] (B, 3H), the gradient w.r.t. gx;
    dgh = [dr | dz | dn r] (B, 3H), the gradient w.r.t. gh = h w_hh^T + b_hh (db_hh is its
    column sum, dW_hh += dgh^T h); dh = dh_next z + dgh @ w_hh. All in the state's dtype.
    """
    B, H = h.shape
    dgx, dgh, dh = out or (torch.empty((B, 3 * H), device=h.device, dtype=dh_next.dtype),
                           torch.empty((B, 3 * H), device=h.device, dtype=dh_next.dtype),
                           torch.empty((B, H), device=h.device, dtype=dh_next.dtype))
    if B == 0 or H == 0:
        return dgx, dgh, dh
    acc_dt, prec = _dot_args(dh_next.dtype, w_hh.dtype)
    _gru_bwd_kernel[_grid(B, H)](
        dh_next, saved, h, w_hh, dgx, dgh, dh, B, H, ACC_DT=acc_dt, PREC=prec,
    )
    return dgx, dgh, dh


def rnn_step_forward(gx, h, w_hh, relu, out=None):
    """One Elman step: gx (B, H) = x W_ih^T + b_ih + b_hh, h (B, H), w_hh (H, H) ->
    h_next = act(gx + h w_hh^T), act relu or tanh, in the state's dtype (``out``: its buffer)."""
    B, H = h.shape
    h_next = torch.empty_like(h) if out is None else out
    if B == 0 or H == 0:
        return h_next
    acc_dt, prec = _dot_args(h.dtype, w_hh.dtype)
    _rnn_fwd_kernel[_grid(B, H)](gx, h, w_hh, h_next, B, H, RELU=bool(relu), ACC_DT=acc_dt, PREC=prec)
    return h_next


def rnn_step_backward(dh_next, h_next, w_hh, relu, out=None):
    """Gradients of one Elman step given dh_next (B, H): (dpre = dh_next act', dh = dpre w_hh)."""
    B, H = h_next.shape
    dpre, dh = out or (torch.empty_like(h_next, dtype=dh_next.dtype), torch.empty_like(h_next, dtype=dh_next.dtype))
    if B == 0 or H == 0:
        return dpre, dh
    acc_dt, prec = _dot_args(dh_next.dtype, w_hh.dtype)
    _rnn_bwd_kernel[_grid(B, H)](dh_next, h_next, w_hh, dpre, dh, B, H, RELU=bool(relu), ACC_DT=acc_dt, PREC=prec)
    return dpre, dh
