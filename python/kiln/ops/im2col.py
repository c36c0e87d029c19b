"""im2col: the receptive fields of an image as the rows of a GEMM, for kiln.nn.Conv2d.

rows = im2col(input (N, C, H, W), kernel_size, dilation, padding, stride) is (N, L, kh kw C) with
L = Ho Wo output pixels; row l = oh Wo + ow holds, tap-major, input[n, c, oh sh - ph + i dh,
ow sw - pw + j dw] at column (i kw + j) C + c (zero outside the image). That is F.unfold's
content with its (C kh kw, L) block transposed and its columns in tap-major order: a
convolution is rows @ weight.permute(0, 2, 3, 1).reshape(O, -1).T. Tap-major columns are what
make the CPU form fast: it reads the image channels-last, where each tap is C contiguous values.
Backward is col2im (F.fold in the reference); nothing is saved but the sizes.

Backends: the numba form ("cpu") and the reference (torch's F.unfold / F.fold). There is no
GPU kernel: kiln.nn.Conv2d on a GPU unfolds with F.unfold itself (docs/design.md, "conv2d").
Autocast: torch's unfold is in none of autocast's lists; im2col keeps its input's dtype too.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln import backend

from . import _cpu_eager
from ._checks import check_floating

OP = "im2col"


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference, on channels-last x (N, H, W, C); sizes as the kernels take them.


def unfold_rows(x: Tensor, kh, kw, sh, sw, ph, pw, dh, dw) -> Tensor:
    """The rows of channels-last x in torch ops (differentiable)."""
    N, H, W, C = x.shape
    columns = F.unfold(x.permute(0, 3, 1, 2), (kh, kw), (dh, dw), (ph, pw), (sh, sw))   # (N, C kh kw, L)
    L = columns.shape[-1]
    return columns.reshape(N, C, kh * kw, L).permute(0, 3, 2, 1).reshape(N, L, kh * kw * C)


def fold_rows(drows: Tensor, H, W, kh, kw, sh, sw, ph, pw, dh, dw) -> Tensor:
    """The transpose of unfold_rows applied to drows, channels-last (N, H, W, C), in torch ops."""
    N, L, K = drows.shape
    C = K // (kh * kw)
    columns = drows.reshape(N, L, kh * kw, C).permute(0, 3, 2, 1).reshape(N, C * kh * kw, L)
    return F.fold(columns, (H, W), (kh, kw), (dh, dw), (ph, pw), (sh, sw)).permute(0, 2, 3, 1)


def reference_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo):
    return unfold_rows(x, kh, kw, sh, sw, ph, pw, dh, dw).contiguous()


def reference_backward(drows, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo):
    return fold_rows(drows.double(), H, W, kh, kw, sh, sw, ph, pw, dh, dw).to(drows.dtype).contiguous()


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = {"cpu": backend.STANDARD_DTYPES["cpu"], "reference": backend.STANDARD_DTYPES["reference"]}
_KERNEL_MODULES = {"cpu": "kiln.kernels.cpu.im2col"}
_REFERENCE = SimpleNamespace(forward=reference_forward, backward=reference_backward)


def _implementation(t: Tensor):
    return backend.implementation(OP, t, DTYPES, _KERNEL_MODULES, _REFERENCE)


# ---------------------------------------------------------------------------------------
# The custom ops: x (N, H, W, C) contiguous; geometry = (kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo).


@torch.library.custom_op("kiln::im2col", mutates_args=())
def _im2col(x: Tensor, geometry: list[int]) -> Tensor:
    return _implementation(x).forward(x, *geometry)


@_im2col.register_fake
def _(x, geometry):
    kh, kw, Ho, Wo = geometry[0], geometry[1], geometry[8], geometry[9]
    return x.new_empty((x.shape[0], Ho * Wo, kh * kw * x.shape[3]))


@torch.library.custom_op("kiln::im2col_backward", mutates_args=())
def _im2col_backward(drows: Tensor, H: int, W: int, geometry: list[int]) -> Tensor:
    return _backward_body(drows, H, W, geometry)


def _backward_body(drows, H, W, geometry):
    return _implementation(drows).backward(drows, H, W, *geometry)


@_im2col_backward.register_fake
def _(drows, H, W, geometry):
    return drows.new_empty((drows.shape[0], H, W, drows.shape[2] // (geometry[0] * geometry[1])))


def _setup_context(ctx, inputs, output):
    x, geometry = inputs
    ctx.H, ctx.W, ctx.geometry = x.shape[1], x.shape[2], geometry


def _backward(ctx, drows):
    drows = drows.contiguous()
    if torch.is_grad_enabled():  # autograd records this backward: double backward, in torch ops (linear)
        return fold_rows(drows, ctx.H, ctx.W, *ctx.geometry[:8]), None
    backward = _backward_body if _cpu_eager.direct(drows) else _im2col_backward
    return backward(drows, ctx.H, ctx.W, ctx.geometry), None


_im2col_call = _cpu_eager.autograd_op(_im2col, _backward, _setup_context)


# ---------------------------------------------------------------------------------------
# The public op.


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{OP}: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def im2col(input: Tensor, kernel_size, dilation=1, padding=0, stride=1) -> Tensor:
    """The receptive fields of input (N, C, H, W) as rows (N, L, kh kw C), tap-major (module
    docstring); F.unfold's arguments, in its order. Any memory format: a channels-last input is
    read without a copy."""
    check_floating(OP, input=input)
    if input.dim() != 4:
        raise ValueError(f"{OP}: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    (kh, kw), (dh, dw) = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    (ph, pw), (sh, sw) = _pair(padding, "padding"), _pair(stride, "stride")
    for name, pair, least in (("kernel_size", (kh, kw), 1), ("dilation", (dh, dw), 1), ("stride", (sh, sw), 1),
                              ("padding", (ph, pw), 0)):
        if min(pair) < least:
            raise ValueError(f"{OP}: {name} must be >= {least}, got {pair}")
    N, C, H, W = input.shape
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{OP}: input {tuple(input.shape)} padded by {(ph, pw)} is smaller than the dilated "
                         f"kernel {(kh, kw)} (dilation {(dh, dw)})")
    x = input.permute(0, 2, 3, 1).contiguous()
    if x.numel() == 0:  # nothing to launch: the torch form gives the empty rows (and their gradient)
        return unfold_rows(x, kh, kw, sh, sw, ph, pw, dh, dw)
    return _im2col_call(x, [kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo])
