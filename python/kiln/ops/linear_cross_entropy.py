"""linear_cross_entropy: cross_entropy(input @ W^T + b, target) without the (N, V) logits.

torch.nn.functional.linear_cross_entropy's arguments (torch >= 2.13; kiln runs on torch
versions without it too): class indices or class probabilities as the target, class
``weight``, ``ignore_index``, ``label_smoothing``, every reduction. Always chunked (torch's
``options`` only picks its chunk size here). A K-dimensional ``linear_weight`` (C, d1, ...,
H) computes the logits with kiln.ops.linear_act and runs kiln.ops.cross_entropy on them, as
torch's chunked path falls back to its reference for that case.

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

Double backward (create_graph=True) is refused with an error naming the op: the gradients
are formed by the kernels chunk by chunk, not by differentiable torch ops. So is a gradient
for a class-probability target (use kiln.ops.cross_entropy on the logits for either).

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

import math
from typing import Optional

import torch
from torch import Tensor


from . import _autocast, _cpu_eager
from ._checks import check_floating, check_same_device_dtype
from .cross_entropy import (_implementation, _shape, _stats_dtype, check_target_range, cross_entropy,
                            reduce_loss, reduce_soft_loss)
from .linear_act import linear_act

# Elements of one chunk's logits: 16 Mi values (64 MiB in float32), a few hundred rows
# of a 32k-128k vocabulary, enough for the GEMM to run near its peak.
CHUNK_ELEMENTS = 1 << 24


def _cpu_empty(shape, dtype: torch.dtype) -> Tensor:
    """kernels/cpu/memory.py's pooled buffer (imported on use: the ops import no CPU kernel
    module up front)."""
    from kiln.kernels.cpu.memory import empty

    return empty(shape, dtype)


class _ChunkLogits:
    """logits(r0, r1) = input[r0:r1] @ W^T + b, a new tensor: MKL on CPU (oneDNN with W packed,
    used here before, measured no faster at chunk shapes such as 512 x 1024 x 32000 and slower
    once its packing is counted: kernels/cpu/linear_act.py), cuBLAS on GPU."""

    def __init__(self, hidden, linear_weight, linear_bias, chunk_rows):
        self.hidden, self.weight, self.bias = hidden, linear_weight, linear_bias

    def __call__(self, r0, r1):
        h = self.hidden[r0:r1]
        if h.device.type == "cpu":  # a pooled buffer: a fresh 4 KiB-page one faults in every chunk
            out = _cpu_empty((h.shape[0], self.weight.shape[0]), h.dtype)
            if self.bias is None:
                return torch.mm(h, self.weight.t(), out=out)
            return torch.addmm(self.bias, h, self.weight.t(), out=out)
        return torch.mm(h, self.weight.t()) if self.bias is None else torch.addmm(self.bias, h, self.weight.t())


def _kernel_forward(kernels, logits, target, weight, ignore_index, label_smoothing):
    if target.is_floating_point():
        return kernels.cross_entropy_soft_forward(logits, target, weight, label_smoothing)
    return kernels.cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing)


def _kernel_backward(kernels, grad_loss, logits, target, weight, row_max, row_logsum, ignore_index,
                     label_smoothing):
    # The chunk's logits are ours alone: dlogits overwrite them in place.
    if target.is_floating_point():
        return kernels.cross_entropy_soft_backward(grad_loss, logits, target, weight, row_max, row_logsum,
                                                   label_smoothing, out=logits)
    return kernels.cross_entropy_backward(grad_loss, logits, target, weight, row_max, row_logsum, ignore_index,
                                          label_smoothing, out=logits)


def _chunk_gradients(kernels, chunk_logits, grad_loss, hidden, linear_weight, target, weight, ignore_index,
                     label_smoothing, chunk_rows, need_dh, need_dw, need_db, row_stats=None):
    """(sum of the losses, dh, dW, db) of sum_r grad_loss[r] loss[r], chunk by chunk.

    target: class indices (N,) or class probabilities (N, V); weight: class weights (V,) or
    None. row_stats: the (row_max, row_logsum) that forward saved; None runs the forward
    kernel on each chunk first (and sums its losses; the sum is 0 otherwise). dW and db
    accumulate in float32 (float64 for float64) and are cast once at the end. Each gradient
    is empty when not needed."""
    N = hidden.shape[0]
    acc = _stats_dtype(hidden.dtype)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    on_cpu = hidden.device.type == "cpu"
    dh = (_cpu_empty(hidden.shape, hidden.dtype) if on_cpu else torch.empty_like(hidden)) if need_dh \
        else hidden.new_empty(0)
    # dW: the first chunk's product is written (no zero fill of a V x H buffer first), the
    # others are added to it
    dw = None
    db = torch.zeros(linear_weight.shape[0], dtype=acc, device=linear_weight.device) if need_db else None
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        logits = chunk_logits(r0, r1)
        if row_stats is None:
            loss, row_max, row_logsum = _kernel_forward(kernels, logits, target[r0:r1], weight, ignore_index,
                                                        label_smoothing)
            total += loss.sum()
        else:
            row_max, row_logsum = row_stats[0][r0:r1], row_stats[1][r0:r1]
        dlogits = _kernel_backward(kernels, grad_loss[r0:r1], logits, target[r0:r1], weight, row_max, row_logsum,
                                   ignore_index, label_smoothing)
        if need_dh:
            torch.mm(dlogits, linear_weight, out=dh[r0:r1])
        if need_dw:
            if dw is None:
                dw = torch.mm(dlogits.t().to(acc), hidden[r0:r1].to(acc),
                              out=_cpu_empty(linear_weight.shape, acc) if on_cpu else None)
            else:
                dw.addmm_(dlogits.t().to(acc), hidden[r0:r1].to(acc))
        if need_db:
            db += dlogits.sum(0, dtype=acc)
    if need_dw and dw is None:  # no rows
        dw = torch.zeros(linear_weight.shape, dtype=acc, device=linear_weight.device)
    return (total, dh, dw.to(linear_weight.dtype) if need_dw else hidden.new_empty(0),
            db.to(linear_weight.dtype) if need_db else hidden.new_empty(0))


def _no_double_backward():
    if torch.is_grad_enabled():
        raise RuntimeError(
            "linear_cross_entropy: double backward (create_graph=True) is not supported: the chunked "
            "kernels form its gradients, not differentiable torch ops; for higher-order gradients use "
            "kiln.ops.cross_entropy(kiln.ops.linear_act(input, linear_weight, linear_bias), target, ...)")


@torch.library.custom_op("kiln::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                          weight: Optional[Tensor], ignore_index: int, label_smoothing: float, chunk_rows: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss per row, row max, row log-sum)."""
    kernels = _implementation("cross_entropy", hidden)
    N = hidden.shape[0]
    loss = hidden.new_empty(N, dtype=_stats_dtype(hidden.dtype))
    row_max, row_logsum = torch.empty_like(loss), torch.empty_like(loss)
    chunk_logits = _ChunkLogits(hidden, linear_weight, linear_bias, chunk_rows)
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        logits = chunk_logits(r0, r1)
        loss[r0:r1], row_max[r0:r1], row_logsum[r0:r1] = _kernel_forward(
            kernels, logits, target[r0:r1], weight, ignore_index, label_smoothing)
    return loss, row_max, row_logsum


@_linear_cross_entropy.register_fake
def _(hidden, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, chunk_rows):
    stats = hidden.new_empty(hidden.shape[0], dtype=_stats_dtype(hidden.dtype))
    return stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.custom_op("kiln::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward(
        grad_loss: Tensor, hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
        weight: Optional[Tensor], row_max: Tensor, row_logsum: Tensor, ignore_index: int, label_smoothing: float,
        chunk_rows: int, need_dh: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dinput, dlinear_weight, dlinear_bias), each empty when not needed."""
    _, dh, dw, db = _chunk_gradients(_implementation("cross_entropy", hidden),
                                     _ChunkLogits(hidden, linear_weight, linear_bias, chunk_rows), grad_loss, hidden,
                                     linear_weight, target, weight, ignore_index, label_smoothing, chunk_rows,
                                     need_dh, need_dw, need_db, row_stats=(row_max, row_logsum))
    return dh, dw, db


@_linear_cross_entropy_backward.register_fake
def _(grad_loss, hidden, linear_weight, linear_bias, target, weight, row_max, row_logsum, ignore_index,
      label_smoothing, chunk_rows, need_dh, need_dw, need_db):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(linear_weight) if need_dw else hidden.new_empty(0),
            linear_weight.new_empty(linear_weight.shape[0]) if need_db else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, chunk_rows = inputs
    ctx.save_for_backward(hidden, linear_weight, linear_bias, target, weight, output[1], output[2])
    ctx.args = (ignore_index, label_smoothing, chunk_rows)
    ctx.has_bias = linear_bias is not None


def _backward(ctx, grad_loss, grad_row_max, grad_row_logsum):
    _no_double_backward()
    hidden, linear_weight, linear_bias, target, weight, row_max, row_logsum = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    dh, dw, db = _linear_cross_entropy_backward(grad_loss.contiguous(), hidden, linear_weight, linear_bias, target,
                                                weight, row_max, row_logsum, *ctx.args, need_dh, need_dw, need_db)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None, None)


_linear_cross_entropy_call = _cpu_eager.autograd_op(_linear_cross_entropy, _backward, _setup_context)
# torch runs the linear in the autocast region's dtype and the cross-entropy in float32, which
# the kernels do anyway (float32 statistics and losses for float16 / bfloat16 logits).
_autocast.register("kiln::linear_cross_entropy", "lower")


@torch.library.custom_op("kiln::linear_cross_entropy_sum_with_grads", mutates_args=())
def _linear_cross_entropy_sum_with_grads(
        hidden: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
        weight: Optional[Tensor], ignore_index: int, label_smoothing: float, chunk_rows: int, need_dh: bool,
        need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (sum of the per-row losses, and its gradients dinput, dlinear_weight,
    dlinear_bias, each empty when not needed), in one pass over the chunks."""
    ones = torch.ones(hidden.shape[0], dtype=_stats_dtype(hidden.dtype), device=hidden.device)
    return _chunk_gradients(_implementation("cross_entropy", hidden),
                            _ChunkLogits(hidden, linear_weight, linear_bias, chunk_rows), ones, hidden,
                            linear_weight, target, weight, ignore_index, label_smoothing, chunk_rows, need_dh,
                            need_dw, need_db)


@_linear_cross_entropy_sum_with_grads.register_fake
def _(hidden, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, chunk_rows, need_dh,
      need_dw, need_db):
    return (hidden.new_empty((), dtype=_stats_dtype(hidden.dtype)),
            torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(linear_weight) if need_dw else hidden.new_empty(0),
            linear_weight.new_empty(linear_weight.shape[0]) if need_db else hidden.new_empty(0))


def _sum_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.needs = inputs[8:11]


def _sum_backward(ctx, grad_total, grad_dh, grad_dw, grad_db):
    _no_double_backward()
    grads = tuple(g * grad_total.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs))
    return (*grads, None, None, None, None, None, None, None, None)


_linear_cross_entropy_sum_with_grads_call = _cpu_eager.autograd_op(
    _linear_cross_entropy_sum_with_grads, _sum_backward, _sum_setup_context)
_autocast.register("kiln::linear_cross_entropy_sum_with_grads", "lower")


def _chunk_rows_of(options, chunk_rows, V):
    if chunk_rows is None and options is not None:
        chunk_rows = getattr(options, "batch_chunk_size", None)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, V))
    return chunk_rows


def _result_dtype(t: Tensor) -> torch.dtype:
    """torch's linear_cross_entropy under autocast: the linear in the region's dtype, the
    cross-entropy in float32, so the loss is float32 (float64 stays float64)."""
    if t.dtype != torch.float64 and t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type):
        return torch.float32
    return t.dtype


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None, chunk_rows: Optional[int] = None,
                         bias: Optional[Tensor] = None) -> Tensor:
    """torch.nn.functional.linear_cross_entropy: cross_entropy(input @ linear_weight.T + linear_bias,
    target) without materialising the logits.

    input (..., H) (torch takes (H,) or (N, H)); linear_weight (V, H), or (V, d1, ..., H) for a
    K-dimensional loss; linear_bias (V,) / (V, d1, ...) or None; target: class indices of shape
    input.shape[:-1] (int64), or class probabilities of the logits' shape (floating point).
    weight (V,): class weights. ignore_index: None means -100 for class indices; it may not be
    given with class probabilities (torch's rule). options: torch's LinearCrossEntropyOptions,
    read for its batch_chunk_size only. ``chunk_rows``: rows per chunk (default
    CHUNK_ELEMENTS // V). ``bias``: kiln's former name of linear_bias.
    """
    op = "linear_cross_entropy"
    if bias is not None:
        if linear_bias is not None:
            raise TypeError(f"{op}: got both linear_bias and bias (its former name); pass linear_bias only")
        linear_bias = bias
    check_floating(op, input=input, linear_weight=linear_weight)
    check_same_device_dtype(op, input=input, linear_weight=linear_weight, linear_bias=linear_bias, weight=weight)
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    if linear_weight.dim() < 2 or input.dim() < 1 or input.shape[-1] != linear_weight.shape[-1]:
        raise ValueError(f"{op}: input's last dim must equal linear_weight's last (in_features) dim: input "
                         f"{_shape(input)} vs linear_weight {_shape(linear_weight)} (linear_weight is "
                         f"(num_classes, *out_features, in_features))")
    V, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and linear_bias.shape != (V, *out_features):
        raise ValueError(f"{op}: linear_bias must have shape {(V, *out_features)} for linear_weight "
                         f"{_shape(linear_weight)}, got {_shape(linear_bias)}")
    if weight is not None and weight.shape != (V,):
        raise ValueError(f"{op}: weight must have shape ({V},) for linear_weight {_shape(linear_weight)}, "
                         f"got {_shape(weight)}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{op}: reduction must be one of none, mean, sum, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    logits_shape = (*input.shape[:-1], V, *out_features)
    soft = target.shape == logits_shape and target.is_floating_point()
    if soft and ignore_index is not None:
        raise ValueError(f"{op}: ignore_index ({ignore_index}) cannot be given when target "
                         f"{_shape(target)} holds class probabilities, as in torch")
    ignore_index = -100 if ignore_index is None else ignore_index
    if out_features:
        if input.dim() != 2:
            raise ValueError(f"{op}: a K-dimensional loss (linear_weight {_shape(linear_weight)}) needs "
                             f"input (N, {input.shape[-1]}), got {_shape(input)}")
        logits = linear_act(input, linear_weight.reshape(-1, input.shape[-1]),
                            None if linear_bias is None else linear_bias.reshape(-1), "identity")
        return cross_entropy(logits.reshape(logits_shape), target, weight=weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing)
    if soft:
        if target.dtype != input.dtype:
            raise TypeError(f"{op}: class-probability target has dtype {str(target.dtype).removeprefix('torch.')} "
                            f"but input has {str(input.dtype).removeprefix('torch.')} (target {_shape(target)}, "
                            f"input {_shape(input)}); cast them to one dtype")
        if target.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: target {_shape(target)} requires grad, but the gradient of a "
                             "class-probability target is not computed here; detach it, or use "
                             "kiln.ops.cross_entropy on the logits, which gives it")
    else:
        if target.is_floating_point() or target.dtype not in (torch.int64, torch.uint8):
            raise TypeError(f"{op}: target must hold class indices as int64 of shape {tuple(input.shape[:-1])} or "
                            f"class probabilities of shape {logits_shape}, got dtype "
                            f"{str(target.dtype).removeprefix('torch.')} and shape {_shape(target)}")
        target = target.long()
        if target.shape != input.shape[:-1]:
            raise ValueError(f"{op}: target shape {_shape(target)} does not match input {_shape(input)} "
                             f"(class indices: expected {tuple(input.shape[:-1])}; class probabilities: "
                             f"{logits_shape})")
    n_rows = math.prod(input.shape[:-1])
    rows = input.reshape(n_rows, input.shape[-1]).contiguous()
    flat_target = (target.reshape(n_rows, V) if soft else target.reshape(n_rows)).contiguous()
    out_shape, out_dtype = input.shape[:-1], _result_dtype(input)
    chunk_rows = _chunk_rows_of(options, chunk_rows, V)
    if chunk_rows < 1:
        raise ValueError(f"{op}: chunk_rows must be >= 1, got {chunk_rows}")
    if rows.shape[0] == 0 or V == 0:
        if V == 0 and not soft and rows.shape[0] > 0:
            raise IndexError(f"{op}: linear_weight {_shape(linear_weight)} has no classes for target {_shape(target)}")
        # No work: zero losses through torch ops (torch's zero gradients), no kernel.
        loss = rows.to(_stats_dtype(rows.dtype)).sum(-1) * 0 + linear_weight.sum() * 0
        if linear_bias is not None:
            loss = loss + linear_bias.sum() * 0
        return _reduce(loss, flat_target, weight, ignore_index, reduction, out_shape, V, soft, out_dtype)
    if not soft:
        check_target_range(op, flat_target, V, ignore_index)
    linear_weight = linear_weight.contiguous()
    linear_bias = None if linear_bias is None else linear_bias.contiguous()
    weight = None if weight is None else weight.contiguous()
    args = (flat_target, weight, ignore_index, float(label_smoothing), int(chunk_rows))
    needs = (input.requires_grad, linear_weight.requires_grad, linear_bias is not None and linear_bias.requires_grad)
    if reduction != "none" and torch.is_grad_enabled() and any(needs):
        total, _, _, _ = _linear_cross_entropy_sum_with_grads_call(rows, linear_weight, linear_bias, *args, *needs)
        if reduction == "sum":
            return total.to(out_dtype)
        return (total / _mean_denominator(flat_target, weight, ignore_index, V, soft, total.dtype)).to(out_dtype)
    loss, _, _ = _linear_cross_entropy_call(rows, linear_weight, linear_bias, *args)
    return _reduce(loss, flat_target, weight, ignore_index, reduction, out_shape, V, soft, out_dtype)


def _mean_denominator(flat_target, weight, ignore_index, V, soft, dtype):
    """torch's: the number of rows for class probabilities, the kept rows' (weight) sum otherwise."""
    if soft:
        return torch.tensor(flat_target.shape[0] if V else float("nan"), dtype=dtype, device=flat_target.device)
    valid = flat_target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    return torch.where(valid, weight.to(dtype)[torch.where(valid, flat_target, 0)], 0).sum()


def _reduce(loss, flat_target, weight, ignore_index, reduction, shape, V, soft, dtype):
    if soft:
        return reduce_soft_loss(loss, reduction, shape, V, dtype)
    return reduce_loss(loss, flat_target, weight, ignore_index, reduction, shape, dtype)
