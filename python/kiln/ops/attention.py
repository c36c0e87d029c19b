"""attention: softmax(q k^T * scale + mask) v, flash-style (the notes, section 17).

Layout as torch.nn.functional.scaled_dot_product_attention: q (B, Hq, Tq, D), k and v
(B, Hkv, Tk, D); Hkv divides Hq (grouped-query attention: query head h reads kv head
h // (Hq // Hkv)); Tq may differ from Tk (cross-attention). Masks: ``causal`` aligns
bottom-right (query i sees keys j <= i + Tk - Tq, as FlashAttention and a KV cache need;
SDPA's is_causal aligns top-left, the same thing when Tq == Tk), ``key_padding_mask``
(B, Tk) bool, True = that key is hidden, and ``attn_bias``, an additive float mask
broadcastable to (B, Hq, Tq, Tk) (each dim 1 or full; -inf hides a key), added to the
scaled scores as SDPA's float attn_mask is. A query row that sees no key gives 0 (and zero
gradients), never NaN: SDPA's answer; torch's softmax-then-matmul path (MultiheadAttention
with need_weights=True) gives NaN there.

Forward streams key blocks past each query block with the online softmax and never
materialises Tq x Tk (the bias is read tile by tile); it saves q, k, v, the bias, the output
o and per row the log-sum-exp lse = log sum_j exp(s_ij) (float32; float64 for float64 input;
+inf for a row that sees no key, so that backward's p = exp(s - lse) is 0 there). Backward
recomputes p tile by tile from q, k, bias and lse (FlashAttention-2): delta = rowsum(do * o)
first, then dv = p^T do, dp = do v^T, ds = p (dp - delta), dq = scale ds k,
dk = scale ds^T q. The gradient of a bias that requires grad is ds summed over its
broadcast dims; it is computed in PyTorch here (``_bias_grad``, query block by query block,
never more than (B, Hq, 128, Tk) at once), on every backend.

Backends: reference, cpu and triton take every mask; the cuda form takes causal and
key_padding_mask and refuses attn_bias (ValueError naming it).

Not in the kernels, explicit PyTorch instead (``composite``, softmax(q k^T scale + mask) v
written out, differentiable): ``dropout_p > 0`` (dropout on the probabilities with torch's
RNG, as SDPA's math path and MultiheadAttention's slow path do), and double backward (when
autograd records the backward, create_graph=True, the gradients are formed by
differentiable PyTorch ops from the inputs, never from the saved lse).
Autocast: "lower" (torch runs SDPA in the region's dtype).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln import backend

from . import _autocast, _cpu_eager
from ._checks import check_floating, check_same_device_dtype
from ._cuda_launch import DTYPE_CODE, ptr, stream

OP = "attention"
# Head dims the GPU forms are built and tested for (the cpu form and the reference take any).
GPU_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
# Query rows per step of _bias_grad.
BIAS_GRAD_BLOCK = 128


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_keys(Tq: int, Tk: int, causal: bool, key_padding_mask: Optional[Tensor], device,
                 q0: int = 0, q1: Optional[int] = None) -> Tensor:
    """(B or 1, 1, q1 - q0, Tk) bool: True where query i (q0 <= i < q1) may attend key j."""
    q1 = Tq if q1 is None else q1
    rows = torch.arange(q0, q1, device=device)[:, None]
    seen = torch.ones(q1 - q0, Tk, dtype=torch.bool, device=device)
    if causal:
        seen = torch.arange(Tk, device=device)[None, :] <= rows + (Tk - Tq)
    seen = seen[None, None]
    if key_padding_mask is not None:
        seen = seen & ~key_padding_mask[:, None, None, :].to(device)
    return seen


def _repeat_kv(q, t):
    return t.repeat_interleave(q.shape[1] // t.shape[1], 1)


def _scores(q, k, causal, key_padding_mask, attn_bias, scale):
    """Masked scaled scores (B, Hq, Tq, Tk); k already repeated to q's heads."""
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias
    seen = visible_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    return s.masked_fill(~seen, -math.inf)


def _safe_softmax(s):
    """(p, lse) of the rows of s; a row with no finite score gives p = 0 and lse = +inf.
    Differentiable (no NaN enters the graph): the shift is detached, softmax is shift-free."""
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    seen = total > 0
    p = e / torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, m + torch.log(torch.where(seen, total, torch.ones_like(total))), math.inf)
    return p, lse.squeeze(-1)


def _reduce_to(g: Tensor, shape) -> Tensor:
    """Sum g (B, Hq, Tq, Tk) over the dims a bias of ``shape`` broadcast along."""
    lead = g.dim() - len(shape)
    g = g.sum(tuple(range(lead))) if lead else g
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(dims, keepdim=True) if dims else g


def composite(q, k, v, causal: bool = False, key_padding_mask=None, attn_bias=None, scale=None,
              dropout_p: float = 0.0, need_weights: bool = False):
    """softmax(q k^T scale + mask) v written out in differentiable PyTorch, in q's dtype:
    (o, p) where p (B, Hq, Tq, Tk) are the probabilities after dropout (None unless
    need_weights). Serves dropout, the attention weights and double backward."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, _ = _safe_softmax(_scores(q, _repeat_kv(q, k), causal, key_padding_mask, attn_bias, scale))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p, training=True)
    return p @ _repeat_kv(q, v), (p if need_weights else None)


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference: explicit softmax(q k^T) v in float64, T x T and all.


def reference_forward(q, k, v, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    bias = None if attn_bias is None else attn_bias.double()
    p, lse = _safe_softmax(_scores(q, _repeat_kv(q, k), causal, key_padding_mask, bias, scale))
    return (p @ _repeat_kv(q, v)).to(dtype), lse.to(_stats_dtype(dtype))


def _grads_from_probs(do, q, k, v, p, scale):
    """(dq, dk, dv, ds) from the probabilities p; k, v unrepeated (GQA sums the group)."""
    B, Hkv, Tk, D = k.shape
    kr, vr = _repeat_kv(q, k), _repeat_kv(q, v)
    dp = do @ vr.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = scale * ds @ kr
    per_query_head = (scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do)
    dk, dv = (g.reshape(B, Hkv, -1, Tk, D).sum(2) for g in per_query_head)  # GQA: sum the group
    return dq, dk, dv, ds


def reference_backward(do, q, k, v, o, lse, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    dtype = q.dtype
    q, k, v, do = q.double(), k.double(), v.double(), do.double()
    bias = None if attn_bias is None else attn_bias.double()
    p, _ = _safe_softmax(_scores(q, _repeat_kv(q, k), causal, key_padding_mask, bias, scale))
    dq, dk, dv, _ = _grads_from_probs(do, q, k, v, p, scale)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _bias_grad(do, q, k, v, o, lse, causal, key_padding_mask, attn_bias, scale):
    """d attn_bias = ds = p (dp - delta), summed to the bias's shape; q block by q block
    from the saved lse (p = exp(s - lse)), so at most (B, Hq, BIAS_GRAD_BLOCK, Tk) at once."""
    kr, vr = _repeat_kv(q, k), _repeat_kv(q, v)
    acc = _stats_dtype(q.dtype)
    delta = (do.to(acc) * o.to(acc)).sum(-1)
    Tq, Tk = q.shape[2], k.shape[2]
    full = attn_bias.expand(q.shape[0], q.shape[1], Tq, Tk)
    blocks = []
    for q0 in range(0, Tq, BIAS_GRAD_BLOCK):
        q1 = min(Tq, q0 + BIAS_GRAD_BLOCK)
        s = (q[:, :, q0:q1] @ kr.transpose(-1, -2)).to(acc) * scale + full[:, :, q0:q1].to(acc)
        seen = visible_keys(Tq, Tk, causal, key_padding_mask, q.device, q0, q1)
        p = torch.exp(s - lse[:, :, q0:q1, None].to(acc)).masked_fill(~seen, 0.0)
        dp = (do[:, :, q0:q1] @ vr.transpose(-1, -2)).to(acc)
        rows = q1 - q0 if attn_bias.shape[2] != 1 else 1
        blocks.append(_reduce_to(p * (dp - delta[:, :, q0:q1, None]),
                                 attn_bias.shape[:2] + (rows, attn_bias.shape[3])))
    grad = torch.cat(blocks, 2) if attn_bias.shape[2] != 1 else torch.stack(blocks).sum(0)
    return grad.to(attn_bias.dtype)


# ---------------------------------------------------------------------------------------
# The cuda backend.


def _cuda_refuses_bias(attn_bias):
    if attn_bias is not None:
        raise ValueError(f"{OP}: the cuda backend takes no attn_bias (it has causal and key_padding_mask); "
                         "use the triton backend for an arbitrary mask")


def cuda_forward(q, k, v, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    _cuda_refuses_bias(attn_bias)
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


def cuda_backward(do, q, k, v, o, lse, causal: bool, key_padding_mask, scale: float, attn_bias=None):
    _cuda_refuses_bias(attn_bias)
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
# The custom ops: contiguous (B, H, T, D) tensors; attn_bias None or contiguous 4-D, each
# dim 1 or full.


@torch.library.custom_op("kiln::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
               attn_bias: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Returns (o, lse)."""
    forward = _implementation(q).forward
    if attn_bias is None:  # the kernel forms' signature without the bias, as before it existed
        return forward(q, k, v, causal, key_padding_mask, scale)
    return forward(q, k, v, causal, key_padding_mask, scale, attn_bias)


@_attention.register_fake
def _(q, k, v, key_padding_mask, attn_bias, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_stats_dtype(q.dtype))


@torch.library.custom_op("kiln::attention_backward", mutates_args=())
def _attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        key_padding_mask: Optional[Tensor], attn_bias: Optional[Tensor], causal: bool,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_body(do, q, k, v, o, lse, key_padding_mask, attn_bias, causal, scale)


def _backward_body(do, q, k, v, o, lse, key_padding_mask, attn_bias, causal: bool, scale: float):
    backward = _implementation(q).backward
    if attn_bias is None:
        return backward(do, q, k, v, o, lse, causal, key_padding_mask, scale)
    return backward(do, q, k, v, o, lse, causal, key_padding_mask, scale, attn_bias)


@_attention_backward.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, attn_bias, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, attn_bias, causal, scale = inputs
    # the second outputs are internal (saved for backward, never returned to the caller): no
    # zero-filled gradient is made for them
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, key_padding_mask, attn_bias, *output)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, grad_lse):
    if do is None:  # only an internal output reached backward: nothing flows to the inputs
        return (None, None, None, None, None, None, None)
    q, k, v, key_padding_mask, attn_bias, o, lse = ctx.saved_tensors
    need_bias = attn_bias is not None and ctx.needs_input_grad[4]
    if torch.is_grad_enabled():
        # create_graph=True: differentiable PyTorch from the inputs (never the saved lse)
        p, _ = _safe_softmax(_scores(q, _repeat_kv(q, k), ctx.causal, key_padding_mask, attn_bias, ctx.scale))
        dq, dk, dv, ds = _grads_from_probs(do, q, k, v, p, ctx.scale)
        dbias = _reduce_to(ds, attn_bias.shape) if need_bias else None
        return dq, dk, dv, None, dbias, None, None
    do = do.contiguous()
    # grad mode is off here: where nothing could observe the dispatch, skip it (_cpu_eager)
    direct = _cpu_eager.direct(do, q, k, v, o, lse, key_padding_mask, attn_bias)
    dq, dk, dv = (_backward_body if direct else _attention_backward)(do, q, k, v, o, lse, key_padding_mask,
                                                                     attn_bias, ctx.causal, ctx.scale)
    dbias = None
    if need_bias:
        dbias = _bias_grad(do, q, k, v, o, lse, ctx.causal, key_padding_mask, attn_bias, ctx.scale)
    return dq, dk, dv, None, dbias, None, None


_attention_call = _cpu_eager.autograd_op(_attention, _backward, _setup_context)
_autocast.register("kiln::attention", "lower")


# ---------------------------------------------------------------------------------------
# The public op.


def _check_bias(attn_bias: Tensor, q: Tensor, k: Tensor) -> tuple:
    """The 4-D shape attn_bias is viewed as: each dim 1 or (B, Hq, Tq, Tk)'s."""
    B, Hq, Tq, _ = q.shape
    full = (B, Hq, Tq, k.shape[2])
    if attn_bias.dtype == torch.bool or not attn_bias.is_floating_point():
        raise TypeError(f"{OP}: attn_bias must be a floating additive mask (-inf hides a key), got dtype "
                        f"{str(attn_bias.dtype).removeprefix('torch.')} (shape {tuple(attn_bias.shape)}); "
                        "for a bool mask pass torch.zeros(shape, dtype=q.dtype).masked_fill(mask, -inf)")
    check_same_device_dtype(OP, q=q, attn_bias=attn_bias)
    padded = (1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape)
    if attn_bias.dim() > 4 or any(n not in (1, m) for n, m in zip(padded, full)):
        raise ValueError(f"{OP}: attn_bias must broadcast to (batch, q heads, Tq, Tk) = {full} with each dim 1 "
                         f"or full, got {tuple(attn_bias.shape)} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    return padded


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
              key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
              dropout_p: float = 0.0, attn_bias: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T * scale + mask) v for q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D).

    ``scale`` defaults to 1/sqrt(D); ``causal`` aligns bottom-right when Tq != Tk;
    ``key_padding_mask`` (B, Tk) bool, True = hidden key; ``attn_bias`` float, added to the
    scaled scores, broadcastable to (B, Hq, Tq, Tk) with each dim 1 or full (SDPA's float
    attn_mask; it gets a gradient when it requires one). ``dropout_p > 0`` drops probabilities
    with torch's RNG and runs the explicit PyTorch path (``composite``), not a kernel.
    """
    check_floating(OP, q=q, k=k, v=v)
    if torch.is_autocast_enabled(q.device.type):
        # torch's SDPA casts mixed float inputs to the region's dtype; so do we, before the checks
        # (kiln::attention's autocast rule does the same at dispatch, for torch.ops callers)
        region = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(region) for t in (q, k, v))
        if attn_bias is not None and attn_bias.is_floating_point():
            attn_bias = attn_bias.to(region)
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
                            f"{str(key_padding_mask.dtype).removeprefix('torch.')}; pass a float mask as "
                            "attn_bias")
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(f"{OP}: key_padding_mask must have shape (batch, Tk) = {(B, Tk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{OP}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device} "
                             f"(key_padding_mask {tuple(key_padding_mask.shape)}, q {tuple(q.shape)})")
        key_padding_mask = key_padding_mask.contiguous()
    bias_shape = None if attn_bias is None else _check_bias(attn_bias, q, k)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1], got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if dropout_p > 0 or q.numel() == 0 or k.numel() == 0:
        # dropout: torch's RNG on the explicit probabilities; zero-size: what SDPA returns (an
        # empty product over Tk = 0 is 0), with gradients, and no kernel launched
        return composite(q, k, v, bool(causal), key_padding_mask, attn_bias, float(scale), dropout_p)[0]
    bias = None if attn_bias is None else attn_bias.reshape(bias_shape).contiguous()
    o, _ = _attention_call(q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, bias, bool(causal),
                      float(scale))
    return o
