"""CPU form of rotary_embedding, numba, rows in parallel.

x (B, S1, S2, D) contiguous, cos / sin (CB, T, D); the position of row (b, s1, s2) is s2
(seq_dim 2) or s1 (seq_dim 1). Per row, every pair (a, b), (i, i + D/2) or (2i, 2i + 1):
forward y_a = x_a c_a - x_b s_a, y_b = x_b c_b + x_a s_b; backward (the transpose) dx_a =
dy_a c_a + dy_b s_b, dx_b = dy_b c_b - dy_a s_a. One loop per layout, branch-free inside,
so LLVM vectorizes it (the rotate-half loop is unit-stride in every array).
"""

import torch
from numba import prange

from .parallel import sized_kernel


@sized_kernel
def _apply(x, cos, sin, y, seq_dim, interleaved, inverse):
    B, S1, S2, D = x.shape
    half = D // 2
    per_batch = cos.shape[0] != 1
    for r in prange(B * S1 * S2):
        b, rest = r // (S1 * S2), r % (S1 * S2)
        s1, s2 = rest // S2, rest % S2
        t = s2 if seq_dim == 2 else s1
        c = cos[b if per_batch else 0, t]
        s = sin[b if per_batch else 0, t]
        xr, yr = x[b, s1, s2], y[b, s1, s2]
        if interleaved:
            if inverse:
                for i in range(half):
                    xa, xb = xr[2 * i], xr[2 * i + 1]
                    yr[2 * i] = xa * c[2 * i] + xb * s[2 * i + 1]
                    yr[2 * i + 1] = xb * c[2 * i + 1] - xa * s[2 * i]
            else:
                for i in range(half):
                    xa, xb = xr[2 * i], xr[2 * i + 1]
                    yr[2 * i] = xa * c[2 * i] - xb * s[2 * i]
                    yr[2 * i + 1] = xb * c[2 * i + 1] + xa * s[2 * i + 1]
        else:
            if inverse:
                for i in range(half):
                    xa, xb = xr[i], xr[i + half]
                    yr[i] = xa * c[i] + xb * s[i + half]
                    yr[i + half] = xb * c[i + half] - xa * s[i]
            else:
                for i in range(half):
                    xa, xb = xr[i], xr[i + half]
                    yr[i] = xa * c[i] - xb * s[i]
                    yr[i + half] = xb * c[i + half] + xa * s[i + half]


def _run(x, cos, sin, seq_dim: int, interleaved: bool, inverse: bool):
    y = torch.empty_like(x)
    if x.numel():
        _apply(x.numel(), x.numpy(), cos.numpy(), sin.numpy(), y.numpy(), seq_dim, bool(interleaved), inverse)
    return y


def forward(x, cos, sin, seq_dim: int, interleaved: bool):
    """x rotated by the cos / sin of each row's position (see the module docstring)."""
    return _run(x, cos, sin, seq_dim, interleaved, False)


def backward(dy, cos, sin, seq_dim: int, interleaved: bool):
    """The transpose of forward applied to dy: the gradient in x."""
    return _run(dy, cos, sin, seq_dim, interleaved, True)
