"""What the benchmarks share: the torch baselines and the table writer."""

from __future__ import annotations

import torch.nn.functional as F

from kiln.ops.linear_act import TORCH_ACTIVATIONS


def torch_linear_act(x, weight, bias, activation):
    """PyTorch eager: one addmm (bias folded into the GEMM), then the activation pass."""
    return TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
