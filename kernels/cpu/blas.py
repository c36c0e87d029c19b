"""The GEMMs the cpu forms take from torch (DESIGN.md: never a hand-rolled CPU GEMM).

``torch.mm`` is MKL's sgemm. torch also ships oneDNN, whose linear with a weight packed
once ahead (``torch.ops.mkldnn._reorder_linear_weight``, the op torch.compile's CPU
backend uses) is faster for the small, repeated products of a recurrence: on this
2-core AVX2 EPYC, (32 x 512) @ (512 x 2048) took 0.48 ms packed against 0.72 ms in
torch.mm, (8 x 256) @ (256 x 1024) 0.070 against 0.074 ms (bench/results/rnn_cpu.md).
oneDNN has no float64: float64 (and a torch built without oneDNN) uses torch.mm. Both
give float32 sums of the same products in different orders.
"""

from __future__ import annotations

import torch


def _onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


class PackedLinear:
    """y = x @ weight^T (+ bias) for many x of about ``rows`` rows and one fixed weight
    (out_features, in_features): the weight is packed once here."""

    def __init__(self, weight: torch.Tensor, rows: int):
        self.onednn = weight.dtype == torch.float32 and _onednn_available()
        if self.onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)
        else:
            self.weight_t = weight.t()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A new (rows, out_features) tensor."""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
        return torch.mm(x, self.weight_t) if bias is None else torch.addmm(bias, x, self.weight_t)
