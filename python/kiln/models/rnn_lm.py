"""Recurrent sequence models of notes 16: a many-to-many language model over the notes' cells
(basic, residual 16.4, highway 16.8) or GRU (16.6) / LSTM (16.7), and a bidirectional
many-to-one classifier.

Language model: token embedding -> recurrent layers -> (projection to the embedding width) ->
output layer tied to the embedding (17.8's weight tying applies as well to an RNN); training loss
through kiln.ops.linear_cross_entropy. Decoding carries the hidden state (``generate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from kiln import nn as knn
from kiln import ops

from .decoding import generate as _generate

CELLS = ("rnn", "residual", "highway", "gru", "lstm")


@dataclass
class RNNLMConfig:
    vocab_size: int = 128
    cell: str = "lstm"
    embed_dim: int = 128
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.1
    tie_weights: bool = True
    nonlinearity: str = "tanh"     # the notes' cells


def _check(cell: str) -> None:
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")


class RecurrentState:
    """The hidden state a recurrent model carries between decoding steps: one entry per layer
    (a tensor (B, H), or for an LSTM stack one (h, c) pair of (L, B, H))."""

    def __init__(self, states=None):
        self.states = states

    def reorder(self, index: Tensor) -> None:
        if self.states is None:
            return
        if isinstance(self.states, tuple):          # LSTM (h, c) of (L, B, H), GRU h (L, B, H) in a 1-tuple
            self.states = tuple(s.index_select(1, index) for s in self.states)
        else:
            self.states = [s.index_select(1, index) for s in self.states]


class RecurrentStack(nn.Module):
    """num_layers recurrent layers, batch first: kiln.nn.RNN (the basic cell of 16.3 as one fused
    sequence op), GRU and LSTM; a CellRNN per layer for the residual and highway cells; dropout
    between layers."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
                 nonlinearity: str = "tanh", bidirectional: bool = False):
        super().__init__()
        _check(cell)
        self.cell, self.num_layers = cell, num_layers
        directions = 2 if bidirectional else 1
        if cell in ("rnn", "gru", "lstm"):
            layer_dropout = dropout if num_layers > 1 else 0.0
            if cell == "rnn":
                self.rnn = knn.RNN(input_size, hidden_size, num_layers, nonlinearity=nonlinearity, batch_first=True,
                                   dropout=layer_dropout, bidirectional=bidirectional)
            else:
                self.rnn = (knn.LSTM if cell == "lstm" else knn.GRU)(
                    input_size, hidden_size, num_layers, batch_first=True, dropout=layer_dropout,
                    bidirectional=bidirectional)
            return
        cell_class = {"residual": knn.ResidualRNNCell, "highway": knn.HighwayRNNCell}[cell]
        layers = []
        for i in range(num_layers):
            width = input_size if i == 0 else directions * hidden_size
            if cell == "highway" and width != hidden_size:
                # the highway cell carries its input through the gate: bring it to the hidden width
                layers.append(nn.Sequential(knn.Linear(width, hidden_size), knn.CellRNN(
                    cell_class(hidden_size, hidden_size, nonlinearity=nonlinearity), bidirectional=bidirectional,
                    batch_first=True)))
            else:
                layers.append(knn.CellRNN(cell_class(width, hidden_size, nonlinearity=nonlinearity),
                                          bidirectional=bidirectional, batch_first=True))
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, state=None):
        """x (B, T, in) -> outputs (B, T, directions * H), the new state."""
        if self.cell in ("rnn", "gru", "lstm"):
            if state is not None and self.cell != "lstm":
                state = state[0]
            out, new = self.rnn(x, state)
            return out, (new if self.cell == "lstm" else (new,))
        new_states = []
        for i, layer in enumerate(self.layers):
            h0 = None if state is None else state[i]
            if isinstance(layer, nn.Sequential):
                x = layer[0](x)
                x, h = layer[1](x, h0)
            else:
                x, h = layer(x, h0)
            new_states.append(h)
            if i < len(self.layers) - 1:
                x = self.dropout(x)
        return x, new_states


class RNNLM(nn.Module):
    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

    def __init__(self, config: RNNLMConfig):
        super().__init__()
        _check(config.cell)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.rnn = RecurrentStack(config.cell, config.embed_dim, config.hidden_size, config.num_layers,
                                  config.dropout, config.nonlinearity)
        self.dropout = nn.Dropout(config.dropout)
        width = config.hidden_size
        self.proj = None
        if config.tie_weights and config.hidden_size != config.embed_dim:
            self.proj = knn.Linear(config.hidden_size, config.embed_dim)
            width = config.embed_dim
        self.head = knn.Linear(width, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.embed.weight

    def hidden(self, idx: Tensor, state=None):
        out, state = self.rnn(self.dropout(self.embed(idx)), state)
        out = self.dropout(out)
        return (self.proj(out) if self.proj is not None else out), state

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, ignore_index: int = -100):
        """(logits, None) without targets; (None, mean loss) with them (no logits formed)."""
        h, _ = self.hidden(idx)
        if targets is None:
            return self.head(h), None
        loss = self.ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head.weight, targets.reshape(-1),
                                        ignore_index=ignore_index)
        return None, loss

    def new_cache(self, batch_size: int) -> RecurrentState:
        return RecurrentState()

    def decode_logits(self, tokens: Tensor, cache: Optional[RecurrentState]) -> Tensor:
        if cache is None:
            return self.head(self.hidden(tokens)[0][:, -1])
        h, cache.states = self.hidden(tokens, cache.states)
        return self.head(h[:, -1])

    def generate(self, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """Hugging Face-style decoding (see kiln.models.decoding.generate for the arguments)."""
        return _generate(self, idx, max_new_tokens, **kwargs)


@dataclass
class RNNClassifierConfig:
    vocab_size: int = 8
    num_classes: int = 2
    cell: str = "lstm"
    embed_dim: int = 32
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = True
    pad_id: int = 0


class RNNClassifier(nn.Module):
    """Many-to-one: a (bidirectional) recurrent stack read at every non-padding position, max-pooled
    over time, then a linear head."""

    def __init__(self, config: RNNClassifierConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.rnn = RecurrentStack(config.cell, config.embed_dim, config.hidden_size, config.num_layers,
                                  config.dropout, bidirectional=config.bidirectional)
        self.head = knn.Linear((2 if config.bidirectional else 1) * config.hidden_size, config.num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        padding = (tokens == self.config.pad_id)[..., None]
        pooled = out.masked_fill(padding, float("-inf")).amax(1)
        return self.head(torch.nan_to_num(pooled, neginf=0.0))
