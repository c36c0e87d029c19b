"""Transformer encoder and decoder layers (and their stacks) on kiln.nn: drop-ins for torch's.

Same constructor and forward arguments, submodule names and state_dict keys as
torch.nn.TransformerEncoderLayer / TransformerDecoderLayer / TransformerEncoder /
TransformerDecoder, so a torch state_dict loads and the outputs match. Built on
kiln.nn.MultiheadAttention (self_attn, multihead_attn), kiln.nn.Linear (linear1 with the
activation fused when it is relu or gelu), kiln.nn.LayerNorm and torch's Dropout.

torch's layers take a fused fast path in eval / no_grad that never calls their self_attn,
so a torch.nn.TransformerEncoderLayer whose self_attn is swapped for kiln's would still run
torch in eval: use these classes, which have no fast path and run kiln in train, eval and
under no_grad alike. The stacks never read a mask's values (torch's TransformerEncoder
compares ``mask`` with the causal mask when ``is_causal`` is None; here None means False
and the mask runs as an additive mask, the same result), so torch.compile traces them
without a graph break; ``enable_nested_tensor`` and ``mask_check`` are accepted and have
no effect (no nested-tensor fast path).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention
from .linear import Linear
from .norm import LayerNorm

# Activations linear1 fuses (kiln.ops.linear_act's names); anything else runs after it.
_FUSED = {"relu": "relu", "gelu": "gelu", F.relu: "relu", torch.relu: "relu", F.gelu: "gelu"}


def _activation(activation):
    """(the callable torch stores as .activation, the linear_act name fused into linear1 or None)."""
    if isinstance(activation, str):
        if activation not in ("relu", "gelu"):
            raise RuntimeError(f"activation should be relu/gelu, not {activation}")
        return getattr(F, activation), activation
    fused = _FUSED.get(activation) if not isinstance(activation, nn.Module) else (
        "relu" if type(activation) is nn.ReLU else "gelu" if type(activation) is nn.GELU
        and activation.approximate == "none" else None)
    return activation, fused


class _FeedForward:
    """linear2(dropout(act(linear1(x)))), the activation fused into linear1 where it can be."""

    def _ff(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        if self._fused_activation is None:
            h = self.activation(h)
        return self.linear2(self.dropout(h))

    def _build_ff(self, d_model, dim_feedforward, dropout, activation, bias, factory):
        self.activation, self._fused_activation = _activation(activation)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, activation=self._fused_activation, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **factory)


class TransformerEncoderLayer(_FeedForward, nn.Module):
    """torch.nn.TransformerEncoderLayer on kiln (post-norm by default, ``norm_first`` pre-norm)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        nn.Module.__init__(self)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            **factory)
        self._build_ff(d_model, dim_feedforward, dropout, activation, bias, factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _sa(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self.dropout2(self._ff(self.norm2(x)))
        else:
            x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self.dropout2(self._ff(x)))
        return x


class TransformerDecoderLayer(_FeedForward, nn.Module):
    """torch.nn.TransformerDecoderLayer on kiln: self-attention, attention over memory, feed-forward."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        nn.Module.__init__(self)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first, bias=bias,
                                            **factory)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first,
                                                 bias=bias, **factory)
        self._build_ff(d_model, dim_feedforward, dropout, activation, bias, factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def _sa(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                           need_weights=False)[0]
        return self.dropout1(x)

    def _mha(self, x, memory, attn_mask, key_padding_mask, is_causal):
        x = self.multihead_attn(x, memory, memory, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self.dropout3(self._ff(self.norm3(x)))
        else:
            x = self.norm1(x + self._sa(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self.dropout3(self._ff(x)))
        return x


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])


class TransformerEncoder(nn.Module):
    """torch.nn.TransformerEncoder: ``num_layers`` deep copies of ``encoder_layer``, then ``norm``."""

    def __init__(self, encoder_layer: "TransformerEncoderLayer", num_layers: int, norm: Optional[nn.Module] = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor  # accepted; kiln has no nested-tensor path
        self.mask_check = mask_check

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=bool(is_causal),
                           src_key_padding_mask=src_key_padding_mask)
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(nn.Module):
    """torch.nn.TransformerDecoder: ``num_layers`` deep copies of ``decoder_layer``, then ``norm``."""

    def __init__(self, decoder_layer: "TransformerDecoderLayer", num_layers: int,
                 norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                           memory_is_causal=memory_is_causal)
        return output if self.norm is None else self.norm(output)
