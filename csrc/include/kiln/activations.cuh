// The activations fused into kiln's kernels, by the integer codes of
// kernels/activations.py. All math is float32 whatever the storage dtype.
#pragma once

#include <cuda_runtime.h>

namespace kiln {

enum ActivationCode : int {
  kIdentity = 0,
  kRelu = 1,
  kGelu = 2,
  kGeluTanh = 3,
  kTanh = 4,
  kSigmoid = 5,
  kSilu = 6,
  kNumActivations = 7,
};

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCubic = 0.044715f;

// Saturates to exactly 0 or 1 for large |z|. __fdividef (2 ulp) instead of an IEEE
// division, whose slow-path call costs the fused GEMM epilogues and prologues registers;
// its result for a denominator of inf is the 0 we want.
__device__ __forceinline__ float sigmoid(float z) {
  return __fdividef(1.f, 1.f + expf(-z));
}

// gelu_tanh's 0.5 (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3), computed as
// sigmoid(2u): the same value without the cancellation of 1 + tanh(u) near -1, and
// cheaper than tanhf.
__device__ __forceinline__ float gelu_tanh_gate(float z) {
  return sigmoid(2.f * kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z));
}

template <int ACT>
__device__ __forceinline__ float activate(float z) {
  static_assert(ACT >= 0 && ACT < kNumActivations, "unknown activation code");
  if constexpr (ACT == kIdentity) {
    return z;
  } else if constexpr (ACT == kRelu) {
    return z < 0.f ? 0.f : z;  // written so that NaN passes through, as in torch.relu
  } else if constexpr (ACT == kGelu) {
    return 0.5f * z * (1.f + erff(z * kInvSqrt2));
  } else if constexpr (ACT == kGeluTanh) {
    return z * gelu_tanh_gate(z);
  } else if constexpr (ACT == kTanh) {
    return tanhf(z);
  } else if constexpr (ACT == kSigmoid) {
    return sigmoid(z);
  } else {
    return z * sigmoid(z);
  }
}

// Whether backward needs a saved tensor at all: the identity's derivative is 1.
template <int ACT>
constexpr bool kActivationReadsSaved = ACT != kIdentity;

// act'(z) from the tensor that forward saved for backward: the output y for relu,
// tanh and sigmoid (whose derivatives are functions of y), the pre-activation z for
// gelu, gelu_tanh and silu. The identity ignores its argument.
template <int ACT>
__device__ __forceinline__ float activation_grad(float saved) {
  static_assert(ACT >= 0 && ACT < kNumActivations, "unknown activation code");
  if constexpr (ACT == kIdentity) {
    return 1.f;
  } else if constexpr (ACT == kRelu) {
    return saved > 0.f ? 1.f : 0.f;
  } else if constexpr (ACT == kGelu) {
    const float z = saved;
    return 0.5f * (1.f + erff(z * kInvSqrt2)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
  } else if constexpr (ACT == kGeluTanh) {
    // d/dz [z h(z)] with h = 0.5 (1 + tanh u): h + z h' and h' = 2 h (1 - h) u'.
    const float z = saved;
    const float h = gelu_tanh_gate(z);
    return h * (1.f + 2.f * kSqrt2OverPi * z * (1.f - h) * (1.f + 3.f * kGeluTanhCubic * z * z));
  } else if constexpr (ACT == kTanh) {
    return 1.f - saved * saved;
  } else if constexpr (ACT == kSigmoid) {
    return saved * (1.f - saved);
  } else {
    const float s = sigmoid(saved);
    return s * (1.f + saved * (1.f - s));
  }
}

}  // namespace kiln
