"""Transformers of notes 17: the decoder-only language model (17.7-17.8) and the encoder-decoder
for translation (17.10), with a KV cache for decoding (17.9).

A layer, exactly as 17.7 (pre-LN):  R = X + Dropout(MHA(LN(X))),  X' = R + Dropout(FFN(LN(R))),
FFN(r) = act(r W1 + b1) W2 + b2 with act in relu / gelu (fused into the first GEMM).
Input: token embedding + positional encoding (sinusoidal 17.6, or learned). Output projection
tied to the token embedding (17.8). In training the loss goes through
kiln.ops.linear_cross_entropy: the (tokens x vocabulary) logits never exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from kiln import nn as knn
from kiln import ops

from .decoding import generate as _generate


@dataclass
class TransformerConfig:
    vocab_size: int = 128
    block_size: int = 256        # the longest sequence the positions cover
    dim: int = 128
    depth: int = 4
    heads: int = 4
    ffn_mult: int = 4
    activation: str = "gelu"     # relu or gelu (notes 17.7)
    dropout: float = 0.1
    positions: str = "sinusoidal"   # or "learned"
    bias: bool = True
    tie_weights: bool = True


def _check_config(config: TransformerConfig) -> None:
    if config.activation not in ("relu", "gelu"):
        raise ValueError(f"Transformer: activation must be relu or gelu (notes 17.7), got {config.activation!r}")
    if config.positions not in ("sinusoidal", "learned"):
        raise ValueError(f"Transformer: positions must be sinusoidal or learned, got {config.positions!r}")


class FeedForward(nn.Sequential):
    def __init__(self, config: TransformerConfig):
        hidden = config.ffn_mult * config.dim
        super().__init__(knn.Linear(config.dim, hidden, bias=config.bias, activation=config.activation),
                         knn.Linear(hidden, config.dim, bias=config.bias))


class DecoderBlock(nn.Module):
    """17.7's layer; with ``cross=True`` a cross-attention sub-layer sits between the two (17.10)."""

    def __init__(self, config: TransformerConfig, causal: bool = True, cross: bool = False):
        super().__init__()
        self.ln_1 = knn.LayerNorm(config.dim)
        self.attn = knn.CausalSelfAttention(config.dim, config.heads, bias=config.bias, causal=causal)
        self.cross = None
        if cross:
            self.ln_cross = knn.LayerNorm(config.dim)
            self.cross = knn.CrossAttention(config.dim, config.heads, bias=config.bias)
        self.ln_2 = knn.LayerNorm(config.dim)
        self.ffn = FeedForward(config)
        self.dropout = knn.Dropout(config.dropout)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, cache=None, memory: Optional[Tensor] = None,
                memory_padding_mask: Optional[Tensor] = None, cross_cache=None) -> Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), key_padding_mask=padding_mask, cache=cache))
        if self.cross is not None:
            x = x + self.dropout(self.cross(self.ln_cross(x), memory, memory_padding_mask, cache=cross_cache))
        return x + self.dropout(self.ffn(self.ln_2(x)))


class Embedding(nn.Module):
    """Token embedding + positional encoding, then dropout; positions start at ``offset``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.dim)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.positions = (knn.SinusoidalPositionalEncoding(config.dim, config.block_size)
                          if config.positions == "sinusoidal"
                          else knn.LearnedPositionalEmbedding(config.block_size, config.dim))
        self.dropout = knn.Dropout(config.dropout)
        self.block_size = config.block_size

    def forward(self, idx: Tensor, offset: int = 0) -> Tensor:
        if offset + idx.shape[1] > self.block_size:
            raise ValueError(f"sequence of {offset + idx.shape[1]} tokens exceeds block_size {self.block_size}")
        return self.dropout(self.positions(self.tokens(idx), offset))


class _Decodes:
    """generate() for the models that define decode_logits and new_cache (see decoding.py)."""

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, do_sample: bool = False, num_beams: int = 1,
                 length_penalty: float = 1.0, eos_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        return _generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         do_sample=do_sample, num_beams=num_beams, length_penalty=length_penalty,
                         eos_token_id=eos_token_id, use_cache=use_cache, generator=generator)


class TransformerLM(_Decodes, nn.Module):
    """Decoder-only language model (17.7-17.9)."""

    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

    def __init__(self, config: TransformerConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.embed = Embedding(config)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.depth))
        self.ln_f = knn.LayerNorm(config.dim)
        self.head = knn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.embed.tokens.weight

    def hidden(self, idx: Tensor, cache: Optional[knn.KVCache] = None) -> Tensor:
        offset = 0 if cache is None else cache.length
        x = self.embed(idx, offset)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if cache is None else cache.layers[i])
        return self.ln_f(x)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, ignore_index: int = -100):
        """Returns (logits, None) without targets, (None, mean loss) with them: the loss never
        forms the logits."""
        h = self.hidden(idx)
        if targets is None:
            return self.head(h), None
        loss = self.ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head.weight, targets.reshape(-1),
                                        ignore_index=ignore_index)
        return None, loss

    @property
    def max_context(self) -> int:
        return self.config.block_size

    def new_cache(self, batch_size: int) -> knn.KVCache:
        return knn.KVCache(len(self.blocks))

    def decode_logits(self, tokens: Tensor, cache: Optional[knn.KVCache]) -> Tensor:
        return self.head(self.hidden(tokens, cache)[:, -1])


@dataclass
class Seq2SeqConfig(TransformerConfig):
    src_vocab_size: int = 128
    encoder_depth: int = 3
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


class Seq2SeqTransformer(_Decodes, nn.Module):
    """Encoder-decoder Transformer (17.10): the encoder's self-attention sees the whole source,
    the decoder's is masked and each decoder layer cross-attends to the encoder's output."""

    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        src = dataclasses.replace(config, vocab_size=config.src_vocab_size)
        self.src_embed = Embedding(src)
        self.encoder = nn.ModuleList(DecoderBlock(config, causal=False) for _ in range(config.encoder_depth))
        self.ln_enc = knn.LayerNorm(config.dim)
        self.tgt_embed = Embedding(config)
        self.decoder = nn.ModuleList(DecoderBlock(config, cross=True) for _ in range(config.depth))
        self.ln_f = knn.LayerNorm(config.dim)
        self.head = knn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.tgt_embed.tokens.weight

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's output (B, S, dim) and the source padding mask (True = padding)."""
        padding = src == self.config.pad_id
        x = self.src_embed(src)
        for block in self.encoder:
            x = block(x, padding_mask=padding)
        return self.ln_enc(x), padding

    def decode(self, tgt: Tensor, memory: Tensor, memory_padding: Tensor, cache: Optional[knn.KVCache] = None):
        offset = 0 if cache is None else cache.length
        x = self.tgt_embed(tgt, offset)
        n = len(self.decoder)
        for i, block in enumerate(self.decoder):
            x = block(x, cache=None if cache is None else cache.layers[i], memory=memory,
                      memory_padding_mask=memory_padding, cross_cache=None if cache is None else cache.layers[n + i])
        return self.ln_f(x)

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Optional[Tensor] = None):
        """Teacher forcing: (logits, None), or (None, mean loss over non-padding targets)."""
        memory, padding = self.encode(src)
        h = self.decode(tgt_in, memory, padding)
        if tgt_out is None:
            return self.head(h), None
        loss = self.ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head.weight, tgt_out.reshape(-1),
                                        ignore_index=self.config.pad_id)
        return None, loss

    # decoding: ``translate`` sets the source; decode_logits/new_cache serve decoding.generate
    @property
    def max_context(self) -> int:
        return self.config.block_size

    def _memory_for(self, rows: int) -> tuple[Tensor, Tensor]:
        memory, padding = self._source        # (B, S, dim), one row per source; beams repeat it
        repeat = rows // memory.shape[0]
        return memory.repeat_interleave(repeat, 0), padding.repeat_interleave(repeat, 0)

    def new_cache(self, batch_size: int) -> knn.KVCache:
        cache = knn.KVCache(2 * len(self.decoder))   # self-attention layers, then cross-attention ones
        cache.extra["memory"], cache.extra["padding"] = self._memory_for(batch_size)
        return cache

    def decode_logits(self, tokens: Tensor, cache: Optional[knn.KVCache]) -> Tensor:
        if cache is None:
            memory, padding = self._memory_for(tokens.shape[0])
            return self.head(self.decode(tokens, memory, padding)[:, -1])
        return self.head(self.decode(tokens, cache.extra["memory"], cache.extra["padding"], cache)[:, -1])

    @torch.no_grad()
    def translate(self, src: Tensor, max_new_tokens: int, num_beams: int = 1, **kwargs) -> Tensor:
        """The target token ids for each source row (without the leading bos; eos-padded)."""
        was_training = self.training
        self.eval()
        self._source = self.encode(src)
        try:
            start = torch.full((src.shape[0], 1), self.config.bos_id, dtype=torch.long, device=src.device)
            out = self.generate(start, max_new_tokens, num_beams=num_beams, eos_token_id=self.config.eos_id,
                                **kwargs)
        finally:
            del self._source
            self.train(was_training)
        return out[:, 1:]
