// pybind11 module kiln._cuda: raw device pointers, sizes, dtype and activation codes
// and the CUDA stream all arrive as Python ints, so the module needs no torch headers
// and builds against any torch. std::invalid_argument becomes ValueError and
// std::runtime_error (every CUDA error) becomes RuntimeError.
#include <pybind11/pybind11.h>

#include <string>

#include "kiln/api.h"

#ifndef KILN_CUDA_ARCHS
#error "KILN_CUDA_ARCHS must name the compiled CUDA architectures (set by CMakeLists.txt)"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kiln's hand-written CUDA C++ kernels (raw-pointer API; see kiln.ops for the torch ops)";

  m.def("linear_act_forward", &kiln::linear_act_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("out"),
        py::arg("preact"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"), py::arg("activation"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "out = act(x @ w^T + b); also preact = x @ w^T + b unless preact is 0.\n"
        "x (M, K), w (N, K), b (N) or 0, out and preact (M, N): contiguous, one dtype.\n"
        "dtype: 0 float32, 1 float16, 2 bfloat16; activation: code of kiln.kernels.activations.");

  m.def("linear_act_backward", &kiln::linear_act_backward, py::arg("grad_out"), py::arg("x"), py::arg("w"),
        py::arg("saved"), py::arg("grad_x"), py::arg("grad_w"), py::arg("grad_b"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("dtype"), py::arg("activation"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "grad_x = dz @ w, grad_w = dz^T @ x, grad_b = dz.sum(0) with dz = grad_out * act'(saved).\n"
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
}
