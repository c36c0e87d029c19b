"""Multi-head attention and the positional encodings of the notes (section 17)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln import ops
from kiln.ops.attention import composite


def _additive(mask: Tensor, name: str, dtype) -> Tensor:
    """A bool mask (True = hidden) as a float one (-inf = hidden); a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    if not mask.is_floating_point():
        raise TypeError(f"kiln.nn.MultiheadAttention: only bool and floating types of {name} are supported, "
                        f"got {str(mask.dtype).removeprefix('torch.')}")
    return mask.to(dtype)


def _pad_keys(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more key, visible: the mask padded by one column of 0 / False (torch's F.pad)."""
    return None if mask is None else F.pad(mask, (0, 1))


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on kiln.ops (linear_act projections, flash attention).

    Same constructor and forward arguments (names, defaults, ``batch_first=False``,
    ``need_weights=True``), parameters (in_proj_weight, in_proj_bias, or q/k/v_proj_weight
    when kdim / vdim differ; bias_k, bias_v with add_bias_kv; out_proj) and state_dict keys,
    so a torch state_dict loads and the outputs and gradients match torch's. Returns
    ``(attn_output, attn_weights)``, weights None when ``need_weights=False``.

    Masks as torch: ``attn_mask`` (L, S) or (batch * num_heads, L, S), bool (True = not
    allowed) or float (added); ``key_padding_mask`` (batch, S) bool or float; ``is_causal``
    is torch's hint that attn_mask is the causal mask (torch also requires the mask): with
    L == S (and no add_bias_kv / add_zero_attn) kiln then runs its causal kernel and never
    reads the mask, otherwise the mask runs as given. Every other mask goes to
    kiln.ops.attention as an additive ``attn_bias`` (bool key padding as its
    key_padding_mask): no value of any mask is read in Python, so torch.compile traces this
    without a graph break. A query that sees no key gives 0 (and zero gradients), as torch's
    SDPA path (need_weights=False) gives; torch's need_weights=True path gives NaN there,
    kiln 0 (weights included).

    Run by the explicit PyTorch path (kiln.ops.attention's ``composite``: T x T
    probabilities), not the flash kernels: ``need_weights=True`` (torch's default: pass
    need_weights=False for the kernels), and dropout in training (on the probabilities with
    torch's RNG, as torch's slow path; eval ignores ``dropout``). ``add_bias_kv`` appends
    bias_k / bias_v as one more key and value, ``add_zero_attn`` one zero key and value per
    head, both with the masks padded by a visible column, as torch.

    A torch module whose attention is swapped for this one (e.g. torch's
    TransformerEncoderLayer.self_attn) may still take torch's fused fast path in eval and
    never call it: use kiln.nn.TransformerEncoderLayer and friends.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)

    def _projections(self):
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(E)
        return (w_q, b_q), (w_k, b_k), (w_v, b_v)

    def _check(self, query, key, value, key_padding_mask, attn_mask):
        name = "kiln.nn.MultiheadAttention"
        unbatched = query.dim() == 2
        if query.dim() not in (2, 3):
            raise ValueError(f"{name}: query should be unbatched 2D or batched 3D, got {query.dim()}-D "
                             f"{tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{name}: key and value must be {query.dim()}-D like query: query "
                             f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"{name}: query's last dim must be embed_dim {self.embed_dim}, got query "
                             f"{tuple(query.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{name}: key and value must have one batch and sequence length: key "
                             f"{tuple(key.shape)} vs value {tuple(value.shape)}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"{name}: key's last dim must be kdim {self.kdim} and value's vdim {self.vdim}: "
                             f"key {tuple(key.shape)}, value {tuple(value.shape)}")
        batch_dim = 0 if self.batch_first else 1
        if not unbatched and key.shape[batch_dim] != query.shape[batch_dim]:
            raise ValueError(f"{name}: key's batch size must match query's: query {tuple(query.shape)} vs key "
                             f"{tuple(key.shape)} (batch_first={self.batch_first})")
        if key_padding_mask is not None:
            B = None if unbatched else query.shape[batch_dim]
            S = key.shape[0 if unbatched else 1 - batch_dim]
            want = (S,) if unbatched else (B, S)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"{name}: key_padding_mask must have shape {want} (batch, source length), got "
                                 f"{tuple(key_padding_mask.shape)} (query {tuple(query.shape)}, key "
                                 f"{tuple(key.shape)})")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"{name}: attn_mask must be 2-D (L, S) or 3-D (batch * num_heads, L, S), got "
                             f"{tuple(attn_mask.shape)}")
        return unbatched

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        unbatched = self._check(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError("kiln.nn.MultiheadAttention: need attn_mask if specifying the is_causal hint "
                               "(as torch); torch.nn.Transformer.generate_square_subsequent_mask makes it")
        self_attention = query is key and key is value
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        H, hd = self.num_heads, self.head_dim
        if attn_mask is not None:
            want = (L, S) if attn_mask.dim() == 2 else ((1 if unbatched else B) * H, L, S)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"kiln.nn.MultiheadAttention: attn_mask should have shape {want}, got "
                                 f"{tuple(attn_mask.shape)} (query {tuple(query.shape)}, key length {S}, "
                                 f"num_heads {H})")

        (w_q, b_q), (w_k, b_k), (w_v, b_v) = self._projections()
        if self._qkv_same_embed_dim and self_attention:
            # self-attention: one GEMM for q, k and v
            qkv = ops.linear_act(query, self.in_proj_weight, self.in_proj_bias, "identity")
            q, k, v = qkv.split(E, dim=-1)
        else:
            q = ops.linear_act(query, w_q, b_q, "identity")
            k = ops.linear_act(key, w_k, b_k, "identity")
            v = ops.linear_act(value, w_v, b_v, "identity")
        dtype = q.dtype

        # Masks: causality from the is_causal hint only; the rest additive (bool padding stays bool).
        causal = is_causal and L == S and self.bias_k is None and not self.add_zero_attn
        bias = None if attn_mask is None or causal else _additive(attn_mask, "attn_mask", dtype)
        padding = key_padding_mask
        if padding is not None and padding.dtype != torch.bool:
            padding = _additive(padding, "key_padding_mask", dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E).to(dtype)], 1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E).to(dtype)], 1)
            bias, padding = _pad_keys(bias), _pad_keys(padding)
        heads = lambda t: t.reshape(B, t.shape[1], H, hd).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, hd)], 2)
            v = torch.cat([v, v.new_zeros(B, H, 1, hd)], 2)
            bias, padding = _pad_keys(bias), _pad_keys(padding)
        S = k.shape[2]
        if bias is not None and bias.dim() == 3:  # (B * H, L, S): per batch and head
            bias = bias.reshape(B, H, L, S)
        if padding is not None and padding.dtype != torch.bool:
            padding = padding.reshape(B, 1, 1, S)
            bias, padding = (padding if bias is None else bias + padding), None

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = composite(q, k, v, causal, padding, bias, None, dropout_p, need_weights=True)
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights.squeeze(0)
        else:
            out = ops.attention(q, k, v, causal=causal, key_padding_mask=padding, dropout_p=dropout_p,
                                attn_bias=bias)
        out = ops.linear_act(out.transpose(1, 2).reshape(B, L, E), self.out_proj.weight, self.out_proj.bias,
                             "identity")
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class SinusoidalPositionalEncoding(nn.Module):
    """x_t + p_t with p_{t,2i} = sin(t / 10000^{2i/D}), p_{t,2i+1} = cos(t / 10000^{2i/D})
    (the notes, section 17.6). Fixed: a buffer, not a parameter, kept out of the state_dict.

    Input (B, T, D) (or (T, D)); positions start at ``offset`` (a KV-cache decode step)."""

    def __init__(self, dim: int, max_len: int = 8192, base: float = 10000.0):
        super().__init__()
        if dim < 1 or max_len < 1:
            raise ValueError(f"SinusoidalPositionalEncoding: dim and max_len must be >= 1, got {dim}, {max_len}")
        t = torch.arange(max_len, dtype=torch.float64)[:, None]
        two_i = torch.arange(0, dim, 2, dtype=torch.float64)
        angle = t / base ** (two_i / dim)
        table = torch.zeros(max_len, dim, dtype=torch.float64)
        table[:, 0::2] = torch.sin(angle)
        table[:, 1::2] = torch.cos(angle[:, : dim // 2])
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        T = x.shape[-2]
        if offset + T > self.table.shape[0]:
            raise ValueError(f"SinusoidalPositionalEncoding: positions up to {offset + T} exceed max_len "
                             f"{self.table.shape[0]}")
        if x.shape[-1] != self.table.shape[1]:
            raise ValueError(f"SinusoidalPositionalEncoding: x's last dim {x.shape[-1]} != dim {self.table.shape[1]}")
        return x + self.table[offset:offset + T].to(x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """x_t + e_t with e a learned (max_len, D) table (GPT-2's wpe)."""

    def __init__(self, max_len: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        T = x.shape[-2]
        if offset + T > self.weight.shape[0]:
            raise ValueError(f"LearnedPositionalEmbedding: positions up to {offset + T} exceed max_len "
                             f"{self.weight.shape[0]}")
        return x + self.weight[offset:offset + T]
