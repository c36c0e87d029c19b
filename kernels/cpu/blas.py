"""The GEMMs the cpu forms take from torch (DESIGN.md: never a hand-rolled CPU GEMM).

``torch.mm`` is MKL's sgemm. torch also ships oneDNN, whose linear with a weight packed
once ahead (``torch.ops.mkldnn._reorder_linear_weight``, the op torch.compile's CPU
backend uses) is faster for the small, repeated products of a recurrence: on this
2-core AVX2 EPYC, (32 x 512) @ (512 x 2048) took 0.48 ms packed against 0.72 ms in
torch.mm, (8 x 256) @ (256 x 1024) 0.070 against 0.074 ms (bench/results/rnn_cpu.md).
oneDNN has no float64: float64 (and a torch built without oneDNN) uses torch.mm. Both
give float32 sums of the same products in different orders.
"""

from __future__ import annotations

import functools

import torch

# Below this many multiply-adds (rows x out x in) a product goes to torch.mm: packing the
# weight (a copy and a oneDNN primitive, ~1-2 ms on this machine) cost more than the
# product, e.g. a small LSTM's input projection (160 x 256 x 64) packed its weight on
# every call (bench/results/rnn_cpu_issue14.md).
_ONEDNN_MIN_MACS = 1 << 24


@functools.cache  # the hasattr lookups on torch.ops cost ~0.1 ms a call
def _onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


class PackedLinear:
    """y = x @ weight^T (+ bias) for many x of about ``rows`` rows and one fixed weight
    (out_features, in_features): the weight is packed once here (oneDNN, float32 products
    of at least _ONEDNN_MIN_MACS), else torch.mm."""

    def __init__(self, weight: torch.Tensor, rows: int):
        self.onednn = (weight.dtype == torch.float32 and rows * weight.numel() >= _ONEDNN_MIN_MACS
                       and _onednn_available())
        if self.onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)
        else:
            self.weight_t = weight.t()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A new (rows, out_features) tensor."""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
        return torch.mm(x, self.weight_t) if bias is None else torch.addmm(bias, x, self.weight_t)


# ---------------------------------------------------------------------------------------
# MKL's Fortran sgemm_ / dgemm_ called from inside numba code.
#
# A recurrence's step GEMM is small ((B x H) @ (H x 4H)), and a step loop in Python pays
# a torch call per step: at B 8, H 64 the oneDNN linear took ~100 us for a product MKL's
# sgemm_ does in ~5 us when called from a numba loop (bench/results/rnn_cpu_issue14.md).
# torch's CPU wheels link MKL into libtorch_cpu and export sgemm_ / dgemm_ (LP64: 32-bit
# ints), so the whole-sequence kernels (rnn.py) run their loop in one numba call and
# take each step's product from that same BLAS. The symbols are registered with LLVM under
# kiln_ names at import, so a cached kernel links against them by name in a new process.

import ctypes
import glob
import os

from llvmlite import ir
import llvmlite.binding as llvm
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_GEMM_SYMBOLS = {"kiln_sgemm": "sgemm_", "kiln_dgemm": "dgemm_"}


def _register_mkl_gemm() -> bool:
    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*"))
    if not libs:
        return False
    try:
        lib = ctypes.CDLL(libs[0])
        addresses = {name: ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
                     for name, symbol in _GEMM_SYMBOLS.items()}
    except (OSError, AttributeError):
        return False
    if not all(addresses.values()):
        return False
    for name, address in addresses.items():
        llvm.add_symbol(name, address)
    return True


# Whether mkl_gemm can run: torch was built with MKL and exports its Fortran GEMMs.
MKL_GEMM = _register_mkl_gemm()


@intrinsic
def mkl_gemm(typingctx, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """MKL's ?gemm (column-major, Fortran): C (m x n, leading dim ldc) = op(A) op(B) +
    beta C, op transposes when trans_* is nonzero; a, b, c numba arrays of one float dtype
    whose data pointers are the matrices' first elements. A row-major (R x S) array is
    the column-major (S x R) matrix, so y (B, N) = x (B, K) @ w (N, K)^T is
    mkl_gemm(1, 0, N, B, K, w, K, x, K, 0.0, y, N). Only when MKL_GEMM; every dimension
    >= 1 (BLAS rejects a leading dim of 0)."""
    dtype = c.dtype
    if dtype not in (types.float32, types.float64) or a.dtype != dtype or b.dtype != dtype:
        return None
    sig = types.void(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc)
    symbol = "kiln_sgemm" if dtype == types.float32 else "kiln_dgemm"

    def codegen(context, builder, signature, args):
        ta, tb, m_, n_, k_, a_, lda_, b_, ldb_, beta_, c_, ldc_ = args
        float_type = context.get_value_type(dtype)
        i8 = ir.IntType(8)

        def by_reference(value, value_type, to_type):
            slot = cgutils.alloca_once(builder, context.get_value_type(to_type))
            builder.store(context.cast(builder, value, value_type, to_type), slot)
            return slot

        def trans(flag):
            slot = cgutils.alloca_once(builder, i8)
            builder.store(builder.select(builder.icmp_signed("!=", flag, flag.type(0)), i8(ord("T")), i8(ord("N"))),
                          slot)
            return slot

        def data(array, array_type):
            return cgutils.create_struct_proxy(array_type)(context, builder, value=array).data

        alpha = cgutils.alloca_once(builder, float_type)
        builder.store(float_type(1.0), alpha)
        sa = signature.args
        pointers = [trans(ta), trans(tb), by_reference(m_, sa[2], types.int32), by_reference(n_, sa[3], types.int32),
                    by_reference(k_, sa[4], types.int32), alpha, data(a_, sa[5]),
                    by_reference(lda_, sa[6], types.int32), data(b_, sa[7]), by_reference(ldb_, sa[8], types.int32),
                    by_reference(beta_, sa[9], dtype), data(c_, sa[10]), by_reference(ldc_, sa[11], types.int32)]
        function_type = ir.FunctionType(ir.VoidType(), [p.type for p in pointers])
        builder.call(cgutils.get_or_insert_function(builder.module, function_type, symbol), pointers)
        return context.get_dummy_value()

    return sig, codegen


# MKL_Set_Num_Threads_Local(n) (C, by value; returns the previous setting, 0 = the global
# one): code that calls mkl_gemm from inside its own parallel region (numba prange) sets
# it to 1 on each worker, so MKL does not start threads of its own under each of them.
_THREADS_SYMBOL = ("kiln_mkl_set_num_threads_local", "MKL_Set_Num_Threads_Local")


def _register_mkl_threads() -> bool:
    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*"))
    try:
        address = ctypes.cast(getattr(ctypes.CDLL(libs[0]), _THREADS_SYMBOL[1]), ctypes.c_void_p).value
    except (IndexError, OSError, AttributeError):
        return False
    if not address:
        return False
    llvm.add_symbol(_THREADS_SYMBOL[0], address)
    return True


# Whether mkl_set_num_threads_local can run (then MKL_GEMM is true too).
MKL_THREADS = MKL_GEMM and _register_mkl_threads()


@intrinsic
def mkl_set_num_threads_local(typingctx, n):
    """MKL's per-thread thread count for the calling thread: -> the previous one. Only when
    MKL_THREADS."""
    sig = types.int32(n)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        value = context.cast(builder, args[0], signature.args[0], types.int32)
        function_type = ir.FunctionType(i32, [i32])
        return builder.call(cgutils.get_or_insert_function(builder.module, function_type, _THREADS_SYMBOL[0]),
                            [value])

    return sig, codegen
