"""LSTM and GRU (the notes, section 16): fused cells and whole-sequence layers, torch's
gate order and weight layout (LSTM [i|f|g|o], GRU [r|z|n]).

A layer runs in two parts. The input projection of every time step is one large GEMM
up front, gx = x W_ih^T + b (kiln.ops.linear_act, autograd through it gives dx, dW_ih and
the biases). The recurrence then runs step by step with a fused step kernel: the
recurrent GEMM h_{t-1} W_hh^T plus the gate nonlinearities and the state update in one
pass (Triton: in the GEMM's epilogue; cpu: a oneDNN GEMM with W_hh packed once per
sequence + one numba pass, the step loop writing in place). Backward walks the
steps in reverse with the fused step backward (pointwise gate gradients + the GEMM
through W_hh) and forms dW_hh = sum_t dpre_t^T h_{t-1} as one GEMM over all steps at
the end.

The cuda form (csrc/rnn.cu) has the same four step kernels (float32 FFMA dot products on
the weights converted to float32, gate math in the GEMM's epilogue / prologue) and a
persistent whole-sequence forward: one cooperative launch of one wave of blocks, each
block owning ceil(H / SMs) hidden units and keeping their gate rows of W_hh (every gate)
in shared memory for all T steps; per step it reads h_{t-1} from L2, writes its slice of
h_t, c_t and the gates, and meets the others at a grid barrier (cooperative_groups
grid.sync(); the cooperative launch guarantees co-residency, so the barrier cannot hang).
It runs when the slice fits in shared memory (on an H100, 227 KiB a block: H <= 1210
for an LSTM with float32 weights, 1709 with 16-bit weights; GRU 1417 / 1905; any batch),
else the forward is the step loop over the step kernels. Backward is the same scheme in
reverse (a persistent whole-sequence backward: each block keeps the columns of its units
of every gate row of W_hh, the same bytes, so the same limits) and likewise falls back to
the step loop over the cuda step-backward kernels. The Triton form is one launch per
step: a persistent Triton kernel needs the same grid barrier (a spin on a global
counter), which TRITON_INTERPRET=1, running programs one after another, would deadlock on,
so nothing here could test it (kernels/triton/rnn.py describes the design).

Saved for backward, per step: LSTM the activated gates (4H) and the cell state; GRU
r, z, n and the n-part of h W_hh^T + b_hh (4H); plus the hidden states, which are
outputs anyway. The state is float32 (float64 for float64) whatever the weights' dtype.
"""

from __future__ import annotations

import functools
import sys
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from kiln import backend

from ._checks import check_floating, check_same_device_dtype
from ._cuda_launch import DTYPE_CODE, ptr, stream
from .linear_act import linear_act

# ---------------------------------------------------------------------------------------
# The pure-PyTorch reference of one step (same signatures as the kernel modules). Every
# step function takes ``out``: None, or the tensors to write its results into (the step
# loops pass their slices of the sequence outputs, so no form copies per step).


def _into(out, *values):
    if out is None:
        return values
    for o, v in zip(out, values):
        o.copy_(v)
    return out


def lstm_step_forward(gx, h, c, w_hh, out=None):
    pre = gx + h @ w_hh.t().to(h.dtype)
    i, f, g, o = pre.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_next = f * c + i * g
    return _into(out, o * torch.tanh(c_next), c_next, torch.cat([i, f, g, o], 1))


def lstm_step_backward(dh_next, dc_next, gates, c, c_next, w_hh, out=None):
    i, f, g, o = gates.chunk(4, 1)
    tc = torch.tanh(c_next)
    dc_tot = dc_next + dh_next * o * (1 - tc * tc)
    dpre = torch.cat([dc_tot * g * i * (1 - i), dc_tot * c * f * (1 - f), dc_tot * i * (1 - g * g),
                      dh_next * tc * o * (1 - o)], 1)
    return _into(out, dpre, dpre @ w_hh.to(dpre.dtype), dc_tot * f)


def gru_step_forward(gx, h, w_hh, b_hh, out=None):
    gh = h @ w_hh.t().to(h.dtype)
    if b_hh is not None:
        gh = gh + b_hh.to(h.dtype)
    (xr, xz, xn), (hr, hz, hn) = gx.chunk(3, 1), gh.chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return _into(out, (1 - z) * n + z * h, torch.cat([r, z, n, hn], 1))


def gru_step_backward(dh_next, saved, h, w_hh, out=None):
    r, z, n, hn = saved.chunk(4, 1)
    dn = dh_next * (1 - z) * (1 - n * n)
    dz = dh_next * (h - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dgh = torch.cat([dr, dz, dn * r], 1)
    return _into(out, torch.cat([dr, dz, dn], 1), dgh, dh_next * z + dgh @ w_hh.to(dgh.dtype))


# ---------------------------------------------------------------------------------------
# The cuda backend.
#
# csrc/rnn.cu: the four step kernels (state float32, w_hh / b_hh float32, float16 or
# bfloat16), and the persistent whole-sequence forwards and backwards, which keep each
# block's slice of w_hh (forward: its gate rows; backward: its columns of every gate row)
# in shared memory for all T steps with a grid barrier per step. They run when
# kiln._cuda.rnn_sequence_fits(gates, B, H, dtype) (H <= 1210 for an LSTM with float32
# weights on an H100, any B) and otherwise fall back to the step loops over the step
# kernels (forward and backward separately: each launcher returns False when its kernel
# does not fit).


def _cuda_state(op, *states):
    for s in states:
        if s.dtype != torch.float32:
            raise TypeError(f"{op} (cuda): the state must be float32, got {s.dtype}")


def cuda_lstm_step_forward(gx, h, c, w_hh, out=None):
    """kiln._cuda.lstm_step_forward: -> (h_next, c_next, gates (B, 4H)), float32."""
    _cuda_state("lstm_step_forward", gx, h, c)
    ext = backend.cuda_extension()
    B, H = h.shape
    h_next, c_next, gates = out or (torch.empty_like(h), torch.empty_like(c), h.new_empty((B, 4 * H)))
    with torch.cuda.device(h.device):
        ext.lstm_step_forward(ptr(gx), ptr(h), ptr(c), ptr(w_hh), ptr(h_next), ptr(c_next), ptr(gates), B, H,
                              DTYPE_CODE[w_hh.dtype], stream(h))
    return h_next, c_next, gates


def cuda_lstm_step_backward(dh_next, dc_next, gates, c, c_next, w_hh, out=None):
    """kiln._cuda.lstm_step_backward: -> (dpre (B, 4H), dh, dc), float32."""
    _cuda_state("lstm_step_backward", dh_next, dc_next, gates, c, c_next)
    ext = backend.cuda_extension()
    B, H = c.shape
    dpre, dh, dc = out or (torch.empty_like(gates), torch.empty_like(c), torch.empty_like(c))
    with torch.cuda.device(c.device):
        ext.lstm_step_backward(ptr(dh_next), ptr(dc_next), ptr(gates), ptr(c), ptr(c_next), ptr(w_hh), ptr(dpre),
                               ptr(dh), ptr(dc), B, H, DTYPE_CODE[w_hh.dtype], stream(c))
    return dpre, dh, dc


def cuda_gru_step_forward(gx, h, w_hh, b_hh, out=None):
    """kiln._cuda.gru_step_forward: -> (h_next, saved (B, 4H) = [r | z | n | gh_n]), float32."""
    _cuda_state("gru_step_forward", gx, h)
    ext = backend.cuda_extension()
    B, H = h.shape
    h_next, saved = out or (torch.empty_like(h), h.new_empty((B, 4 * H)))
    with torch.cuda.device(h.device):
        ext.gru_step_forward(ptr(gx), ptr(h), ptr(w_hh), ptr(b_hh), ptr(h_next), ptr(saved), B, H,
                             DTYPE_CODE[w_hh.dtype], stream(h))
    return h_next, saved


def cuda_gru_step_backward(dh_next, saved, h, w_hh, out=None):
    """kiln._cuda.gru_step_backward: -> (dgx, dgh (B, 3H), dh), float32."""
    _cuda_state("gru_step_backward", dh_next, saved, h)
    ext = backend.cuda_extension()
    B, H = h.shape
    dgx, dgh, dh = out or (h.new_empty((B, 3 * H)), h.new_empty((B, 3 * H)), torch.empty_like(h))
    with torch.cuda.device(h.device):
        ext.gru_step_backward(ptr(dh_next), ptr(saved), ptr(h), ptr(w_hh), ptr(dgx), ptr(dgh), ptr(dh), B, H,
                              DTYPE_CODE[w_hh.dtype], stream(h))
    return dgx, dgh, dh


def cuda_sequence_fits(gates: int, B: int, H: int, w_hh: Tensor) -> bool:
    """Whether the persistent forward and backward run for this shape and weight dtype on
    w_hh's device."""
    ext = backend.cuda_extension()
    with torch.cuda.device(w_hh.device):
        return bool(ext.rnn_sequence_fits(gates, B, H, DTYPE_CODE[w_hh.dtype]))


def cuda_lstm_sequence_forward(gx, h0, c0, w_hh):
    """The persistent kernel (one cooperative launch for all T steps) when the shape fits,
    else the step loop over the cuda step kernels. -> (h_all, c_all, gates)."""
    _cuda_state("lstm_sequence_forward", gx, h0, c0)
    ext = backend.cuda_extension()
    T, B, H = gx.shape[0], h0.shape[0], h0.shape[1]
    h_all, c_all, gates = h0.new_empty((T, B, H)), c0.new_empty((T, B, H)), torch.empty_like(gx)
    with torch.cuda.device(h0.device):
        ran = ext.lstm_sequence_forward(ptr(gx), ptr(h0), ptr(c0), ptr(w_hh), ptr(h_all), ptr(c_all), ptr(gates),
                                        T, B, H, DTYPE_CODE[w_hh.dtype], stream(h0))
    if ran:
        return h_all, c_all, gates
    return lstm_sequence_forward(gx, h0, c0, w_hh, kernels=_CUDA_STEPS)


def cuda_gru_sequence_forward(gx, h0, w_hh, b_hh):
    """The persistent kernel when the shape fits, else the step loop. -> (h_all, saved)."""
    _cuda_state("gru_sequence_forward", gx, h0)
    ext = backend.cuda_extension()
    T, B, H = gx.shape[0], h0.shape[0], h0.shape[1]
    h_all, saved = h0.new_empty((T, B, H)), h0.new_empty((T, B, 4 * H))
    with torch.cuda.device(h0.device):
        ran = ext.gru_sequence_forward(ptr(gx), ptr(h0), ptr(w_hh), ptr(b_hh), ptr(h_all), ptr(saved), T, B, H,
                                       DTYPE_CODE[w_hh.dtype], stream(h0))
    if ran:
        return h_all, saved
    return gru_sequence_forward(gx, h0, w_hh, b_hh, kernels=_CUDA_STEPS)


def cuda_lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh):
    """The persistent backward (one cooperative launch for all T steps) when the shape fits,
    else the step loop over the cuda step-backward kernels. -> (dpre_all, dh0, dc0)."""
    _cuda_state("lstm_sequence_backward", dh_all, dc_all, gates, h0, c0, c_all)
    ext = backend.cuda_extension()
    T, B, H = gates.shape[0], h0.shape[0], h0.shape[1]
    dpre_all, dh0, dc0 = torch.empty_like(gates), torch.empty_like(h0), torch.empty_like(c0)
    with torch.cuda.device(h0.device):
        ran = ext.lstm_sequence_backward(ptr(dh_all), ptr(dc_all), ptr(gates), ptr(c0), ptr(c_all), ptr(w_hh),
                                         ptr(dpre_all), ptr(dh0), ptr(dc0), T, B, H, DTYPE_CODE[w_hh.dtype],
                                         stream(h0))
    if ran and T > 0:  # T == 0 writes nothing; the loop's zeros
        return dpre_all, dh0, dc0
    return lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh, kernels=_CUDA_STEPS)


def cuda_gru_sequence_backward(dh_all, saved, h0, h_all, w_hh):
    """The persistent backward when the shape fits, else the step loop. -> (dgx_all, dgh_all, dh0)."""
    _cuda_state("gru_sequence_backward", dh_all, saved, h0, h_all)
    ext = backend.cuda_extension()
    T, B, H = saved.shape[0], h0.shape[0], h0.shape[1]
    dgx_all, dgh_all, dh0 = h0.new_empty((T, B, 3 * H)), h0.new_empty((T, B, 3 * H)), torch.empty_like(h0)
    with torch.cuda.device(h0.device):
        ran = ext.gru_sequence_backward(ptr(dh_all), ptr(saved), ptr(h0), ptr(h_all), ptr(w_hh), ptr(dgx_all),
                                        ptr(dgh_all), ptr(dh0), T, B, H, DTYPE_CODE[w_hh.dtype], stream(h0))
    if ran and T > 0:
        return dgx_all, dgh_all, dh0
    return gru_sequence_backward(dh_all, saved, h0, h_all, w_hh, kernels=_CUDA_STEPS)


# The step functions alone (the fallbacks' kernels), and the form the dispatcher gets:
# with its own sequence forwards and backwards.
_CUDA_STEPS = SimpleNamespace(lstm_step_forward=cuda_lstm_step_forward, lstm_step_backward=cuda_lstm_step_backward,
                              gru_step_forward=cuda_gru_step_forward, gru_step_backward=cuda_gru_step_backward)
_CUDA = SimpleNamespace(**vars(_CUDA_STEPS), lstm_sequence_forward=cuda_lstm_sequence_forward,
                        gru_sequence_forward=cuda_gru_sequence_forward,
                        lstm_sequence_backward=cuda_lstm_sequence_backward,
                        gru_sequence_backward=cuda_gru_sequence_backward)


# ---------------------------------------------------------------------------------------
# The table of implementations.

DTYPES = backend.STANDARD_DTYPES
_KERNEL_MODULES = {"triton": "kiln.kernels.triton.rnn", "cpu": "kiln.kernels.cpu.rnn"}


def _implementation(op: str, t: Tensor):
    return backend.implementation(op, t, DTYPES, _KERNEL_MODULES, sys.modules[__name__], _CUDA)


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# The custom ops: one direction of one layer over T steps, (T, B, .) contiguous.


# A form offers the four step functions above, or whole-sequence functions with the
# signatures of the step loops below (lstm_sequence_forward, ...), which the custom ops
# then call instead (the numba form's loop writes in place, no per-step copies; a
# persistent GPU kernel runs the whole sequence in one launch).


def lstm_sequence_forward(gx, h0, c0, w_hh, kernels=None):
    """Step loop: gx (T, B, 4H), h0, c0 (B, H) -> (h_all, c_all (T, B, H), gates (T, B, 4H))."""
    kernels = kernels or sys.modules[__name__]
    T = gx.shape[0]
    h_all, c_all = h0.new_empty((T, *h0.shape)), c0.new_empty((T, *c0.shape))
    gates = torch.empty_like(gx)
    h, c = h0, c0
    for t in range(T):
        h, c, _ = kernels.lstm_step_forward(gx[t], h, c, w_hh, out=(h_all[t], c_all[t], gates[t]))
    return h_all, c_all, gates


def lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh, kernels=None):
    """Step loop, reversed: -> (dpre_all (T, B, 4H), dh0, dc0)."""
    kernels = kernels or sys.modules[__name__]
    dpre_all = torch.empty_like(gates)
    dh, dc = torch.zeros_like(h0), torch.zeros_like(c0)
    for t in reversed(range(gates.shape[0])):
        c_prev = c0 if t == 0 else c_all[t - 1]
        # The sums are new tensors, so the carries' buffers can take the step's dh and dc.
        kernels.lstm_step_backward(dh_all[t] + dh, dc_all[t] + dc, gates[t], c_prev, c_all[t], w_hh,
                                   out=(dpre_all[t], dh, dc))
    return dpre_all, dh, dc


def gru_sequence_forward(gx, h0, w_hh, b_hh, kernels=None):
    """Step loop: gx (T, B, 3H), h0 (B, H) -> (h_all (T, B, H), saved (T, B, 4H))."""
    kernels = kernels or sys.modules[__name__]
    T, B, H = gx.shape[0], h0.shape[0], h0.shape[1]
    h_all, saved = h0.new_empty((T, B, H)), h0.new_empty((T, B, 4 * H))
    h = h0
    for t in range(T):
        h, _ = kernels.gru_step_forward(gx[t], h, w_hh, b_hh, out=(h_all[t], saved[t]))
    return h_all, saved


def gru_sequence_backward(dh_all, saved, h0, h_all, w_hh, kernels=None):
    """Step loop, reversed: -> (dgx_all, dgh_all (T, B, 3H), dh0)."""
    kernels = kernels or sys.modules[__name__]
    T, B, H = saved.shape[0], h0.shape[0], h0.shape[1]
    dgx_all, dgh_all = saved.new_empty((T, B, 3 * H)), saved.new_empty((T, B, 3 * H))
    dh = torch.zeros_like(h0)
    for t in reversed(range(T)):
        h_prev = h0 if t == 0 else h_all[t - 1]
        kernels.gru_step_backward(dh_all[t] + dh, saved[t], h_prev, w_hh, out=(dgx_all[t], dgh_all[t], dh))
    return dgx_all, dgh_all, dh


def _sequence_function(kernels, name):
    """The form's own whole-sequence function, else the step loop over its step functions."""
    own = getattr(kernels, name, None)  # the reference (this module) gets its own loop here
    return own if own is not None else functools.partial(globals()[name], kernels=kernels)


@torch.library.custom_op("kiln::lstm_sequence", mutates_args=())
def _lstm_sequence(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """gx (T, B, 4H), h0, c0 (B, H) state dtype -> (h_all, c_all (T, B, H), gates (T, B, 4H))."""
    forward = _sequence_function(_implementation("lstm", w_hh), "lstm_sequence_forward")
    return forward(gx, h0, c0, w_hh)


@_lstm_sequence.register_fake
def _(gx, h0, c0, w_hh):
    T = gx.shape[0]
    return h0.new_empty((T, *h0.shape)), c0.new_empty((T, *c0.shape)), torch.empty_like(gx)


@torch.library.custom_op("kiln::lstm_sequence_backward", mutates_args=())
def _lstm_sequence_backward(dh_all: Tensor, dc_all: Tensor, gates: Tensor, h0: Tensor, c0: Tensor,
                            h_all: Tensor, c_all: Tensor, w_hh: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dgx (T, B, 4H), dh0, dc0, dw_hh)."""
    backward = _sequence_function(_implementation("lstm", w_hh), "lstm_sequence_backward")
    dpre_all, dh, dc = backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh)
    h_prev = torch.cat([h0[None], h_all[:-1]]).reshape(-1, h0.shape[1])
    dw_hh = dpre_all.reshape(-1, gates.shape[2]).t() @ h_prev
    return dpre_all, dh, dc, dw_hh.to(w_hh.dtype)


@_lstm_sequence_backward.register_fake
def _(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh):
    return torch.empty_like(gates), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_hh)


def _lstm_setup(ctx, inputs, output):
    _, h0, c0, w_hh = inputs
    h_all, c_all, gates = output
    ctx.save_for_backward(gates, h0, c0, h_all, c_all, w_hh)


def _lstm_grad(ctx, dh_all, dc_all, dgates):
    gates, h0, c0, h_all, c_all, w_hh = ctx.saved_tensors
    dh_all = torch.zeros_like(h_all) if dh_all is None else dh_all.contiguous()
    dc_all = torch.zeros_like(c_all) if dc_all is None else dc_all.contiguous()
    return _lstm_sequence_backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh)


torch.library.register_autograd("kiln::lstm_sequence", _lstm_grad, setup_context=_lstm_setup)


@torch.library.custom_op("kiln::gru_sequence", mutates_args=())
def _gru_sequence(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """gx (T, B, 3H), h0 (B, H) -> (h_all (T, B, H), saved (T, B, 4H))."""
    forward = _sequence_function(_implementation("gru", w_hh), "gru_sequence_forward")
    return forward(gx, h0, w_hh, b_hh)


@_gru_sequence.register_fake
def _(gx, h0, w_hh, b_hh):
    T, B, H = gx.shape[0], h0.shape[0], h0.shape[1]
    return h0.new_empty((T, B, H)), h0.new_empty((T, B, 4 * H))


@torch.library.custom_op("kiln::gru_sequence_backward", mutates_args=())
def _gru_sequence_backward(dh_all: Tensor, saved: Tensor, h0: Tensor, h_all: Tensor, w_hh: Tensor,
                           need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dgx (T, B, 3H), dh0, dw_hh, db_hh (empty unless need_db))."""
    H = h0.shape[1]
    backward = _sequence_function(_implementation("gru", w_hh), "gru_sequence_backward")
    dgx_all, dgh_all, dh = backward(dh_all, saved, h0, h_all, w_hh)
    h_prev = torch.cat([h0[None], h_all[:-1]]).reshape(-1, H)
    dgh = dgh_all.reshape(-1, 3 * H)
    db = dgh.sum(0).to(w_hh.dtype) if need_db else h0.new_empty(0)
    return dgx_all, dh, (dgh.t() @ h_prev).to(w_hh.dtype), db


@_gru_sequence_backward.register_fake
def _(dh_all, saved, h0, h_all, w_hh, need_db):
    T, B, H = saved.shape[0], h0.shape[0], h0.shape[1]
    return (h0.new_empty((T, B, 3 * H)), torch.empty_like(h0), torch.empty_like(w_hh),
            w_hh.new_empty(3 * H) if need_db else h0.new_empty(0))


def _gru_setup(ctx, inputs, output):
    _, h0, w_hh, b_hh = inputs
    h_all, saved = output
    ctx.save_for_backward(saved, h0, h_all, w_hh)
    ctx.has_bias = b_hh is not None


def _gru_grad(ctx, dh_all, dsaved):
    saved, h0, h_all, w_hh = ctx.saved_tensors
    dh_all = torch.zeros_like(h_all) if dh_all is None else dh_all.contiguous()
    need_db = ctx.has_bias and ctx.needs_input_grad[3]
    dgx, dh0, dw_hh, db = _gru_sequence_backward(dh_all, saved, h0, h_all, w_hh, need_db)
    return dgx, dh0, dw_hh, db if need_db else None


torch.library.register_autograd("kiln::gru_sequence", _gru_grad, setup_context=_gru_setup)


# ---------------------------------------------------------------------------------------
# The public ops.


def _check_weights(op, x, w_ih, w_hh, b_ih, b_hh, gates):
    check_floating(op, x=x, w_ih=w_ih, w_hh=w_hh)
    check_same_device_dtype(op, x=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    if w_hh.dim() != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
        raise ValueError(f"{op}: w_hh must be ({gates} * hidden, hidden), got {tuple(w_hh.shape)}")
    H = w_hh.shape[1]
    if w_ih.dim() != 2 or w_ih.shape[0] != gates * H or w_ih.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: w_ih must be ({gates} * hidden, input) = ({gates * H}, {x.shape[-1]}) "
                         f"for x {tuple(x.shape)} and w_hh {tuple(w_hh.shape)}, got {tuple(w_ih.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and tuple(b.shape) != (gates * H,):
            raise ValueError(f"{op}: {name} must have shape ({gates * H},), got {tuple(b.shape)}")
    return H


def _check_state(op, name, s, B, H, x):
    if tuple(s.shape) != (B, H):
        raise ValueError(f"{op}: {name} must have shape (batch, hidden) = {(B, H)}, got {tuple(s.shape)}")
    if s.device != x.device:
        raise ValueError(f"{op}: {name} is on {s.device} but x is on {x.device}")


def _input_projection(x, w_ih, bias):
    """gx = x W_ih^T + bias for every step at once: (T, B, in) -> (T, B, G*H), state dtype."""
    return linear_act(x, w_ih, bias, "identity").to(_state_dtype(x.dtype)).contiguous()


def _sum_biases(b_ih, b_hh):
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def lstm(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
         b_hh: Optional[Tensor] = None, reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, over x (T, B, input): returns (out (T, B, H), h_n, c_n).
    ``reverse`` runs the steps from T-1 down to 0 (the backward direction of a
    bidirectional layer); out stays in time order."""
    op = "lstm"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (T, batch, input), got {tuple(x.shape)}")
    H = _check_weights(op, x, w_ih, w_hh, b_ih, b_hh, 4)
    B = x.shape[1]
    _check_state(op, "h0", h0, B, H, x)
    _check_state(op, "c0", c0, B, H, x)
    if reverse:
        x = x.flip(0)
    gx = _input_projection(x, w_ih, _sum_biases(b_ih, b_hh))
    sd = _state_dtype(x.dtype)
    h_all, c_all, _ = _lstm_sequence(gx, h0.to(sd).contiguous(), c0.to(sd).contiguous(), w_hh.contiguous())
    out = h_all.flip(0) if reverse else h_all
    return out.to(x.dtype), h_all[-1].to(x.dtype), c_all[-1].to(x.dtype)


def gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
        b_hh: Optional[Tensor] = None, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction, over x (T, B, input): returns (out (T, B, H), h_n)."""
    op = "gru"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (T, batch, input), got {tuple(x.shape)}")
    H = _check_weights(op, x, w_ih, w_hh, b_ih, b_hh, 3)
    _check_state(op, "h0", h0, x.shape[1], H, x)
    if reverse:
        x = x.flip(0)
    gx = _input_projection(x, w_ih, b_ih)
    sd = _state_dtype(x.dtype)
    h_all, _ = _gru_sequence(gx, h0.to(sd).contiguous(), w_hh.contiguous(),
                             None if b_hh is None else b_hh.contiguous())
    out = h_all.flip(0) if reverse else h_all
    return out.to(x.dtype), h_all[-1].to(x.dtype)


def _cell_batch(op, x):
    if x.dim() not in (1, 2):
        raise ValueError(f"{op}: x must be (batch, input) or (input,), got {tuple(x.shape)}")
    return x.dim() == 1


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One LSTM step as torch.nn.LSTMCell: x (B, input), h, c (B, H) -> (h_next, c_next)."""
    unbatched = _cell_batch("lstm_cell", x)
    if unbatched:
        x, h, c = x[None], h[None], c[None]
    _, h_n, c_n = lstm(x[None], h, c, w_ih, w_hh, b_ih, b_hh)
    return (h_n[0], c_n[0]) if unbatched else (h_n, c_n)


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    """One GRU step as torch.nn.GRUCell: x (B, input), h (B, H) -> h_next."""
    unbatched = _cell_batch("gru_cell", x)
    if unbatched:
        x, h = x[None], h[None]
    _, h_n = gru(x[None], h, w_ih, w_hh, b_ih, b_hh)
    return h_n[0] if unbatched else h_n
