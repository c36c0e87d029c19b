"""LSTM and GRU layers and cells on kiln.ops (the notes, section 16), drop-in for torch's.

Each subclasses torch's module, so the constructor, the parameters (weight_ih_l0,
weight_hh_l0_reverse, ...), their initialization and the state_dict keys are torch's
and a torch state_dict loads as is; forward runs kiln.ops.lstm / gru per layer and
direction. Not implemented (refused, not ignored): PackedSequence inputs, proj_size.
Below them, the notes' own cells (basic, residual, highway) and a sequence wrapper.
"""

from __future__ import annotations

import copy
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


# ---------------------------------------------------------------------------------------
# The notes' RNN cells (section 16) and one sequence wrapper for any of them.


def _one_gemm(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], activation: str):
    """act(x W_ih^T + h W_hh^T + b) as one fused GEMM over the concatenation [x, h]."""
    return ops.linear_act(torch.cat([x, h], -1), torch.cat([w_ih, w_hh], 1), bias, activation)


class RNNCell(nn.RNNCell):
    """``torch.nn.RNNCell`` (the notes' basic cell, h_t = phi(A x_t + C h_{t-1} + b), phi tanh
    or relu): one fused GEMM + bias + activation over [x, h]."""

    def forward(self, x: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if hx is None:
            hx = x.new_zeros((*x.shape[:-1], self.hidden_size))
        bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh
        return _one_gemm(x, hx, self.weight_ih, self.weight_hh, bias, self.nonlinearity)


class ResidualRNNCell(nn.Module):
    """h_t = Q h_{t-1} + phi(A x_t + C h_{t-1} + b) (the notes, section 16.4).
    Parameters: weight_ih = A, weight_hh = C, weight_skip = Q, bias = b."""

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.nonlinearity = input_size, hidden_size, nonlinearity
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        self.weight_skip = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        self.bias = nn.Parameter(torch.empty(hidden_size, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.hidden_size ** -0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():  # start as the identity skip: gradients flow through time
            self.weight_skip.copy_(torch.eye(self.hidden_size))

    def forward(self, x: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if hx is None:
            hx = x.new_zeros((*x.shape[:-1], self.hidden_size))
        update = _one_gemm(x, hx, self.weight_ih, self.weight_hh, self.bias, self.nonlinearity)
        return ops.linear_act(hx, self.weight_skip, None, "identity") + update


class HighwayRNNCell(nn.Module):
    """The notes' highway cell (section 16.8): h~ = phi(W_x x + W_h h + b_h),
    a = sigmoid(W_xa x + W_ha h + b_a), h_t = h~ * a + x * (1 - a). The carried term is the
    input x, as the notes write it, so input_size must equal hidden_size.
    Parameters: weight_ih (2H, in) = [W_x; W_xa], weight_hh (2H, H) = [W_h; W_ha], bias (2H)."""

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if input_size != hidden_size:
            raise ValueError(f"HighwayRNNCell carries its input x through the gate, so input_size must equal "
                             f"hidden_size; got {input_size} and {hidden_size}")
        kw = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.nonlinearity = input_size, hidden_size, nonlinearity
        self.weight_ih = nn.Parameter(torch.empty(2 * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(2 * hidden_size, hidden_size, **kw))
        self.bias = nn.Parameter(torch.empty(2 * hidden_size, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.hidden_size ** -0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if hx is None:
            hx = x.new_zeros((*x.shape[:-1], self.hidden_size))
        H = self.hidden_size
        b_h, b_a = (None, None) if self.bias is None else self.bias.split(H)
        h_tilde = _one_gemm(x, hx, self.weight_ih[:H], self.weight_hh[:H], b_h, self.nonlinearity)
        a = _one_gemm(x, hx, self.weight_ih[H:], self.weight_hh[H:], b_a, "sigmoid")
        return h_tilde * a + x * (1 - a)


class RNN(nn.Module):
    """Runs any cell (x_t, h_{t-1}) -> h_t over a sequence (the notes' recurrent unit R,
    section 16.5); ``bidirectional`` adds a second, independently initialised copy of the
    cell run from the last step to the first (section 16.6), outputs concatenated.
    Input (T, B, in) or (B, T, in) with batch_first; returns (outputs, final states)."""

    def __init__(self, cell: nn.Module, bidirectional: bool = False, batch_first: bool = False):
        super().__init__()
        self.cell = cell
        self.reverse_cell = None
        if bidirectional:
            self.reverse_cell = copy.deepcopy(cell)
            if hasattr(self.reverse_cell, "reset_parameters"):
                self.reverse_cell.reset_parameters()
        self.batch_first = batch_first

    @staticmethod
    def _scan(cell, x, h, reverse):
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        out = [None] * x.shape[0]
        for t in steps:
            h = cell(x[t], h)
            out[t] = h
        return torch.stack(out), h

    def forward(self, x: Tensor, h0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if self.batch_first:
            x = x.transpose(0, 1)
        D = 2 if self.reverse_cell is not None else 1
        h0 = [None] * D if h0 is None else list(h0)
        out, h_n = self._scan(self.cell, x, h0[0], False)
        if D == 2:
            out_r, h_r = self._scan(self.reverse_cell, x, h0[1], True)
            out, h_n = torch.cat([out, out_r], -1), torch.stack([h_n, h_r])
        else:
            h_n = h_n[None]
        return (out.transpose(0, 1) if self.batch_first else out), h_n
