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


class LinearCrossEntropyLoss(nn.Linear):
    """An output projection and its cross-entropy in one: loss(hidden @ W^T + b, target).

    It is a ``torch.nn.Linear`` (same ``weight``/``bias`` and state_dict keys, so an LM
    head's state_dict loads) whose forward takes the targets and returns the loss through
    kiln.ops.linear_cross_entropy, never holding the (N, V) logits. ``logits(hidden)``
    gives them when they are wanted (decoding).
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy(hidden, self.weight, target, self.bias,
                                        ignore_index=self.ignore_index, reduction=self.reduction,
                                        label_smoothing=self.label_smoothing)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.linear_act(hidden, self.weight, self.bias, "identity")
