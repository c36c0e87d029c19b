"""LSTM, GRU and the Elman RNN (the notes, section 16): fused cells and whole-sequence
layers, torch's gate order and weight layout (LSTM [i|f|g|o], GRU [r|z|n], Elman one gate,
h_t = tanh or relu(x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)).

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
r, z, n and the n-part of h W_hh^T + b_hh (4H); Elman nothing but the hidden states
(tanh' = 1 - h^2, relu' = [h > 0]), which are outputs anyway. Each op also keeps its input
gx (a reference, no copy) for double backward. The state is float32 (float64 for
float64) whatever the weights' dtype.

Double backward: under create_graph (torch.is_grad_enabled() inside the backward) the
registered backwards recompute the forward from the op's inputs with differentiable
PyTorch ops (``_differentiable_sequence``) and differentiate that, so second derivatives
are exact; the kernels' saved gates are never used there.

Packed sequences (``batch_sizes``, torch's PackedSequence layout: rows sorted by length,
step t runs the first batch_sizes[t] rows): the layer runs the op once per run of steps
with the same batch size, each over exactly the rows still active (the backward
direction adds the rows that start late with their initial state), so every sequence
runs over its own length only, as torch's.

Autocast ("lower", torch's policy for recurrent layers): the public functions run in the
region's dtype (inputs, weights and initial states cast to it), the state stays float32
inside, the outputs have the region's dtype. It is applied here and not as an autocast
kernel on the sequence ops because the sequence ops take float32 state whatever the
weights' dtype (the cuda form refuses anything else), which neither autocast policy of
ops/_autocast.py expresses.
"""

from __future__ import annotations

import functools
import sys
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import Tensor

from kiln import backend

from . import _cpu_eager
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


def rnn_step_forward(gx, h, w_hh, relu, out=None):
    """Elman step: h_next = act(gx + h w_hh^T), act relu or tanh. ``out``: h_next's buffer."""
    pre = gx + h @ w_hh.t().to(h.dtype)
    h_next = torch.relu(pre) if relu else torch.tanh(pre)
    return h_next if out is None else out.copy_(h_next)


def rnn_step_backward(dh_next, h_next, w_hh, relu, out=None):
    """-> (dpre = dh_next act'(pre) (from h_next), dh = dpre w_hh)."""
    dpre = dh_next * (h_next > 0).to(h_next.dtype) if relu else dh_next * (1 - h_next * h_next)
    return _into(out, dpre, dpre @ w_hh.to(dpre.dtype))


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


def cuda_rnn_step_forward(gx, h, w_hh, relu, out=None):
    """kiln._cuda.rnn_step_forward (Elman): -> h_next (B, H) = act(gx + h w_hh^T), float32."""
    _cuda_state("rnn_step_forward", gx, h)
    ext = backend.cuda_extension()
    B, H = h.shape
    h_next = torch.empty_like(h) if out is None else out
    with torch.cuda.device(h.device):
        ext.rnn_step_forward(ptr(gx), ptr(h), ptr(w_hh), ptr(h_next), B, H, bool(relu), DTYPE_CODE[w_hh.dtype],
                             stream(h))
    return h_next


def cuda_rnn_step_backward(dh_next, h_next, w_hh, relu, out=None):
    """kiln._cuda.rnn_step_backward (Elman): -> (dpre (B, H), dh = dpre w_hh), float32."""
    _cuda_state("rnn_step_backward", dh_next, h_next)
    ext = backend.cuda_extension()
    B, H = h_next.shape
    dpre, dh = out or (torch.empty_like(h_next), torch.empty_like(h_next))
    with torch.cuda.device(h_next.device):
        ext.rnn_step_backward(ptr(dh_next), ptr(h_next), ptr(w_hh), ptr(dpre), ptr(dh), B, H, bool(relu),
                              DTYPE_CODE[w_hh.dtype], stream(h_next))
    return dpre, dh


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
                              gru_step_forward=cuda_gru_step_forward, gru_step_backward=cuda_gru_step_backward,
                              rnn_step_forward=cuda_rnn_step_forward, rnn_step_backward=cuda_rnn_step_backward)
# (The Elman RNN has no persistent kernel: its one gate leaves the step GEMM small enough
# that the step loop over the cuda step kernels is what runs.)
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


def rnn_sequence_forward(gx, h0, w_hh, relu, kernels=None):
    """Step loop (Elman): gx (T, B, H), h0 (B, H) -> h_all (T, B, H)."""
    kernels = kernels or sys.modules[__name__]
    h_all = h0.new_empty((gx.shape[0], *h0.shape))
    h = h0
    for t in range(gx.shape[0]):
        h = kernels.rnn_step_forward(gx[t], h, w_hh, relu, out=h_all[t])
    return h_all


def rnn_sequence_backward(dh_all, h0, h_all, w_hh, relu, kernels=None):
    """Step loop, reversed (Elman): -> (dpre_all (T, B, H), dh0)."""
    kernels = kernels or sys.modules[__name__]
    dpre_all = torch.empty_like(h_all)
    dh = torch.zeros_like(h0)
    for t in reversed(range(h_all.shape[0])):
        kernels.rnn_step_backward(dh_all[t] + dh, h_all[t], w_hh, relu, out=(dpre_all[t], dh))
    return dpre_all, dh


def _sequence_function(kernels, name):
    """The form's own whole-sequence function, else the step loop over its step functions."""
    own = getattr(kernels, name, None)  # the reference (this module) gets its own loop here
    return own if own is not None else functools.partial(globals()[name], kernels=kernels)


# ---------------------------------------------------------------------------------------
# Double backward: the forward again in differentiable PyTorch ops, from the op's inputs.


def _differentiable_sequence(kind, gx, h0, c0, w_hh, b_hh, relu):
    """The sequence op's differentiable outputs recomputed by autograd-tracked PyTorch ops:
    lstm -> [h_all, c_all], gru / rnn -> [h_all]."""
    T = gx.shape[0]
    if T == 0:
        return [h0.new_zeros((0, *h0.shape))] + ([c0.new_zeros((0, *c0.shape))] if kind == "lstm" else [])
    w = w_hh.t().to(h0.dtype)
    h, c, hs, cs = h0, c0, [], []
    for t in range(T):
        if kind == "lstm":
            i, f, g, o = (gx[t] + h @ w).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            cs.append(c)
        elif kind == "gru":
            gh = h @ w if b_hh is None else h @ w + b_hh.to(h.dtype)
            (xr, xz, xn), (hr, hz, hn) = gx[t].chunk(3, 1), gh.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
        else:
            pre = gx[t] + h @ w
            h = torch.relu(pre) if relu else torch.tanh(pre)
        hs.append(h)
    return [torch.stack(hs)] + ([torch.stack(cs)] if kind == "lstm" else [])


def _double_backward_grads(ctx, kind, inputs, grad_outputs, relu=False):
    """The gradients of the op's tensor ``inputs`` (gx, h0, [c0,] w_hh, [b_hh]) as a
    differentiable graph (create_graph): None where not needed."""
    gx, h0, c0, w_hh, b_hh = inputs
    wanted = [(i, t) for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[_ARG_INDEX[kind][i]]]
    outputs = _differentiable_sequence(kind, gx, h0, c0, w_hh, b_hh, relu)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    grads = [None] * len(inputs)
    if not pairs or not wanted:
        return grads
    found = torch.autograd.grad([o for o, _ in pairs], [t for _, t in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    for (i, t), g in zip(wanted, found):
        grads[i] = torch.zeros_like(t) if g is None else g
    return grads


# Position of (gx, h0, c0, w_hh, b_hh) among each op's arguments (None: not an argument).
_ARG_INDEX = {"lstm": (0, 1, 2, 3, None), "gru": (0, 1, None, 2, 3), "rnn": (0, 1, None, 2, None)}


# ---------------------------------------------------------------------------------------
# The custom ops: one direction of one layer over T steps, (T, B, .) contiguous.


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
    return _lstm_sequence_backward_body(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh)


def _lstm_sequence_backward_body(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh):
    backward = _sequence_function(_implementation("lstm", w_hh), "lstm_sequence_backward")
    dpre_all, dh, dc, *own_dw = backward(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh)
    if own_dw:  # the form's sequence backward formed dw_hh itself (cpu: inside its one numba call)
        return dpre_all, dh, dc, own_dw[0].to(w_hh.dtype)
    h_prev = torch.cat([h0[None], h_all])[:h_all.shape[0]].reshape(-1, h0.shape[1])
    dw_hh = dpre_all.reshape(-1, gates.shape[2]).t() @ h_prev
    return dpre_all, dh, dc, dw_hh.to(w_hh.dtype)


@_lstm_sequence_backward.register_fake
def _(dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh):
    return torch.empty_like(gates), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_hh)


def _lstm_setup(ctx, inputs, output):
    gx, h0, c0, w_hh = inputs
    h_all, c_all, gates = output
    ctx.save_for_backward(gx, gates, h0, c0, h_all, c_all, w_hh)


def _lstm_grad(ctx, dh_all, dc_all, dgates):
    gx, gates, h0, c0, h_all, c_all, w_hh = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: differentiable gradients
        dgx, dh0, dc0, dw_hh, _ = _double_backward_grads(ctx, "lstm", (gx, h0, c0, w_hh, None), (dh_all, dc_all))
        return dgx, dh0, dc0, dw_hh
    dh_all = torch.zeros_like(h_all) if dh_all is None else dh_all.contiguous()
    dc_all = torch.zeros_like(c_all) if dc_all is None else dc_all.contiguous()
    args = (dh_all, dc_all, gates, h0, c0, h_all, c_all, w_hh)
    # grad mode is off here: where nothing could observe the dispatch, skip it (_cpu_eager)
    return (_lstm_sequence_backward_body if _cpu_eager.direct(*args) else _lstm_sequence_backward)(*args)


_lstm_sequence_call = _cpu_eager.autograd_op(_lstm_sequence, _lstm_grad, _lstm_setup)


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
    h_prev = torch.cat([h0[None], h_all])[:h_all.shape[0]].reshape(-1, H)
    dgh = dgh_all.reshape(-1, 3 * H)
    db = dgh.sum(0).to(w_hh.dtype) if need_db else h0.new_empty(0)
    return dgx_all, dh, (dgh.t() @ h_prev).to(w_hh.dtype), db


@_gru_sequence_backward.register_fake
def _(dh_all, saved, h0, h_all, w_hh, need_db):
    T, B, H = saved.shape[0], h0.shape[0], h0.shape[1]
    return (h0.new_empty((T, B, 3 * H)), torch.empty_like(h0), torch.empty_like(w_hh),
            w_hh.new_empty(3 * H) if need_db else h0.new_empty(0))


def _gru_setup(ctx, inputs, output):
    gx, h0, w_hh, b_hh = inputs
    h_all, saved = output
    ctx.save_for_backward(gx, saved, h0, h_all, w_hh, b_hh)
    ctx.has_bias = b_hh is not None


def _gru_grad(ctx, dh_all, dsaved):
    gx, saved, h0, h_all, w_hh, b_hh = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: differentiable gradients
        dgx, dh0, _, dw_hh, db = _double_backward_grads(ctx, "gru", (gx, h0, None, w_hh, b_hh), (dh_all,))
        return dgx, dh0, dw_hh, db
    dh_all = torch.zeros_like(h_all) if dh_all is None else dh_all.contiguous()
    need_db = ctx.has_bias and ctx.needs_input_grad[3]
    dgx, dh0, dw_hh, db = _gru_sequence_backward(dh_all, saved, h0, h_all, w_hh, need_db)
    return dgx, dh0, dw_hh, db if need_db else None


_gru_sequence_call = _cpu_eager.autograd_op(_gru_sequence, _gru_grad, _gru_setup)


@torch.library.custom_op("kiln::rnn_sequence", mutates_args=())
def _rnn_sequence(gx: Tensor, h0: Tensor, w_hh: Tensor, relu: bool) -> Tensor:
    """Elman: gx (T, B, H) = x W_ih^T + b_ih + b_hh, h0 (B, H) -> h_all (T, B, H),
    h_t = act(gx_t + h_{t-1} w_hh^T), act relu if ``relu`` else tanh."""
    forward = _sequence_function(_implementation("rnn", w_hh), "rnn_sequence_forward")
    return forward(gx, h0, w_hh, relu)


@_rnn_sequence.register_fake
def _(gx, h0, w_hh, relu):
    return h0.new_empty((gx.shape[0], *h0.shape))


@torch.library.custom_op("kiln::rnn_sequence_backward", mutates_args=())
def _rnn_sequence_backward(dh_all: Tensor, h0: Tensor, h_all: Tensor, w_hh: Tensor,
                           relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dgx (T, B, H), dh0, dw_hh)."""
    backward = _sequence_function(_implementation("rnn", w_hh), "rnn_sequence_backward")
    dpre_all, dh = backward(dh_all, h0, h_all, w_hh, relu)
    h_prev = torch.cat([h0[None], h_all])[:h_all.shape[0]].reshape(-1, h0.shape[1])
    return dpre_all, dh, (dpre_all.reshape(-1, h0.shape[1]).t() @ h_prev).to(w_hh.dtype)


@_rnn_sequence_backward.register_fake
def _(dh_all, h0, h_all, w_hh, relu):
    return torch.empty_like(h_all), torch.empty_like(h0), torch.empty_like(w_hh)


def _rnn_setup(ctx, inputs, output):
    gx, h0, w_hh, relu = inputs
    ctx.save_for_backward(gx, h0, output, w_hh)
    ctx.relu = relu


def _rnn_grad(ctx, dh_all):
    gx, h0, h_all, w_hh = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: differentiable gradients
        dgx, dh0, _, dw_hh, _ = _double_backward_grads(ctx, "rnn", (gx, h0, None, w_hh, None), (dh_all,),
                                                       relu=ctx.relu)
        return dgx, dh0, dw_hh, None
    return (*_rnn_sequence_backward(dh_all.contiguous(), h0, h_all, w_hh, ctx.relu), None)


_rnn_sequence_call = _cpu_eager.autograd_op(_rnn_sequence, _rnn_grad, _rnn_setup)


# ---------------------------------------------------------------------------------------
# The public ops.


def _check_weights(op, x, w_ih, w_hh, b_ih, b_hh, gates, w_hr=None):
    """-> (H, S): the hidden size and the recurrent state's size (proj_size with w_hr)."""
    check_floating(op, x=x, w_ih=w_ih, w_hh=w_hh)
    check_same_device_dtype(op, x=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    if w_hh.dim() != 2 or w_hh.shape[0] % gates:
        raise ValueError(f"{op}: w_hh must be ({gates} * hidden, hidden), got {tuple(w_hh.shape)}")
    H = w_hh.shape[0] // gates
    S = H
    if w_hr is not None:
        if w_hr.dim() != 2 or w_hr.shape[1] != H:
            raise ValueError(f"{op}: w_hr must be (proj, hidden) = (proj, {H}) for w_hh {tuple(w_hh.shape)}, "
                             f"got {tuple(w_hr.shape)}")
        S = w_hr.shape[0]
    if w_hh.shape[1] != S:
        want = f"({gates} * hidden, proj) = ({gates * H}, {S})" if w_hr is not None else \
            f"({gates} * hidden, hidden) = ({gates * H}, {H})"
        raise ValueError(f"{op}: w_hh must be {want}, got {tuple(w_hh.shape)}")
    if w_ih.dim() != 2 or w_ih.shape[0] != gates * H or w_ih.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: w_ih must be ({gates} * hidden, input) = ({gates * H}, {x.shape[-1]}) "
                         f"for x {tuple(x.shape)} and w_hh {tuple(w_hh.shape)}, got {tuple(w_ih.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and tuple(b.shape) != (gates * H,):
            raise ValueError(f"{op}: {name} must have shape ({gates} * hidden,) = ({gates * H},) for w_hh "
                             f"{tuple(w_hh.shape)}, got {tuple(b.shape)}")
    return H, S


def _check_state(op, name, s, B, H, x):
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(s).__name__}")
    if tuple(s.shape) != (B, H):
        raise ValueError(f"{op}: {name} must have shape (batch, hidden) = {(B, H)} for x {tuple(x.shape)}, "
                         f"got {tuple(s.shape)}")
    if s.device != x.device:
        raise ValueError(f"{op}: {name} is on {s.device} but x is on {x.device} ({name} {tuple(s.shape)}, "
                         f"x {tuple(x.shape)})")


def _check_batch_sizes(op, batch_sizes, x):
    """torch's PackedSequence layout: T non-increasing counts of active leading rows."""
    T, B = x.shape[0], x.shape[1]
    sizes = [int(b) for b in batch_sizes]
    if len(sizes) != T or (T and sizes[0] != B) or any(b <= 0 for b in sizes) or \
            any(a < b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"{op}: batch_sizes must be {T} non-increasing positive counts starting at the "
                         f"batch size {B} for x {tuple(x.shape)}, got {sizes}")
    return sizes


def _autocast_dtype(x: Tensor):
    """The autocast region's dtype for x's device, None outside one (torch's "lower" policy
    for recurrent layers: they run in the region's dtype)."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(x, *tensors):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return (x, *tensors)
    dtype = _autocast_dtype(x)
    if dtype is None:
        return (x, *tensors)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in (x, *tensors))


def _input_projection(x, w_ih, bias, op="lstm"):
    """gx = x W_ih^T + bias for every step at once: (T, B, in) -> (T, B, G*H), state dtype.

    Where ``op`` runs on the cpu form this is torch's own linear (MKL, with torch's
    autograd): kiln's linear_act adds nothing to a product with no activation, and its
    custom op, its oneDNN weight packing and its epilogue pass cost ~135 us a call at a
    small layer (T 20, B 8, 64 -> 256), as much as the whole recurrence
    (bench/results/cpu_speed_issue14_session5.md). Under torch.compile it stays linear_act:
    backend.select does not trace, and the compiled graph pays no per-call overhead."""
    if (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and backend.select(op, x.device, x.dtype, DTYPES) == "cpu"):
        gx = torch.nn.functional.linear(x, w_ih, bias)
    else:
        gx = linear_act(x, w_ih, bias, "identity")
    return gx.to(_state_dtype(x.dtype)).contiguous()


def _sum_biases(b_ih, b_hh):
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def _segments(batch_sizes):
    """Runs of steps with the same batch size: [(t0, t1, rows)]."""
    runs, t0 = [], 0
    for t in range(1, len(batch_sizes) + 1):
        if t == len(batch_sizes) or batch_sizes[t] != batch_sizes[t0]:
            runs.append((t0, t, batch_sizes[t0]))
            t0 = t
    return runs


def _run_packed(run, x, states, batch_sizes, reverse):
    """Runs ``run(x_seg, states_seg) -> (out_seg, *finals)`` (one direction, rows all active)
    over each run of steps with one batch size, on exactly its active rows. -> out (T, B, .)
    zero past each row's length, and each row's final states (the state after its last
    step forward, after step 0 in reverse)."""
    B = x.shape[1]
    runs = _segments(batch_sizes)
    outs = [None] * len(runs)
    if not reverse:
        current, ended = list(states), [[] for _ in states]
        for i, (t0, t1, rows) in enumerate(runs):
            out, *current = run(x[t0:t1, :rows], [s[:rows] for s in current])
            outs[i] = out
            rows_next = runs[i + 1][2] if i + 1 < len(runs) else 0
            for e, s in zip(ended, current):  # rows rows_next .. rows end at step t1 - 1
                e.append(s[rows_next:])
        finals = [torch.cat(e[::-1]) for e in ended]
    else:
        current = None
        for i in reversed(range(len(runs))):
            t0, t1, rows = runs[i]
            if current is None:
                current = [s[:rows] for s in states]
            else:  # the rows that start here start from their initial state
                current = [torch.cat([c, s[c.shape[0]:rows]]) for c, s in zip(current, states)]
            out, *current = run(x[t0:t1, :rows], current)
            outs[i] = out
        finals = current
    out = torch.cat([torch.nn.functional.pad(o, (0, 0, 0, B - o.shape[1])) for o in outs])
    return out, finals


def _run_direction(run, x, states, batch_sizes, reverse):
    if batch_sizes is None or x.shape[0] == 0:
        out, *finals = run(x, states)
        return out, finals
    return _run_packed(run, x, states, batch_sizes, reverse)


def _lstm_projected(x, h0, c0, w_ih, w_hh, bias, w_hr):
    """LSTM with a projection (torch's proj_size): h_t = w_hr (o tanh(c_t)), and the
    recurrence reads the projected h. The step kernels take a square w_hh, so this runs as
    differentiable PyTorch ops per step (autograd gives every gradient and the double
    backward). -> (out (T, B, P), h_n, c_n), state dtype."""
    gx = _input_projection(x, w_ih, bias)
    sd = gx.dtype
    w, w_r = w_hh.t().to(sd), w_hr.t().to(sd)
    h, c, hs = h0.to(sd), c0.to(sd), []
    for t in range(gx.shape[0]):
        i, f, g, o = (gx[t] + h @ w).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = (torch.sigmoid(o) * torch.tanh(c)) @ w_r
        hs.append(h)
    out = torch.stack(hs) if hs else gx.new_zeros((0, h.shape[0], h.shape[1]))
    return out, h, c


# ---------------------------------------------------------------------------------------
# The eager cpu layer: input projection and recurrence in one numba call each way.
#
# In eager CPU mode (_cpu_eager.direct: no compile, no dispatch or function mode, no
# profiler, no autocast) a whole layer of one direction, tensor (not packed) input and no
# projection runs as one autograd.Function over kernels/cpu/rnn.py's lstm_layer_forward /
# _backward: no torch call for the projection, no custom-op dispatch, one autograd node,
# no flips for the reverse direction and no output copies. The op-per-piece form below
# (linear, then the lstm_sequence op) paid ~170 us of that per layer at T 32, B 8,
# H 64, as much as the layer's own GEMMs and gate passes
# (bench/results/lstm_cpu_issue14_session6.md). Everywhere else the layer runs as
# before, and so does the double backward: under create_graph this Function's backward
# differentiates the layer recomputed in PyTorch ops (_differentiable_sequence).


def _cpu_layer_kernels(x, h0, c0, *weights):
    """kernels/cpu/rnn.py where the eager cpu layer may run on these arguments (its
    lstm_layer_fits is the caller's to check), else None."""
    if x.device.type != "cpu" or c0.dtype != h0.dtype or not _cpu_eager.direct(x, h0, c0, *weights):
        return None
    if backend.select("lstm", x.device, x.dtype, DTYPES) != "cpu":
        return None
    kernels = backend.kernels("cpu", _KERNEL_MODULES, None)
    return kernels if hasattr(kernels, "lstm_layer_fits") else None


def _lstm_layer_cpu(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, kernels):
    """-> (out, h_n, c_n) and what backward needs (c_all, gates)."""
    h_all, c_all, gates, h_n, c_n = kernels.lstm_layer_forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, reverse)
    return (h_all, h_n, c_n), (c_all, gates)


class _LstmLayerCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, kernels):
        outputs, (c_all, gates) = _lstm_layer_cpu(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, kernels)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, outputs[0], c_all, gates)
        ctx.reverse, ctx.kernels = reverse, kernels
        return outputs

    @staticmethod
    def backward(ctx, dh_all, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, h_all, c_all, gates = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiable gradients
            return (*_lstm_layer_double_backward(ctx, (x, h0, c0, w_ih, w_hh, b_ih, b_hh), (dh_all, dh_n, dc_n)),
                    None, None)
        need_w = any(need[3:7])
        dh0, dc0 = dh_n.clone(memory_format=torch.contiguous_format), dc_n.clone(memory_format=torch.contiguous_format)
        dx, dw_ih, dw_hh, db = ctx.kernels.lstm_layer_backward(dh_all.contiguous(), dh0, dc0, gates, h0, c0, h_all,
                                                               c_all, w_hh, x, w_ih, ctx.reverse, need[0], need_w)
        return (dx, dh0, dc0, dw_ih if need[3] else None, dw_hh if need[4] else None,
                db if need[5] and b_ih is not None else None, db if need[6] and b_hh is not None else None, None, None)


def _lstm_layer_double_backward(ctx, inputs, grad_outputs):
    """The gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh) as a differentiable graph: the
    layer recomputed in PyTorch ops from its inputs, differentiated with create_graph."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs
    wanted = [(i, t) for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    grads = [None] * len(inputs)
    if not wanted:
        return grads
    xs = x.flip(0) if ctx.reverse else x
    gx = torch.nn.functional.linear(xs, w_ih, _sum_biases(b_ih, b_hh))
    h_all, c_all = _differentiable_sequence("lstm", gx, h0, c0, w_hh, None, False)
    outputs = (h_all.flip(0) if ctx.reverse else h_all, h_all[-1], c_all[-1])
    found = torch.autograd.grad(outputs, [t for _, t in wanted], grad_outputs, create_graph=True, allow_unused=True)
    for (i, t), g in zip(wanted, found):
        grads[i] = torch.zeros_like(t) if g is None else g
    return grads


def lstm_stack_cpu(x: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tensor], bias: bool = True):
    """A unidirectional stack of LSTM layers (torch.nn.LSTM's forward without dropout,
    projection or packed input) as one autograd node over the eager cpu layer kernels:
    x (T, B, in), h0, c0 (layers, B, H), ``weights`` torch's flat list (w_ih, w_hh[, b_ih,
    b_hh]) per layer. -> (out (T, B, H), h_n, c_n), or None where the eager cpu layer does
    not run (kiln.nn.LSTM then runs the layers one by one on ``lstm``). One node and one
    Python pass over the layers instead of a layer's checks and node each: ~0.1 ms less a
    2-layer forward at B 8, H 64."""
    per = 4 if bias else 2
    L = len(weights) // per
    if x.dim() != 3 or x.shape[0] == 0 or L == 0 or h0.dim() != 3 or tuple(h0.shape) != tuple(c0.shape) \
            or h0.shape[0] != L or h0.shape[1] != x.shape[1]:
        return None
    layers = [tuple(weights[l * per:(l + 1) * per]) + ((None, None) if not bias else ()) for l in range(L)]
    flat = [t for layer in layers for t in layer]
    kernels = _cpu_layer_kernels(x, h0, c0, *flat)
    if kernels is None or any(not kernels.lstm_layer_fits(x if l == 0 else h0, h0[0], w_ih, w_hh)
                              or w_hh.shape[1] != h0.shape[2] for l, (w_ih, w_hh, _, _) in enumerate(layers)):
        return None
    x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
    flat = [None if t is None else t.contiguous() for t in flat]
    if _cpu_eager.no_grad_needed(x, h0, c0, *flat):
        return _lstm_stack_cpu(x, h0, c0, flat, kernels)[0]
    return _LstmStackCpu.apply(x, h0, c0, kernels, *flat)


def _lstm_stack_cpu(x, h0, c0, flat, kernels):
    """-> ((out, h_n, c_n), [h_all, c_all, gates] per layer)."""
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    saved, xs = [], x
    for l in range(h0.shape[0]):
        w_ih, w_hh, b_ih, b_hh = flat[4 * l:4 * l + 4]
        h_all, c_all, gates, _, _ = kernels.lstm_layer_forward(xs, w_ih, b_ih, b_hh, h0[l], c0[l], w_hh, False,
                                                               h_n[l], c_n[l])
        saved += [h_all, c_all, gates]
        xs = h_all
    return (xs, h_n, c_n), saved


class _LstmStackCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, kernels, *flat):
        outputs, saved = _lstm_stack_cpu(x, h0, c0, flat, kernels)
        ctx.save_for_backward(x, h0, c0, *flat, *saved)
        ctx.kernels, ctx.weights = kernels, len(flat)
        return outputs

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        x, h0, c0, *rest = ctx.saved_tensors
        flat, saved = rest[:ctx.weights], rest[ctx.weights:]
        need = ctx.needs_input_grad
        L = h0.shape[0]
        if torch.is_grad_enabled():  # create_graph: differentiable gradients
            return _lstm_stack_double_backward(ctx, x, h0, c0, flat, (dout, dh_n, dc_n))
        dflat = [None] * len(flat)
        dh0 = dh_n.clone(memory_format=torch.contiguous_format)  # the carries, updated in place
        dc0 = dc_n.clone(memory_format=torch.contiguous_format)
        d_above = dout.contiguous()
        for l in reversed(range(L)):
            w_ih, w_hh, b_ih, b_hh = flat[4 * l:4 * l + 4]
            h_all, c_all, gates = saved[3 * l:3 * l + 3]
            x_l = x if l == 0 else saved[3 * (l - 1)]
            need_w = any(need[4 + 4 * l:8 + 4 * l])
            dx, dw_ih, dw_hh, db = ctx.kernels.lstm_layer_backward(d_above, dh0[l], dc0[l], gates, h0[l], c0[l],
                                                                   h_all, c_all, w_hh, x_l, w_ih, False,
                                                                   l > 0 or need[0], need_w)
            if need_w:
                dflat[4 * l:4 * l + 4] = [dw_ih, dw_hh, None if b_ih is None else db, None if b_hh is None else db]
            d_above = dx
        return (d_above if need[0] else None, dh0, dc0, None, *dflat)


def _lstm_stack_double_backward(ctx, x, h0, c0, flat, grad_outputs):
    """The stack recomputed in PyTorch ops from its inputs, differentiated with create_graph."""
    inputs = (x, h0, c0, None, *flat)
    wanted = [(i, t) for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    grads = [None] * len(inputs)
    if not wanted:
        return tuple(grads)
    xs, h_n, c_n = x, [], []
    for l in range(h0.shape[0]):
        w_ih, w_hh, b_ih, b_hh = flat[4 * l:4 * l + 4]
        gx = torch.nn.functional.linear(xs, w_ih, _sum_biases(b_ih, b_hh))
        xs, c_all = _differentiable_sequence("lstm", gx, h0[l], c0[l], w_hh, None, False)
        h_n.append(xs[-1])
        c_n.append(c_all[-1])
    outputs = (xs, torch.stack(h_n), torch.stack(c_n))
    found = torch.autograd.grad(outputs, [t for _, t in wanted], grad_outputs, create_graph=True, allow_unused=True)
    for (i, t), g in zip(wanted, found):
        grads[i] = torch.zeros_like(t) if g is None else g
    return tuple(grads)


def lstm(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
         b_hh: Optional[Tensor] = None, reverse: bool = False, w_hr: Optional[Tensor] = None,
         batch_sizes: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, over x (T, B, input): returns (out (T, B, H), h_n, c_n).
    ``reverse`` runs the steps from T-1 down to 0 (the backward direction of a
    bidirectional layer); out stays in time order. ``w_hr`` (proj, H): torch's projection
    (h_t = w_hr (o tanh c_t), out and h_n (., proj)). ``batch_sizes``: packed layout, step t
    runs the first batch_sizes[t] rows (rows sorted by length); out is zero past a row's
    length and h_n, c_n are each row's state after its own last step."""
    op = "lstm"
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = _autocast(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (T, batch, input), got {tuple(x.shape)}")
    H, S = _check_weights(op, x, w_ih, w_hh, b_ih, b_hh, 4, w_hr)
    B = x.shape[1]
    _check_state(op, "h0", h0, B, S, x)
    _check_state(op, "c0", c0, B, H, x)
    if batch_sizes is not None:
        batch_sizes = _check_batch_sizes(op, batch_sizes, x)
    if batch_sizes is None and w_hr is None and x.shape[0] > 0:
        kernels = _cpu_layer_kernels(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        if kernels is not None and kernels.lstm_layer_fits(x, h0, w_ih, w_hh):
            args = (x.contiguous(), h0.contiguous(), c0.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
                    None if b_ih is None else b_ih.contiguous(), None if b_hh is None else b_hh.contiguous(),
                    bool(reverse), kernels)
            if _cpu_eager.no_grad_needed(*args[:7]):
                return _lstm_layer_cpu(*args)[0]
            return _LstmLayerCpu.apply(*args)
    bias = _sum_biases(b_ih, b_hh)
    sd = _state_dtype(x.dtype)

    def run(xs, states):
        xs = xs.flip(0) if reverse else xs
        if w_hr is not None:
            out, h_n, c_n = _lstm_projected(xs, states[0], states[1], w_ih, w_hh, bias, w_hr)
        else:
            gx = _input_projection(xs, w_ih, bias)
            args = (gx, states[0].to(sd).contiguous(), states[1].to(sd).contiguous(), w_hh.contiguous())
            out, c_all, _ = _lstm_sequence_call(*args)
            h_n, c_n = (out[-1], c_all[-1]) if xs.shape[0] else (states[0], states[1])
        return (out.flip(0) if reverse else out), h_n, c_n

    out, (h_n, c_n) = _run_direction(run, x, [h0, c0], batch_sizes, reverse)
    return out.to(x.dtype), h_n.to(x.dtype), c_n.to(x.dtype)


def gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
        b_hh: Optional[Tensor] = None, reverse: bool = False,
        batch_sizes: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction, over x (T, B, input): returns (out (T, B, H), h_n);
    ``reverse`` and ``batch_sizes`` as lstm's."""
    op = "gru"
    x, h0, w_ih, w_hh, b_ih, b_hh = _autocast(x, h0, w_ih, w_hh, b_ih, b_hh)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (T, batch, input), got {tuple(x.shape)}")
    H, _ = _check_weights(op, x, w_ih, w_hh, b_ih, b_hh, 3)
    _check_state(op, "h0", h0, x.shape[1], H, x)
    if batch_sizes is not None:
        batch_sizes = _check_batch_sizes(op, batch_sizes, x)
    sd = _state_dtype(x.dtype)

    def run(xs, states):
        xs = xs.flip(0) if reverse else xs
        gx = _input_projection(xs, w_ih, b_ih, "gru")
        h_all, _ = _gru_sequence_call(gx, states[0].to(sd).contiguous(), w_hh.contiguous(),
                                      None if b_hh is None else b_hh.contiguous())
        h_n = h_all[-1] if xs.shape[0] else states[0]
        return (h_all.flip(0) if reverse else h_all), h_n

    out, (h_n,) = _run_direction(run, x, [h0], batch_sizes, reverse)
    return out.to(x.dtype), h_n.to(x.dtype)


def _elman(op, relu, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, batch_sizes):
    x, h0, w_ih, w_hh, b_ih, b_hh = _autocast(x, h0, w_ih, w_hh, b_ih, b_hh)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (T, batch, input), got {tuple(x.shape)}")
    H, _ = _check_weights(op, x, w_ih, w_hh, b_ih, b_hh, 1)
    _check_state(op, "h0", h0, x.shape[1], H, x)
    if batch_sizes is not None:
        batch_sizes = _check_batch_sizes(op, batch_sizes, x)
    bias = _sum_biases(b_ih, b_hh)
    sd = _state_dtype(x.dtype)

    def run(xs, states):
        xs = xs.flip(0) if reverse else xs
        gx = _input_projection(xs, w_ih, bias, "rnn")
        h_all = _rnn_sequence_call(gx, states[0].to(sd).contiguous(), w_hh.contiguous(), relu)
        h_n = h_all[-1] if xs.shape[0] else states[0]
        return (h_all.flip(0) if reverse else h_all), h_n

    out, (h_n,) = _run_direction(run, x, [h0], batch_sizes, reverse)
    return out.to(x.dtype), h_n.to(x.dtype)


def rnn_tanh(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None, reverse: bool = False,
             batch_sizes: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer (torch.nn.RNN, nonlinearity "tanh"), one direction, over x
    (T, B, input): h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh); returns
    (out (T, B, H), h_n); ``reverse`` and ``batch_sizes`` as lstm's."""
    return _elman("rnn_tanh", False, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, batch_sizes)


def rnn_relu(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None, reverse: bool = False,
             batch_sizes: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """rnn_tanh with relu: torch.nn.RNN's nonlinearity "relu"."""
    return _elman("rnn_relu", True, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, batch_sizes)


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


def rnn_tanh_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                  b_hh: Optional[Tensor] = None) -> Tensor:
    """One Elman step as torch.nn.RNNCell (tanh): x (B, input), h (B, H) -> h_next."""
    unbatched = _cell_batch("rnn_tanh_cell", x)
    if unbatched:
        x, h = x[None], h[None]
    _, h_n = rnn_tanh(x[None], h, w_ih, w_hh, b_ih, b_hh)
    return h_n[0] if unbatched else h_n


def rnn_relu_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                  b_hh: Optional[Tensor] = None) -> Tensor:
    """One Elman step as torch.nn.RNNCell (relu): x (B, input), h (B, H) -> h_next."""
    unbatched = _cell_batch("rnn_relu_cell", x)
    if unbatched:
        x, h = x[None], h[None]
    _, h_n = rnn_relu(x[None], h, w_ih, w_hh, b_ih, b_hh)
    return h_n[0] if unbatched else h_n
