"""linear_cross_entropy: cross_entropy(hidden @ W^T + b, target) without the (N, V) logits.

The rows go through in chunks of ``chunk_rows``: a chunk's logits (chunk_rows x V) are
one GEMM, and the cross-entropy kernel of the selected backend (kiln.ops.cross_entropy's
Triton, CUDA or numba form) turns them into the chunk's losses and per-row statistics.
Peak extra memory is O(chunk_rows x V), never O(N x V).

Two ways to the gradients, chosen by the public function:

* reduction "mean" / "sum" with autograd recording (training): the gradients of the summed
  loss are formed during forward, chunk by chunk while the chunk's logits are in memory
  (as Liger-Kernel does): dlogits over the logits in place (cross-entropy backward kernel
  with a gradient of 1 per row), dh_chunk = dlogits W, dW += dlogits^T h_chunk, db +=
  column sums. Saved for backward: dh, dW, db; backward only scales them by the incoming
  scalar gradient (the mean's 1 / count reaches it through autograd). Three GEMMs in all,
  as many as torch's linear + cross_entropy.
* reduction "none", or no autograd (inference): forward computes the losses and two
  statistics per row (max, log-sum; see cross_entropy.py) and saves hidden, W, b and the
  targets with them. Backward, which may get any per-row gradient, recomputes each chunk's
  logits (one more GEMM per chunk, the price of not storing them) and forms the gradients
  as above.

No form fuses the GEMM with the cross-entropy: each chunk's GEMM is the vendor's (cuBLAS
through torch on GPU, oneDNN through torch on CPU) and the selected backend's cross-entropy kernel runs on
its output. The chunk's logits make one round trip through memory (write, read, and in
backward one overwrite with dlogits), 3 * 4 bytes per logit against 2H FLOPs per logit of
GEMM: for H >= 1024 the GEMM dominates by far, and a hand-written GEMM would lose more to
cuBLAS/oneDNN than the fusion saves. Measured on CPU (4096 x 1024 -> 32000): forward 1.00x,
forward+backward 1.01x torch eager (bench/results/cross_entropy_cpu.md); peak extra memory
101 MiB against torch's 3018 MiB at 4096 x 2048 -> 128256.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kiln.kernels.cpu.blas import PackedLinear

from ._checks import check_floating, check_same_device_dtype
from .cross_entropy import _implementation, _stats_dtype, check_target_range, reduce_loss

# Elements of one chunk's logits: 16 Mi values (64 MiB in float32), a few hundred rows
# of a 32k-128k vocabulary, enough for the GEMM to run near its peak.
CHUNK_ELEMENTS = 1 << 24


class _ChunkLogits:
    """logits(r0, r1) = hidden[r0:r1] @ W^T + b, a new tensor. CPU: oneDNN with W packed
    once per call (kernels/cpu/blas.py: faster than MKL's sgemm on our CPUs); GPU: cuBLAS."""

    def __init__(self, hidden, weight, bias, chunk_rows):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.packed = PackedLinear(weight, chunk_rows) if hidden.device.type == "cpu" else None

    def __call__(self, r0, r1):
        h = self.hidden[r0:r1]
        if self.packed is not None:
            return self.packed(h, self.bias)
        return torch.mm(h, self.weight.t()) if self.bias is None else torch.addmm(self.bias, h, self.weight.t())


def _chunk_gradients(kernels, chunk_logits, grad_loss, hidden, weight, target, ignore_index, label_smoothing,
                     chunk_rows, need_dh, need_dw, need_db, row_stats=None):
    """(sum of the losses, dh, dW, db) of sum_r grad_loss[r] loss[r], chunk by chunk.

    row_stats: the (row_max, row_logsum) that forward saved; None runs the forward kernel on
    each chunk first (and sums its losses; the sum is 0 otherwise). dW and db accumulate in
    float32 (float64 for float64) and are cast once at the end. Each gradient is empty when
    not needed."""
    N = hidden.shape[0]
    acc = _stats_dtype(hidden.dtype)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_db else None
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        logits = chunk_logits(r0, r1)
        if row_stats is None:
            loss, row_max, row_logsum = kernels.cross_entropy_forward(logits, target[r0:r1], None, ignore_index,
                                                                      label_smoothing)
            total += loss.sum()
        else:
            row_max, row_logsum = row_stats[0][r0:r1], row_stats[1][r0:r1]
        # The chunk's logits are ours alone: dlogits overwrite them in place.
        dlogits = kernels.cross_entropy_backward(grad_loss[r0:r1], logits, target[r0:r1], None, row_max,
                                                 row_logsum, ignore_index, label_smoothing, out=logits)
        if need_dh:
            torch.mm(dlogits, weight, out=dh[r0:r1])
        if need_dw:
            dw.addmm_(dlogits.t().to(acc), hidden[r0:r1].to(acc))
        if need_db:
            db += dlogits.sum(0, dtype=acc)
    return (total, dh, dw.to(weight.dtype) if need_dw else hidden.new_empty(0),
            db.to(weight.dtype) if need_db else hidden.new_empty(0))


@torch.library.custom_op("kiln::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                          ignore_index: int, label_smoothing: float, chunk_rows: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss per row, row max, row log-sum)."""
    kernels = _implementation("cross_entropy", hidden)
    N = hidden.shape[0]
    loss = hidden.new_empty(N, dtype=_stats_dtype(hidden.dtype))
    row_max, row_logsum = torch.empty_like(loss), torch.empty_like(loss)
    chunk_logits = _ChunkLogits(hidden, weight, bias, chunk_rows)
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        logits = chunk_logits(r0, r1)
        loss[r0:r1], row_max[r0:r1], row_logsum[r0:r1] = kernels.cross_entropy_forward(
            logits, target[r0:r1], None, ignore_index, label_smoothing)
    return loss, row_max, row_logsum


@_linear_cross_entropy.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, chunk_rows):
    stats = hidden.new_empty(hidden.shape[0], dtype=_stats_dtype(hidden.dtype))
    return stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.custom_op("kiln::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward(
        grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
        row_max: Tensor, row_logsum: Tensor, ignore_index: int, label_smoothing: float,
        chunk_rows: int, need_dh: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dhidden, dweight, dbias), each empty when not needed."""
    _, dh, dw, db = _chunk_gradients(_implementation("cross_entropy", hidden),
                                     _ChunkLogits(hidden, weight, bias, chunk_rows), grad_loss, hidden, weight,
                                     target, ignore_index, label_smoothing, chunk_rows, need_dh, need_dw, need_db,
                                     row_stats=(row_max, row_logsum))
    return dh, dw, db


@_linear_cross_entropy_backward.register_fake
def _(grad_loss, hidden, weight, bias, target, row_max, row_logsum, ignore_index, label_smoothing,
      chunk_rows, need_dh, need_dw, need_db):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else hidden.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_db else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, chunk_rows = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1], output[2])
    ctx.args = (ignore_index, label_smoothing, chunk_rows)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_loss, grad_row_max, grad_row_logsum):
    hidden, weight, bias, target, row_max, row_logsum = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    dh, dw, db = _linear_cross_entropy_backward(grad_loss.contiguous(), hidden, weight, bias, target,
                                                row_max, row_logsum, *ctx.args, need_dh, need_dw, need_db)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None)


torch.library.register_autograd("kiln::linear_cross_entropy", _backward, setup_context=_setup_context)


@torch.library.custom_op("kiln::linear_cross_entropy_sum_with_grads", mutates_args=())
def _linear_cross_entropy_sum_with_grads(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
        label_smoothing: float, chunk_rows: int, need_dh: bool, need_dw: bool, need_db: bool
        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (sum of the per-row losses, and its gradients dhidden, dweight, dbias, each
    empty when not needed), in one pass over the chunks."""
    ones = torch.ones(hidden.shape[0], dtype=_stats_dtype(hidden.dtype), device=hidden.device)
    return _chunk_gradients(_implementation("cross_entropy", hidden), _ChunkLogits(hidden, weight, bias, chunk_rows),
                            ones, hidden, weight, target, ignore_index, label_smoothing, chunk_rows, need_dh,
                            need_dw, need_db)


@_linear_cross_entropy_sum_with_grads.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, chunk_rows, need_dh, need_dw, need_db):
    return (hidden.new_empty((), dtype=_stats_dtype(hidden.dtype)),
            torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else hidden.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_db else hidden.new_empty(0))


def _sum_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.needs = inputs[7:10]


def _sum_backward(ctx, grad_total, grad_dh, grad_dw, grad_db):
    grads = tuple(g * grad_total.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs))
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("kiln::linear_cross_entropy_sum_with_grads", _sum_backward,
                                setup_context=_sum_setup_context)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, chunk_rows: Optional[int] = None) -> Tensor:
    """cross_entropy(hidden @ weight.T + bias, target) without materialising the logits.

    hidden (..., H), weight (V, H), bias (V,) or None, target (...) of int64 class indices.
    ``chunk_rows``: rows per chunk (default: CHUNK_ELEMENTS // V).
    """
    op = "linear_cross_entropy"
    check_floating(op, hidden=hidden, weight=weight)
    check_same_device_dtype(op, hidden=hidden, weight=weight, bias=bias)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden's last dim must equal weight's in dim: hidden "
                         f"{tuple(hidden.shape)} vs weight {tuple(weight.shape)} (weight is (V, H))")
    V = weight.shape[0]
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"{op}: bias must have shape ({V},) for weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must hold class indices as int64, got dtype "
                        f"{str(target.dtype).removeprefix('torch.')}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: target shape {tuple(target.shape)} does not match hidden "
                         f"{tuple(hidden.shape)} (expected {tuple(hidden.shape[:-1])})")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{op}: reduction must be one of none, mean, sum, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    rows = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_target = target.reshape(-1).contiguous()
    check_target_range(op, flat_target, V, ignore_index)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, V))
    if chunk_rows < 1:
        raise ValueError(f"{op}: chunk_rows must be >= 1, got {chunk_rows}")
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if reduction != "none" and torch.is_grad_enabled() and any(needs):
        total, _, _, _ = _linear_cross_entropy_sum_with_grads(rows, weight, bias, flat_target, ignore_index,
                                                              float(label_smoothing), int(chunk_rows), *needs)
        if reduction == "sum":
            return total.to(hidden.dtype)
        count = (flat_target != ignore_index).sum().to(total.dtype)
        return (total / count).to(hidden.dtype)
    loss, _, _ = _linear_cross_entropy(rows, weight, bias, flat_target, ignore_index, float(label_smoothing),
                                       int(chunk_rows))
    return reduce_loss(loss, flat_target, None, ignore_index, reduction, target.shape, hidden.dtype)
