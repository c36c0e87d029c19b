"""attention: softmax(q k^T * scale + mask) v, flash-style (the notes, section 17).

Layout as torch.nn.functional.scaled_dot_product_attention: q (B, Hq, Tq, D), k and v
(B, Hkv, Tk, D); Hkv divides Hq (grouped-query attention: query head h reads kv head
h // (Hq // Hkv)); Tq may differ from Tk (cross-attention). Masks: ``causal`` aligns
bottom-right (query i sees keys j <= i + Tk - Tq, as FlashAttention and a KV cache need;
SDPA's is_causal aligns top-left, the same thing when Tq == Tk), ``key_padding_mask``
(B, Tk) bool, True = that key is hidden. A query row that sees no key gives 0 (and zero
gradients), never NaN.

Forward streams key blocks past each query block with the online softmax and never
materialises Tq x Tk; it saves q, k, v, the output o and per row the log-sum-exp
lse = log sum_j exp(s_ij) (float32; float64 for float64 input; +inf for a row that sees
no key, so that backward's p = exp(s - lse) is 0 there). Backward recomputes p tile by
tile from q, k and lse (FlashAttention-2): delta = rowsum(do * o) first, then
dv = p^T do, dp = do v^T, ds = p (dp - delta), dq = scale ds k, dk = scale ds^T q.
Dropout on the probabilities is not implemented: dropout_p > 0 raises.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from kiln import backend

from ._checks import check_floating, check_same_device_dtype
from ._cuda_launch import DTYPE_CODE, ptr, stream

OP = "attention"
# Head dims the GPU forms are built and tested for (the cpu form and the reference take any).
GPU_HEAD_DIMS = (16, 32, 64, 80, 96, 128)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_keys(Tq: int, Tk: int, causal: bool, key_padding_mask: Optional[Tensor], device) -> Tensor:
    """(B or 1, 1, Tq, Tk) bool: True where query i may attend key j."""
    seen = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        seen = seen.tril(Tk - Tq)
    seen = seen[None, None]
    if key_padding_mask is not None:
        seen = seen & ~key_padding_mask[:, None, None, :].to(device)
    return seen


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference: explicit softmax(q k^T) v in float64, T x T and all.


def _reference_probs(q, k, causal, key_padding_mask, scale):
    """p (B, Hq, Tq, Tk) and lse, in q's dtype; k already repeated to q's heads."""
    s = (q @ k.transpose(-1, -2)) * scale
    seen = visible_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    s = s.masked_fill(~seen, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows that see no key: exp(-inf - -inf)
    return p, lse.masked_fill(lse == -math.inf, math.inf)


def _repeat_kv(q, t):
    return t.repeat_interleave(q.shape[1] // t.shape[1], 1)


def reference_forward(q, k, v, causal: bool, key_padding_mask, scale: float):
    q, k, v = q.double(), k.double(), v.double()
    p, lse = _reference_probs(q, _repeat_kv(q, k), causal, key_padding_mask, scale)
    return (p @ _repeat_kv(q, v)).to(q.dtype), lse.to(_stats_dtype(q.dtype))


def reference_backward(do, q, k, v, o, lse, causal: bool, key_padding_mask, scale: float):
    dtype, (B, Hkv, Tk, D) = q.dtype, k.shape
    q, k, v, do = q.double(), k.double(), v.double(), do.double()
    kr, vr = _repeat_kv(q, k), _repeat_kv(q, v)
    p, _ = _reference_probs(q, kr, causal, key_padding_mask, scale)
    dp = do @ vr.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = scale * ds @ kr
    per_query_head = (scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do)
    dk, dv = (g.reshape(B, Hkv, -1, Tk, D).sum(2) for g in per_query_head)  # GQA: sum the group
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


# ---------------------------------------------------------------------------------------
# The cuda backend.


def cuda_forward(q, k, v, causal: bool, key_padding_mask, scale: float):
    ext = backend.cuda_extension()
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        ext.attention_forward(ptr(q), ptr(k), ptr(v), ptr(key_padding_mask), ptr(o), ptr(lse),
                              B, Hq, Hkv, Tq, Tk, D, int(causal), float(scale), DTYPE_CODE[q.dtype],
                              stream(q))
    return o, lse


def cuda_backward(do, q, k, v, o, lse, causal: bool, key_padding_mask, scale: float):
    ext = backend.cuda_extension()
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    workspace = torch.empty(ext.attention_backward_workspace(B, Hq, Hkv, Tq, Tk, D), dtype=torch.float32,
                            device=q.device)
    with torch.cuda.device(q.device):
        ext.attention_backward(ptr(do), ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse), ptr(key_padding_mask),
                               ptr(dq), ptr(dk), ptr(dv), ptr(workspace), B, Hq, Hkv, Tq, Tk, D,
                               int(causal), float(scale), DTYPE_CODE[q.dtype], stream(q))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.attention", "cpu": "kiln.kernels.cpu.attention"}


_REFERENCE = SimpleNamespace(forward=reference_forward, backward=reference_backward)
_CUDA = SimpleNamespace(forward=cuda_forward, backward=cuda_backward)


def _implementation(q: Tensor):
    name = backend.select(OP, q.device, q.dtype, DTYPES)
    if name in ("triton", "cuda") and q.shape[-1] not in GPU_HEAD_DIMS:
        raise ValueError(f"{OP}: the {name} backend takes head dims {GPU_HEAD_DIMS}, got "
                         f"{q.shape[-1]} (q {tuple(q.shape)})")
    return backend.kernels(name, _KERNEL_MODULES, _REFERENCE, _CUDA)


# ---------------------------------------------------------------------------------------
# The custom ops: contiguous (B, H, T, D) tensors.


@torch.library.custom_op("kiln::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
               scale: float) -> tuple[Tensor, Tensor]:
    """Returns (o, lse)."""
    forward = _implementation(q).forward
    return forward(q, k, v, causal, key_padding_mask, scale)


@_attention.register_fake
def _(q, k, v, key_padding_mask, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_stats_dtype(q.dtype))


@torch.library.custom_op("kiln::attention_backward", mutates_args=())
def _attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        key_padding_mask: Optional[Tensor], causal: bool, scale: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    backward = _implementation(q).backward
    return backward(do, q, k, v, o, lse, causal, key_padding_mask, scale)


@_attention_backward.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale = inputs
    ctx.save_for_backward(q, k, v, key_padding_mask, *output)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, grad_lse):
    q, k, v, key_padding_mask, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward(do.contiguous(), q, k, v, o, lse, key_padding_mask, ctx.causal,
                                     ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("kiln::attention", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# The public op.


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
              key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
              dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T * scale + mask) v for q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D).

    ``scale`` defaults to 1/sqrt(D); ``causal`` aligns bottom-right when Tq != Tk;
    ``key_padding_mask`` (B, Tk) bool, True = hidden key.
    """
    check_floating(OP, q=q, k=k, v=v)
    check_same_device_dtype(OP, q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{OP}: q, k, v must be 4-D (batch, heads, T, head_dim), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k and v must have one shape, got k {tuple(k.shape)} vs v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{OP}: k must match q's batch and head_dim: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{OP}: k/v heads must divide q heads (grouped-query attention): q "
                         f"{tuple(q.shape)} has {Hq}, k {tuple(k.shape)} has {Hkv}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{OP}: key_padding_mask must be bool (True = hidden key), got "
                            f"{str(key_padding_mask.dtype).removeprefix('torch.')}")
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(f"{OP}: key_padding_mask must have shape (batch, Tk) = {(B, Tk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{OP}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        key_padding_mask = key_padding_mask.contiguous()
    if dropout_p != 0.0:
        raise NotImplementedError(f"{OP}: dropout on the attention probabilities is not implemented "
                                  f"(dropout_p={dropout_p}); apply dropout to the output instead")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if q.numel() == 0 or Tk == 0:
        return q.new_zeros(q.shape) + 0 * q
    o, _ = _attention(q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, bool(causal),
                      float(scale))
    return o
