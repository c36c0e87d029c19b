"""Linear and MLP layers on kiln.ops.linear_act (activation and dropout fused)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kiln import ops
from kiln.ops.dropout import check_probability


class Linear(nn.Linear):
    """``torch.nn.Linear`` with the activation fused: y = act(x W^T + b).

    Same constructor and forward arguments, parameters, initialization and state_dict keys
    as torch's Linear, so a torch Linear's state_dict loads as is; the activation is a
    keyword-only extra after torch's arguments. ``activation=None`` is a plain affine map.
    ``dropout=p`` (keyword-only) applies inverted dropout to the activated output in
    training (the module's ``training`` flag), fused into the same kernel: the equivalent
    of ``nn.Dropout(p)`` after the layer; in eval it does nothing.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, activation: str | None = None, dropout: float = 0.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation or "identity"
        self.dropout = check_probability("Linear", dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.linear_act(input, self.weight, self.bias, self.activation,
                              dropout=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        extra = f", dropout={self.dropout}" if self.dropout else ""
        return f"{super().extra_repr()}, activation={self.activation}{extra}"


class MLP(nn.Sequential):
    """The notes' deep network (section 5.6): h_l = act(A_l h_{l-1} + b_l), affine output.

    ``sizes`` = (in, hidden..., out). Hidden layers fuse ``activation``; the last layer
    uses ``out_activation`` (identity by default: logits or a regression output).
    Optional dropout after each hidden activation, fused into the hidden layers' kernels
    (``Linear(..., dropout=p)``), so the layers are the Linears alone.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", bias: bool = True,
                 out_activation: str | None = None, dropout: float = 0.0, device=None, dtype=None):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least (in, out) sizes, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            layers.append(Linear(d_in, d_out, bias=bias,
                                 activation=out_activation if last else activation,
                                 dropout=0.0 if last else dropout, device=device, dtype=dtype))
        super().__init__(*layers)
