// The raw-pointer C++ API that bindings.cpp exposes to Python. Plain C++ (no CUDA
// or torch headers): device pointers and the stream travel as integers.
//
// Errors: bad arguments throw std::invalid_argument (Python ValueError); CUDA
// failures, including "no GPU / no driver", throw std::runtime_error (RuntimeError).
#pragma once

#include <cstdint>

namespace kiln {

// Number of CUDA devices; 0 when there is no driver or no GPU.
int device_count();

// out = act(x @ w^T + bias), and preact = x @ w^T + bias when preact != 0.
// x (M, K), w (N, K), bias (N) or 0, out and preact (M, N); row-major, contiguous,
// one dtype for all. Any alignment: misaligned rows take an element-wise path.
void linear_act_forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t out,
                        std::uintptr_t preact, std::int64_t M, std::int64_t N, std::int64_t K, int dtype,
                        int activation, std::uintptr_t stream);

// With dz = grad_out * act'(saved): grad_x = dz @ w (M, K), grad_w = dz^T @ x (N, K),
// grad_b = column sums of dz (N). saved (M, N) is the forward output for relu, tanh,
// sigmoid, the pre-activation for gelu, gelu_tanh, silu, and 0 for identity. A zero
// output pointer skips that gradient; the others are overwritten, not accumulated.
void linear_act_backward(std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t w, std::uintptr_t saved,
                         std::uintptr_t grad_x, std::uintptr_t grad_w, std::uintptr_t grad_b, std::int64_t M,
                         std::int64_t N, std::int64_t K, int dtype, int activation, std::uintptr_t stream);

// y = softmax(x) row-wise, or log_softmax(x) when log == 1. x and y (R, C), row-major,
// contiguous, one dtype; y may be x (in place). Float32 math.
void softmax_forward(std::uintptr_t x, std::uintptr_t y, std::int64_t R, std::int64_t C, int log, int dtype,
                     std::uintptr_t stream);

// grad_x from the forward output y: softmax dx = y * (g - sum_c g y); log_softmax
// dx = g - exp(y) * sum_c g. All (R, C), one dtype; grad_x may alias grad_y or y.
void softmax_backward(std::uintptr_t grad_y, std::uintptr_t y, std::uintptr_t grad_x, std::int64_t R,
                      std::int64_t C, int log, int dtype, std::uintptr_t stream);

// Per-row cross-entropy. logits (N, C) of dtype, target int64 (N), weight float32 (C)
// or 0 for none; writes loss, row_max and row_logsum (N each, float32):
// m_i = max_c x[i, c], l_i = log sum_c exp(x[i, c] - m_i) (also for ignored rows).
// loss_i = (1 - eps) w[t_i] ((m_i - x[i, t_i]) + l_i) + (eps / C) (sum_c w[c] (m_i - x[i, c]) + S_w l_i),
// never forming m_i + l_i; 0 where t_i == ignore_index; NaN where t_i is outside [0, C)
// and not ignore_index.
void cross_entropy_forward(std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight, std::uintptr_t loss,
                           std::uintptr_t row_max, std::uintptr_t row_logsum, std::int64_t N, std::int64_t C,
                           std::int64_t ignore_index, double label_smoothing, int dtype, std::uintptr_t stream);

// grad_logits (N, C) of dtype, overwritten (may alias logits):
// g_i ((1 - eps) w[t_i] (p_ic - [c == t_i]) + (eps / C) (S_w p_ic - w[c])),
// p_ic = exp((x_ic - m_i) - l_i), S_w = sum_c w[c]; grad_loss float32 (N). row_max and
// row_logsum: the forward's float32 (N) statistics, both required when N > 0. Rows with
// t_i == ignore_index get 0, rows with an out-of-range target NaN.
void cross_entropy_backward(std::uintptr_t grad_loss, std::uintptr_t logits, std::uintptr_t target,
                            std::uintptr_t weight, std::uintptr_t row_max, std::uintptr_t row_logsum,
                            std::uintptr_t grad_logits, std::int64_t N, std::int64_t C, std::int64_t ignore_index,
                            double label_smoothing, int dtype, std::uintptr_t stream);

}  // namespace kiln
