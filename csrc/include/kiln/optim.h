// The raw-pointer C++ API of the fused optimizer steps (csrc/optim.cu), in the style of
// kiln/api.h: plain C++, device pointers and the stream as integers; bad arguments throw
// std::invalid_argument, CUDA failures std::runtime_error.
//
// Every function takes a multi-tensor table in device memory (kernels/multi_tensor.py):
// one int64 array holding, in order, addresses (lists x tensors), sizes (tensors), the
// chunk -> tensor map (chunks), the chunk -> first element map (chunks), then float64
// per-tensor scalars (bit-cast). One CUDA block updates one chunk of `chunk` elements of
// one tensor: a whole group of parameters in one launch. dtype: 0 float32, 1 float16,
// 2 bfloat16, 3 float64 (the storage of every tensor of the call); the math is float32,
// float64 for float64. Tensors are updated in place.
#pragma once

#include <cstdint>

namespace kiln {

// SGD (torch.optim.SGD): lists param, grad[, momentum_buffer when momentum != 0].
// d = (maximize ? -g : g) + weight_decay p; with momentum, b = first_step ? d :
// momentum b + (1 - dampening) d, d = nesterov ? d + momentum b : b; p -= lr d.
void optim_sgd(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
               std::int64_t chunk, double lr, double weight_decay, double momentum, double dampening, bool nesterov,
               bool maximize, bool first_step, int dtype, std::uintptr_t stream);

// Adam / AdamW (torch.optim.Adam): lists param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq];
// two scalar rows per tensor: step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step).
void optim_adam(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
                std::int64_t chunk, double lr, double beta1, double beta2, double eps, double weight_decay,
                bool amsgrad, bool maximize, bool decoupled_weight_decay, int dtype, std::uintptr_t stream);

// RMSprop (torch.optim.RMSprop): lists param, grad, square_avg[, momentum_buffer when
// momentum > 0][, grad_avg when centered].
void optim_rmsprop(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
                   std::int64_t chunk, double lr, double alpha, double eps, double weight_decay, double momentum,
                   bool centered, bool maximize, int dtype, std::uintptr_t stream);

// partial[c] (float64, one per chunk) = sum of squares of chunk c of list `list`; the chunks
// of a tensor are consecutive, so a segmented sum gives each tensor's.
void optim_sum_squares(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
                       std::int64_t chunk, std::int64_t list, std::uintptr_t partial, int dtype,
                       std::uintptr_t stream);

// param -= scale * direction: lists param, direction; one scalar row (scale per tensor).
void optim_scaled_descent(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
                          std::int64_t chunk, int dtype, std::uintptr_t stream);

}  // namespace kiln
