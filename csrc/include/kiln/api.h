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

}  // namespace kiln
