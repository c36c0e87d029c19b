// Cross-entropy with class-probability (soft) targets: the raw-pointer API beside api.h's
// class-index forms. Plain C++ (no CUDA or torch headers). Errors as in api.h.
#pragma once

#include <cstdint>

namespace kiln {

// Per-row cross-entropy against class probabilities. logits and target (N, C) of dtype,
// row-major and contiguous; weight float32 (C) or 0 for none. With eps = label_smoothing
// and u_c = w[c] ((1 - eps) q[i, c] + eps / C) (torch's mixing), writes (N each, float32):
// row_max m_i, row_logsum l_i = log sum_c exp(x[i, c] - m_i) and
// loss_i = sum_c u_c ((m_i - x[i, c]) + l_i), never forming m_i + l_i.
void cross_entropy_soft_forward(std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight,
                                std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t row_logsum, std::int64_t N,
                                std::int64_t C, double label_smoothing, int dtype, std::uintptr_t stream);

// grad_logits (N, C) of dtype, overwritten (may alias logits, not target):
// g_i (U_i p_ic - u_c), U_i = sum_c u_c, p_ic = exp((x_ic - m_i) - l_i) from the forward's
// float32 row_max and row_logsum; grad_loss float32 (N).
void cross_entropy_soft_backward(std::uintptr_t grad_loss, std::uintptr_t logits, std::uintptr_t target,
                                 std::uintptr_t weight, std::uintptr_t row_max, std::uintptr_t row_logsum,
                                 std::uintptr_t grad_logits, std::int64_t N, std::int64_t C, double label_smoothing,
                                 int dtype, std::uintptr_t stream);

}  // namespace kiln
