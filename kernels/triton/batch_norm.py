"""Triton form of batch_norm on x (N, C, L): per-channel statistics, apply, backward.

The op layer views (N, C) as (N, C, 1) and (N, C, H, W) as (N, C, H*W). Channel c's
n = N*L values are x[:, c, :]. The op saves x, the batch mean and invstd (training) or
the running mean and invstd (eval), and the weight; y is never saved. The mean is float64
for every x dtype (kiln/ops/layer_norm.py says why); the kernels read it as two parts
hi + lo in the accumulation dtype and form (x - hi) - lo.

* stats: mean and biased var per channel. Work is split over (channel block, L block,
  block of N) so that a few channels with millions of values still fill the GPU. Each
  program reduces its (BLOCK_B, BLOCK_C, BLOCK_L) tiles to (count, mean, M2) per channel,
  the tile's own M2 taken around the tile mean and merged with Chan's formula; a second
  kernel merges the programs' summaries per channel in a fixed order (deterministic, no
  atomics). All values are first centred on a pilot mean per channel, s = x0 + mean(x -
  x0) over the channel's first tile, x0 = x[0, c, 0] (a small first kernel): a float32
  sum of values near 1e4 is off by ~1e-3, a whole std when std ~ 1e-2, while x - s is
  exact for x near s; and s, unlike x0, is much closer to the mean than a std, which
  keeps rounding far below eps * std (zero-mean channels keep a relative accuracy).
  The mean is written as s + mean_s in float64 (exact: two float32 parts).
* apply: y = (x - mean[c]) * invstd[c] * w[c] + b[c], one tile per program.
* backward: per channel sum_dy = sum dy and sum_dy_xhat = sum dy xhat, xhat =
  (x - mean) invstd, as per-program partial sums reduced in a fixed order; dw =
  sum_dy_xhat, db = sum_dy. dx = w invstd (dy - sum_dy / n - xhat sum_dy_xhat / n) in
  training, w invstd dy in eval (no reduction at all when dw / db are not asked for).
  In training backward also takes a float32 batch mean (off by half an ulp of |mean|:
  5e-4 at 1e4, 5% of a 1e-2 std): it takes out the residual mean(x - mean), formed in its
  reduction pass, and uses xhat = ((x - mean) - residual) invstd (residual ~ 0 for a
  float64 mean). In eval the given (running) mean is the definition, used as it is.

var and all sums are float32 (float64 for float64 x, which only the interpreter runs);
y, dx, dw, db have x's dtype. num_warps is autotuned on the GPU (1-16 tile elements per
thread: the 3-d tiles spill at 32 on sm_90); under TRITON_INTERPRET=1 one config runs.
``MAX_BLOCK_L``, ``TILE`` and ``PROGRAMS`` are read at each launch; tests lower them to
get several tiles and partial summaries on small shapes.
"""

import os

import torch
import triton
import triton.language as tl

from .layer_norm import _acc, _autotune, _chan, _sm_count, _split_mean  # shared helpers

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Widest block along L; the rest of a tile's TILE elements go to channels, then to N.
MAX_BLOCK_L = 512 if _INTERPRET else 1024
TILE = 2048 if _INTERPRET else 4096
# Programs of the reduction passes (stats, backward sums); None: 4 per SM.
PROGRAMS = 3 if _INTERPRET else None


def _tiles(N, C, L):
    block_l = min(triton.next_power_of_2(L), MAX_BLOCK_L)
    block_c = min(triton.next_power_of_2(C), max(1, TILE // block_l))
    block_b = min(triton.next_power_of_2(N), max(1, TILE // (block_l * block_c)))
    return block_b, block_c, block_l


def _split(x):
    """Tiles and the reduction grid: (blocks, num_cb, num_lb, span, P), P summaries a channel.

    A reduction program owns channel block cb, L block lb and the `span` rows of N from
    nb * span (span a multiple of BLOCK_B); its summary is row p = nb * num_lb + lb.
    """
    N, C, L = x.shape
    blocks = _tiles(N, C, L)
    block_b, block_c, block_l = blocks
    num_cb, num_lb = triton.cdiv(C, block_c), triton.cdiv(L, block_l)
    steps = triton.cdiv(N, block_b)
    programs = PROGRAMS if PROGRAMS is not None else 4 * _sm_count(x.device.index)
    num_nb = min(steps, max(1, programs // (num_cb * num_lb)))
    span = triton.cdiv(steps, num_nb) * block_b
    return blocks, num_cb, num_lb, span, triton.cdiv(N, span) * num_lb


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tile(n0, cs, c_mask, ls, l_mask, N, C, L, BLOCK_B: tl.constexpr):
    # Offsets and mask of the (BLOCK_B, BLOCK_C, BLOCK_L) tile x[n0 : n0 + BLOCK_B, cs, ls].
    ns = n0 + tl.arange(0, BLOCK_B)
    offs = (ns.to(tl.int64) * C * L)[:, None, None] + (cs.to(tl.int64) * L)[None, :, None] \
        + ls[None, None, :]
    mask = (ns < N)[:, None, None] & c_mask[None, :, None] & l_mask[None, None, :]
    return offs, mask


@triton.jit
def _sum_bl(t):
    # (BLOCK_B, BLOCK_C, BLOCK_L) -> (BLOCK_C,)
    return tl.sum(tl.sum(t, axis=2), axis=0)


@triton.jit
def _reduction_program(N, C, L, span, num_cb, num_lb,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    # The channels, L positions (n_l of them valid) and rows of N that this reduction
    # program owns, and the row p of the summary buffers it writes.
    pid = tl.program_id(0)
    cb = pid % num_cb
    p = pid // num_cb
    l0 = (p % num_lb) * BLOCK_L
    n_start = (p // num_lb) * span
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ls = l0 + tl.arange(0, BLOCK_L)
    n_l = tl.minimum(L - l0, BLOCK_L)
    return cs, cs < C, ls, ls < L, n_l, n_start, tl.minimum(n_start + span, N), p


@triton.jit
def _tile_coords(N, C, L, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    # Elementwise kernels: one tile per program, programs ordered (N block, C block, L block).
    pid = tl.program_id(0)
    num_lb = tl.cdiv(L, BLOCK_L)
    num_cb = tl.cdiv(C, BLOCK_C)
    cs = ((pid // num_lb) % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    ls = (pid % num_lb) * BLOCK_L + tl.arange(0, BLOCK_L)
    c_mask = cs < C
    n0 = (pid // (num_lb * num_cb)) * BLOCK_B
    offs, mask = _tile(n0, cs, c_mask, ls, ls < L, N, C, L, BLOCK_B)
    return offs, mask, cs, c_mask


# ----------------------------------------------------------------------------- kernels


@_autotune(key=["N", "C", "L", "BLOCK_B", "BLOCK_C", "BLOCK_L"], per_thread=16)
@triton.jit
def _shift_kernel(
    x_ptr, shift_ptr, N, C, L,
    ACC_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # Pilot mean of each channel, x0 + mean(x - x0) over its first tile, x0 = x[0, c, 0].
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    ls = tl.arange(0, BLOCK_L)
    offs, mask = _tile(0, cs, c_mask, ls, ls < L, N, C, L, BLOCK_B)
    x0 = tl.load(x_ptr + cs.to(tl.int64) * L, mask=c_mask, other=0.0).to(ACC_DT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
    count = (tl.minimum(N, BLOCK_B) * tl.minimum(L, BLOCK_L)).to(ACC_DT)
    shift = x0 + _sum_bl(tl.where(mask, x - x0[None, :, None], 0.0)) / count
    tl.store(shift_ptr + cs, shift, mask=c_mask)


@_autotune(key=["N", "C", "L", "BLOCK_B", "BLOCK_C", "BLOCK_L"], per_thread=16)
@triton.jit
def _stats_partial_kernel(
    x_ptr, shift_ptr, mean_ptr, m2_ptr, N, C, L, span, num_cb, num_lb,
    ACC_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    cs, c_mask, ls, l_mask, n_l, n_start, n_end, p = _reduction_program(
        N, C, L, span, num_cb, num_lb, BLOCK_C, BLOCK_L)
    shift = tl.load(shift_ptr + cs, mask=c_mask, other=0.0)
    count = tl.zeros((BLOCK_C,), ACC_DT)
    mean = tl.zeros((BLOCK_C,), ACC_DT)
    m2 = tl.zeros((BLOCK_C,), ACC_DT)
    for n0 in range(n_start, n_end, BLOCK_B):
        offs, mask = _tile(n0, cs, c_mask, ls, l_mask, N, C, L, BLOCK_B)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        xs = tl.where(mask, x - shift[None, :, None], 0.0)
        n_b = (tl.minimum(N - n0, BLOCK_B) * n_l).to(ACC_DT)
        mean_b = _sum_bl(xs) / n_b
        d = tl.where(mask, xs - mean_b[None, :, None], 0.0)
        count, mean, m2 = _chan(count, mean, m2, n_b, mean_b, _sum_bl(d * d))
    out = p.to(tl.int64) * C + cs
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)


@_autotune(key=["P", "C", "BLOCK_P", "BLOCK_C"], per_thread=16)
@triton.jit
def _stats_merge_kernel(
    shift_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr, N, C, L, P, span, num_lb,
    ACC_DT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    count = tl.zeros((BLOCK_C,), ACC_DT)
    mean = tl.zeros((BLOCK_C,), ACC_DT)
    m2 = tl.zeros((BLOCK_C,), ACC_DT)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_mask = ps < P
        # summary p covers rows [nb span, +span) of N and L block lb (see _reduction_program)
        rows = tl.minimum(N - (ps // num_lb) * span, span).to(ACC_DT)
        cnt = rows * tl.minimum(L - (ps % num_lb) * BLOCK_L, BLOCK_L).to(ACC_DT)
        cnt = tl.where(p_mask, cnt, 0.0)[:, None]
        offs = ps.to(tl.int64)[:, None] * C + cs[None, :]
        mask = p_mask[:, None] & c_mask[None, :]
        pm = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        # the BLOCK_P summaries at once: exact mean first, then M2 around it
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt * pm, axis=0) / n_b
        dev = pm - mean_b[None, :]
        m2_b = tl.sum(tl.load(pm2_ptr + offs, mask=mask, other=0.0) + cnt * dev * dev, axis=0)
        count, mean, m2 = _chan(count, mean, m2, n_b, mean_b, m2_b)
    shift = tl.load(shift_ptr + cs, mask=c_mask, other=0.0)
    mean = shift.to(mean_ptr.dtype.element_ty) + mean.to(mean_ptr.dtype.element_ty)
    tl.store(mean_ptr + cs, mean, mask=c_mask)
    tl.store(var_ptr + cs, (m2 / count).to(var_ptr.dtype.element_ty), mask=c_mask)


@_autotune(key=["N", "C", "L", "HAS_W", "HAS_B", "BLOCK_B", "BLOCK_C", "BLOCK_L"], per_thread=16)
@triton.jit
def _apply_kernel(
    x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, y_ptr, N, C, L,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC_DT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    offs, mask, cs, c_mask = _tile_coords(N, C, L, BLOCK_B, BLOCK_C, BLOCK_L)
    hi, lo = _split_mean(mean_ptr + cs, c_mask, ACC_DT)
    scale = tl.load(invstd_ptr + cs, mask=c_mask, other=0.0).to(ACC_DT)
    if HAS_W:
        scale = scale * tl.load(w_ptr + cs, mask=c_mask, other=0.0).to(ACC_DT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
    y = ((x - hi[None, :, None]) - lo[None, :, None]) * scale[None, :, None]
    if HAS_B:
        y = y + tl.load(b_ptr + cs, mask=c_mask, other=0.0).to(ACC_DT)[None, :, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@_autotune(key=["N", "C", "L", "TRAINING", "BLOCK_B", "BLOCK_C", "BLOCK_L"], per_thread=16)
@triton.jit
def _bwd_partial_kernel(
    dy_ptr, x_ptr, mean_ptr, s_dy_ptr, s_dyxs_ptr, s_xs_ptr, N, C, L, span, num_cb, num_lb,
    TRAINING: tl.constexpr, ACC_DT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # This program's sums of dy, dy (x - mean) and (training) x - mean, per channel.
    cs, c_mask, ls, l_mask, _, n_start, n_end, p = _reduction_program(
        N, C, L, span, num_cb, num_lb, BLOCK_C, BLOCK_L)
    hi, lo = _split_mean(mean_ptr + cs, c_mask, ACC_DT)
    s_dy = tl.zeros((BLOCK_C,), ACC_DT)
    s_dyxs = tl.zeros((BLOCK_C,), ACC_DT)
    s_xs = tl.zeros((BLOCK_C,), ACC_DT)
    for n0 in range(n_start, n_end, BLOCK_B):
        offs, mask = _tile(n0, cs, c_mask, ls, l_mask, N, C, L, BLOCK_B)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        xs = tl.where(mask, (x - hi[None, :, None]) - lo[None, :, None], 0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        s_dy += _sum_bl(dy)
        s_dyxs += _sum_bl(dy * xs)
        if TRAINING:
            s_xs += _sum_bl(xs)
    out = p.to(tl.int64) * C + cs
    tl.store(s_dy_ptr + out, s_dy, mask=c_mask)
    tl.store(s_dyxs_ptr + out, s_dyxs, mask=c_mask)
    if TRAINING:
        tl.store(s_xs_ptr + out, s_xs, mask=c_mask)


@_autotune(key=["P", "C", "TRAINING", "NEED_DW", "NEED_DB", "BLOCK_P", "BLOCK_C"], per_thread=16)
@triton.jit
def _bwd_reduce_kernel(
    s_dy_ptr, s_dyxs_ptr, s_xs_ptr, invstd_ptr, sums_ptr, dw_ptr, db_ptr, P, C, n,
    TRAINING: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    ACC_DT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Sums the P partial rows in a fixed order; writes sums = (sum_dy, sum_dy_xhat,
    # residual of the mean) per channel, and dw / db.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    s_dy = tl.zeros((BLOCK_C,), ACC_DT)
    s_dyxs = tl.zeros((BLOCK_C,), ACC_DT)
    s_xs = tl.zeros((BLOCK_C,), ACC_DT)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        offs = ps.to(tl.int64)[:, None] * C + cs[None, :]
        mask = (ps < P)[:, None] & c_mask[None, :]
        s_dy += tl.sum(tl.load(s_dy_ptr + offs, mask=mask, other=0.0), axis=0)
        s_dyxs += tl.sum(tl.load(s_dyxs_ptr + offs, mask=mask, other=0.0), axis=0)
        if TRAINING:
            s_xs += tl.sum(tl.load(s_xs_ptr + offs, mask=mask, other=0.0), axis=0)
    res = s_xs / n  # 0 in eval
    # sum dy ((x - mean) - res) invstd
    s_dyxhat = (s_dyxs - res * s_dy) * tl.load(invstd_ptr + cs, mask=c_mask, other=0.0).to(ACC_DT)
    tl.store(sums_ptr + cs, s_dy, mask=c_mask)
    tl.store(sums_ptr + C + cs, s_dyxhat, mask=c_mask)
    tl.store(sums_ptr + 2 * C + cs, res, mask=c_mask)
    if NEED_DW:
        tl.store(dw_ptr + cs, s_dyxhat.to(dw_ptr.dtype.element_ty), mask=c_mask)
    if NEED_DB:
        tl.store(db_ptr + cs, s_dy.to(db_ptr.dtype.element_ty), mask=c_mask)


@_autotune(key=["N", "C", "L", "TRAINING", "HAS_W", "BLOCK_B", "BLOCK_C", "BLOCK_L"], per_thread=16)
@triton.jit
def _bwd_dx_kernel(
    dy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, sums_ptr, dx_ptr, N, C, L, n,
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, ACC_DT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    offs, mask, cs, c_mask = _tile_coords(N, C, L, BLOCK_B, BLOCK_C, BLOCK_L)
    invstd = tl.load(invstd_ptr + cs, mask=c_mask, other=0.0).to(ACC_DT)
    k = invstd
    if HAS_W:
        k = k * tl.load(w_ptr + cs, mask=c_mask, other=0.0).to(ACC_DT)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
    if TRAINING:
        hi, lo = _split_mean(mean_ptr + cs, c_mask, ACC_DT)
        mean_dy = tl.load(sums_ptr + cs, mask=c_mask, other=0.0) / n
        mean_dyxhat = tl.load(sums_ptr + C + cs, mask=c_mask, other=0.0) / n
        res = tl.load(sums_ptr + 2 * C + cs, mask=c_mask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        xs = (x - hi[None, :, None]) - lo[None, :, None]
        xhat = (xs - res[None, :, None]) * invstd[None, :, None]
        dx = (dy - mean_dy[None, :, None] - xhat * mean_dyxhat[None, :, None]) * k[None, :, None]
    else:
        dx = dy * k[None, :, None]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _grid(x, blocks):
    N, C, L = x.shape
    return (triton.cdiv(N, blocks[0]) * triton.cdiv(C, blocks[1]) * triton.cdiv(L, blocks[2]),)


def _reduce_blocks(P, C):
    """(BLOCK_P, BLOCK_C) of the kernels that combine the P summaries of each channel."""
    block_c = min(triton.next_power_of_2(C), TILE if _INTERPRET else 64)
    return min(triton.next_power_of_2(P), max(1, TILE // block_c)), block_c


def stats(x):
    """(mean, var) per channel of x (N, C, L) over its N*L values; biased var.

    mean (C,) float64, var (C,) float32 (float64 for float64 x).
    """
    N, C, L = x.shape
    tl_acc, torch_acc = _acc(x.dtype)
    mean = torch.empty(C, dtype=torch.float64, device=x.device)
    var = torch.empty(C, dtype=torch_acc, device=x.device)
    if C == 0:
        return mean, var
    if N * L == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    blocks, num_cb, num_lb, span, P = _split(x)
    tile_args = dict(ACC_DT=tl_acc, BLOCK_B=blocks[0], BLOCK_C=blocks[1], BLOCK_L=blocks[2])
    shift = torch.empty(C, dtype=torch_acc, device=x.device)
    _shift_kernel[(num_cb,)](x, shift, N, C, L, **tile_args)
    pmean = torch.empty((P, C), dtype=torch_acc, device=x.device)
    pm2 = torch.empty((P, C), dtype=torch_acc, device=x.device)
    _stats_partial_kernel[(num_cb * P,)](
        x, shift, pmean, pm2, N, C, L, span, num_cb, num_lb, **tile_args,
    )
    block_p, block_c = _reduce_blocks(P, C)
    _stats_merge_kernel[(triton.cdiv(C, block_c),)](
        shift, pmean, pm2, mean, var, N, C, L, P, span, num_lb,
        ACC_DT=tl_acc, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_L=blocks[2],
    )
    return mean, var


def apply(x, mean, invstd, weight, bias):
    """y = (x - mean[c]) * invstd[c] * weight[c] + bias[c] for x (N, C, L); x.dtype.

    mean (C,) float64 or float32, invstd (C,) float32 / float64; weight, bias (C,) x.dtype
    or None.
    """
    N, C, L = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    blocks = _tiles(N, C, L)
    _apply_kernel[_grid(x, blocks)](
        x, mean, invstd, weight if weight is not None else x, bias if bias is not None else x,
        y, N, C, L,
        HAS_W=weight is not None, HAS_B=bias is not None, ACC_DT=_acc(x.dtype)[0],
        BLOCK_B=blocks[0], BLOCK_C=blocks[1], BLOCK_L=blocks[2],
    )
    return y


def backward(dy, x, mean, invstd, weight, training: bool,
             need_dx: bool, need_dw: bool, need_db: bool):
    """(dx, dw, db) of batch_norm from dy (N, C, L); None where not needed.

    mean / invstd are the batch statistics (training) or the running ones (eval); mean
    float64 or float32. dx has x's dtype, dw and db (C,) too. need_dw is ignored without a
    weight.
    """
    N, C, L = x.shape
    training, need_dx, need_db = bool(training), bool(need_dx), bool(need_db)
    need_dw = bool(need_dw) and weight is not None
    tl_acc, torch_acc = _acc(x.dtype)
    dev = x.device
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty(C, dtype=x.dtype, device=dev) if need_dw else None
    db = torch.empty(C, dtype=x.dtype, device=dev) if need_db else None
    if x.numel() == 0:  # empty sums
        return tuple(None if t is None else t.zero_() for t in (dx, dw, db))
    blocks = _tiles(N, C, L)
    tile_args = dict(ACC_DT=tl_acc, BLOCK_B=blocks[0], BLOCK_C=blocks[1], BLOCK_L=blocks[2])
    sums = x  # never read when nothing is reduced (eval dx alone)
    if need_dw or need_db or (need_dx and training):
        _, num_cb, num_lb, span, P = _split(x)
        part = lambda: torch.empty((P, C), dtype=torch_acc, device=dev)
        s_dy, s_dyxs, s_xs = part(), part(), (part() if training else x)
        _bwd_partial_kernel[(num_cb * P,)](
            dy, x, mean, s_dy, s_dyxs, s_xs, N, C, L, span, num_cb, num_lb,
            TRAINING=training, **tile_args,
        )
        sums = torch.empty((3, C), dtype=torch_acc, device=dev)
        block_p, block_c = _reduce_blocks(P, C)
        _bwd_reduce_kernel[(triton.cdiv(C, block_c),)](
            s_dy, s_dyxs, s_xs, invstd, sums, dw if need_dw else x, db if need_db else x,
            P, C, N * L,
            TRAINING=training, NEED_DW=need_dw, NEED_DB=need_db,
            ACC_DT=tl_acc, BLOCK_P=block_p, BLOCK_C=block_c,
        )
    if need_dx:
        _bwd_dx_kernel[_grid(x, blocks)](
            dy, x, mean, invstd, weight if weight is not None else x, sums, dx, N, C, L, N * L,
            TRAINING=training, HAS_W=weight is not None, **tile_args,
        )
    return dx, dw, db
