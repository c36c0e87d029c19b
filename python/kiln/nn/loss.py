"""Loss modules on kiln.ops."""

from __future__ import annotations

import torch
from torch import nn

from kiln import ops


class CrossEntropyLoss(nn.Module):
    """``torch.nn.CrossEntropyLoss`` for class-index targets, on kiln.ops.cross_entropy.

    Same arguments, and ``weight`` is a buffer as in torch, so state_dicts match.
    """

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing)
