"""Multi-head attention and the positional encodings of the notes (section 17)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from kiln import ops


def _is_causal_mask(attn_mask: Tensor, L: int, S: int) -> bool:
    """True when attn_mask hides exactly the keys above the (bottom-right) diagonal, as
    torch.nn.Transformer.generate_square_subsequent_mask (float -inf) or a bool triu do."""
    if attn_mask.shape != (L, S):
        return False
    hidden = torch.ones(L, S, dtype=torch.bool, device=attn_mask.device).triu(S - L + 1)
    if attn_mask.dtype == torch.bool:
        return bool(torch.equal(attn_mask, hidden))
    return bool(torch.equal(torch.isneginf(attn_mask), hidden) and (attn_mask[~hidden] == 0).all())


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on kiln.ops (linear_act projections, flash attention).

    Same constructor, parameters (in_proj_weight, in_proj_bias, or q/k/v_proj_weight when
    kdim / vdim differ; out_proj) and state_dict keys, so a torch state_dict loads and the
    outputs match. Differences, all explicit: ``batch_first`` defaults to True; attention
    weights are never formed (``need_weights`` must be False, the default here); masks are
    ``key_padding_mask`` (bool) and causality (``is_causal=True`` or an ``attn_mask`` that is
    the causal mask), other attn_masks raise; dropout on the attention weights, add_bias_kv
    and add_zero_attn are not implemented (refused, not ignored).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = True, device=None, dtype=None):
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("kiln.nn.MultiheadAttention: add_bias_kv / add_zero_attn are not implemented")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
                         batch_first=batch_first, device=device, dtype=dtype)

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

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("kiln.nn.MultiheadAttention never forms the attention weights; pass need_weights=False")
        if self.training and self.dropout > 0:
            raise NotImplementedError(f"kiln.nn.MultiheadAttention: attention dropout ({self.dropout}) is "
                                      "not implemented; use dropout=0.0 or eval()")
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        causal = is_causal
        if attn_mask is not None:
            if not _is_causal_mask(attn_mask, L, S):
                raise NotImplementedError("kiln.nn.MultiheadAttention takes only the causal attn_mask "
                                          f"(or is_causal=True); got a {tuple(attn_mask.shape)} mask")
            causal = True
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise TypeError("kiln.nn.MultiheadAttention: key_padding_mask must be bool (True = ignore)")
        (w_q, b_q), (w_k, b_k), (w_v, b_v) = self._projections()
        H, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim and self_attention:
            # self-attention: one GEMM for q, k and v
            qkv = ops.linear_act(query, self.in_proj_weight, self.in_proj_bias, "identity")
            q, k, v = qkv.split(E, dim=-1)
        else:
            q = ops.linear_act(query, w_q, b_q, "identity")
            k = ops.linear_act(key, w_k, b_k, "identity")
            v = ops.linear_act(value, w_v, b_v, "identity")
        heads = lambda t, T: t.reshape(B, T, H, hd).transpose(1, 2)
        out = ops.attention(heads(q, L), heads(k, S), heads(v, S), causal=causal,
                            key_padding_mask=key_padding_mask)
        out = ops.linear_act(out.transpose(1, 2).reshape(B, L, E), self.out_proj.weight, self.out_proj.bias,
                             "identity")
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


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
