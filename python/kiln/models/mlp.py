"""A classifier MLP (the notes' deep network, section 5.6) with its config, nanoGPT style.

``hidden=[]`` is multinomial logistic regression: one affine map to the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import kiln.nn


@dataclass
class MLPConfig:
    in_features: int = 64
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    out_features: int = 10
    activation: str = "relu"
    dropout: float = 0.0  # after each hidden activation


class MLP(nn.Module):
    """Logits of ``config.out_features`` classes from ``config.in_features`` inputs."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        sizes = [config.in_features, *config.hidden, config.out_features]
        self.net = kiln.nn.MLP(sizes, activation=config.activation, dropout=config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
