"""LSTM, GRU and Elman RNN layers and cells on kiln.ops (the notes, section 16), drop-in
for torch's.

The layers are torch's modules in everything a user touches: the constructor signature
and its checks, the parameters (weight_ih_l0, weight_hh_l0_reverse, weight_hr_l0, ...),
their initialization, the state_dict keys, ``_flat_weights_names``, ``_flat_weights``,
``all_weights``, ``flatten_parameters`` and the forward (tensor or PackedSequence input,
unbatched input, batch_first, bidirectional, dropout between layers, proj_size) with
torch's outputs and errors. They subclass nn.Module rather than nn.RNNBase: dynamo
refuses to trace subclasses of nn.RNN / LSTM / GRU (RNNBase in older torch) unless
torch._dynamo.config.allow_rnn is set, and these run kiln's custom ops, which trace.
Below them, the notes' own cells (basic, residual, highway) and ``CellRNN``, which runs
any cell over a sequence.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from kiln import ops

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class _RNNBase(nn.Module):
    """torch.nn.RNNBase's parameters, attributes and checks (its __init__ ported), with a
    forward on kiln.ops. Not an nn.RNNBase, so dynamo traces it (module docstring)."""

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size"]

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self._flat_weight_refs = []
        num_directions = 2 if bidirectional else 1
        # torch's checks and messages, in torch's order
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=3)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode not in _GATES:
            raise ValueError("Unrecognized RNN mode: " + mode)
        gate_size = _GATES[mode] * hidden_size
        self._flat_weights_names = []
        self._all_weights = []
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                shapes = [(gate_size, layer_input_size), (gate_size, real_hidden_size)]
                names = ["weight_ih_l{}{}", "weight_hh_l{}{}"]
                if bias:
                    shapes += [(gate_size,), (gate_size,)]
                    names += ["bias_ih_l{}{}", "bias_hh_l{}{}"]
                if proj_size > 0:
                    shapes += [(proj_size, hidden_size)]
                    names += ["weight_hr_l{}{}"]
                suffix = "_reverse" if direction == 1 else ""
                names = [n.format(layer, suffix) for n in names]
                for name, shape in zip(names, shapes):
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self._init_flat_weights()
        self.reset_parameters()

    def _init_flat_weights(self) -> None:
        self._flat_weights = [getattr(self, wn) if hasattr(self, wn) else None for wn in self._flat_weights_names]
        self._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in self._flat_weights]
        self.flatten_parameters()

    def __setattr__(self, attr, value) -> None:
        if hasattr(self, "_flat_weights_names") and attr in self._flat_weights_names:
            self._flat_weights[self._flat_weights_names.index(attr)] = value
        super().__setattr__(attr, value)

    def flatten_parameters(self) -> None:
        """torch packs the weights into one cuDNN buffer here; kiln's kernels read each
        weight where it is, so there is nothing to do."""

    def _apply(self, fn, recurse=True):
        self._flat_weight_refs = []
        ret = super()._apply(fn, recurse)
        self._init_flat_weights()
        return ret

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        if input.dtype != self._flat_weights[0].dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype "
                             f"({self._flat_weights[0].dtype}). Convert input: "
                             f"input.to({self._flat_weights[0].dtype}), or convert model: model.to({input.dtype})")
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")

    def get_expected_hidden_size(self, input: Tensor, batch_sizes: Optional[Tensor]) -> tuple[int, int, int]:
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        num_directions = 2 if self.bidirectional else 1
        size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (self.num_layers * num_directions, mini_batch, size)

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def _weights_have_changed(self):
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            weight = getattr(self, name) if hasattr(self, name) else None
            if weight is not None and ref is not None and ref() is not weight:
                return True
        return False

    def check_forward_args(self, input: Tensor, hidden: Tensor, batch_sizes: Optional[Tensor]) -> None:
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))

    def permute_hidden(self, hx: Tensor, permutation: Optional[Tensor]):
        if permutation is None:
            return hx
        return hx.index_select(1, permutation)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    def _update_flat_weights(self) -> None:
        if self._weights_have_changed():
            self._init_flat_weights()

    def __getstate__(self):
        self._update_flat_weights()
        state = self.__dict__.copy()
        del state["_flat_weight_refs"]
        return state

    def __setstate__(self, d):
        super().__setstate__(d)
        self._init_flat_weights()

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, weight) for weight in weights] for weights in self._all_weights]

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._flat_weights = replica._flat_weights[:]
        replica._flat_weights_names = replica._flat_weights_names[:]
        return replica

    # ---- the forward on kiln.ops

    def _layer(self, x, states, weights, reverse, batch_sizes):
        """One layer, one direction: x (T, B, in) -> (out (T, B, .), *final states)."""
        raise NotImplementedError

    def _run(self, x: Tensor, states: list[Tensor], batch_sizes: Optional[list[int]]):
        """x (T, B, in) time-major (packed: rows sorted by length, padded); states: per kind
        (L*D, B, .). -> out (T, B, D * .), final states per kind (L*D, B, .)."""
        D = 2 if self.bidirectional else 1
        finals: list[list[Tensor]] = [[] for _ in states]
        weights = self._flat_weights
        per_direction = len(weights) // (self.num_layers * D)
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                idx = layer * D + d
                w = weights[idx * per_direction:(idx + 1) * per_direction]
                out, *last = self._layer(x, [s[idx] for s in states], w, bool(d), batch_sizes)
                outs.append(out)
                for f, s in zip(finals, last):
                    f.append(s)
            x = torch.cat(outs, -1) if D == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = self._dropout(x, batch_sizes)
        return x, [torch.stack(f) for f in finals]

    def _dropout(self, x: Tensor, batch_sizes: Optional[list[int]]) -> Tensor:
        """torch's dropout between layers: on the (T, B, .) output, or for packed input on
        the packed data (so one seed draws torch's mask)."""
        if batch_sizes is None:
            return F.dropout(x, self.dropout, training=True)
        data = torch.cat([x[t, :b] for t, b in enumerate(batch_sizes)])
        data = F.dropout(data, self.dropout, training=True)
        return _pad_packed(data, batch_sizes, x.shape[1])

    def _weights(self, w):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction from its flat weights."""
        w = list(w)
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
        w_hr = w[-1] if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def _state_sizes(self) -> list[int]:
        return [self.hidden_size]

    def _forward(self, input, hx, kinds: int):
        """torch's forward (RNN / GRU / LSTM): checks, unbatched and packed input, then the
        layers on kiln.ops. hx: a tensor (kinds 1) or a tuple (kinds 2)."""
        self._update_flat_weights()
        name = {"LSTM": "LSTM", "GRU": "GRU"}.get(self.mode, "RNN")
        D = 2 if self.bidirectional else 1
        orig_input = input
        sizes = self._state_sizes()
        batch_sizes = None
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                if name == "LSTM":
                    raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    hs = list(hx) if kinds == 2 else [hx]
                    if any(h.dim() != 2 for h in hs):
                        if kinds == 2:
                            raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but got "
                                               f"({hs[0].dim()}-D, {hs[1].dim()}-D) tensors")
                        raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got "
                                           f"{hx.dim()}-D tensor")
                    hx = tuple(h.unsqueeze(1) for h in hs) if kinds == 2 else hx.unsqueeze(1)
            elif hx is not None:
                hs = list(hx) if kinds == 2 else [hx]
                if any(h.dim() != 3 for h in hs):
                    if kinds == 2:
                        raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but got "
                                           f"({hs[0].dim()}-D, {hs[1].dim()}-D) tensors")
                    raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = unsorted_indices = None
        if hx is None:
            states = [torch.zeros(self.num_layers * D, max_batch_size, size, dtype=input.dtype,
                                  device=input.device) for size in sizes]
        else:
            states = list(hx) if kinds == 2 else [hx]
            if sorted_indices is not None:
                states = [s.index_select(1, sorted_indices) for s in states]
        self._check_states(input, states, batch_sizes)

        if batch_sizes is not None:
            steps = [int(b) for b in batch_sizes]
            x = _pad_packed(input, steps, max_batch_size)
        else:
            steps = None
            x = input.transpose(0, 1) if self.batch_first else input
            if x.shape[0] == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        out, finals = self._run(x, states, steps)
        if unsorted_indices is not None:
            finals = [f.index_select(1, unsorted_indices) for f in finals]
        if batch_sizes is not None:
            data = torch.cat([out[t, :b] for t, b in enumerate(steps)])
            output = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
        else:
            output = out.transpose(0, 1) if self.batch_first else out
            if not is_batched:
                output = output.squeeze(batch_dim)
                finals = [f.squeeze(1) for f in finals]
        return output, (tuple(finals) if kinds == 2 else finals[0])

    def _check_states(self, input, states, batch_sizes):
        self.check_forward_args(input, states[0], batch_sizes)


def _pad_packed(data: Tensor, batch_sizes: list[int], B: int) -> Tensor:
    """PackedSequence data (sum(batch_sizes), .) -> (T, B, .) in the packed (sorted) row
    order, zero past each row's length."""
    rows, offset = [], 0
    for b in batch_sizes:
        step = data[offset:offset + b]
        rows.append(F.pad(step, (0, 0, 0, B - b)))
        offset += b
    return torch.stack(rows) if rows else data.new_zeros((0, B, data.shape[-1]))


# torch's constructors take (*args, **kwargs) and document these signatures; the parsing
# below gives the same errors for a missing or unknown argument as a plain signature.


def _bind(signature_of, args, kwargs):
    bound = inspect.signature(signature_of).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _lstm_arguments(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                    bidirectional=False, proj_size=0, device=None, dtype=None):
    pass


def _gru_arguments(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                   bidirectional=False, device=None, dtype=None):
    pass


class LSTM(_RNNBase):
    """``torch.nn.LSTM`` (num_layers, bias, batch_first, dropout, bidirectional, proj_size;
    tensor, unbatched or PackedSequence input) on kiln.ops.lstm.
    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None)``."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", **_bind(_lstm_arguments, args, kwargs))

    def get_expected_cell_size(self, input: Tensor, batch_sizes: Optional[Tensor]) -> tuple[int, int, int]:
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        num_directions = 2 if self.bidirectional else 1
        return (self.num_layers * num_directions, mini_batch, self.hidden_size)

    def check_forward_args(self, input: Tensor, hidden: tuple[Tensor, Tensor],
                           batch_sizes: Optional[Tensor]) -> None:
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx: tuple[Tensor, Tensor], permutation: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if permutation is None:
            return hx
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)

    def _state_sizes(self) -> list[int]:
        return [self.proj_size if self.proj_size > 0 else self.hidden_size, self.hidden_size]

    def _check_states(self, input, states, batch_sizes):
        self.check_forward_args(input, tuple(states), batch_sizes)

    def _run(self, x: Tensor, states: list[Tensor], batch_sizes: Optional[list[int]]):
        # The common case (one direction, tensor input, no projection, no dropout) runs the
        # whole stack as one autograd node on the cpu where it can (ops.rnn.lstm_stack_cpu).
        if (batch_sizes is None and not self.bidirectional and self.proj_size == 0
                and not (self.dropout and self.training and self.num_layers > 1)):
            result = ops.rnn.lstm_stack_cpu(x, states[0], states[1], self._flat_weights, self.bias)
            if result is not None:
                out, h_n, c_n = result
                return out, [h_n, c_n]
        return super()._run(x, states, batch_sizes)

    def _layer(self, x, states, weights, reverse, batch_sizes):
        w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(weights)
        return ops.lstm(x, states[0], states[1], w_ih, w_hh, b_ih, b_hh, reverse=reverse, w_hr=w_hr,
                        batch_sizes=batch_sizes)

    def forward(self, input, hx=None):
        return self._forward(input, hx, 2)


class GRU(_RNNBase):
    """``torch.nn.GRU`` (num_layers, bias, batch_first, dropout, bidirectional; tensor,
    unbatched or PackedSequence input) on kiln.ops.gru.
    ``GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None)``."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", **_bind(_gru_arguments, args, kwargs))

    def _layer(self, x, states, weights, reverse, batch_sizes):
        w_ih, w_hh, b_ih, b_hh, _ = self._weights(weights)
        return ops.gru(x, states[0], w_ih, w_hh, b_ih, b_hh, reverse=reverse, batch_sizes=batch_sizes)

    def forward(self, input, hx=None):
        return self._forward(input, hx, 1)


class RNN(_RNNBase):
    """``torch.nn.RNN``, the Elman RNN h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),
    act tanh or relu (num_layers, bias, batch_first, dropout, bidirectional; tensor,
    unbatched or PackedSequence input) on kiln.ops.rnn_tanh / rnn_relu.
    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None)``.
    (The notes' sequence wrapper for any cell is ``CellRNN``.)"""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:  # torch's order: nonlinearity first, then the other arguments
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        arguments = _bind(_gru_arguments, args, kwargs)  # RNN's arguments but nonlinearity
        super().__init__(mode, **arguments)

    def _layer(self, x, states, weights, reverse, batch_sizes):
        w_ih, w_hh, b_ih, b_hh, _ = self._weights(weights)
        run = ops.rnn_relu if self.mode == "RNN_RELU" else ops.rnn_tanh
        return run(x, states[0], w_ih, w_hh, b_ih, b_hh, reverse=reverse, batch_sizes=batch_sizes)

    def forward(self, input, hx=None):
        return self._forward(input, hx, 1)


def _cell_checks(cell, input, hx):
    """torch's RNNCell / GRUCell / LSTMCell input checks; -> whether input is batched."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{type(cell).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    hs = [] if hx is None else (list(hx) if isinstance(hx, (tuple, list)) else [hx])
    for h in hs:
        if h.dim() not in (1, 2):
            raise ValueError(f"{type(cell).__name__}: Expected hidden to be 1D or 2D, got {h.dim()}D instead")
    return input.dim() == 2


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` on kiln.ops.lstm_cell."""

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        _cell_checks(self, input, hx)
        if hx is None:
            zeros = input.new_zeros((*input.shape[:-1], self.hidden_size))
            hx = (zeros, zeros)
        return ops.lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(nn.GRUCell):
    """``torch.nn.GRUCell`` on kiln.ops.gru_cell."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        _cell_checks(self, input, hx)
        if hx is None:
            hx = input.new_zeros((*input.shape[:-1], self.hidden_size))
        return ops.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class RNNCell(nn.RNNCell):
    """``torch.nn.RNNCell`` (torch's signature, parameters and keys; the notes' basic cell,
    h_t = phi(A x_t + C h_{t-1} + b), phi tanh or relu) on kiln.ops.rnn_tanh_cell /
    rnn_relu_cell."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        _cell_checks(self, input, hx)
        if hx is None:
            hx = input.new_zeros((*input.shape[:-1], self.hidden_size))
        if self.nonlinearity == "tanh":
            step = ops.rnn_tanh_cell
        elif self.nonlinearity == "relu":
            step = ops.rnn_relu_cell
        else:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return step(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


# ---------------------------------------------------------------------------------------
# The notes' RNN cells (section 16) and one sequence wrapper for any of them.


def _one_gemm(ops, x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], activation: str):
    """act(x W_ih^T + h W_hh^T + b) as one fused GEMM over the concatenation [x, h] (``ops``: the
    cell's op namespace)."""
    return ops.linear_act(torch.cat([x, h], -1), torch.cat([w_ih, w_hh], 1), bias, activation)


class ResidualRNNCell(nn.Module):
    """h_t = Q h_{t-1} + phi(A x_t + C h_{t-1} + b) (the notes, section 16.4).
    Parameters: weight_ih = A, weight_hh = C, weight_skip = Q, bias = b."""

    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

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
        update = _one_gemm(self.ops, x, hx, self.weight_ih, self.weight_hh, self.bias, self.nonlinearity)
        return self.ops.linear_act(hx, self.weight_skip, None, "identity") + update


class HighwayRNNCell(nn.Module):
    """The notes' highway cell (section 16.8): h~ = phi(W_x x + W_h h + b_h),
    a = sigmoid(W_xa x + W_ha h + b_a), h_t = h~ * a + x * (1 - a). The carried term is the
    input x, as the notes write it, so input_size must equal hidden_size.
    Parameters: weight_ih (2H, in) = [W_x; W_xa], weight_hh (2H, H) = [W_h; W_ha], bias (2H)."""

    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

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
        h_tilde = _one_gemm(self.ops, x, hx, self.weight_ih[:H], self.weight_hh[:H], b_h, self.nonlinearity)
        a = _one_gemm(self.ops, x, hx, self.weight_ih[H:], self.weight_hh[H:], b_a, "sigmoid")
        return h_tilde * a + x * (1 - a)


class CellRNN(nn.Module):
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
