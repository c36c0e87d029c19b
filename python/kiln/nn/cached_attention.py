"""Attention layers for decoding models: causal self-attention and cross-attention whose keys and
values can live in a cache (notes 17.3-17.5, 17.9-17.10).

kiln.nn.MultiheadAttention is torch's drop-in; these are kiln's own, shaped for models that
generate: (B, T, D) batch-first input, one fused q/k/v projection, and an optional
``LayerCache`` that keeps the keys and values of every position seen so far. kiln's attention
aligns the causal mask bottom-right, so T new queries against a cache of S + T keys see exactly
the keys a full recomputation would show them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from kiln import ops

from .linear import Linear


class LayerCache:
    """The keys and values (B, H, S, head_dim) one attention layer has seen."""

    def __init__(self):
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reorder(self, index: Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class KVCache:
    """One LayerCache per attention layer of a model, plus how many positions it holds."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.extra: dict = {}   # what a model keeps beside the layers (an encoder's memory mask, ...)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)
        for key, value in self.extra.items():
            if isinstance(value, Tensor):
                self.extra[key] = value.index_select(0, index)


def _heads(t: Tensor, heads: int) -> Tensor:
    B, T, D = t.shape
    return t.reshape(B, T, heads, D // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    B, H, T, hd = t.shape
    return t.transpose(1, 2).reshape(B, T, H * hd)


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention (position t sees positions <= t); ``causal=False`` for an
    encoder. ``cache`` (a LayerCache) makes it incremental."""

    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

    def __init__(self, dim: int, heads: int, bias: bool = True, causal: bool = True, device=None, dtype=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"CausalSelfAttention: heads {heads} does not divide dim {dim}")
        self.heads, self.causal = heads, causal
        self.qkv = Linear(dim, 3 * dim, bias=bias, device=device, dtype=dtype)
        self.proj = Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.append(k, v)
        out = self.ops.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)
        return self.proj(_merge(out))


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder's output (notes 17.10). With a
    cache the memory's keys and values are projected once and reused at every step."""

    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

    def __init__(self, dim: int, heads: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"CrossAttention: heads {heads} does not divide dim {dim}")
        self.heads = heads
        self.q = Linear(dim, dim, bias=bias, device=device, dtype=dtype)
        self.kv = Linear(dim, 2 * dim, bias=bias, device=device, dtype=dtype)
        self.proj = Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, memory: Tensor, memory_padding_mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None) -> Tensor:
        q = _heads(self.q(x), self.heads)
        if cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            k, v = (_heads(t, self.heads) for t in self.kv(memory).chunk(2, dim=-1))
            if cache is not None:
                cache.append(k, v)
        out = self.ops.attention(q, k, v, causal=False, key_padding_mask=memory_padding_mask)
        return self.proj(_merge(out))
