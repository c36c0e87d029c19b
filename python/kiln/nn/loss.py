"""Loss modules on kiln.ops: torch.nn's CrossEntropyLoss and LinearCrossEntropyLoss, same
constructor and forward arguments, same state_dict keys."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln import ops


class CrossEntropyLoss(nn.Module):
    """``torch.nn.CrossEntropyLoss`` on kiln.ops.cross_entropy: class indices or class
    probabilities, (N, C), (C,) or K-dimensional (N, C, d1, ...) input.

    Same constructor (``size_average`` / ``reduce`` are torch's deprecated spellings of
    ``reduction`` and are mapped as torch maps them, with its warning), ``weight`` is a
    buffer as in torch, so state_dicts match.
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]

    def __init__(self, weight: torch.Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing)


class LinearCrossEntropyLoss(nn.Module):
    """``torch.nn.LinearCrossEntropyLoss`` (torch >= 2.13) on kiln.ops.linear_cross_entropy,
    which never holds the (N, C) logits; it works on torch versions without that class too.

    As torch's: the projection is the submodule ``linear`` (an nn.Linear of in_features ->
    num_classes * prod(out_features), stored flat), ``weight`` the class weights (a buffer),
    so the state_dict keys are torch's (``linear.weight``, ``linear.bias``, ``weight``).
    ``options`` (torch's LinearCrossEntropyOptions) only sets the chunk size here: kiln
    always chunks. ``logits(input)`` gives the (N, C, *out_features) logits when they are
    wanted (decoding).
    """

    __constants__ = ["num_classes", "out_features", "reduction", "ignore_index", "label_smoothing"]
    ops = ops   # the op namespace forward calls; kiln.nn.torch_twin's subclass puts torch's here

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: torch.Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0, options=None) -> None:
        super().__init__()
        if weight is not None and weight.shape != (num_classes,):
            raise ValueError(f"LinearCrossEntropyLoss: weight must have shape {(num_classes,)}, "
                             f"got {tuple(weight.shape)}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"LinearCrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)
        self.options = options

    def _projection(self):
        weight = self.linear.weight.reshape(self.num_classes, *self.out_features, self.linear.in_features)
        bias = None if self.linear.bias is None else self.linear.bias.reshape(self.num_classes, *self.out_features)
        return weight, bias

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        linear_weight, linear_bias = self._projection()
        return self.ops.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                        reduction=self.reduction, ignore_index=self.ignore_index,
                                        label_smoothing=self.label_smoothing, options=self.options)

    def logits(self, input: torch.Tensor) -> torch.Tensor:
        out = self.ops.linear_act(input, self.linear.weight, self.linear.bias, "identity")
        return out.reshape(*input.shape[:-1], self.num_classes, *self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")
