"""CPU form of the gated activations (swiglu, geglu), numba, elementwise.

forward: y = act(gate) * up; backward: dgate = dy * up * act'(gate), dup = dy * act(gate),
act and act' recomputed from gate (linear_act's numba activations, float32 arithmetic
that vectorizes). The flat arrays are cut into fixed chunks, in parallel; each chunk runs
one loop per activation (a switch inside the loop would keep LLVM from vectorizing it).
"""

import torch
from numba import njit, prange

from ..activations import GELU, GELU_TANH, GELU_TANH_CUBIC, INV_SQRT_2, INV_SQRT_2PI, SILU, SQRT_2_OVER_PI
from .fastmath import KERNEL_OPTIONS, exp, like, one_plus_erf, tanh
from .linear_act import _gelu, _gelu_grad, _gelu_tanh, _gelu_tanh_grad, _sigmoid, _silu, _silu_grad

_CHUNK = 16384


@njit(**KERNEL_OPTIONS)
def _forward(gate, up, y, code):
    n = gate.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        if code == SILU:
            for j in range(lo, hi):
                y[j] = _silu(gate[j]) * up[j]
        elif code == GELU:
            for j in range(lo, hi):
                y[j] = _gelu(gate[j]) * up[j]
        else:
            for j in range(lo, hi):
                y[j] = _gelu_tanh(gate[j]) * up[j]


# act(z) and act'(z) together, sharing their one transcendental (sigmoid, erf, tanh): the
# backward that wants both gradients evaluates it once per element, not twice.


@njit(inline="always")
def _silu_pair(z):
    sg = _sigmoid(z)
    return z * sg, sg * (like(z, 1.0) + z * (like(z, 1.0) - sg))


@njit(inline="always")
def _gelu_pair(z):
    half = like(z, 0.5)
    cdf = half * one_plus_erf(z * like(z, INV_SQRT_2))
    return z * cdf, cdf + z * like(z, INV_SQRT_2PI) * exp(-half * z * z)


@njit(inline="always")
def _gelu_tanh_pair(z):
    one, half, c = like(z, 1.0), like(z, 0.5), like(z, GELU_TANH_CUBIC)
    t = tanh(like(z, SQRT_2_OVER_PI) * (z + c * z * z * z))
    du = like(z, SQRT_2_OVER_PI) * (one + like(z, 3.0) * c * z * z)
    return half * z * (one + t), half * (one + t) + half * z * (one - t * t) * du


@njit(**KERNEL_OPTIONS)
def _backward_both(dy, gate, up, dgate, dup, code):
    n = gate.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        if code == SILU:
            for j in range(lo, hi):
                a, d = _silu_pair(gate[j])
                dgate[j] = dy[j] * up[j] * d
                dup[j] = dy[j] * a
        elif code == GELU:
            for j in range(lo, hi):
                a, d = _gelu_pair(gate[j])
                dgate[j] = dy[j] * up[j] * d
                dup[j] = dy[j] * a
        else:
            for j in range(lo, hi):
                a, d = _gelu_tanh_pair(gate[j])
                dgate[j] = dy[j] * up[j] * d
                dup[j] = dy[j] * a


@njit(**KERNEL_OPTIONS)
def _backward(dy, gate, up, dgate, dup, need_dgate, need_dup, code):
    n = gate.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        if need_dgate:
            if code == SILU:
                for j in range(lo, hi):
                    dgate[j] = dy[j] * up[j] * _silu_grad(gate[j])
            elif code == GELU:
                for j in range(lo, hi):
                    dgate[j] = dy[j] * up[j] * _gelu_grad(gate[j])
            else:
                for j in range(lo, hi):
                    dgate[j] = dy[j] * up[j] * _gelu_tanh_grad(gate[j])
        if need_dup:
            if code == SILU:
                for j in range(lo, hi):
                    dup[j] = dy[j] * _silu(gate[j])
            elif code == GELU:
                for j in range(lo, hi):
                    dup[j] = dy[j] * _gelu(gate[j])
            else:
                for j in range(lo, hi):
                    dup[j] = dy[j] * _gelu_tanh(gate[j])


def forward(gate, up, activation: int):
    """act(gate) * up for flat contiguous gate, up of one dtype; activation a SILU, GELU or
    GELU_TANH code."""
    y = torch.empty_like(gate)
    _forward(gate.numpy(), up.numpy(), y.numpy(), activation)
    return y


def backward(dy, gate, up, activation: int, need_dgate: bool, need_dup: bool):
    dgate = torch.empty_like(gate) if need_dgate else gate.new_empty(1)
    dup = torch.empty_like(gate) if need_dup else gate.new_empty(1)
    if need_dgate and need_dup:
        _backward_both(dy.numpy(), gate.numpy(), up.numpy(), dgate.numpy(), dup.numpy(), activation)
        return dgate, dup
    _backward(dy.numpy(), gate.numpy(), up.numpy(), dgate.numpy(), dup.numpy(), bool(need_dgate),
              bool(need_dup), activation)
    return dgate if need_dgate else None, dup if need_dup else None
