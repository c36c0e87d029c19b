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
// Dropout when p in (0, 1): out *= keep / (1 - p), element (m, n)'s keep bit from
// Philox(seed, offset + m N + n) and threshold (kiln/philox.cuh); preact then holds
// act(z) before dropout for relu, tanh and sigmoid. p == 0: no dropout.
void linear_act_forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t out,
                        std::uintptr_t preact, std::int64_t M, std::int64_t N, std::int64_t K, int dtype,
                        int activation, double p, std::uint64_t seed, std::uint64_t offset, std::int64_t threshold,
                        std::uintptr_t stream);

// With dz = grad_out * act'(saved): grad_x = dz @ w (M, K), grad_w = dz^T @ x (N, K),
// grad_b = column sums of dz (N). saved (M, N) is the forward output for relu, tanh,
// sigmoid, the pre-activation for gelu, gelu_tanh, silu, and 0 for identity. A zero
// output pointer skips that gradient; the others are overwritten, not accumulated.
// With dropout (p > 0, forward's seed, offset and threshold) dz also carries forward's
// keep / (1 - p), and saved is act(z) before dropout for tanh and sigmoid.
void linear_act_backward(std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t w, std::uintptr_t saved,
                         std::uintptr_t grad_x, std::uintptr_t grad_w, std::uintptr_t grad_b, std::int64_t M,
                         std::int64_t N, std::int64_t K, int dtype, int activation, double p, std::uint64_t seed,
                         std::uint64_t offset, std::int64_t threshold, std::uintptr_t stream);

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

// Layer normalization over the last dimension of x (M, N), float32 math.
// y = (x - mean) * rstd * w + b with mean and the biased variance var of each row, rstd =
// 1 / sqrt(var + eps). x, y (M, N) of dtype, contiguous (y may be x); w, b (N) of dtype
// or 0 (each independently). Outputs, each may be 0 (not saved): mean (M) float64 (double),
// x[row, 0] + the shifted mean, exact (a float32 mean near 1e4 would be off by up to 5e-4),
// and rstd (M) float32. Statistics are taken on x - x[row, 0] (exact for nearby values),
// never as E[x^2] - E[x]^2. M == 0 or N == 0: nothing is done.
void layer_norm_forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t b, std::uintptr_t y, std::uintptr_t mean,
                        std::uintptr_t rstd, std::int64_t M, std::int64_t N, double eps, int dtype,
                        std::uintptr_t stream);

// Float32 elements of the workspace that layer_norm_backward needs for (M, N).
std::int64_t layer_norm_backward_workspace(std::int64_t M, std::int64_t N);

// With xhat = (x - mean) rstd and g = dy * w (dy when w is 0):
// dx = rstd (g - xhat mean_N(g xhat) - mean_N(g)), dw = sum_rows dy xhat, db = sum_rows dy.
// dy, x, dx (M, N) of dtype; w, dw, db (N) of dtype; mean (M) float64 (double) and rstd
// (M) float32 from the forward; the mean is used as float32 hi + lo, x - mean = (x - hi)
// - lo, so the per-element math stays float32. A 0 output skips it; dw needs w.
// workspace: layer_norm_backward_workspace(M, N) float32 elements, required when dw or db
// is wanted (and M, N > 0). dw and db are
// deterministic (fixed-order partial sums, no atomics). M == 0: dw, db are zeroed.
// dx must not overlap dy or x (the dw / db pass reads them after dx is written).
void layer_norm_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w, std::uintptr_t mean,
                         std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
                         std::uintptr_t workspace, std::int64_t M, std::int64_t N, int dtype, std::uintptr_t stream);

// Float32 elements of the workspace that batch_norm_stats needs for x (N, C, L).
std::int64_t batch_norm_stats_workspace(std::int64_t N, std::int64_t C, std::int64_t L);

// Per channel c of x (N, C, L) contiguous of dtype, over its N * L values: mean[c] (C)
// float64 (double; x[0, c, 0] + the shifted mean, exact) and the biased var[c] (C) float32.
// Deterministic (fixed-order Chan merges), never E[x^2] - E[x]^2. workspace:
// batch_norm_stats_workspace(N, C, L) float32 elements. N * L == 0 or C == 0: nothing is
// written.
void batch_norm_stats(std::uintptr_t x, std::uintptr_t mean, std::uintptr_t var, std::uintptr_t workspace,
                      std::int64_t N, std::int64_t C, std::int64_t L, int dtype, std::uintptr_t stream);

// y = (x - mean[c]) * invstd[c] * w[c] + b[c]. x, y (N, C, L) of dtype, contiguous (y may
// be x); mean (C) float64 (double), used as float32 hi + lo, x - mean = (x - hi) - lo (no
// loss at large means); invstd (C) float32; w, b (C) of dtype or 0 (each independently).
void batch_norm_apply(std::uintptr_t x, std::uintptr_t mean, std::uintptr_t invstd, std::uintptr_t w,
                      std::uintptr_t b, std::uintptr_t y, std::int64_t N, std::int64_t C, std::int64_t L, int dtype,
                      std::uintptr_t stream);

// Float32 elements of the workspace that batch_norm_backward needs for (N, C, L).
std::int64_t batch_norm_backward_workspace(std::int64_t N, std::int64_t C, std::int64_t L);

// Per channel, over n = N * L: sum_dy and sum_dy_xhat, xhat = (x - mean) invstd;
// dw = sum_dy_xhat, db = sum_dy (C) of dtype; dx (N, C, L) of dtype:
// training == 1: w invstd (dy - sum_dy / n - xhat sum_dy_xhat / n) (mean, invstd: the
// batch statistics); training == 0: dy w invstd. mean (C) float64 (double), used as
// float32 hi + lo, x - mean = (x - hi) - lo; invstd (C) float32. w (C) of dtype or 0
// (taken as 1); a 0 output skips it; dw needs w. workspace:
// batch_norm_backward_workspace(N, C, L) float32 elements, required when dw, db or the
// training dx is wanted. Deterministic. N * L == 0: dw, db are zeroed.
void batch_norm_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t mean, std::uintptr_t invstd,
                         std::uintptr_t w, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
                         std::uintptr_t workspace, std::int64_t N, std::int64_t C, std::int64_t L, int training,
                         int dtype, std::uintptr_t stream);

}  // namespace kiln
