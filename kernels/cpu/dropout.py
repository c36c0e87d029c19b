"""CPU form of dropout: y = x * keep * 1/(1-p), the keep mask from Philox (philox.py).

One numba pass: each element's word is computed from (seed, offset + index), so the
mask is never stored and backward (the same pass over dy) regenerates it. The
multiplier is ``scale`` or 0 (not a select of x or 0), as torch's x * noise: a dropped
NaN or inf stays NaN. float32 and float64.
"""

import numpy as np
import torch
from numba import njit, prange

from .fastmath import KERNEL_OPTIONS
from .philox import key_of, keeps

# Elements per parallel chunk: a whole number of cache lines, enough work per thread.
_CHUNK = 1 << 14


@njit(**KERNEL_OPTIONS)
def _apply(src, dst, k0, k1, offset, threshold, scale):
    n = src.size
    zero = scale * 0
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        start = c * _CHUNK
        stop = min(n, start + _CHUNK)
        for i in range(start, stop):
            keep = keeps(k0, k1, offset + np.uint64(i), threshold)
            dst[i] = src[i] * (scale if keep else zero)


def _dropout(src, p: float, seed: int, offset: int, threshold: int):
    out = torch.empty_like(src)
    if src.numel():
        scale = np.dtype(str(src.dtype).removeprefix("torch.")).type(1.0 / (1.0 - p))
        k0, k1 = key_of(seed)
        _apply(src.reshape(-1).numpy(), out.reshape(-1).numpy(), k0, k1, np.uint64(offset),
               np.uint64(threshold), scale)
    return out


def forward(x, p: float, seed: int, offset: int, threshold: int):
    """x * mask / (1 - p) for contiguous x; element i's mask from counter offset + i."""
    return _dropout(x, p, seed, offset, threshold)


def backward(grad_out, p: float, seed: int, offset: int, threshold: int):
    """grad_out * mask / (1 - p) with forward's mask (the same seed and offset)."""
    return _dropout(grad_out, p, seed, offset, threshold)
