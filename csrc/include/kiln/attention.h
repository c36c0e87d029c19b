// The raw-pointer C++ API of the flash-attention kernels (csrc/attention.cu), in the
// style of kiln/api.h: plain C++, device pointers and the stream as integers; bad
// arguments throw std::invalid_argument, CUDA failures std::runtime_error.
#pragma once

#include <cstdint>

namespace kiln {

// o = softmax(q k^T * scale + masks) v and lse, per (batch, query head, query row).
// q, o (B, Hq, Tq, D); k, v (B, Hkv, Tk, D): contiguous, one dtype (0 float32, 1 float16,
// 2 bfloat16); Hkv divides Hq and query head h reads kv head h / (Hq / Hkv). D is one of
// 16, 32, 64, 80, 96, 128. key_padding_mask: (B, Tk) of 1-byte bool (true = key hidden)
// or 0. causal (0 / 1) aligns bottom-right: query i sees key j iff j <= i + (Tk - Tq).
// lse (B, Hq, Tq) float32: natural-log log-sum-exp of the scaled visible scores. A row
// that sees no key gets o = 0 exactly and lse = +inf. float32 math (tensor cores with
// float32 accumulation for float16 / bfloat16). Sizes of 0 are no-ops (B * Hq * Tq == 0);
// Tk == 0 gives o = 0, lse = +inf.
void attention_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t key_padding_mask,
                       std::uintptr_t o, std::uintptr_t lse, std::int64_t B, std::int64_t Hq, std::int64_t Hkv,
                       std::int64_t Tq, std::int64_t Tk, std::int64_t D, int causal, double scale, int dtype,
                       std::uintptr_t stream);

// Float32 elements of the workspace that attention_backward needs: delta = rowsum(do * o),
// B * Hq * Tq.
std::int64_t attention_backward_workspace(std::int64_t B, std::int64_t Hq, std::int64_t Hkv, std::int64_t Tq,
                                          std::int64_t Tk, std::int64_t D);

// Gradients of attention_forward from its saved o and lse (float32): with
// p = exp(scale q k^T - lse) (0 for hidden keys and rows with lse = +inf) and
// delta_i = sum_d do_id o_id: dv = p^T do, ds = p (do v^T - delta), dq = scale ds k,
// dk = scale ds^T q; dk and dv of a kv head sum over the Hq / Hkv query heads that read
// it. Shapes, dtype and masks as attention_forward; do like q; dq like q, dk and dv like
// k, all overwritten. workspace: attention_backward_workspace(...) float32 elements.
// Deterministic (no atomics). Keys hidden by key_padding_mask get dk = dv = 0.
void attention_backward(std::uintptr_t grad_out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                        std::uintptr_t o, std::uintptr_t lse, std::uintptr_t key_padding_mask, std::uintptr_t dq,
                        std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t workspace, std::int64_t B,
                        std::int64_t Hq, std::int64_t Hkv, std::int64_t Tq, std::int64_t Tk, std::int64_t D,
                        int causal, double scale, int dtype, std::uintptr_t stream);

}  // namespace kiln
