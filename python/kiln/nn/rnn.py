"""LSTM and GRU layers and cells on kiln.ops (the notes, section 16), drop-in for torch's.

Each subclasses torch's module, so the constructor, the parameters (weight_ih_l0,
weight_hh_l0_reverse, ...), their initialization and the state_dict keys are torch's
and a torch state_dict loads as is; forward runs kiln.ops.lstm / gru per layer and
direction. Not implemented (refused, not ignored): PackedSequence inputs, proj_size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln import ops


class _RecurrentMixin:
    _gates: int

    def _run_layers(self, x: Tensor, states: list[Tensor]):
        """x (T, B, in) time-major; states: per-kind (L*D, B, H) tensors. -> out, final states."""
        D = 2 if self.bidirectional else 1
        finals: list[list[Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                sfx = "_reverse" if d else ""
                w = [getattr(self, f"{name}_l{layer}{sfx}", None)
                     for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                idx = layer * D + d
                out, *last = self._layer(x, [s[idx] for s in states], *w, reverse=bool(d))
                outs.append(out)
                for f, s in zip(finals, last):
                    f.append(s)
            x = torch.cat(outs, -1) if D == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, [torch.stack(f) for f in finals]

    def _prepare(self, x: Tensor, hx, kinds: int):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise NotImplementedError(f"kiln.nn.{type(self).__name__} does not take PackedSequence inputs")
        if getattr(self, "proj_size", 0):
            raise NotImplementedError(f"kiln.nn.{type(self).__name__}: proj_size is not implemented")
        unbatched = x.dim() == 2
        if x.dim() not in (2, 3):
            raise ValueError(f"kiln.nn.{type(self).__name__}: input must be (T, B, in), (B, T, in) with "
                             f"batch_first, or unbatched (T, in); got {tuple(x.shape)}")
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        D = 2 if self.bidirectional else 1
        shape = (self.num_layers * D, x.shape[1], self.hidden_size)
        if hx is None:
            states = [x.new_zeros(shape) for _ in range(kinds)]
        else:
            states = list(hx) if kinds > 1 else [hx]
            if unbatched:
                states = [s.unsqueeze(1) for s in states]
            for s in states:
                if tuple(s.shape) != shape:
                    raise ValueError(f"kiln.nn.{type(self).__name__}: initial state must have shape "
                                     f"(layers * directions, batch, hidden) = {shape}, got {tuple(s.shape)}")
        return x, states, unbatched

    def _finish(self, out: Tensor, finals: list[Tensor], unbatched: bool):
        if unbatched:
            return out.squeeze(1), [f.squeeze(1) for f in finals]
        return (out.transpose(0, 1) if self.batch_first else out), finals


class LSTM(_RecurrentMixin, nn.LSTM):
    """``torch.nn.LSTM`` (num_layers, bidirectional, batch_first, bias, dropout) on kiln.ops.lstm."""

    @staticmethod
    def _layer(x, states, w_ih, w_hh, b_ih, b_hh, reverse):
        return ops.lstm(x, states[0], states[1], w_ih, w_hh, b_ih, b_hh, reverse=reverse)

    def forward(self, x: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None):
        x, states, unbatched = self._prepare(x, hx, 2)
        out, finals = self._run_layers(x, states)
        out, (h_n, c_n) = self._finish(out, finals, unbatched)
        return out, (h_n, c_n)


class GRU(_RecurrentMixin, nn.GRU):
    """``torch.nn.GRU`` (num_layers, bidirectional, batch_first, bias, dropout) on kiln.ops.gru."""

    @staticmethod
    def _layer(x, states, w_ih, w_hh, b_ih, b_hh, reverse):
        return ops.gru(x, states[0], w_ih, w_hh, b_ih, b_hh, reverse=reverse)

    def forward(self, x: Tensor, hx: Optional[Tensor] = None):
        x, states, unbatched = self._prepare(x, hx, 1)
        out, finals = self._run_layers(x, states)
        out, (h_n,) = self._finish(out, finals, unbatched)
        return out, h_n


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` on kiln.ops.lstm_cell."""

    def forward(self, x: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None):
        if hx is None:
            zeros = x.new_zeros((*x.shape[:-1], self.hidden_size))
            hx = (zeros, zeros)
        return ops.lstm_cell(x, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(nn.GRUCell):
    """``torch.nn.GRUCell`` on kiln.ops.gru_cell."""

    def forward(self, x: Tensor, hx: Optional[Tensor] = None):
        if hx is None:
            hx = x.new_zeros((*x.shape[:-1], self.hidden_size))
        return ops.gru_cell(x, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
