"""Triton form of layer_norm over the last dim of x (M, N), forward and backward.

* forward: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps), biased variance. It
  writes y and the per-row mean and rstd: with x and w they are all that backward needs
  (the op saves x, weight, mean, rstd; of the bias only whether it exists). The mean is
  float64 for every x dtype (kiln/ops/layer_norm.py says why); the kernels read it as two
  parts hi + lo in the accumulation dtype and form (x - hi) - lo.
* backward: xhat = (x - mean) * rstd, wdy = dy * w, dx = rstd (wdy - xhat mean(wdy xhat)
  - mean(wdy)); dw = sum over rows of dy xhat, db = sum over rows of dy.

Statistics. Each row is centred on a pilot mean before anything is summed: s = x0 +
mean(x - x0) over the row's first chunk, x0 = x[row, 0], rounded to float32. A float32 sum
of values near 1e4 is off by ~1e-3, a whole std when std ~ 1e-2, while x - s is exact for
x near s; and s (not x0, a std away from the mean) keeps the sums' rounding far below
eps * std, so that a mean ~1e-2 std (zero-mean rows) still has float32 relative accuracy.
The mean of x - s comes first, then the variance as the mean of squared deviations
(never E[x^2] - E[x]^2, which cancels). A row that fits in BLOCK_N (<= MAX_BLOCK_N)
stays in registers; a longer one is streamed: its first chunk for s, then chunk
statistics (count, mean, M2) merged with Chan's formula, then y. y is formed from the
unrounded mean_s; the stored mean is s + mean_s in float64 (exact: two float32 parts).

Backward also takes a float32 mean (rounded by half an ulp of |mean|: 5e-4 at 1e4, 5% of a
1e-2 std): it takes out the residual c = mean_row(x - mean), formed from x in the pass that
forms its other row sums, and uses xhat = ((x - mean) - c) * rstd (c ~ 0 for a float64
mean).

dw / db are deterministic, without atomics: program p owns the rows [p R, (p + 1) R) and
sums dy xhat and dy over them in float32 into row p of a (programs, N) buffer (kept in
registers for on-chip rows; for streamed rows the program read-modify-writes its own
buffer row chunk by chunk); a second kernel sums the buffer's rows in a fixed order.

rstd and every sum are float32 (float64 for float64 x, which only the interpreter runs);
y, dx, dw, db have x's dtype. num_warps is autotuned on the GPU (pruned to 1-32
tile elements per thread, 1-8 in backward); under TRITON_INTERPRET=1 one config runs.
``MAX_BLOCK_N``, ``MAX_BLOCK_N_BWD``, ``CHUNK_N_BWD``, ``TILE`` and ``PROGRAMS`` are read
at each launch; tests lower them to reach the streamed path and several partial rows on
small shapes.
"""

import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Widest row kept in registers; forward streams longer rows in chunks of this width.
# Backward holds about twice as many row-sized values (x, dy, w, xhat, wdy, the dw / db
# sums): on-chip rows up to 4096 and streamed chunks of 2048, the widest that ptxas -v
# (sm_90) compiles without spills, at 8 tile elements per thread.
MAX_BLOCK_N = 2048 if _INTERPRET else 8192
MAX_BLOCK_N_BWD = 2048 if _INTERPRET else 4096
CHUNK_N_BWD = 2048
# Target elements per program (BLOCK_R rows of BLOCK_N) when rows are short.
TILE = 2048 if _INTERPRET else 4096
# Row blocks of backward (rows of the dw / db partial buffers); None: 4 per SM.
PROGRAMS = 3 if _INTERPRET else None

_NUM_WARPS = [1, 2, 4, 8, 16]


def _prune(configs, per_thread, kwargs):
    # Registers grow with the tile (the product of the BLOCK_* sizes) per thread: keep the
    # configs with 1 to per_thread tile elements a thread (ptxas -v: no spills there).
    tile = 1
    for name, value in kwargs.items():
        if name.startswith("BLOCK_"):
            tile *= value
    kept = [c for c in configs if 32 * c.num_warps <= tile <= 32 * per_thread * c.num_warps]
    return kept or [(min if tile < 32 else max)(configs, key=lambda c: c.num_warps)]


def _autotune(key, per_thread=32):
    if _INTERPRET:
        return triton.autotune(configs=[triton.Config({}, num_warps=4, num_stages=1)], key=key)
    prune = lambda configs, named_args, **kwargs: _prune(configs, per_thread, kwargs)
    return triton.autotune(
        configs=[triton.Config({}, num_warps=w) for w in _NUM_WARPS], key=key,
        prune_configs_by={"early_config_prune": prune},
    )


def _acc(dtype):
    """(triton, torch) accumulation dtype: float64 stays float64, everything else float32."""
    if dtype == torch.float64:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _blocks(M, N, max_block_n, chunk=None):
    """(BLOCK_R, BLOCK_N): the whole row when it fits max_block_n, else chunks of `chunk`."""
    block_n = triton.next_power_of_2(max(N, 1))
    if block_n > max_block_n:
        block_n = min(chunk or max_block_n, max_block_n)
    block_r = min(triton.next_power_of_2(max(M, 1)), max(1, TILE // block_n))
    return block_r, block_n


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _rsqrt(v, ACC_DT: tl.constexpr):
    # sqrt_rn (IEEE) takes float32 only; float64 runs on the interpreter, where sqrt is exact.
    if ACC_DT == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = 1.0 / tl.sqrt_rn(v)
    return r


@triton.jit
def _load_centered(ptrs, mask, center, ACC_DT: tl.constexpr):
    # x - center (one value per row), 0 on masked lanes so that sums need no more masking.
    x = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DT)
    return tl.where(mask, x - center[:, None], 0.0)


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Chan's merge of two (count, mean, M2) summaries, n_b > 0: no cancellation anywhere.
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / n
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a * frac)


@triton.jit
def _split_mean(ptrs, mask, ACC_DT: tl.constexpr):
    # A saved mean (float64, or float32) as hi + lo in ACC_DT: (x - hi) - lo keeps the
    # per-element arithmetic in ACC_DT yet exact near the mean.
    m = tl.load(ptrs, mask=mask, other=0.0)
    hi = m.to(ACC_DT)
    return hi, (m - hi.to(m.dtype)).to(ACC_DT)


@triton.jit
def _load_xs(ptrs, mask, hi, lo, ACC_DT: tl.constexpr):
    # (x - hi) - lo per row, 0 on masked lanes.
    x = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DT)
    return tl.where(mask, (x - hi[:, None]) - lo[:, None], 0.0)


@triton.jit
def _times_w(dy, w_ptr, cols, col_mask, HAS_W: tl.constexpr, ACC_DT: tl.constexpr):
    # w dy for one (BLOCK_R, BLOCK_N) chunk; dy itself without a weight.
    if HAS_W:
        dy = dy * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)[None, :]
    return dy


@triton.jit
def _add_partial(ptrs, v, mask, first):
    # A program's partial row: its first rows store v (the buffer starts uninitialised),
    # later ones add v. (Folding `first` into the load mask, `mask & (r0 > row_start)`,
    # makes the interpreter, triton 3.9, build an integer mask and fail.)
    prev = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, tl.where(first, 0.0, prev) + v, mask=mask)


@triton.jit
def _store_y(y_ptrs, d, rstd, w_ptr, b_ptr, cols, col_mask, mask,
             HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC_DT: tl.constexpr):
    # y = d * rstd * w + b for one (BLOCK_R, BLOCK_N) chunk, d = x - mean.
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC_DT)[None, :]
    tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- kernels


@_autotune(key=["N", "BLOCK_R", "BLOCK_N", "HAS_W", "HAS_B"])
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ONE_CHUNK: tl.constexpr, ACC_DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    row_off = rows.to(tl.int64) * N
    x_row = x_ptr + row_off[:, None]
    y_row = y_ptr + row_off[:, None]
    cols0 = tl.arange(0, BLOCK_N)
    x0 = tl.load(x_ptr + row_off, mask=row_mask, other=0.0).to(ACC_DT)

    if ONE_CHUNK:
        col_mask = cols0 < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_row + cols0[None, :], mask=mask, other=0.0).to(ACC_DT)
        shift = x0 + tl.sum(tl.where(mask, x - x0[:, None], 0.0), axis=1) / N
        xs = tl.where(mask, x - shift[:, None], 0.0)
        mean_s = tl.sum(xs, axis=1) / N
        d = tl.where(mask, xs - mean_s[:, None], 0.0)
        rstd = _rsqrt(tl.sum(d * d, axis=1) / N + eps, ACC_DT)
        _store_y(y_row + cols0[None, :], d, rstd, w_ptr, b_ptr, cols0, col_mask, mask,
                 HAS_W, HAS_B, ACC_DT)
    else:
        mask = row_mask[:, None] & (cols0[None, :] < N)
        xs = _load_centered(x_row + cols0[None, :], mask, x0, ACC_DT)
        shift = x0 + tl.sum(xs, axis=1) / BLOCK_N  # the first chunk is full: N > BLOCK_N
        mean_s = tl.zeros((BLOCK_R,), ACC_DT)
        m2 = tl.zeros((BLOCK_R,), ACC_DT)
        for c0 in range(0, N, BLOCK_N):  # c0 values seen so far
            cols = c0 + cols0
            mask = row_mask[:, None] & (cols[None, :] < N)
            xs = _load_centered(x_row + cols[None, :], mask, shift, ACC_DT)
            n_b = tl.minimum(N - c0, BLOCK_N).to(ACC_DT)
            mean_b = tl.sum(xs, axis=1) / n_b
            d = tl.where(mask, xs - mean_b[:, None], 0.0)
            _, mean_s, m2 = _chan(c0, mean_s, m2, n_b, mean_b, tl.sum(d * d, axis=1))
        rstd = _rsqrt(m2 / N + eps, ACC_DT)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + cols0
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            # (x - s) - mean_s, never x - (s + mean_s): that sum rounds to float32
            xs = _load_centered(x_row + cols[None, :], mask, shift, ACC_DT)
            d = tl.where(mask, xs - mean_s[:, None], 0.0)
            _store_y(y_row + cols[None, :], d, rstd, w_ptr, b_ptr, cols, col_mask, mask,
                     HAS_W, HAS_B, ACC_DT)

    mean = shift.to(mean_ptr.dtype.element_ty) + mean_s.to(mean_ptr.dtype.element_ty)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=row_mask)


@_autotune(key=["N", "BLOCK_R", "BLOCK_N", "HAS_W", "NEED_DX", "NEED_DW", "NEED_DB"], per_thread=8)
@triton.jit
def _bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, M, N, rows_per_prog,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    ONE_CHUNK: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    part = pid.to(tl.int64) * N  # this program's row of the dw / db partial buffers
    cols0 = tl.arange(0, BLOCK_N)

    if ONE_CHUNK:
        col_mask = cols0 < N
        if HAS_W:
            w = tl.load(w_ptr + cols0, mask=col_mask, other=0.0).to(ACC_DT)
        dw_acc = tl.zeros((BLOCK_N,), ACC_DT)
        db_acc = tl.zeros((BLOCK_N,), ACC_DT)
        for r0 in range(row_start, row_end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols0[None, :]
            hi, lo = _split_mean(mean_ptr + rows, row_mask, ACC_DT)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(ACC_DT)
            xs = _load_xs(x_ptr + offs, mask, hi, lo, ACC_DT)
            xs = tl.where(mask, xs - (tl.sum(xs, axis=1) / N)[:, None], 0.0)  # the residual c
            xhat = xs * rstd[:, None]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
            if NEED_DX:
                wdy = dy
                if HAS_W:
                    wdy = dy * w[None, :]
                c1 = tl.sum(wdy * xhat, axis=1) / N
                c2 = tl.sum(wdy, axis=1) / N
                dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if NEED_DB:
                db_acc += tl.sum(dy, axis=0)
        if NEED_DW:
            tl.store(dw_ptr + part + cols0, dw_acc, mask=col_mask)
        if NEED_DB:
            tl.store(db_ptr + part + cols0, db_acc, mask=col_mask)
    else:
        for r0 in range(row_start, row_end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < row_end
            row_off = rows.to(tl.int64)[:, None] * N
            hi, lo = _split_mean(mean_ptr + rows, row_mask, ACC_DT)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(ACC_DT)
            # pass 1: sum xs (N times the residual c), sum wdy, sum wdy xs
            s_xs = tl.zeros((BLOCK_R,), ACC_DT)
            s_wdy = tl.zeros((BLOCK_R,), ACC_DT)
            s_wdy_xs = tl.zeros((BLOCK_R,), ACC_DT)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + cols0
                col_mask = cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                xs = _load_xs(x_ptr + row_off + cols[None, :], mask, hi, lo, ACC_DT)
                s_xs += tl.sum(xs, axis=1)
                if NEED_DX:
                    dy = tl.load(dy_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(ACC_DT)
                    wdy = _times_w(dy, w_ptr, cols, col_mask, HAS_W, ACC_DT)
                    s_wdy += tl.sum(wdy, axis=1)
                    s_wdy_xs += tl.sum(wdy * xs, axis=1)
            res = s_xs / N
            # mean(wdy xhat) = rstd (sum wdy xs - res sum wdy) / N
            c1 = (s_wdy_xs - res * s_wdy) * rstd / N
            c2 = s_wdy / N
            # pass 2: dx, and this program's partial sums, chunk by chunk
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + cols0
                col_mask = cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                offs = row_off + cols[None, :]
                xs = _load_xs(x_ptr + offs, mask, hi, lo, ACC_DT)
                xhat = tl.where(mask, xs - res[:, None], 0.0) * rstd[:, None]
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
                if NEED_DX:
                    wdy = _times_w(dy, w_ptr, cols, col_mask, HAS_W, ACC_DT)
                    dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                first = r0 == row_start
                if NEED_DW:
                    _add_partial(dw_ptr + part + cols, tl.sum(dy * xhat, axis=0), col_mask, first)
                if NEED_DB:
                    _add_partial(db_ptr + part + cols, tl.sum(dy, axis=0), col_mask, first)
            # the next rows' reads of the partial row must see these writes from every thread
            tl.debug_barrier()


@_autotune(key=["B", "N", "BLOCK_R", "BLOCK_N"])
@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, B, N, ACC_DT: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # out[n] = sum_b part[b, n], always in the same order: deterministic.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_N,), ACC_DT)
    for b0 in range(0, B, BLOCK_R):
        rows = b0 + tl.arange(0, BLOCK_R)
        mask = (rows < B)[:, None] & col_mask[None, :]
        acc += tl.sum(tl.load(part_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :],
                              mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------- launchers


def forward(x, weight, bias, eps: float):
    """(y, mean, rstd) of layer_norm over the last dim of x (M, N); weight, bias (N,) or None.

    y has x's dtype; mean (M,) is float64, rstd (M,) float32 (float64 for float64 x).
    """
    M, N = x.shape
    tl_acc, torch_acc = _acc(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty(M, dtype=torch.float64, device=x.device)
    rstd = torch.empty(M, dtype=torch_acc, device=x.device)
    if M == 0 or N == 0:
        return y, mean, rstd
    block_r, block_n = _blocks(M, N, MAX_BLOCK_N)
    _fwd_kernel[(triton.cdiv(M, block_r),)](
        x, weight if weight is not None else x, bias if bias is not None else x,
        y, mean, rstd, M, N, float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, ONE_CHUNK=N <= block_n,
        ACC_DT=tl_acc, BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return y, mean, rstd


def _sum_rows(part, dtype):
    """part (B, N) summed over its rows in a fixed order, as dtype."""
    B, N = part.shape
    out = torch.empty(N, dtype=dtype, device=part.device)
    block_r, block_n = _blocks(B, N, MAX_BLOCK_N if _INTERPRET else 256)
    _sum_rows_kernel[(triton.cdiv(N, block_n),)](
        part, out, B, N, ACC_DT=_acc(part.dtype)[0], BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return out


def backward(dy, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    """(dx, dw, db) of layer_norm from dy (M, N) and forward's mean, rstd; None where not needed.

    mean may be float64 or float32. dx has x's dtype, dw and db weight's (x's) dtype.
    need_dw is ignored without a weight.
    """
    M, N = x.shape
    need_dw = bool(need_dw) and weight is not None
    dx = torch.empty_like(x) if need_dx else None
    if M == 0 or N == 0:  # empty sums
        zeros = lambda need: torch.zeros(N, dtype=x.dtype, device=x.device) if need else None
        return dx, zeros(need_dw), zeros(need_db)
    if not (need_dx or need_dw or need_db):
        return None, None, None
    tl_acc, torch_acc = _acc(x.dtype)
    block_r, block_n = _blocks(M, N, MAX_BLOCK_N_BWD, CHUNK_N_BWD)
    steps = triton.cdiv(M, block_r)
    programs = PROGRAMS if PROGRAMS is not None else 4 * _sm_count(x.device.index)
    rows_per_prog = triton.cdiv(steps, min(steps, max(1, programs))) * block_r
    grid = triton.cdiv(M, rows_per_prog)  # every program owns at least one row
    part = lambda need: torch.empty((grid, N), dtype=torch_acc, device=x.device) if need else None
    dw_part, db_part = part(need_dw), part(need_db)
    _bwd_kernel[(grid,)](
        dy, x, weight if weight is not None else x, mean, rstd,
        dx if need_dx else x, dw_part if need_dw else x, db_part if need_db else x,
        M, N, rows_per_prog,
        HAS_W=weight is not None, NEED_DX=bool(need_dx), NEED_DW=need_dw, NEED_DB=bool(need_db),
        ONE_CHUNK=N <= block_n, ACC_DT=tl_acc, BLOCK_R=block_r, BLOCK_N=block_n,
    )
    dw = _sum_rows(dw_part, x.dtype) if need_dw else None
    db = _sum_rows(db_part, x.dtype) if need_db else None
    return dx, dw, db
