// The raw-pointer C++ API of the LLM ops (rms_norm.cu, gated.cu, rotary.cu) that
// bindings.cpp exposes to Python: plain C++, device pointers and the stream as integers.
// Errors: bad arguments throw std::invalid_argument (ValueError), CUDA failures
// std::runtime_error (RuntimeError). All math is float32 whatever the storage dtype.
#pragma once

#include <cstdint>

namespace kiln {

// RMS normalization over the last dimension of x (M, N): y = x * rstd * (offset + w),
// rstd = 1 / sqrt(mean(x^2) + eps). x, y (M, N) of dtype, contiguous (y may be x); w (N)
// of dtype or 0 (no scale: y = x * rstd). rstd (M) float32, or 0 (not saved).
// M == 0 or N == 0: nothing is done.
void rms_norm_forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t y, std::uintptr_t rstd, std::int64_t M,
                      std::int64_t N, double eps, double offset, int dtype, std::uintptr_t stream);

// Float32 elements of the workspace that rms_norm_backward needs for dw at (M, N).
std::int64_t rms_norm_backward_workspace(std::int64_t M, std::int64_t N);

// With xhat = x rstd and g = dy (offset + w) (dy when w is 0): dx = rstd (g - xhat
// mean_N(g xhat)), dw = sum_rows dy xhat. dy, x, dx (M, N) of dtype; w, dw (N) of dtype;
// rstd (M) float32 from the forward. A 0 output skips it; dw needs w and the workspace
// (rms_norm_backward_workspace(M, N) float32 elements). dw is deterministic (fixed-order
// partial sums, no atomics); M == 0: dw is zeroed.
void rms_norm_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w, std::uintptr_t rstd, std::uintptr_t dx,
                       std::uintptr_t dw, std::uintptr_t workspace, std::int64_t M, std::int64_t N, double offset,
                       int dtype, std::uintptr_t stream);

// y = act(gate) * up elementwise over n values; activation: kiln.kernels.activations'
// code of silu (6), gelu (2) or gelu_tanh (3). gate, up, y of dtype, contiguous.
void gated_forward(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t y, std::int64_t n, int activation,
                   int dtype, std::uintptr_t stream);

// dgate = dy * up * act'(gate), dup = dy * act(gate) (act recomputed from gate); a 0
// output skips it. All n values of dtype, contiguous.
void gated_backward(std::uintptr_t dy, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t dgate,
                    std::uintptr_t dup, std::int64_t n, int activation, int dtype, std::uintptr_t stream);

// Rotary embedding of x (B, S1, S2, D), contiguous, into y (same shape; y may be x):
// each pair (a, b) of columns, (i, i + D/2) for rotate-half (interleaved == 0) or
// (2i, 2i + 1) (interleaved == 1), with c, s the cos / sin rows of the row's position:
//   forward (inverse == 0): y_a = x_a c_a - x_b s_a,   y_b = x_b c_b + x_a s_b;
//   inverse == 1 (the transpose, backward): y_a = x_a c_a + x_b s_b, y_b = x_b c_b - x_a s_a.
// cos, sin (CB, T, D) of dtype, contiguous, CB == 1 or B; the position is s2 when
// seq_dim == 2 (x is (B, H, T, D)), s1 when seq_dim == 1 (x is (B, T, H, D)). D even.
void rotary_apply(std::uintptr_t x, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t y, std::int64_t B,
                  std::int64_t S1, std::int64_t S2, std::int64_t D, std::int64_t CB, int seq_dim, int interleaved,
                  int inverse, int dtype, std::uintptr_t stream);

}  // namespace kiln
