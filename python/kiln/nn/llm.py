"""The layers of a LLaMA-style decoder on kiln.ops: RMSNorm (torch.nn.RMSNorm's drop-in,
Gemma's offset as an extra), GatedMLP (SwiGLU / GeGLU feed-forward) and RotaryEmbedding
(the cos / sin tables of Hugging Face's LlamaRotaryEmbedding).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln import ops


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` on kiln.ops.rms_norm: same constructor, parameter ``weight``,
    state_dict and eps=None default (torch's: the computation dtype's epsilon).

    ``offset`` (keyword-only, kiln's extra) scales by ``offset + weight``: Gemma's norm is
    offset=1. The weight then starts at ``1 - offset`` (zeros for Gemma, as Gemma's own
    initialisation), so that a fresh layer scales by 1 whatever the offset.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 offset: float = 0.0):
        self.offset = float(offset)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", offset={self.offset}" if self.offset else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset, normalized_shape=self.normalized_shape)
