"""LayerNorm, BatchNorm1d, BatchNorm2d and BatchNorm3d on kiln.ops (the notes, section 14.5).

Each subclasses torch's module: same constructor, parameters, buffers (running_mean,
running_var, num_batches_tracked), state_dict keys and train/eval behaviour, so a torch
state_dict loads as is; only the arithmetic is kiln's.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln import ops


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` on kiln.ops.layer_norm (elementwise_affine, bias as torch's)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class _BatchNormMixin:
    """torch's _BatchNorm.forward, momentum and cumulative-average logic included,
    with kiln.ops.batch_norm doing the work."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return ops.batch_norm(input, self.running_mean if use_running else None,
                              self.running_var if use_running else None, self.weight, self.bias,
                              batch_stats, factor, self.eps)


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` for (N, C) and (N, C, L) on kiln.ops.batch_norm."""


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` for (N, C, H, W) on kiln.ops.batch_norm."""


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` for (N, C, D, H, W) on kiln.ops.batch_norm."""
