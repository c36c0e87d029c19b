"""Linear and MLP layers on kiln.ops.linear_act."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kiln import ops


class Linear(nn.Linear):
    """``torch.nn.Linear`` with the activation fused: y = act(x W^T + b).

    Same constructor and forward arguments, parameters, initialization and state_dict keys
    as torch's Linear, so a torch Linear's state_dict loads as is; the activation is a
    keyword-only extra after torch's arguments. ``activation=None`` is a plain affine map.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, activation: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation or "identity"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.linear_act(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class MLP(nn.Sequential):
    """The notes' deep network (section 5.6): h_l = act(A_l h_{l-1} + b_l), affine output.

    ``sizes`` = (in, hidden..., out). Hidden layers fuse ``activation``; the last layer
    uses ``out_activation`` (identity by default: logits or a regression output).
    Optional dropout after each hidden activation.
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
                                 device=device, dtype=dtype))
            if not last and dropout > 0:
                layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
