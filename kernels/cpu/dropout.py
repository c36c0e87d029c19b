"""CPU form of dropout: y = x * keep * 1/(1-p), the keep mask from Philox (philox.py).

One numba pass: each element's word is computed from (seed, offset + index). Philox
4x32-10 costs ~3 ns an element on one core where reading a byte back costs a tenth of
that, so under autograd (`forward_saving_mask`) the pass also writes the keep mask, one
byte an element (what torch's dropout keeps too), and backward multiplies dy by it;
`backward` regenerates the mask, for a caller that has none. The multiplier is ``scale``
or 0 (not a select of x or 0), as torch's x * noise: a dropped NaN or inf stays NaN.
float32 and float64.
"""

import numpy as np
import torch
from numba import prange

from .philox import key_of, keeps
from .parallel import sized_kernel

# Elements per parallel chunk: a whole number of cache lines, enough work per thread.
_CHUNK = 1 << 14


@sized_kernel
def _apply(src, dst, mask, save_mask, k0, k1, offset, threshold, scale):
    """dst = src * keep * scale, the keep bits from Philox; also written to mask when save_mask."""
    n = src.size
    zero = scale * 0
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        start = c * _CHUNK
        stop = min(n, start + _CHUNK)
        for i in range(start, stop):
            keep = keeps(k0, k1, offset + np.uint64(i), threshold)
            if save_mask:
                mask[i] = keep
            dst[i] = src[i] * (scale if keep else zero)


@sized_kernel
def _apply_mask(src, dst, mask, scale):
    n = src.size
    zero = scale * 0
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        start = c * _CHUNK
        stop = min(n, start + _CHUNK)
        for i in range(start, stop):
            dst[i] = src[i] * (scale if mask[i] else zero)


def _scale(dtype, p: float):
    return np.dtype(str(dtype).removeprefix("torch.")).type(1.0 / (1.0 - p))


def _dropout(src, p: float, seed: int, offset: int, threshold: int, save_mask: bool = False):
    out = torch.empty_like(src)
    mask = torch.empty(src.shape if save_mask else (1,), dtype=torch.uint8)
    if src.numel():
        k0, k1 = key_of(seed)
        _apply(src.numel(), src.reshape(-1).numpy(), out.reshape(-1).numpy(), mask.reshape(-1).numpy(), save_mask,
               k0, k1, np.uint64(offset), np.uint64(threshold), _scale(src.dtype, p))
    return out, mask


def forward(x, p: float, seed: int, offset: int, threshold: int):
    """x * mask / (1 - p) for contiguous x; element i's mask from counter offset + i."""
    return _dropout(x, p, seed, offset, threshold)[0]


def forward_saving_mask(x, p: float, seed: int, offset: int, threshold: int):
    """(forward's y, its keep mask as uint8 of x's shape) in one pass."""
    return _dropout(x, p, seed, offset, threshold, save_mask=True)


def backward_with_mask(grad_out, mask, p: float):
    """grad_out * mask / (1 - p) with forward_saving_mask's mask."""
    out = torch.empty_like(grad_out)
    if grad_out.numel():
        _apply_mask(grad_out.numel(), grad_out.reshape(-1).numpy(), out.reshape(-1).numpy(), mask.reshape(-1).numpy(),
                    _scale(grad_out.dtype, p))
    return out


def backward(grad_out, p: float, seed: int, offset: int, threshold: int):
    """grad_out * mask / (1 - p) with forward's mask (the same seed and offset)."""
    return _dropout(grad_out, p, seed, offset, threshold)[0]
