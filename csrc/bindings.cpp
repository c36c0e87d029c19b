// pybind11 module kiln._cuda: raw device pointers, sizes, dtype and activation codes
// and the CUDA stream all arrive as Python ints, so the module needs no torch headers
// and builds against any torch. std::invalid_argument becomes ValueError and
// std::runtime_error (every CUDA error) becomes RuntimeError.
#include <pybind11/pybind11.h>

#include <string>

#include "kiln/api.h"
#include "kiln/attention.h"
#include "kiln/cross_entropy.h"
#include "kiln/llm_ops.h"
#include "kiln/optim.h"
#include "kiln/dropout.h"
#include "kiln/rnn.h"

#ifndef KILN_CUDA_ARCHS
#error "KILN_CUDA_ARCHS must name the compiled CUDA architectures (set by CMakeLists.txt)"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kiln's hand-written CUDA C++ kernels (raw-pointer API; see kiln.ops for the torch ops)";

  m.def("linear_act_forward", &kiln::linear_act_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("out"),
        py::arg("preact"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"), py::arg("activation"),
        py::arg("p"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "out = act(x @ w^T + b); also preact = x @ w^T + b unless preact is 0.\n"
        "p > 0: dropout, element (m, n) kept by Philox(seed, offset + m N + n) >> 1 >= threshold.\n"
        "x (M, K), w (N, K), b (N) or 0, out and preact (M, N): contiguous, one dtype.\n"
        "dtype: 0 float32, 1 float16, 2 bfloat16; activation: code of kiln.kernels.activations.");

  m.def("linear_act_backward", &kiln::linear_act_backward, py::arg("grad_out"), py::arg("x"), py::arg("w"),
        py::arg("saved"), py::arg("grad_x"), py::arg("grad_w"), py::arg("grad_b"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("dtype"), py::arg("activation"), py::arg("p"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "grad_x = dz @ w, grad_w = dz^T @ x, grad_b = dz.sum(0) with dz = grad_out * act'(saved).\n"
        "p > 0: dz also times forward's dropout mask / (1 - p) (same seed, offset, threshold).\n"
        "saved: forward output (relu, tanh, sigmoid), pre-activation (gelu, gelu_tanh, silu), 0 (identity).\n"
        "A 0 output pointer skips that gradient; the others are overwritten.");

  m.def("device_count", &kiln::device_count, py::call_guard<py::gil_scoped_release>(),
        "Number of CUDA devices; 0 when there is no driver or GPU.");

  m.def("archs", [] { return std::string(KILN_CUDA_ARCHS); }, "The CUDA architectures compiled in, e.g. '80 90'.");

  m.def("softmax_forward", &kiln::softmax_forward, py::arg("x"), py::arg("y"), py::arg("R"), py::arg("C"),
        py::arg("log"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "y = softmax(x) (log=0) or log_softmax(x) (log=1) of each row; x, y (R, C), contiguous, one dtype.\n"
        "y may be x. dtype: 0 float32, 1 float16, 2 bfloat16.");

  m.def("softmax_backward", &kiln::softmax_backward, py::arg("grad_y"), py::arg("y"), py::arg("grad_x"),
        py::arg("R"), py::arg("C"), py::arg("log"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "softmax: grad_x = y * (grad_y - sum(grad_y * y)); log_softmax: grad_x = grad_y - exp(y) * sum(grad_y).\n"
        "y is the forward output; all (R, C), one dtype; grad_x may alias grad_y or y.");

  m.def("cross_entropy_forward", &kiln::cross_entropy_forward, py::arg("logits"), py::arg("target"),
        py::arg("weight"), py::arg("loss"), py::arg("row_max"), py::arg("row_logsum"), py::arg("N"), py::arg("C"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Per-row loss (N,), row_max (N,) and row_logsum (N,) float32 (m = max_c x, l = log sum_c exp(x - m))\n"
        "of logits (N, C) of dtype, target int64 (N,), weight float32 (C,) or 0.\n"
        "Ignored rows: loss 0; a target outside [0, C): loss NaN.");

  m.def("cross_entropy_backward", &kiln::cross_entropy_backward, py::arg("grad_loss"), py::arg("logits"),
        py::arg("target"), py::arg("weight"), py::arg("row_max"), py::arg("row_logsum"), py::arg("grad_logits"), py::arg("N"), py::arg("C"),
        py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "grad_logits (N, C) of dtype (may alias logits) from grad_loss (N,) float32 and the saved row_max\n"
        "and row_logsum (N,) float32 (both required), p = exp((x - m) - l).\n"
        "Ignored rows: 0; a target outside [0, C): NaN.");

  m.def("cross_entropy_soft_forward", &kiln::cross_entropy_soft_forward, py::arg("logits"), py::arg("target"),
        py::arg("weight"), py::arg("loss"), py::arg("row_max"), py::arg("row_logsum"), py::arg("N"), py::arg("C"),
        py::arg("label_smoothing"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Per-row loss, row_max, row_logsum (N,) float32 of logits (N, C) against class probabilities\n"
        "target (N, C) of the same dtype, weight float32 (C,) or 0; smoothing mixed as torch does.");

  m.def("cross_entropy_soft_backward", &kiln::cross_entropy_soft_backward, py::arg("grad_loss"), py::arg("logits"),
        py::arg("target"), py::arg("weight"), py::arg("row_max"), py::arg("row_logsum"), py::arg("grad_logits"),
        py::arg("N"), py::arg("C"), py::arg("label_smoothing"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "grad_logits (N, C) of dtype (may alias logits) = g (U p - u) for class-probability targets,\n"
        "from grad_loss (N,) float32 and the saved row_max, row_logsum (N,) float32.");

  m.def("layer_norm_forward", &kiln::layer_norm_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"),
        py::arg("mean"), py::arg("rstd"), py::arg("M"), py::arg("N"), py::arg("eps"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "y = (x - mean) * rstd * w + b per row, rstd = 1 / sqrt(biased var + eps), float32 math.\n"
        "Reads x (M, N), w (N,) or 0, b (N,) or 0, all of dtype; writes y (M, N) of dtype (may be x)\n"
        "and mean (M,) float64 (exact), rstd (M,) float32 (each may be 0: not saved).\n"
        "dtype: 0 float32, 1 float16, 2 bfloat16.");

  m.def("layer_norm_backward_workspace", &kiln::layer_norm_backward_workspace, py::arg("M"), py::arg("N"),
        "Number of float32 elements of the workspace layer_norm_backward needs for (M, N).");

  m.def("layer_norm_backward", &kiln::layer_norm_backward, py::arg("dy"), py::arg("x"), py::arg("w"),
        py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("workspace"),
        py::arg("M"), py::arg("N"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "xhat = (x - mean) * rstd, g = dy * w (dy when w is 0): dx = rstd * (g - xhat * mean(g * xhat) - mean(g)),\n"
        "dw = sum over rows of dy * xhat, db = sum over rows of dy. Reads dy, x (M, N) and w (N,) or 0 of dtype,\n"
        "mean (M,) float64 (used as float32 hi + lo: (x - hi) - lo), rstd (M,) float32; writes dx (M, N),\n"
        "dw, db (N,) of dtype, each 0 to skip (dw needs w).\n"
        "workspace: layer_norm_backward_workspace(M, N) float32 elements, needed for dw or db. Deterministic.\n"
        "dx must not overlap dy or x.");

  m.def("batch_norm_stats_workspace", &kiln::batch_norm_stats_workspace, py::arg("N"), py::arg("C"), py::arg("L"),
        "Number of float32 elements of the workspace batch_norm_stats needs for x (N, C, L).");

  m.def("batch_norm_stats", &kiln::batch_norm_stats, py::arg("x"), py::arg("mean"), py::arg("var"),
        py::arg("workspace"), py::arg("N"), py::arg("C"), py::arg("L"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Per channel over N * L values: mean (C,) float64 (exact) and biased var (C,) float32, from x (N, C, L)\n"
        "of dtype, contiguous.\n"
        "workspace: batch_norm_stats_workspace(N, C, L) float32 elements. Deterministic; no E[x^2] - E[x]^2.");

  m.def("batch_norm_apply", &kiln::batch_norm_apply, py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("w"),
        py::arg("b"), py::arg("y"), py::arg("N"), py::arg("C"), py::arg("L"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "y = (x - mean[c]) * invstd[c] * w[c] + b[c]. Reads x (N, C, L) of dtype, mean (C,) float64 (used as\n"
        "float32 hi + lo: (x - hi) - lo), invstd (C,) float32, w, b (C,) of dtype or 0; writes y (N, C, L) of\n"
        "dtype (may be x).");

  m.def("batch_norm_backward_workspace", &kiln::batch_norm_backward_workspace, py::arg("N"), py::arg("C"),
        py::arg("L"), "Number of float32 elements of the workspace batch_norm_backward needs for (N, C, L).");

  m.def("batch_norm_backward", &kiln::batch_norm_backward, py::arg("dy"), py::arg("x"), py::arg("mean"),
        py::arg("invstd"), py::arg("w"), py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("workspace"),
        py::arg("N"), py::arg("C"), py::arg("L"), py::arg("training"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Per channel over n = N * L: sum_dy, sum_dy_xhat (xhat = (x - mean) * invstd); dw = sum_dy_xhat, db = sum_dy\n"
        "(C,) of dtype; dx (N, C, L) of dtype: training=1: w * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n),\n"
        "training=0: dy * w * invstd. Reads dy, x (N, C, L) and w (C,) or 0 (taken as 1) of dtype, mean (C,)\n"
        "float64 (used as float32 hi + lo: (x - hi) - lo), invstd (C,) float32. dx, dw, db: 0 to skip (dw needs w).\n"
        "workspace: batch_norm_backward_workspace(N, C, L) float32 elements, needed for dw, db or the training dx.\n"
        "Deterministic.");

  m.def("attention_forward", &kiln::attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("key_padding_mask"), py::arg("o"), py::arg("lse"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("Tq"), py::arg("Tk"), py::arg("D"), py::arg("causal"), py::arg("scale"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "o = softmax(q k^T * scale + masks) v and lse = logsumexp of the scaled visible scores (natural log).\n"
        "q, o (B, Hq, Tq, D); k, v (B, Hkv, Tk, D), contiguous, one dtype (0 float32, 1 float16, 2 bfloat16);\n"
        "Hkv divides Hq (query head h reads kv head h // (Hq // Hkv)); D in 16, 32, 64, 80, 96, 128.\n"
        "key_padding_mask (B, Tk) bool (True = hidden) or 0; causal=1 aligns bottom-right (query i sees keys\n"
        "j <= i + Tk - Tq). lse (B, Hq, Tq) float32. A row that sees no key: o = 0, lse = +inf.");

  m.def("attention_backward_workspace", &kiln::attention_backward_workspace, py::arg("B"), py::arg("Hq"),
        py::arg("Hkv"), py::arg("Tq"), py::arg("Tk"), py::arg("D"),
        "Number of float32 elements of the workspace attention_backward needs (delta = rowsum(do * o): B * Hq * Tq).");

  m.def("attention_backward", &kiln::attention_backward, py::arg("grad_out"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("key_padding_mask"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("workspace"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Tq"),
        py::arg("Tk"), py::arg("D"), py::arg("causal"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "dq, dk, dv of attention_forward from its saved o and lse (float32), recomputing p = exp(scale q k^T - lse):\n"
        "dv = p^T do, ds = p * (do v^T - rowsum(do * o)), dq = scale ds k, dk = scale ds^T q; dk, dv sum over the\n"
        "Hq // Hkv query heads of each kv head. Shapes, dtype and masks as attention_forward; grad_out like q;\n"
        "dq like q, dk and dv like k, overwritten. workspace: attention_backward_workspace(...) float32 elements.\n"
        "Deterministic (no atomics).");

  // LSTM / GRU (csrc/rnn.cu): the state (h, c, gx, outputs) is float32, w_hh and b_hh have `dtype`.
  m.def("lstm_step_forward", &kiln::lstm_step_forward, py::arg("gx"), py::arg("h"), py::arg("c"), py::arg("w_hh"),
        py::arg("h_next"), py::arg("c_next"), py::arg("gates"), py::arg("B"), py::arg("H"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "One LSTM step: pre = gx + h @ w_hh^T, [i|f|g|o] = sigmoid, sigmoid, tanh, sigmoid of pre,\n"
        "c_next = f c + i g, h_next = o tanh(c_next). gx (B, 4H), h, c (B, H) float32; w_hh (4H, H) of dtype\n"
        "(0 float32, 1 float16, 2 bfloat16); writes h_next, c_next (B, H) and gates (B, 4H) float32.");

  m.def("lstm_step_backward", &kiln::lstm_step_backward, py::arg("dh_next"), py::arg("dc_next"), py::arg("gates"),
        py::arg("c"), py::arg("c_next"), py::arg("w_hh"), py::arg("dpre"), py::arg("dh"), py::arg("dc"),
        py::arg("B"), py::arg("H"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Gradients of one LSTM step: dc_tot = dc_next + dh_next o (1 - tanh(c_next)^2);\n"
        "dpre (B, 4H) the pre-activation gradients [di|df|dg|do], dh = dpre @ w_hh (B, H), dc = dc_tot f (B, H).\n"
        "All float32 but w_hh (4H, H) of dtype; outputs must not overlap inputs.");

  m.def("gru_step_forward", &kiln::gru_step_forward, py::arg("gx"), py::arg("h"), py::arg("w_hh"), py::arg("b_hh"),
        py::arg("h_next"), py::arg("saved"), py::arg("B"), py::arg("H"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "One GRU step: gh = h @ w_hh^T + b_hh, r = sigmoid(gx_r + gh_r), z = sigmoid(gx_z + gh_z),\n"
        "n = tanh(gx_n + r gh_n), h_next = (1 - z) n + z h. gx (B, 3H), h (B, H) float32; w_hh (3H, H) and\n"
        "b_hh (3H,) or 0 of dtype; writes h_next (B, H) and saved (B, 4H) = [r|z|n|gh_n] float32.");

  m.def("gru_step_backward", &kiln::gru_step_backward, py::arg("dh_next"), py::arg("saved"), py::arg("h"),
        py::arg("w_hh"), py::arg("dgx"), py::arg("dgh"), py::arg("dh"), py::arg("B"), py::arg("H"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Gradients of one GRU step from saved = [r|z|n|gh_n]: dgx (B, 3H) = [dr|dz|dn], dgh (B, 3H) = [dr|dz|dn r],\n"
        "dh = dh_next z + dgh @ w_hh (B, H). All float32 but w_hh (3H, H) of dtype; outputs must not overlap inputs.");

  m.def("rnn_step_forward", &kiln::rnn_step_forward, py::arg("gx"), py::arg("h"), py::arg("w_hh"), py::arg("h_next"),
        py::arg("B"), py::arg("H"), py::arg("relu"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "One Elman RNN step: h_next (B, H) = act(gx + h @ w_hh^T), act relu if relu else tanh.\n"
        "gx, h, h_next float32 (B, H); w_hh (H, H) of dtype.");

  m.def("rnn_step_backward", &kiln::rnn_step_backward, py::arg("dh_next"), py::arg("h_next"), py::arg("w_hh"),
        py::arg("dpre"), py::arg("dh"), py::arg("B"), py::arg("H"), py::arg("relu"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Gradients of one Elman step: dpre = dh_next act' (from h_next), dh = dpre @ w_hh, both (B, H) float32;\n"
        "w_hh (H, H) of dtype; outputs must not overlap inputs.");

  m.def("rnn_sequence_fits", &kiln::rnn_sequence_fits, py::arg("gates"), py::arg("B"), py::arg("H"), py::arg("dtype"),
        py::call_guard<py::gil_scoped_release>(),
        "Whether the persistent whole-sequence forward and backward run on the current device for gates\n"
        "(4 LSTM, 3 GRU), batch B, hidden H and w_hh's dtype: each block's slice of w_hh (its gate rows, or\n"
        "its columns of every gate row) must fit in its shared memory and all blocks (one per group of\n"
        "ceil(H / SMs) hidden units) must be co-resident.");

  m.def("lstm_sequence_forward", &kiln::lstm_sequence_forward, py::arg("gx"), py::arg("h0"), py::arg("c0"),
        py::arg("w_hh"), py::arg("h_all"), py::arg("c_all"), py::arg("gates"), py::arg("T"), py::arg("B"),
        py::arg("H"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "All T LSTM steps in one persistent cooperative launch (w_hh kept in shared memory, a grid barrier per\n"
        "step). gx (T, B, 4H), h0, c0 (B, H) float32, w_hh (4H, H) of dtype -> h_all, c_all (T, B, H),\n"
        "gates (T, B, 4H) float32. Returns False, doing nothing, when rnn_sequence_fits(4, B, H, dtype) is false.");

  m.def("gru_sequence_forward", &kiln::gru_sequence_forward, py::arg("gx"), py::arg("h0"), py::arg("w_hh"),
        py::arg("b_hh"), py::arg("h_all"), py::arg("saved"), py::arg("T"), py::arg("B"), py::arg("H"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "All T GRU steps in one persistent cooperative launch. gx (T, B, 3H), h0 (B, H) float32, w_hh (3H, H)\n"
        "and b_hh (3H,) or 0 of dtype -> h_all (T, B, H), saved (T, B, 4H) float32. Returns False, doing\n"
        "nothing, when rnn_sequence_fits(3, B, H, dtype) is false.");

  m.def("lstm_sequence_backward", &kiln::lstm_sequence_backward, py::arg("dh_all"), py::arg("dc_all"),
        py::arg("gates"), py::arg("c0"), py::arg("c_all"), py::arg("w_hh"), py::arg("dpre_all"), py::arg("dh0"),
        py::arg("dc0"), py::arg("T"), py::arg("B"), py::arg("H"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "All T LSTM backward steps (T-1 down to 0) in one persistent cooperative launch (each block keeps its\n"
        "columns of w_hh in shared memory, a grid barrier per step). dh_all, dc_all (T, B, H), gates (T, B, 4H),\n"
        "c0 (B, H), c_all (T, B, H) float32, w_hh (4H, H) of dtype -> dpre_all (T, B, 4H), dh0, dc0 (B, H)\n"
        "float32, as the step loop over lstm_step_backward. Returns False, doing nothing, when\n"
        "rnn_sequence_fits(4, B, H, dtype) is false; T == 0: nothing written, returns True.");

  m.def("gru_sequence_backward", &kiln::gru_sequence_backward, py::arg("dh_all"), py::arg("saved"), py::arg("h0"),
        py::arg("h_all"), py::arg("w_hh"), py::arg("dgx_all"), py::arg("dgh_all"), py::arg("dh0"), py::arg("T"),
        py::arg("B"), py::arg("H"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "All T GRU backward steps in one persistent cooperative launch. dh_all (T, B, H), saved (T, B, 4H),\n"
        "h0 (B, H), h_all (T, B, H) float32, w_hh (3H, H) of dtype -> dgx_all, dgh_all (T, B, 3H), dh0 (B, H)\n"
        "float32, as the step loop over gru_step_backward. Returns False, doing nothing, when\n"
        "rnn_sequence_fits(3, B, H, dtype) is false; T == 0: nothing written, returns True.");

  m.def("rms_norm_forward", &kiln::rms_norm_forward, py::arg("x"), py::arg("w"), py::arg("y"), py::arg("rstd"),
        py::arg("M"), py::arg("N"), py::arg("eps"), py::arg("offset"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "y = x * rstd * (offset + w), rstd = 1 / sqrt(mean(x^2) + eps) per row of x (M, N); w (N) or 0.\n"
        "rstd (M) float32 or 0. x, y, w of dtype (0 float32, 1 float16, 2 bfloat16), contiguous.");

  m.def("rms_norm_backward_workspace", &kiln::rms_norm_backward_workspace, py::arg("M"), py::arg("N"),
        "Float32 elements of the workspace rms_norm_backward needs for dw at (M, N).");

  m.def("rms_norm_backward", &kiln::rms_norm_backward, py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("rstd"),
        py::arg("dx"), py::arg("dw"), py::arg("workspace"), py::arg("M"), py::arg("N"), py::arg("offset"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "dx = rstd (g - xhat mean(g xhat)), g = dy (offset + w), xhat = x rstd; dw = sum_rows dy xhat\n"
        "(deterministic; needs w and the workspace). A 0 output pointer skips that gradient.");

  m.def("gated_forward", &kiln::gated_forward, py::arg("gate"), py::arg("up"), py::arg("y"), py::arg("n"),
        py::arg("activation"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "y = act(gate) * up over n contiguous values; activation: silu (6), gelu (2) or gelu_tanh (3).");

  m.def("gated_backward", &kiln::gated_backward, py::arg("dy"), py::arg("gate"), py::arg("up"), py::arg("dgate"),
        py::arg("dup"), py::arg("n"), py::arg("activation"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "dgate = dy * up * act'(gate), dup = dy * act(gate), act recomputed from gate; a 0 output skips it.");

  m.def("rotary_apply", &kiln::rotary_apply, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("y"),
        py::arg("B"), py::arg("S1"), py::arg("S2"), py::arg("D"), py::arg("CB"), py::arg("seq_dim"),
        py::arg("interleaved"), py::arg("inverse"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Rotary embedding of x (B, S1, S2, D) into y (may be x) with cos, sin (CB, T, D), CB 1 or B; the\n"
        "position is s2 (seq_dim 2) or s1 (seq_dim 1). Pairs (i, i + D/2), or (2i, 2i + 1) when interleaved:\n"
        "y_a = x_a c_a - x_b s_a, y_b = x_b c_b + x_a s_b; inverse applies the transpose (backward).");
  // Fused optimizer steps (csrc/optim.cu): a multi-tensor table in device memory, one launch.
  m.def("optim_sgd", &kiln::optim_sgd, py::arg("table"), py::arg("lists"), py::arg("tensors"), py::arg("chunks"),
        py::arg("chunk"), py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"),
        py::arg("nesterov"), py::arg("maximize"), py::arg("first_step"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "torch.optim.SGD's step over every tensor of the table (lists param, grad[, momentum_buffer]), in place.\n"
        "dtype: 0 float32, 1 float16, 2 bfloat16, 3 float64.");

  m.def("optim_adam", &kiln::optim_adam, py::arg("table"), py::arg("lists"), py::arg("tensors"), py::arg("chunks"),
        py::arg("chunk"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled_weight_decay"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "torch.optim.Adam's (AdamW's) step over the table (param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]),\n"
        "per-tensor scalar rows step_size and bc2_sqrt, in place.");

  m.def("optim_rmsprop", &kiln::optim_rmsprop, py::arg("table"), py::arg("lists"), py::arg("tensors"),
        py::arg("chunks"), py::arg("chunk"), py::arg("lr"), py::arg("alpha"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("momentum"), py::arg("centered"), py::arg("maximize"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "torch.optim.RMSprop's step over the table (param, grad, square_avg[, momentum_buffer][, grad_avg]).");

  m.def("optim_sum_squares", &kiln::optim_sum_squares, py::arg("table"), py::arg("lists"), py::arg("tensors"),
        py::arg("chunks"), py::arg("chunk"), py::arg("list"), py::arg("partial"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "partial[c] (float64) = sum of squares of chunk c of the table's list `list`.");

  m.def("optim_scaled_descent", &kiln::optim_scaled_descent, py::arg("table"), py::arg("lists"), py::arg("tensors"),
        py::arg("chunks"), py::arg("chunk"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "param -= scale * direction over the table (lists param, direction; scalar row 0: scale per tensor).");
  m.def("dropout_apply", &kiln::dropout_apply, py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("seed"),
        py::arg("offset"), py::arg("threshold"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "dst = src * keep * scale for n contiguous elements; element i kept when Philox(seed, offset + i) >> 1\n"
        ">= threshold (kiln.ops.random's rule). dtype: 0 float32, 1 float16, 2 bfloat16. Dropout's forward\n"
        "and, on the gradient, its backward.");
}
