"""CPU form of linear_act: y = act(x @ W^T + b), numba around torch's BLAS.

A hand-rolled GEMM in numba runs at a fraction of MKL's rate (DESIGN.md), so the
products come from torch (torch.mm, MKL) and everything around them is numba:

* forward: rows in blocks (tall enough for MKL, small enough for L3), each block's
  ``torch.mm`` followed at once by the numba pass that adds the bias, applies the activation
  and (for gelu, gelu_tanh, silu) keeps z, while the block is in cache. With no activation,
  dropout or saved output the product is one ``torch.addmm``. (oneDNN's linear with the
  weight packed per call, used here before, measured 1.10-1.37x MKL's time on the idle
  2-core machine at every shape tried, 3072x128x128 to 4096x1024x4096: a weight used once
  does not repay its packing.)
* backward: per row block, one numba pass makes dz = dy * act'(saved) and adds its
  column sums into db (fixed row parts with their own partial sums: deterministic,
  no atomics);
  dx for the block is multiplied out while dz is in cache; dW = dz^T x is one GEMM
  at the end, which needs all of dz, so dz is one (M, N) buffer in backward.
* with 2+ numba threads and layers whose rows per thread fit a block (_fused_tasks), both
  run instead as one numba parallel region, each thread's rows multiplied by MKL's
  sequential GEMM called from numba (blas.mkl_gemm) and their epilogue / dz pass run
  right after: torch's OpenMP team and numba's (two libgomp copies in one process) no
  longer hand the cores to each other, and spin on them, between the steps.

Dropout (p > 0) is fused into both passes: forward multiplies each activated element by
scale = 1/(1-p) or 0, the keep bit regenerated from Philox(seed, offset + row * N + col)
(philox.py, the rule of ops/random.py); backward's dz pass multiplies dy by the same factor
before act'. The second output that act' reads is z for gelu / gelu_tanh / silu and, with
dropout, act(z) before dropout for tanh / sigmoid (their y is scaled and zeroed); relu's
act' reads the dropped-out y itself (y > 0 exactly where z > 0 and the element is kept, and
dropped elements have no gradient anyway).

float32 and float64; math accumulates in the storage dtype except db (float64).
"""

import numpy as np
import torch
from numba import get_num_threads, njit, prange

from ..activations import GELU, GELU_TANH, GELU_TANH_CUBIC, IDENTITY, INV_SQRT_2, INV_SQRT_2PI
from ..activations import RELU, SIGMOID, SILU, SQRT_2_OVER_PI, TANH
from .blas import MKL_THREADS, mkl_gemm, mkl_set_num_threads_local
from .fastmath import KERNEL_OPTIONS, exp, like, one_plus_erf, one_plus_erf_and_gauss, tanh
from .memory import empty
from .parallel import GRAIN, sized_kernel
from .philox import key_of, keeps

# A row block must be tall: each torch.mm call packs all of W again, so short blocks
# spend their time repacking (32-row blocks of 4096x1024 @ 1024x4096 ran at half of one
# whole mm; 512-row blocks matched it). A block of y up to 8 MiB still sits in L3 when
# the epilogue reads it back.
_BLOCK_BYTES = 8 << 20
_MIN_BLOCK_ROWS = 256
_DB_PARTS = 8  # row parts of the dz pass, each with its own db partial sums


def _rows_per_block(n_cols: int, itemsize: int) -> int:
    return max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // max(1, n_cols * itemsize))


@njit(inline="always")
def _sigmoid(z):
    # exp of a non-positive argument only: no overflow for large |z|.
    one = like(z, 1.0)
    e = exp(-abs(z))
    return one / (one + e) if z >= 0 else e / (one + e)


@njit(inline="always")
def _relu(z):
    # z * 0 keeps NaN (like(): a bare 0 would make the float32 loop compute in float64). The
    # + 0 makes the stored value differ from the loaded one for z > 0: in place, LLVM turns
    # "store z back where z > 0" into a masked store (vmaskmovps), which AMD cores run at a
    # fifth of a plain store's rate (1M float32: 0.50 ms against 0.09 ms).
    zero = like(z, 0.0)
    return (z if z > 0 else z * zero) + zero


@njit(inline="always")
def _gelu(z):
    return like(z, 0.5) * z * one_plus_erf(z * like(z, INV_SQRT_2))


@njit(inline="always")
def _gelu_tanh(z):
    u = like(z, SQRT_2_OVER_PI) * (z + like(z, GELU_TANH_CUBIC) * z * z * z)
    return like(z, 0.5) * z * (like(z, 1.0) + tanh(u))


@njit(inline="always")
def _silu(z):
    return z * _sigmoid(z)


@njit(inline="always")
def _act_row(row, code):
    """row <- act(row). One loop per activation: a switch inside the loop would keep
    LLVM from vectorizing it."""
    n = row.size
    if code == RELU:
        for j in range(n):
            row[j] = _relu(row[j])
    elif code == GELU:
        for j in range(n):
            row[j] = _gelu(row[j])
    elif code == GELU_TANH:
        for j in range(n):
            row[j] = _gelu_tanh(row[j])
    elif code == TANH:
        for j in range(n):
            row[j] = tanh(row[j])
    elif code == SIGMOID:
        for j in range(n):
            row[j] = _sigmoid(row[j])
    elif code == SILU:
        for j in range(n):
            row[j] = _silu(row[j])


@njit(inline="always")
def _gelu_grad(z):
    # Phi(z) + z phi(z), phi(z) = e^{-z^2/2} / sqrt(2 pi): the exp of erf's x = z / sqrt(2)
    cdf_twice, gauss = one_plus_erf_and_gauss(z * like(z, INV_SQRT_2))
    return like(z, 0.5) * cdf_twice + z * like(z, INV_SQRT_2PI) * gauss


@njit(inline="always")
def _gelu_tanh_grad(z):
    one, half, c = like(z, 1.0), like(z, 0.5), like(z, GELU_TANH_CUBIC)
    t = tanh(like(z, SQRT_2_OVER_PI) * (z + c * z * z * z))
    du = like(z, SQRT_2_OVER_PI) * (one + like(z, 3.0) * c * z * z)
    return half * (one + t) + half * z * (one - t * t) * du


@njit(inline="always")
def _silu_grad(z):
    sg = _sigmoid(z)
    return sg * (like(z, 1.0) + z * (like(z, 1.0) - sg))


@njit(inline="always")
def _grad_row(dz, dy, s, code):
    """dz <- dy * act'(z), from s: the output y for relu, tanh, sigmoid; z for the others."""
    n = dz.size
    if code == RELU:
        for j in range(n):
            dz[j] = dy[j] if s[j] > 0 else dy[j] * like(dy[j], 0.0)
    elif code == TANH:
        for j in range(n):
            dz[j] = dy[j] * (like(s[j], 1.0) - s[j] * s[j])
    elif code == SIGMOID:
        for j in range(n):
            dz[j] = dy[j] * (s[j] * (like(s[j], 1.0) - s[j]))
    elif code == GELU:
        for j in range(n):
            dz[j] = dy[j] * _gelu_grad(s[j])
    elif code == GELU_TANH:
        for j in range(n):
            dz[j] = dy[j] * _gelu_tanh_grad(s[j])
    elif code == SILU:
        for j in range(n):
            dz[j] = dy[j] * _silu_grad(s[j])
    else:
        dz[:] = dy


@njit(inline="always")
def _dropout_row(row, first, k0, k1, threshold, scale):
    """row[j] *= scale or 0, the keep bit of counter first + j; a dropped NaN stays NaN."""
    zero = scale * like(scale, 0.0)
    for j in range(row.size):
        row[j] *= scale if keeps(k0, k1, first + np.uint64(j), threshold) else zero


@njit(inline="always")
def _act_row_from(dst, src, code):
    """dst <- act(src) for two distinct rows (gelu, gelu_tanh, silu, whose z is kept): a
    loop reading and writing one row does not vectorize when the two might alias (LLVM's
    runtime overlap check fails for the very same row and it runs the scalar loop), so the
    in-place form is _act_row."""
    n = dst.size
    if code == GELU:
        for j in range(n):
            dst[j] = _gelu(src[j])
    elif code == GELU_TANH:
        for j in range(n):
            dst[j] = _gelu_tanh(src[j])
    elif code == SILU:
        for j in range(n):
            dst[j] = _silu(src[j])
    else:
        dst[:] = src
        _act_row(dst, code)


@sized_kernel(fastmath={"contract"})
def _epilogue(y, z, from_z, after_act, save_after_act, code, drop, row0, k0, k1, offset, threshold, scale,
              one_thread):
    """On one block (rows row0.. of the output), whose product (bias included) is in z when
    from_z, else in y itself: y <- act(product), then times the dropout factor when drop;
    after_act <- act(product) before dropout when save_after_act.

    One loop per step over a row that sits in L1: branch-free inner loops vectorize. With
    one thread (one_thread: numba's count, read by the caller: asking for it in here keeps the
    kernel out of numba's cache) and nothing but the activation to do, one loop over the
    whole block instead:
    LLVM compiles gelu's loop nested in a loop over rows (or chunks) with its constants
    reloaded each iteration, 1M float32 in 0.70 ms against 0.50 ms as a single loop.
    """
    rows, cols = y.shape
    if not drop and not save_after_act and one_thread:
        if from_z:
            _act_row_from(y.reshape(y.size), z.reshape(z.size), code)
        else:
            _act_row(y.reshape(y.size), code)
        return
    for i in prange(rows):
        row = y[i]
        if from_z:
            _act_row_from(row, z[i], code)
        else:
            _act_row(row, code)
        if save_after_act:
            after_act[i, :] = row
        if drop:
            _dropout_row(row, offset + np.uint64((row0 + i) * cols), k0, k1, threshold, scale)


@sized_kernel(fastmath={"contract"})
def _grad_preact(dy, saved, has_saved, dz, db_parts, code, drop, row0, k0, k1, offset, threshold, scale,
                 one_thread):
    """dz = dy * act'(saved) (times forward's dropout factor when drop) for one block,
    rows row0.. of the output; db_parts[p] += column sums of part p's rows.

    The rows split into a fixed number of parts (not one per thread), each summed in
    order into its own float64 row of db_parts: the result does not depend on the
    thread count or schedule. Whole rows per thread stream through memory; column
    chunks per thread ran at half the speed. With one thread and no dropout, dz is one loop
    over the whole block first (as _epilogue's, for the same reason) and the parts then sum it.
    """
    rows, cols = dy.shape
    parts = db_parts.shape[0]
    per_part = (rows + parts - 1) // parts
    if one_thread and has_saved and not drop:
        _grad_row(dz.reshape(dz.size), dy.reshape(dy.size), saved.reshape(saved.size), code)
        for p in range(parts):
            col_sum = db_parts[p]
            for i in range(p * per_part, min(rows, (p + 1) * per_part)):
                dz_row = dz[i]
                for j in range(cols):
                    col_sum[j] += dz_row[j]
        return
    for p in prange(parts):
        col_sum = db_parts[p]
        for i in range(p * per_part, min(rows, (p + 1) * per_part)):
            dz_row = dz[i]
            _grad_row(dz_row, dy[i], saved[i] if has_saved else dy[i], code if has_saved else IDENTITY)
            if drop:
                _dropout_row(dz_row, offset + np.uint64((row0 + i) * cols), k0, k1, threshold, scale)
            for j in range(cols):
                col_sum[j] += dz_row[j]


@sized_kernel(fastmath={"contract"})
def _column_sums(dy, db_parts):
    """db_parts[p] += column sums of part p's rows of dy: _grad_preact's db for an identity
    activation without dropout, where dz is dy itself and need not be written."""
    rows = dy.shape[0]
    parts = db_parts.shape[0]
    per_part = (rows + parts - 1) // parts
    for p in prange(parts):
        col_sum = db_parts[p]
        for i in range(p * per_part, min(rows, (p + 1) * per_part)):
            row = dy[i]
            for j in range(row.size):
                col_sum[j] += row[j]


# ---------------------------------------------------------------------------------------
# The one-region forms: each numba thread multiplies its own rows with MKL's sequential GEMM
# (blas.mkl_gemm, MKL_Set_Num_Threads_Local(1) on the worker) and runs the epilogue on them
# at once, while they are in its cache. The blocked forms above hand the cores from torch's
# OpenMP team (the GEMM) to numba's (the passes) and back at every step: two libgomp teams
# in one process (torch's own copy and the system's), whose idle workers spin for a while
# after each region on the very cores the other team needs.


@njit(**{**KERNEL_OPTIONS, "fastmath": {"contract"}})
def _fused_forward(x, weight, bias, has_bias, y, z, save_z, code, tasks):
    """y = act(x W^T + b) without dropout; z = x W^T + b too when save_z. Task t: rows
    [t M / tasks, (t + 1) M / tasks), their product into z (save_z) or y (the bias first
    written to the rows and the GEMM's beta 1, as addmm), then the activation as one loop
    over the task's rows (a loop nested in a row loop compiles slower: _epilogue)."""
    M, K = x.shape
    N = weight.shape[0]
    y_flat = y.reshape(y.size)
    z_flat = z.reshape(z.size)
    for t in prange(tasks):
        r0, r1 = t * M // tasks, (t + 1) * M // tasks
        if r1 > r0:
            product = z if save_z else y
            if has_bias:
                for i in range(r0, r1):
                    product[i, :] = bias
            previous = mkl_set_num_threads_local(1)
            mkl_gemm(1, 0, N, r1 - r0, K, weight, K, x[r0:], K, 1.0 if has_bias else 0.0, product[r0:], N)
            mkl_set_num_threads_local(previous)
            if save_z:
                _act_row_from(y_flat[r0 * N:r1 * N], z_flat[r0 * N:r1 * N], code)
            else:
                _act_row(y_flat[r0 * N:r1 * N], code)


@njit(**{**KERNEL_OPTIONS, "fastmath": {"contract"}})
def _fused_backward(dy, saved, weight, x, dz, dx, dw, db_parts, code, need_dx, need_dw, tasks):
    """Without dropout, from saved (z or y, as _grad_row reads it): dz = dy act'(saved),
    db_parts[p] += column sums of part p's rows (parts fixed, as _grad_preact's: the sums do
    not depend on the thread count), dx = dz W for each task's rows while its dz is in cache;
    then dW = dz^T x by blocks of dW's rows, one per task. dz is one loop over the task's
    rows, then summed (as _grad_preact with one thread)."""
    M, N = dy.shape
    K = x.shape[1]
    parts = db_parts.shape[0]
    per_part = (M + parts - 1) // parts
    dz_flat, dy_flat, saved_flat = dz.reshape(dz.size), dy.reshape(dy.size), saved.reshape(saved.size)
    for t in prange(tasks):
        p0, p1 = t * parts // tasks, (t + 1) * parts // tasks
        r0, r1 = min(M, p0 * per_part), min(M, p1 * per_part)
        if r1 > r0:
            _grad_row(dz_flat[r0 * N:r1 * N], dy_flat[r0 * N:r1 * N], saved_flat[r0 * N:r1 * N], code)
            for p in range(p0, p1):
                col_sum = db_parts[p]
                for i in range(p * per_part, min(M, (p + 1) * per_part)):
                    dz_row = dz[i]
                    for j in range(N):
                        col_sum[j] += dz_row[j]
            if need_dx:
                previous = mkl_set_num_threads_local(1)
                mkl_gemm(0, 0, K, r1 - r0, N, weight, K, dz[r0:], N, 0.0, dx[r0:], K)
                mkl_set_num_threads_local(previous)
    if need_dw:
        for t in prange(tasks):
            n0, n1 = t * N // tasks, (t + 1) * N // tasks
            if n1 > n0:
                previous = mkl_set_num_threads_local(1)
                mkl_gemm(0, 1, K, n1 - n0, M, x, K, dz[:, n0:], N, 0.0, dw[n0:], K)
                mkl_set_num_threads_local(previous)


_team_size = get_num_threads  # the tests set a team size here to run the one-region forms on one thread


def _fused_tasks(M: int, N: int, K: int, itemsize: int):
    """The task count of the one-region forms (numba's thread count), or 0 where the blocked
    forms run: one thread (no second team to hand over to; there the blocked forms' single
    loops measured 0.1-0.2 ms faster at 1024x256x1024 gelu), no MKL to call from numba,
    fewer than GRAIN outputs, a task's rows larger than _BLOCK_BYTES (the big layers, where
    the epilogue would read its block back from memory and each task packs all of W again)
    or fewer than _MIN_BLOCK_ROWS (many threads on few rows: short GEMMs, each packing W;
    MKL's own threads share one packing), or a dimension past BLAS's 32-bit ints."""
    tasks = _team_size()
    if tasks < 2 or not MKL_THREADS or M * N < GRAIN or max(M, N, K) >= 2 ** 31:
        return 0
    rows = -(-M // tasks)
    return tasks if _MIN_BLOCK_ROWS <= rows and rows * N * itemsize <= _BLOCK_BYTES else 0


_NO_DROPOUT = {dtype: (False, *key_of(0), np.uint64(0), np.uint64(0), np.dtype(name).type(1.0))
               for dtype, name in ((torch.float32, "float32"), (torch.float64, "float64"))}


# a stand-in for an array a kernel is passed but does not read
_DUMMY = {torch.float32: np.zeros((1, 1), np.float32), torch.float64: np.zeros((1, 1), np.float64)}


def _dropout_args(p: float, seed: int, offset: int, threshold: int, dtype):
    """(drop, k0, k1, offset, threshold, scale) as the kernels take them."""
    if p == 0 and dtype in _NO_DROPOUT:  # the common case, without the per-call conversions
        return _NO_DROPOUT[dtype]
    k0, k1 = key_of(seed)
    scale = np.dtype(str(dtype).removeprefix("torch.")).type(1.0 / (1.0 - p) if p > 0 else 1.0)
    return p > 0, k0, k1, np.uint64(offset), np.uint64(threshold), scale


def _product(x, weight, bias, out):
    """out <- x W^T (+ bias), out None: a new tensor. The bias rides in the BLAS call (addmm,
    beta = 1), as in torch's F.linear, at no measurable cost over mm."""
    if out is None:
        return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def forward(x, weight, bias, activation: int, save_preact: bool, p: float = 0.0, seed: int = 0,
            offset: int = 0, threshold: int = 0):
    """y = act(x W^T + b) (dropped out when p > 0: element (i, j) by counter offset + i N + j).
    Returns (y, saved): saved is z for gelu / gelu_tanh / silu, act(z) before dropout for
    the others, None unless save_preact."""
    M, N = x.shape[0], weight.shape[0]
    drop = _dropout_args(p, seed, offset, threshold, x.dtype)
    out = empty((M, N), x.dtype) if M * N >= GRAIN else None  # small: the BLAS call allocates it
    if activation == IDENTITY and not drop[0] and not save_preact:
        # nothing for an epilogue to do: the BLAS call adds the bias itself
        return _product(x, weight, bias, out), None
    if activation == RELU and not drop[0]:
        # relu saves nothing without dropout, and torch's in-place relu is the same exact
        # pass as the epilogue's at any size, less the numpy views and the numba call (~6 us
        # of a small layer's ~15)
        return torch.relu_(_product(x, weight, bias, out)), None
    out = empty((M, N), x.dtype) if out is None else out
    save_after_act = save_preact and activation in (RELU, TANH, SIGMOID)
    preact = empty((M, N), x.dtype) if save_preact else None
    tasks = _fused_tasks(M, N, x.shape[1], x.element_size()) if not drop[0] and not save_after_act else 0
    if tasks and x.dtype in _DUMMY:
        dummy = _DUMMY[x.dtype]
        _fused_forward(x.numpy(), weight.numpy(), dummy[0] if bias is None else bias.numpy(), bias is not None,
                       out.numpy(), preact.numpy() if save_preact else dummy, save_preact, activation, tasks)
        return out, preact
    # z itself saved (gelu, gelu_tanh, silu): the product goes to preact and the epilogue
    # reads it from there, else it goes to y and the epilogue works in place
    from_z = save_preact and not save_after_act
    product = preact if from_z else out
    dummy = _DUMMY[x.dtype] if x.dtype in _DUMMY else x.new_empty((1, 1)).numpy()
    step = _rows_per_block(N, x.element_size())
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        block = out[r0:r1] if r0 or r1 < M else out
        _product(x[r0:r1], weight, bias, product[r0:r1] if from_z else block)
        _epilogue(block.numel(), block.numpy(), preact[r0:r1].numpy() if save_preact else dummy, from_z,
                  preact[r0:r1].numpy() if save_after_act else dummy, save_after_act, activation,
                  drop[0], r0, *drop[1:], get_num_threads() == 1)
    return out, preact


def _small_backward(grad_out, x, weight, saved, activation: int, need_dx: bool, need_dw: bool, need_db: bool):
    """backward for identity and relu without dropout below GRAIN elements, in torch's ops:
    there the dz pass is microseconds and the numba path's fixed costs (numpy views of four
    tensors, float64 db partial sums made, summed and cast back: ~25 us on the idle machine)
    were most of a small layer's backward. relu's dz is exact either way (dy or 0), and db
    sums at most GRAIN elements in the storage dtype, as torch's own linear does."""
    dz = grad_out if activation == IDENTITY else torch.ops.aten.threshold_backward(grad_out, saved, 0)
    return (torch.mm(dz, weight) if need_dx else None, torch.mm(dz.t(), x) if need_dw else None,
            dz.sum(0) if need_db else None)


def backward(grad_out, x, weight, saved, activation: int, need_dx: bool, need_dw: bool, need_db: bool,
             p: float = 0.0, seed: int = 0, offset: int = 0, threshold: int = 0):
    """(dx, dW, db) from dz = dy * dropout factor * act'(saved); None where not needed."""
    M, N = grad_out.shape
    drop = _dropout_args(p, seed, offset, threshold, grad_out.dtype)
    if M * N < GRAIN and activation in (IDENTITY, RELU) and not drop[0]:
        return _small_backward(grad_out, x, weight, saved, activation, need_dx, need_dw, need_db)
    dx = empty(x.shape, x.dtype) if need_dx else None
    db_parts = np.zeros((_DB_PARTS, N), np.float64)
    if activation == IDENTITY and not drop[0]:  # dz is dy: no pass writes it
        if need_db:
            _column_sums(grad_out.numel(), grad_out.numpy(), db_parts)
        if need_dx:
            torch.mm(grad_out, weight, out=dx)
        dw = torch.mm(grad_out.t(), x) if need_dw else None
        db = torch.from_numpy(db_parts.sum(0)).to(grad_out.dtype) if need_db else None
        return dx, dw, db
    dz = empty(grad_out.shape, grad_out.dtype)  # pooled: the same (M, N) scratch every step
    tasks = _fused_tasks(M, N, x.shape[1], x.element_size()) if saved is not None and not drop[0] else 0
    if tasks and x.dtype in _DUMMY:
        dw = torch.empty_like(weight) if need_dw else None
        dummy = _DUMMY[x.dtype]
        _fused_backward(grad_out.numpy(), saved.numpy(), weight.numpy(), x.numpy(), dz.numpy(),
                        dx.numpy() if need_dx else dummy, dw.numpy() if need_dw else dummy, db_parts,
                        activation, need_dx, need_dw, tasks)
        db = torch.from_numpy(db_parts.sum(0)).to(grad_out.dtype) if need_db else None
        return dx, dw, db
    saved_np = saved.numpy() if saved is not None else grad_out.new_empty((1, 1)).numpy()
    step = _rows_per_block(N, grad_out.element_size())
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        dz_block = dz[r0:r1]
        _grad_preact(dz_block.numel(), grad_out[r0:r1].numpy(), saved_np[r0:r1] if saved is not None else saved_np,
                     saved is not None, dz_block.numpy(), db_parts, activation, drop[0], r0, *drop[1:],
                     get_num_threads() == 1)
        if need_dx:
            torch.mm(dz_block, weight, out=dx[r0:r1])
    dw = torch.mm(dz.t(), x) if need_dw else None
    db = torch.from_numpy(db_parts.sum(0)).to(grad_out.dtype) if need_db else None
    return dx, dw, db
