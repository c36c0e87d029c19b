"""Triton form of the gated activations (swiglu, geglu), elementwise over flat tensors.

forward: y = act(gate) * up; backward: dgate = dy * up * act'(gate), dup = dy * act(gate),
act and act' recomputed from gate (linear_act's Triton activations) in float32 (float64
for float64, which only the interpreter runs). One program per BLOCK elements; BLOCK and
num_warps are autotuned on the GPU, one config under TRITON_INTERPRET=1.
"""

import os

import torch
import triton
import triton.language as tl

from .layer_norm import _acc
from .linear_act import _act, _act_grad

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _autotune(key):
    if _INTERPRET:
        return triton.autotune(configs=[triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1)], key=key)
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)]
    return triton.autotune(configs=configs, key=key)


@_autotune(["ACT"])
@triton.jit
def _fwd_kernel(gate_ptr, up_ptr, y_ptr, n, ACT: tl.constexpr, ACC_DT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
    tl.store(y_ptr + offs, (_act(g, ACT) * u).to(y_ptr.dtype.element_ty), mask=mask)


@_autotune(["ACT", "NEED_DGATE", "NEED_DUP"])
@triton.jit
def _bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, ACT: tl.constexpr, NEED_DGATE: tl.constexpr,
                NEED_DUP: tl.constexpr, ACC_DT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
    if NEED_DGATE:
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        tl.store(dgate_ptr + offs, (dy * u * _act_grad(g, ACT)).to(dgate_ptr.dtype.element_ty), mask=mask)
    if NEED_DUP:
        tl.store(dup_ptr + offs, (dy * _act(g, ACT)).to(dup_ptr.dtype.element_ty), mask=mask)


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def forward(gate, up, activation: int):
    """act(gate) * up for flat contiguous gate, up of one dtype."""
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _fwd_kernel[_grid(n)](gate, up, y, n, ACT=activation, ACC_DT=_acc(gate.dtype)[0])
    return y


def backward(dy, gate, up, activation: int, need_dgate: bool, need_dup: bool):
    """(dgate, dup); None where not needed."""
    dgate = torch.empty_like(gate) if need_dgate else None
    dup = torch.empty_like(gate) if need_dup else None
    n = gate.numel()
    if n and (need_dgate or need_dup):
        _bwd_kernel[_grid(n)](dy, gate, up, dgate if need_dgate else gate, dup if need_dup else gate, n,
                              ACT=activation, NEED_DGATE=bool(need_dgate), NEED_DUP=bool(need_dup),
                              ACC_DT=_acc(gate.dtype)[0])
    return dgate, dup
