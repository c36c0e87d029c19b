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
# What _apply does with its mask argument
_MASK_UNUSED, _MASK_WRITE, _MASK_READ = 0, 1, 2


@sized_kernel
def _apply(src, dst, mask, mask_use, k0, k1, offset, threshold, scale):
    """dst = src * keep * scale. The keep bits come from Philox, and are also written to mask
    when mask_use is _MASK_WRITE, or come from mask when it is _MASK_READ (no Philox)."""
    n = src.size
    zero = scale - scale  # scale's float type: scale * 0 would be float64, and so every product
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        start = c * _CHUNK
        stop = min(n, start + _CHUNK)
        for i in range(start, stop):
            if mask_use == _MASK_READ:
                keep = mask[i] != 0
            else:
                keep = keeps(k0, k1, offset + np.uint64(i), threshold)
                if mask_use == _MASK_WRITE:
                    mask[i] = keep
            dst[i] = src[i] * (scale if keep else zero)


def _scale(dtype, p: float):
    return np.dtype(str(dtype).removeprefix("torch.")).type(1.0 / (1.0 - p))


def _run(src, p: float, mask_use: int, mask=None, seed: int = 0, offset: int = 0, threshold: int = 0):
    out = torch.empty_like(src)
    if mask is None:
        mask = torch.empty(src.shape if mask_use == _MASK_WRITE else (1,), dtype=torch.uint8)
    if src.numel():
        k0, k1 = key_of(seed)
        _apply(src.numel(), src.reshape(-1).numpy(), out.reshape(-1).numpy(), mask.reshape(-1).numpy(), mask_use,
               k0, k1, np.uint64(offset), np.uint64(threshold), _scale(src.dtype, p))
    return out, mask


def forward(x, p: float, seed: int, offset: int, threshold: int):
    """x * mask / (1 - p) for contiguous x; element i's mask from counter offset + i."""
    return _run(x, p, _MASK_UNUSED, seed=seed, offset=offset, threshold=threshold)[0]


def forward_saving_mask(x, p: float, seed: int, offset: int, threshold: int):
    """(forward's y, its keep mask as uint8 of x's shape) in one pass."""
    return _run(x, p, _MASK_WRITE, seed=seed, offset=offset, threshold=threshold)


def backward_with_mask(grad_out, mask, p: float):
    """grad_out * mask / (1 - p) with forward_saving_mask's mask."""
    return _run(grad_out, p, _MASK_READ, mask=mask)[0]


def backward(grad_out, p: float, seed: int, offset: int, threshold: int):
    """grad_out * mask / (1 - p) with forward's mask (the same seed and offset)."""
    return _run(grad_out, p, _MASK_UNUSED, seed=seed, offset=offset, threshold=threshold)[0]
