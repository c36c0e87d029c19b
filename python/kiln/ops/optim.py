"""Fused optimizer steps: one multi-tensor update per call, in place (the notes' section 9).

Each op takes lists of tensors of one dtype and device (the parameters, their gradients
and the optimizer state) and updates the parameters and the state in place, with
torch.optim's math (torch's single-tensor formulas, the reference below):

    sgd_step      SGD with momentum, dampening, Nesterov, weight decay, maximize
    adam_step     Adam / AdamW (decoupled decay), amsgrad, maximize
    rmsprop_step  RMSprop with momentum, centered, weight decay, maximize
    ngd_step      normalized gradient descent: p -= lr g / ||g||, the norm over the whole
                  call (a parameter group) or per tensor

The cpu, triton and cuda forms run one pass over all tensors of a call (a table of
addresses and sizes cut in chunks, kernels/multi_tensor.py); ngd_step needs the norm
first, so it is two passes (sum of squares, then the update). These are optimizer
updates, not differentiable functions: no autograd, nothing saved.

Torch's per-parameter step counters (`steps`, 0-d tensors already incremented for this
step) give Adam's bias corrections, computed on the host in float64 as torch computes
them: step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from kiln import backend
from kiln.kernels import multi_tensor

from . import _cpu_eager
from ._cuda_launch import ptr, stream

OPS = ("sgd_step", "adam_step", "rmsprop_step", "ngd_step")

# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference: torch.optim's single-tensor formulas, one tensor at a time.


def reference_sgd_step(params, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov,
                       maximize, first_step):
    for i, (param, grad) in enumerate(zip(params, grads)):
        grad = -grad if maximize else grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def reference_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bc2_sqrts, lr, beta1,
                        beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
    for i, (param, grad) in enumerate(zip(params, grads)):
        grad = -grad if maximize else grad
        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avgs[i].lerp_(grad, 1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second = exp_avg_sqs[i]
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], second, out=max_exp_avg_sqs[i])
            second = max_exp_avg_sqs[i]
        denom = (second.sqrt() / bc2_sqrts[i]).add_(eps)
        param.addcdiv_(exp_avgs[i], denom, value=-step_sizes[i])


def reference_rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, lr, alpha, eps, weight_decay,
                           momentum, centered, maximize):
    for i, (param, grad) in enumerate(zip(params, grads)):
        grad = -grad if maximize else grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        square_avgs[i].mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if centered:
            grad_avgs[i].lerp_(grad, 1 - alpha)
            avg = square_avgs[i].addcmul(grad_avgs[i], grad_avgs[i], value=-1).sqrt_()
        else:
            avg = square_avgs[i].sqrt()
        avg = avg.add_(eps)
        if momentum > 0:
            momentum_buffers[i].mul_(momentum).addcdiv_(grad, avg)
            param.add_(momentum_buffers[i], alpha=-lr)
        else:
            param.addcdiv_(grad, avg, value=-lr)


def ngd_scales(sums_of_squares: list[float], lr: float, per_tensor: bool, maximize: bool) -> list[float]:
    """lr / ||g|| for each tensor: its own norm (per_tensor) or the norm over all of them.
    A zero norm gives scale 0: no direction, no step. Negated for maximize."""
    norms = ([math.sqrt(s) for s in sums_of_squares] if per_tensor
             else [math.sqrt(math.fsum(sums_of_squares))] * len(sums_of_squares))
    sign = -1.0 if maximize else 1.0
    return [sign * lr / n if n > 0 else 0.0 for n in norms]


def reference_ngd_step(params, grads, lr, per_tensor, maximize):
    sums = [torch.linalg.vector_norm(g.double()).item() ** 2 for g in grads]
    for param, grad, scale in zip(params, grads, ngd_scales(sums, lr, per_tensor, maximize)):
        param.add_(grad, alpha=-scale)


# ---------------------------------------------------------------------------------------
# The cuda backend: one table (kernels/multi_tensor.py) copied to the device, one launch.

CUDA_CHUNK = 1 << 14  # elements per CUDA block: 20M elements make ~1200 blocks
CUDA_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _cuda_table(lists, scalars=()):
    table = multi_tensor.build(lists, CUDA_CHUNK, scalars)
    return table.to(lists[0][0].device)


def _cuda_launch(name, lists, scalars, *args):
    ext = backend.cuda_extension()
    table = _cuda_table(lists, scalars)
    first = lists[0][0]
    with torch.cuda.device(first.device):
        getattr(ext, name)(ptr(table.data), table.lists, table.tensors, table.chunks, table.chunk, *args,
                           CUDA_DTYPE_CODE[first.dtype], stream(first))
    return table


def cuda_sgd_step(params, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov, maximize,
                  first_step):
    lists = [params, grads] + ([momentum_buffers] if momentum != 0 else [])
    _cuda_launch("optim_sgd", lists, (), lr, weight_decay, momentum, dampening, nesterov, maximize, first_step)


def cuda_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bc2_sqrts, lr, beta1, beta2,
                   eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    _cuda_launch("optim_adam", lists, (step_sizes, bc2_sqrts), lr, beta1, beta2, eps, weight_decay, amsgrad,
                 maximize, decoupled_weight_decay)


def cuda_rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, lr, alpha, eps, weight_decay,
                      momentum, centered, maximize):
    lists = ([params, grads, square_avgs] + ([momentum_buffers] if momentum > 0 else [])
             + ([grad_avgs] if centered else []))
    _cuda_launch("optim_rmsprop", lists, (), lr, alpha, eps, weight_decay, momentum, centered, maximize)


def cuda_ngd_step(params, grads, lr, per_tensor, maximize):
    ext = backend.cuda_extension()
    table = _cuda_table([params, grads], ([0.0] * len(params),))
    first = params[0]
    code = CUDA_DTYPE_CODE[first.dtype]
    partial = torch.empty(table.chunks, dtype=torch.float64, device=first.device)
    with torch.cuda.device(first.device):
        # pass 1: float64 sums of squares of the grads per chunk; a tensor's chunks are
        # consecutive, so a segmented sum (fixed order, no atomics) gives its sum
        ext.optim_sum_squares(ptr(table.data), table.lists, table.tensors, table.chunks, table.chunk, 1,
                              ptr(partial), code, stream(first))
        counts = torch.tensor([-(-g.numel() // CUDA_CHUNK) for g in grads], device=first.device)
        sums = torch.segment_reduce(partial, "sum", lengths=counts)
        table.scalars[0].copy_(multi_tensor.device_ngd_scales(sums, lr, per_tensor, maximize))
        # pass 2: the update with the scales, written into the table on the device
        ext.optim_scaled_descent(ptr(table.data), table.lists, table.tensors, table.chunks, table.chunk, code,
                                 stream(first))


# ---------------------------------------------------------------------------------------
# The table of implementations.

_GPU = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES = {
    "triton": _GPU,
    "cuda": _GPU,
    "cpu": (torch.float32, torch.float64),
    "reference": backend.STANDARD_DTYPES["reference"],
}
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.optim", "cpu": "kiln.kernels.cpu.optim"}
_REFERENCE = SimpleNamespace(sgd_step=reference_sgd_step, adam_step=reference_adam_step,
                             rmsprop_step=reference_rmsprop_step, ngd_step=reference_ngd_step)
_CUDA = SimpleNamespace(sgd_step=cuda_sgd_step, adam_step=cuda_adam_step, rmsprop_step=cuda_rmsprop_step,
                        ngd_step=cuda_ngd_step)


def _implementation(op: str, t: Tensor):
    return getattr(backend.implementation(op, t, DTYPES, _KERNEL_MODULES, _REFERENCE, _CUDA), op)


# ---------------------------------------------------------------------------------------
# The custom ops: contiguous tensors of one dtype and device; the public functions check.


def _sgd_step_body(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr: float,
                   weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                   first_step: bool) -> None:
    _implementation("sgd_step", params[0])(params, grads, momentum_buffers, lr, weight_decay, momentum, dampening,
                                           nesterov, maximize, first_step)


_sgd_step = torch.library.custom_op(
    "kiln::sgd_step", mutates_args=("params", "momentum_buffers"))(_sgd_step_body)


@_sgd_step.register_fake
def _(params, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov, maximize, first_step):
    return None


def _bias_corrections(steps: list[Tensor], lr: float, beta1: float, beta2: float):
    if all(s.is_cpu for s in steps):  # torch's non-capturable counters: read each directly
        counts = [s.item() for s in steps]
    else:  # one copy to the host, not one synchronization per counter
        counts = torch.stack([s.detach().reshape(()).cpu() for s in steps]).tolist()
    return ([lr / (1 - beta1 ** c) for c in counts], [(1 - beta2 ** c) ** 0.5 for c in counts])


def _adam_step_body(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: float, beta1: float, beta2: float,
                    eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                    decoupled_weight_decay: bool) -> None:
    step_sizes, bc2_sqrts = _bias_corrections(steps, lr, beta1, beta2)
    _implementation("adam_step", params[0])(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes,
                                            bc2_sqrts, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                            decoupled_weight_decay)


_adam_step = torch.library.custom_op(
    "kiln::adam_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))(_adam_step_body)


@_adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, amsgrad,
      maximize, decoupled_weight_decay):
    return None


def _rmsprop_step_body(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                       momentum_buffers: list[Tensor], grad_avgs: list[Tensor], lr: float, alpha: float, eps: float,
                       weight_decay: float, momentum: float, centered: bool, maximize: bool) -> None:
    _implementation("rmsprop_step", params[0])(params, grads, square_avgs, momentum_buffers, grad_avgs, lr, alpha,
                                               eps, weight_decay, momentum, centered, maximize)


_rmsprop_step = torch.library.custom_op(
    "kiln::rmsprop_step", mutates_args=("params", "square_avgs", "momentum_buffers", "grad_avgs"))(_rmsprop_step_body)


@_rmsprop_step.register_fake
def _(params, grads, square_avgs, momentum_buffers, grad_avgs, lr, alpha, eps, weight_decay, momentum, centered,
      maximize):
    return None


def _ngd_step_body(params: list[Tensor], grads: list[Tensor], lr: float, per_tensor: bool, maximize: bool) -> None:
    _implementation("ngd_step", params[0])(params, grads, lr, per_tensor, maximize)


_ngd_step = torch.library.custom_op("kiln::ngd_step", mutates_args=("params",))(_ngd_step_body)


@_ngd_step.register_fake
def _(params, grads, lr, per_tensor, maximize):
    return None


# ---------------------------------------------------------------------------------------
# Eager CPU calls skip torch.library's dispatch (~0.35 ms at 6 lists of 20 tensors, against
# 0.4 ms for the update of their 1M float32 elements) where _cpu_eager.direct allows it and
# grad mode is off, as in every optimizer step.


def _call(op, body, args: tuple, mutated: tuple) -> None:
    """op(*args), or body(*args) after bumping the versions of the mutated lists where
    allowed (args[0] and args[1]: the params and grads lists)."""
    if args[0] and not torch.is_grad_enabled() and _cpu_eager.direct(args[0][0], args[1][0]):
        _cpu_eager.bump_versions(mutated)
        body(*args)
    else:
        op(*args)


# ---------------------------------------------------------------------------------------
# The public functions: check once, drop zero-size tensors, run on contiguous tensors
# (copies for the rare non-contiguous one, written back after the step).


def _lists_agree(params, lists: dict) -> bool:
    """The common case of _check_lists in one quick pass (half its time at 6 lists of 20):
    floating-point params, every list as long as params, each tensor a dense tensor of
    params[0]'s dtype and device and of its param's shape."""
    if not isinstance(params, (list, tuple)) or not params or not isinstance(params[0], Tensor):
        return False
    first = params[0]
    if not first.is_floating_point():
        return False
    shapes = [p.shape if isinstance(p, Tensor) else None for p in params]
    dtype, device, strided = first.dtype, first.device, torch.strided
    for tensors in (params, *lists.values()):
        if len(tensors) != len(params):
            return False
        for t, shape in zip(tensors, shapes):
            if not (isinstance(t, Tensor) and t.shape == shape and t.dtype == dtype and t.device == device
                    and t.layout == strided):
                return False
    return True


def _check_lists(op: str, params, **lists) -> None:
    if _lists_agree(params, lists):
        return
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"{op}: params must be a list of tensors")
    if not params:
        return
    first = params[0]
    if not first.is_floating_point():
        raise TypeError(f"{op}: params must be floating-point tensors, got dtype "
                        f"{str(first.dtype).removeprefix('torch.')}")
    for i, p in enumerate(params):
        if p.dtype != first.dtype or p.device != first.device:
            raise TypeError(f"{op}: every tensor of one call must share params[0]'s dtype and device "
                            f"({first.dtype}, {first.device}); params[{i}] is {p.dtype} on {p.device}")
    for name, tensors in lists.items():
        if len(tensors) != len(params):
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors but params has {len(params)}")
        for i, (t, p) in enumerate(zip(tensors, params)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.layout != torch.strided:
                raise RuntimeError(f"{op}: {name}[{i}] is a {t.layout} tensor; kiln's fused optimizers "
                                   f"take dense (strided) tensors only")
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"{op}: {name}[{i}] must match params[{i}] ({tuple(p.shape)}, {p.dtype}, "
                                 f"{p.device}), got ({tuple(t.shape)}, {t.dtype}, {t.device})")


def _run(op, lists: list[list[Tensor]], mutated: list[bool], call) -> None:
    """Calls call(*dense_lists) on the non-empty tensors, contiguous; copies back the
    mutated ones that had to be made contiguous."""
    keep = [i for i, p in enumerate(lists[0]) if p.numel() > 0]
    if not keep:
        return
    picked = [[ts[i] for i in keep] for ts in lists]
    dense = [[t.contiguous() for t in ts] for ts in picked]
    call(*dense)
    for ts, ds, is_mutated in zip(picked, dense, mutated):
        if is_mutated:
            for t, d in zip(ts, ds):
                if d is not t:
                    t.copy_(d)


def _scalar(value, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element, got shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


def sgd_step(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor] | None = None, *,
             lr: float, weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
             nesterov: bool = False, maximize: bool = False, first_step: bool = False) -> None:
    """One SGD step of torch.optim.SGD over all params, in place. momentum_buffers (needed
    when momentum != 0) are overwritten with the (weight-decayed) gradient when first_step
    (torch's first step clones it), else updated."""
    momentum = _scalar(momentum, "momentum")
    buffers = momentum_buffers if momentum != 0 else []
    if momentum != 0 and momentum_buffers is None:
        raise ValueError("sgd_step: momentum_buffers are required when momentum != 0")
    _check_lists("sgd_step", params, grads=grads, **({"momentum_buffers": buffers} if momentum != 0 else {}))
    lists = [list(params), list(grads)] + ([list(buffers)] if momentum != 0 else [])
    args = (_scalar(lr, "lr"), _scalar(weight_decay, "weight_decay"), momentum, _scalar(dampening, "dampening"),
            bool(nesterov), bool(maximize), bool(first_step))
    _run("sgd_step", lists, [True, False, True],
         lambda p, g, *b: _call(_sgd_step, _sgd_step_body, (p, g, b[0] if b else [], *args), (p, *b)))


def adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              max_exp_avg_sqs: list[Tensor] | None, steps: list[Tensor], *, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
              decoupled_weight_decay: bool = False) -> None:
    """One Adam (AdamW with decoupled_weight_decay) step of torch.optim.Adam, in place.
    steps: each parameter's step count, already incremented for this step."""
    extra = {"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("adam_step: max_exp_avg_sqs are required when amsgrad")
    _check_lists("adam_step", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, **extra)
    if len(steps) != len(params):
        raise ValueError(f"adam_step: steps has {len(steps)} tensors but params has {len(params)}")
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps)]
    lists += [list(max_exp_avg_sqs)] if amsgrad else []
    args = (_scalar(lr, "lr"), _scalar(beta1, "beta1"), _scalar(beta2, "beta2"), _scalar(eps, "eps"),
            _scalar(weight_decay, "weight_decay"), bool(amsgrad), bool(maximize), bool(decoupled_weight_decay))
    _run("adam_step", lists, [True, False, True, True, False, True],
         lambda p, g, m, v, s, *vmax: _call(_adam_step, _adam_step_body,
                                            (p, g, m, v, vmax[0] if vmax else [], s, *args), (p, m, v, *vmax)))


# ---------------------------------------------------------------------------------------
# The steps of kiln.optim's cached plans (kiln/optim/_common.py StepPlan): lists the caller
# has checked (non-empty, contiguous, of one dtype and device, matching sizes) and step
# counts as numbers. Eager CPU calls go straight to the implementation; any other call
# (compiling, a dispatch mode, another device) takes the public function's path.


def _direct(params: list[Tensor], grads: list[Tensor]) -> bool:
    return not torch.is_grad_enabled() and _cpu_eager.direct(params[0], grads[0])


def adam_step_checked(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      max_exp_avg_sqs: list[Tensor] | None, steps: list[Tensor], counts: list[float], *, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                      decoupled_weight_decay: bool) -> None:
    """adam_step on checked lists; counts: the values of steps (already incremented)."""
    if not _direct(params, grads):
        adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2,
                  eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                  decoupled_weight_decay=decoupled_weight_decay)
        return
    vmax = max_exp_avg_sqs if amsgrad else []
    _cpu_eager.bump_versions((params, exp_avgs, exp_avg_sqs, vmax))
    # torch's bias corrections, once per distinct count (usually one for the whole group)
    per_count = {c: (lr / (1 - beta1 ** c), (1 - beta2 ** c) ** 0.5) for c in set(counts)}
    if len(per_count) == 1:
        ((step_size, bc2_sqrt),) = per_count.values()
        step_sizes, bc2_sqrts = [step_size] * len(counts), [bc2_sqrt] * len(counts)
    else:
        step_sizes = [per_count[c][0] for c in counts]
        bc2_sqrts = [per_count[c][1] for c in counts]
    _implementation("adam_step", params[0])(params, grads, exp_avgs, exp_avg_sqs, vmax, step_sizes, bc2_sqrts,
                                            lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                            decoupled_weight_decay)


def sgd_step_checked(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor] | None, *, lr: float,
                     weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                     first_step: bool) -> None:
    """sgd_step on checked lists."""
    if not _direct(params, grads):
        sgd_step(params, grads, momentum_buffers, lr=lr, weight_decay=weight_decay, momentum=momentum,
                 dampening=dampening, nesterov=nesterov, maximize=maximize, first_step=first_step)
        return
    buffers = momentum_buffers if momentum != 0 else []
    _cpu_eager.bump_versions((params, buffers))
    _implementation("sgd_step", params[0])(params, grads, buffers, lr, weight_decay, momentum, dampening, nesterov,
                                           maximize, first_step)


# ---------------------------------------------------------------------------------------
# Steps on a plan's own table: kiln.optim's plans check each step that their parameters and
# state still live where the table says (and keep those storages alive), so only the
# gradients' addresses are new; the numba kernel then runs on the table as it stands
# (reading 600 addresses and building the table's key cost more than a 200-tensor step's
# other host work together). Any call the table cannot take goes through *_checked.


def step_table(lists: list[list[Tensor]]):
    """A table for a plan's eager CPU steps over these lists (params, grads, state lists:
    checked, non-empty, contiguous, of one dtype), or None where the cpu backend cannot run
    them (another device or dtype, numba missing). The grads' row is written by each step."""
    first = lists[0][0]
    if backend.unavailable_reason("cpu", first.device, first.dtype, DTYPES["cpu"]) is not None:
        return None
    return backend.kernels("cpu", _KERNEL_MODULES, _REFERENCE).PlanTable(lists)


def _table_usable(op: str, table, params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether this call may run on the plan's table: eager, no mode or profiler, grad mode
    off (_direct), and the cpu backend is the one selected for the op now."""
    first = params[0]
    return (table is not None and _direct(params, grads)
            and backend.select(op, first.device, first.dtype, DTYPES) == "cpu")


def sgd_step_planned(table, grad_addresses: list[int], mutated: list[Tensor], params: list[Tensor],
                     grads: list[Tensor], momentum_buffers: list[Tensor] | None, *, lr: float, weight_decay: float,
                     momentum: float, dampening: float, nesterov: bool, maximize: bool) -> None:
    """sgd_step_checked (not a first step) on a plan's table (step_table of [params, grads,
    buffers]): grad_addresses are the grads' data pointers, mutated the params and buffers
    (whose versions the step bumps)."""
    if not _table_usable("sgd_step", table, params, grads):
        sgd_step_checked(params, grads, momentum_buffers, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         dampening=dampening, nesterov=nesterov, maximize=maximize, first_step=False)
        return
    _cpu_eager.bump_versions_of(mutated)
    table.set_grads(grad_addresses)
    backend.kernels("cpu", _KERNEL_MODULES, _REFERENCE).sgd_step_table(
        table, lr, weight_decay, momentum, dampening, nesterov, maximize, False)


def adam_step_planned(table, grad_addresses: list[int], mutated: list[Tensor], params: list[Tensor],
                      grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      max_exp_avg_sqs: list[Tensor] | None, steps: list[Tensor], counts, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                      decoupled_weight_decay: bool) -> None:
    """adam_step_checked on a plan's table (step_table of [params, grads, exp_avgs,
    exp_avg_sqs(, max_exp_avg_sqs)]); counts: a float64 numpy array of the steps' values
    (already incremented); mutated: the params and state lists' tensors."""
    if not _table_usable("adam_step", table, params, grads):
        adam_step_checked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, counts.tolist(), lr=lr,
                          beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                          maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
        return
    _cpu_eager.bump_versions_of(mutated)
    table.set_grads(grad_addresses)
    # torch's bias corrections in float64, once when every count is the same (as usual)
    first = float(counts[0])
    if (counts == first).all():
        step_sizes = np.full(len(counts), lr / (1 - beta1 ** first))
        bc2_sqrts = np.full(len(counts), (1 - beta2 ** first) ** 0.5)
    else:
        values = counts.tolist()
        step_sizes = np.array([lr / (1 - beta1 ** c) for c in values])
        bc2_sqrts = np.array([(1 - beta2 ** c) ** 0.5 for c in values])
    backend.kernels("cpu", _KERNEL_MODULES, _REFERENCE).adam_step_table(
        table, step_sizes, bc2_sqrts, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay)


def rmsprop_step(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                 momentum_buffers: list[Tensor] | None = None, grad_avgs: list[Tensor] | None = None, *,
                 lr: float, alpha: float, eps: float, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False, maximize: bool = False) -> None:
    """One RMSprop step of torch.optim.RMSprop, in place; momentum_buffers needed when
    momentum > 0, grad_avgs when centered."""
    momentum = _scalar(momentum, "momentum")
    extra = {}
    if momentum > 0:
        if momentum_buffers is None:
            raise ValueError("rmsprop_step: momentum_buffers are required when momentum > 0")
        extra["momentum_buffers"] = momentum_buffers
    if centered:
        if grad_avgs is None:
            raise ValueError("rmsprop_step: grad_avgs are required when centered")
        extra["grad_avgs"] = grad_avgs
    _check_lists("rmsprop_step", params, grads=grads, square_avgs=square_avgs, **extra)
    lists = [list(params), list(grads), list(square_avgs)] + [list(v) for v in extra.values()]
    args = (_scalar(lr, "lr"), _scalar(alpha, "alpha"), _scalar(eps, "eps"), _scalar(weight_decay, "weight_decay"),
            momentum, bool(centered), bool(maximize))

    def call(p, g, sq, *optional):
        optional = list(optional)
        buf = optional.pop(0) if momentum > 0 else []
        gavg = optional.pop(0) if centered else []
        _call(_rmsprop_step, _rmsprop_step_body, (p, g, sq, buf, gavg, *args), (p, sq, buf, gavg))

    _run("rmsprop_step", lists, [True, False] + [True] * (len(lists) - 2), call)


def ngd_step(params: list[Tensor], grads: list[Tensor], *, lr: float, per_tensor: bool = False,
             maximize: bool = False) -> None:
    """params -= lr * g / ||g||, the norm over all grads of the call (per_tensor: each
    tensor's own); a zero norm leaves the parameters as they are."""
    _check_lists("ngd_step", params, grads=grads)
    args = (_scalar(lr, "lr"), bool(per_tensor), bool(maximize))
    _run("ngd_step", [list(params), list(grads)], [True, False],
         lambda p, g: _call(_ngd_step, _ngd_step_body, (p, g, *args), (p,)))
