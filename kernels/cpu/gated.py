"""CPU form of the gated activations (swiglu, geglu), numba, elementwise.

forward: y = act(gate) * up; backward: dgate = dy * up * act'(gate), dup = dy * act(gate),
act and act' recomputed from gate (linear_act's numba activations, float32 arithmetic
that vectorizes). The flat arrays are cut into fixed chunks, in parallel; each chunk runs
one loop per activation (a switch inside the loop would keep LLVM from vectorizing it).
"""

import torch
from numba import njit, prange

from ..activations import GELU, GELU_TANH, SILU
from .fastmath import KERNEL_OPTIONS
from .linear_act import _gelu, _gelu_grad, _gelu_tanh, _gelu_tanh_grad, _silu, _silu_grad

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
    _backward(dy.numpy(), gate.numpy(), up.numpy(), dgate.numpy(), dup.numpy(), bool(need_dgate),
              bool(need_dup), activation)
    return dgate if need_dgate else None, dup if need_dup else None
