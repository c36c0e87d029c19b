"""Triton form of dropout: y = x * keep * 1/(1-p), keep from ``tl.randint`` (Philox 4x32-10).

Element i's word is ``tl.randint(seed, offset + i)`` (int64 counters), kept when
``(word >> 1) >= threshold``: the rule of ops/random.py, bit for bit the cpu and cuda forms.
The mask is never stored; backward is the same kernel over dy. The multiplier is scale or 0, as
torch's x * noise (a dropped NaN stays NaN). float32 / float16 / bfloat16 storage, math in
float32 (scale goes in as a float32 argument, so float64 is not a Triton dtype here).
"""

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 1024 if not _INTERPRET else 256


@triton.jit
def keep_mask(seed, counters, threshold):
    """The dropout rule for int64 ``counters``: (word >> 1) >= threshold, word = randint."""
    word = tl.randint(seed, counters)
    return (word >> 1).to(tl.int32) >= threshold


@triton.jit
def _dropout_kernel(src_ptr, dst_ptr, n, seed, offset, threshold, scale,
                    BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    v = tl.load(src_ptr + index, mask=inside, other=0.0).to(tl.float32)
    keep = keep_mask(seed, offset + index, threshold)
    multiplier = tl.where(keep, scale, 0.0)
    tl.store(dst_ptr + index, (v * multiplier).to(dst_ptr.dtype.element_ty), mask=inside)


def _dropout(src, p: float, seed: int, offset: int, threshold: int):
    out = torch.empty_like(src)
    n = src.numel()
    if n:
        _dropout_kernel[(triton.cdiv(n, _BLOCK),)](
            src, out, n, seed, offset, threshold, 1.0 / (1.0 - p), BLOCK=_BLOCK)
    return out


def forward(x, p: float, seed: int, offset: int, threshold: int):
    """x * mask / (1 - p) for contiguous x; element i's mask from counter offset + i."""
    return _dropout(x, p, seed, offset, threshold)


def backward(grad_out, p: float, seed: int, offset: int, threshold: int):
    """grad_out * mask / (1 - p) with forward's mask (the same seed and offset)."""
    return _dropout(grad_out, p, seed, offset, threshold)
