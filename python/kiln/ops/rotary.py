"""rotary_embedding: rotary position embedding (RoPE) of q and k, as Hugging Face's
apply_rotary_pos_emb: y = x * cos + rotate(x) * sin, per head, with cos / sin of each
token's position.

Layouts of the head dim's D columns, as pairs (a, b):
* rotate-half (interleaved=False, HF LLaMA / Mistral / Gemma): (i, i + D/2), rotate(x) =
  cat(-x[D/2:], x[:D/2]); cos / sin as HF's LlamaRotaryEmbedding writes them, cat(f, f);
* interleaved (GPT-J, the original RoFormer): (2i, 2i + 1), rotate(x) = (-x1, x0, -x3, x2,
  ...); cos / sin with each frequency repeated twice in place, (f0, f0, f1, f1, ...).
Per pair: y_a = x_a c_a - x_b s_a, y_b = x_b c_b + x_a s_b. Backward is the transpose,
dx_a = dy_a c_a + dy_b s_b, dx_b = dy_b c_b - dy_a s_a: the inverse rotation (sin -> -sin)
when cos / sin have equal halves, as every RoPE table has, and exact for any table.

q (B, Hq, T, D) and k (B, Hk, T, D) (unsqueeze_dim=1, HF's default) or (B, T, H, D)
(unsqueeze_dim=2), Hq and Hk free (grouped-query attention); cos, sin (B or 1, T, D) (or
(T, D)), or with position_ids (B or 1, T) tables (P, D) that position_ids index (HF's
older API). A q that is the (1, 2) transpose of a contiguous tensor (the usual
``proj(x).view(B, T, H, D).transpose(1, 2)``) is read in place, without a copy.

Outputs are fresh tensors: kiln never rotates q or k in place. A custom op that mutates
its inputs needs mutates_args and breaks on any input autograd saved elsewhere (q is often
a view of a projection output another node still holds), and the saving (one output
allocation) is small next to attention. Backward writes dq, dk into fresh tensors too.

Saved for backward: cos and sin (and q, k only when cos or sin needs a gradient).
Autocast: torch's composite (q * cos + rotate_half(q) * sin) is in none of autocast's
lists: it runs in its inputs' dtype, and so does kiln (no rule registered).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from kiln import backend

from . import _cpu_eager
from ._checks import check_floating, check_same_device_dtype
from ._cuda_launch import DTYPE_CODE, ptr, stream

OP = "rotary_embedding"


# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference.


def rotate(x: Tensor, interleaved: bool) -> Tensor:
    """rotate_half(x) (HF) or the interleaved pair rotation, over the last dim."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _broadcast(table: Tensor, seq_dim: int) -> Tensor:
    """cos / sin (CB, T, D) shaped to broadcast against x (B, S1, S2, D)."""
    return table[:, None] if seq_dim == 2 else table[:, :, None]


def apply(x: Tensor, cos: Tensor, sin: Tensor, seq_dim: int, interleaved: bool) -> Tensor:
    """x * cos + rotate(x) * sin in torch ops (differentiable in all three)."""
    return x * _broadcast(cos, seq_dim) + rotate(x, interleaved) * _broadcast(sin, seq_dim)


def apply_transpose(dy: Tensor, cos: Tensor, sin: Tensor, seq_dim: int, interleaved: bool) -> Tensor:
    """The transpose of apply in x: dy * cos - rotate(dy * sin) (rotate^T = -rotate)."""
    return dy * _broadcast(cos, seq_dim) - rotate(dy * _broadcast(sin, seq_dim), interleaved)


def reference_forward(x, cos, sin, seq_dim: int, interleaved: bool):
    return apply(x.double(), cos.double(), sin.double(), seq_dim, interleaved).to(x.dtype)


def reference_backward(dy, cos, sin, seq_dim: int, interleaved: bool):
    return apply_transpose(dy.double(), cos.double(), sin.double(), seq_dim, interleaved).to(dy.dtype)


# ---------------------------------------------------------------------------------------
# The cuda backend.


def _cuda_apply(x, cos, sin, seq_dim: int, interleaved: bool, inverse: bool):
    ext = backend.cuda_extension()
    y = torch.empty_like(x)
    B, S1, S2, D = x.shape
    with torch.cuda.device(x.device):
        ext.rotary_apply(ptr(x), ptr(cos), ptr(sin), ptr(y), B, S1, S2, D, cos.shape[0], seq_dim, int(interleaved),
                         int(inverse), DTYPE_CODE[x.dtype], stream(x))
    return y


def cuda_forward(x, cos, sin, seq_dim: int, interleaved: bool):
    return _cuda_apply(x, cos, sin, seq_dim, interleaved, False)


def cuda_backward(dy, cos, sin, seq_dim: int, interleaved: bool):
    return _cuda_apply(dy, cos, sin, seq_dim, interleaved, True)


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.rotary", "cpu": "kiln.kernels.cpu.rotary"}

_REFERENCE = SimpleNamespace(forward=reference_forward, backward=reference_backward)
_CUDA = SimpleNamespace(forward=cuda_forward, backward=cuda_backward)


def _implementation(t: Tensor):
    return backend.implementation(OP, t, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA)


# ---------------------------------------------------------------------------------------
# The custom ops: q, k (B, S1, S2, D) and cos, sin (CB, T, D) contiguous; the position
# of a row is its index along dim seq_dim (2: (B, H, T, D), 1: (B, T, H, D)).


@torch.library.custom_op("kiln::rotary_embedding", mutates_args=())
def _rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_seq_dim: int, k_seq_dim: int,
            interleaved: bool) -> tuple[Tensor, Tensor]:
    impl = _implementation(q)
    return impl.forward(q, cos, sin, q_seq_dim, interleaved), impl.forward(k, cos, sin, k_seq_dim, interleaved)


@_rotary.register_fake
def _(q, k, cos, sin, q_seq_dim, k_seq_dim, interleaved):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("kiln::rotary_embedding_backward", mutates_args=())
def _rotary_backward(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, q_seq_dim: int, k_seq_dim: int,
                     interleaved: bool) -> tuple[Tensor, Tensor]:
    impl = _implementation(dq)
    return impl.backward(dq, cos, sin, q_seq_dim, interleaved), impl.backward(dk, cos, sin, k_seq_dim, interleaved)


@_rotary_backward.register_fake
def _(dq, dk, cos, sin, q_seq_dim, k_seq_dim, interleaved):
    return torch.empty_like(dq), torch.empty_like(dk)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, q_seq_dim, k_seq_dim, interleaved = inputs
    table_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.save_for_backward(cos, sin, q if table_grads else None, k if table_grads else None)
    ctx.seq_dims, ctx.interleaved = (q_seq_dim, k_seq_dim), interleaved


def _table_grad(parts, cb: int) -> Tensor:
    """The sum of the per-element products over what cos / sin were broadcast along."""
    total = None
    for v, seq_dim in parts:
        g = v.sum(dim=1 if seq_dim == 2 else 2)  # over the heads: (B, T, D)
        g = g.sum(0, keepdim=True) if cb == 1 else g
        total = g if total is None else total + g
    return total


def _backward(ctx, dq, dk):
    cos, sin, q, k = ctx.saved_tensors
    (q_seq, k_seq), inter = ctx.seq_dims, ctx.interleaved
    dq, dk = dq.contiguous(), dk.contiguous()
    if torch.is_grad_enabled():  # autograd records this backward: double backward, in torch ops
        grad_q = apply_transpose(dq, cos, sin, q_seq, inter)
        grad_k = apply_transpose(dk, cos, sin, k_seq, inter)
    else:
        grad_q, grad_k = _rotary_backward(dq, dk, cos, sin, q_seq, k_seq, inter)
    grad_cos = grad_sin = None
    if ctx.needs_input_grad[2]:
        grad_cos = _table_grad([(dq * q, q_seq), (dk * k, k_seq)], cos.shape[0])
    if ctx.needs_input_grad[3]:
        grad_sin = _table_grad([(dq * rotate(q, inter), q_seq), (dk * rotate(k, inter), k_seq)], sin.shape[0])
    return (grad_q if ctx.needs_input_grad[0] else None, grad_k if ctx.needs_input_grad[1] else None,
            grad_cos, grad_sin, None, None, None)


_rotary_call = _cpu_eager.autograd_op(_rotary, _backward, _setup_context)


# ---------------------------------------------------------------------------------------
# The public op.


def _physical(x: Tensor, unsqueeze_dim: int) -> tuple[Tensor, int, bool]:
    """(x4, seq_dim, transposed): x as a contiguous (B, S1, S2, D) tensor without a copy
    where its strides allow, the dim of x4 that holds the position, and whether x4 is x
    with dims 1 and 2 swapped."""
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    if x.is_contiguous():
        return x, seq_dim, False
    swapped = x.transpose(1, 2)
    if swapped.is_contiguous():
        return swapped, 3 - seq_dim, True
    return x.contiguous(), seq_dim, False


def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                     interleaved: bool = False, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """(q_rot, k_rot) = (q * cos + rotate(q) * sin, k * cos + rotate(k) * sin), HF's
    apply_rotary_pos_emb (interleaved=False) or GPT-J's pair rotation (interleaved=True).

    q (B, Hq, T, D), k (B, Hk, T, D) for unsqueeze_dim=1 (HF's default), (B, T, H, D) for
    unsqueeze_dim=2; D even. cos, sin (B or 1, T, D) or (T, D); with position_ids (B or 1,
    T) of integers, cos and sin are (P, D) tables and row position_ids[b, t] applies.
    """
    check_floating(OP, q=q, k=k, cos=cos, sin=sin)
    check_same_device_dtype(OP, q=q, k=k, cos=cos, sin=sin)
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"{OP}: unsqueeze_dim must be 1 (q (B, H, T, D)) or 2 (q (B, T, H, D)), got {unsqueeze_dim}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be 4-D, got shape {tuple(t.shape)}")
    seq = 2 if unsqueeze_dim == 1 else 1
    B, T, D = q.shape[0], q.shape[seq], q.shape[-1]
    if k.shape[0] != B or k.shape[seq] != T or k.shape[-1] != D:
        raise ValueError(f"{OP}: k must match q's batch, sequence and head dims: q {tuple(q.shape)} vs k "
                         f"{tuple(k.shape)}")
    if D % 2:
        raise ValueError(f"{OP}: the head dim D must be even to form pairs, got q {tuple(q.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"{OP}: cos and sin must have the same shape: cos {tuple(cos.shape)} vs sin "
                         f"{tuple(sin.shape)}")
    if position_ids is not None:
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise TypeError(f"{OP}: position_ids must be an integer tensor, got dtype {position_ids.dtype}")
        if cos.dim() != 2 or cos.shape[-1] != D:
            raise ValueError(f"{OP}: with position_ids, cos and sin must be (positions, D) tables: cos "
                             f"{tuple(cos.shape)} vs q {tuple(q.shape)}")
        if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
            raise ValueError(f"{OP}: position_ids must be (B or 1, T) = ({B} or 1, {T}), got "
                             f"{tuple(position_ids.shape)} (q {tuple(q.shape)})")
        cos, sin = cos[position_ids], sin[position_ids]
    elif cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1] != T or cos.shape[2] != D:
        raise ValueError(f"{OP}: cos and sin must be (B or 1, T, D) = ({B} or 1, {T}, {D}), got "
                         f"{tuple(cos.shape)} (q {tuple(q.shape)})")
    if q.numel() == 0 or k.numel() == 0:  # nothing to launch for one of them: the torch form
        seq_dim = 2 if unsqueeze_dim == 1 else 1
        return apply(q, cos, sin, seq_dim, interleaved), apply(k, cos, sin, seq_dim, interleaved)
    q4, q_seq, q_swapped = _physical(q, unsqueeze_dim)
    k4, k_seq, k_swapped = _physical(k, unsqueeze_dim)
    q_rot, k_rot = _rotary_call(q4, k4, cos.contiguous(), sin.contiguous(), q_seq, k_seq, bool(interleaved))
    return (q_rot.transpose(1, 2) if q_swapped else q_rot, k_rot.transpose(1, 2) if k_swapped else k_rot)
