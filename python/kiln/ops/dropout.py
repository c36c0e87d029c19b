"""dropout: y = x * mask / (1 - p), inverted dropout as torch.nn.functional.dropout.

The keep mask is a pure function of (seed, offset, element index) (ops/random.py:
Philox 4x32-10, the same words in the triton, cuda, cpu and reference forms). Saved for
backward: the int64 pair [seed, offset] the forward used, from which the GPU forms'
backward (dx = dy * mask / (1 - p)) regenerates the mask; the cpu form, where Philox
costs ten times the read of a stored byte, keeps the mask too (one uint8 an element, as
torch's dropout keeps its mask) when a gradient is wanted. Double backward runs the same
product in PyTorch ops with the mask rebuilt by the reference Philox.

Where (seed, offset) come from: kiln's generator (ops/random.py), advanced by the number
of elements each call consumes; torch.manual_seed reseeds it. Autocast: none, as torch's
dropout (it runs in its input's dtype). Zero-size input, p == 0 or training=False: the
input itself, as torch. p == 1: input * 0, as torch.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from kiln import backend

from . import _cpu_eager
from . import random as kiln_random
from ._checks import check_floating
from ._cuda_launch import DTYPE_CODE, ptr, stream

OP = "dropout"


def check_probability(op: str, p) -> float:
    """torch's rule and wording: p is a number in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{op}: p must be a float in [0, 1], got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference: the mask from ops/random.py's Philox.


def multiplier(like: Tensor, p: float, seed: int, offset: int) -> Tensor:
    """mask / (1 - p) for a contiguous tensor like ``like``, in its dtype and device."""
    keep = kiln_random.keep_mask(seed, offset, like.shape, p, device=like.device)
    return keep.to(like.dtype) * (1.0 / (1.0 - p))


def reference_forward(x, p: float, seed: int, offset: int, threshold: int):
    return x * multiplier(x, p, seed, offset)


def reference_backward(grad_out, p: float, seed: int, offset: int, threshold: int):
    return grad_out * multiplier(grad_out, p, seed, offset)


# ---------------------------------------------------------------------------------------
# The cuda backend.


def _cuda_apply(src, p: float, seed: int, offset: int, threshold: int):
    ext = backend.cuda_extension()
    out = torch.empty_like(src)
    with torch.cuda.device(src.device):
        ext.dropout_apply(ptr(src), ptr(out), src.numel(), seed, offset, threshold, 1.0 / (1.0 - p),
                          DTYPE_CODE[src.dtype], stream(src))
    return out


DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.dropout", "cpu": "kiln.kernels.cpu.dropout"}
_REFERENCE = SimpleNamespace(forward=reference_forward, backward=reference_backward)
_CUDA = SimpleNamespace(forward=_cuda_apply, backward=_cuda_apply)


def _implementation(t: Tensor):
    return backend.implementation(OP, t, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA)


# ---------------------------------------------------------------------------------------
# The custom ops: contiguous input, p in (0, 1), seed_offset the int64 CPU pair [seed, offset].


def _saves_mask(x: Tensor, save_mask: bool) -> bool:
    return save_mask and hasattr(_implementation(x), "forward_saving_mask")


@torch.library.custom_op("kiln::dropout", mutates_args=())
def _dropout(x: Tensor, p: float, seed_offset: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    """Returns (y, mask): mask is the uint8 keep mask where the form stores it (save_mask and the
    cpu form), else empty."""
    seed, offset = kiln_random.seed_offset(seed_offset)
    impl = _implementation(x)
    if _saves_mask(x, save_mask):
        return impl.forward_saving_mask(x, p, seed, offset, kiln_random.keep_threshold(p))
    return impl.forward(x, p, seed, offset, kiln_random.keep_threshold(p)), x.new_empty(0, dtype=torch.uint8)


@_dropout.register_fake
def _(x, p, seed_offset, save_mask):
    return torch.empty_like(x), x.new_empty(x.shape if _saves_mask(x, save_mask) else 0, dtype=torch.uint8)


@torch.library.custom_op("kiln::dropout_backward", mutates_args=())
def _dropout_backward(grad_out: Tensor, p: float, seed_offset: Tensor) -> Tensor:
    seed, offset = kiln_random.seed_offset(seed_offset)
    return _implementation(grad_out).backward(grad_out, p, seed, offset, kiln_random.keep_threshold(p))


@_dropout_backward.register_fake
def _(grad_out, p, seed_offset):
    return torch.empty_like(grad_out)


def _setup_context(ctx, inputs, output):
    _, p, seed_offset, _ = inputs
    ctx.set_materialize_grads(False)  # the mask output is internal: no zero gradient is made for it
    ctx.save_for_backward(seed_offset, output[1])
    ctx.p = p


def _backward(ctx, grad_out, grad_mask):
    if grad_out is None:
        return None, None, None, None
    seed_offset, mask = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: dy * mask / (1 - p) in PyTorch ops
        seed, offset = kiln_random.seed_offset(seed_offset)
        grad = grad_out * multiplier(grad_out, ctx.p, seed, offset)
    elif mask.numel() and _cpu_eager.direct(grad_out, mask):
        grad = _implementation(grad_out).backward_with_mask(grad_out.contiguous(), mask, ctx.p)
    elif mask.numel():  # traced (torch.compile): the same product in PyTorch ops
        grad = grad_out * mask.to(grad_out.dtype) * (1.0 / (1.0 - ctx.p))
    else:
        grad = _dropout_backward(grad_out.contiguous(), ctx.p, seed_offset)
    return grad, None, None, None


_dropout_call = _cpu_eager.autograd_op(_dropout, _backward, _setup_context)


# ---------------------------------------------------------------------------------------
# The public op.


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """torch.nn.functional.dropout on kiln's fused kernel: zeroes each element with
    probability p (from kiln's counter-based generator) and scales the rest by 1 / (1 - p).

    training=False, p == 0 or an empty input return ``input`` itself; p == 1 gives zeros
    (input * 0). inplace=True writes the result into ``input`` and returns it.
    """
    p = check_probability(OP, p)
    check_floating(OP, input=input)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0:
        return input.mul_(0.0) if inplace else input * 0.0
    x = input.contiguous()
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    out, _ = _dropout_call(x, p, kiln_random.next_seed_offset(x.numel()), wants_grad)
    out = out.view(input.shape)
    return input.copy_(out) if inplace else out
