"""Dropout on kiln.ops.dropout (kiln's counter-based generator, fused kernels)."""

import torch
from torch import nn

from kiln import ops


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` (same constructor, p validated as torch does, state_dict and
    repr) on ``kiln.ops.dropout``: in training, zeroes each element with probability p
    and scales the rest by 1 / (1 - p); in eval, the identity. The mask comes from
    kiln's generator (``kiln.ops.random``), which ``torch.manual_seed`` reseeds."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.dropout(input, self.p, self.training, self.inplace)
