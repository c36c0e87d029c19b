// Philox 4x32-10 and the dropout rule of kiln.ops.random, for CUDA kernels.
//
// The word of element i is the first output of Philox 4x32-10 with counter
// (lo32(offset + i), hi32(offset + i), 0, 0) and key (lo32(seed), hi32(seed)): bit for
// bit Triton's tl.randint(seed, offset + i), the numba form (kernels/cpu/philox.py) and
// the PyTorch reference (python/kiln/ops/random.py). Element i is kept when
// (word >> 1) >= threshold, threshold = round(p * 2^31): integer math only, so every
// form keeps the same elements. Kept elements are multiplied by scale = 1 / (1 - p),
// dropped ones by 0 (as torch's x * noise: a dropped NaN stays NaN).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kiln {

// High 32 bits of a 32 x 32 bit product; the host form lets a CPU test check the words.
__host__ __device__ __forceinline__ std::uint32_t mul_hi32(std::uint32_t a, std::uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ std::uint32_t philox_word(std::uint64_t seed, std::uint64_t counter) {
  constexpr std::uint32_t kRoundA = 0xD2511F53u;
  constexpr std::uint32_t kRoundB = 0xCD9E8D57u;
  constexpr std::uint32_t kKeyA = 0x9E3779B9u;
  constexpr std::uint32_t kKeyB = 0xBB67AE85u;
  std::uint32_t c0 = static_cast<std::uint32_t>(counter);
  std::uint32_t c1 = static_cast<std::uint32_t>(counter >> 32);
  std::uint32_t c2 = 0u;
  std::uint32_t c3 = 0u;
  std::uint32_t k0 = static_cast<std::uint32_t>(seed);
  std::uint32_t k1 = static_cast<std::uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const std::uint32_t hi_b = mul_hi32(kRoundB, c2);
    const std::uint32_t hi_a = mul_hi32(kRoundA, c0);
    const std::uint32_t lo_b = kRoundB * c2;
    const std::uint32_t lo_a = kRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// A dropout call's parameters as kernels take them; enabled == false is no dropout.
struct Dropout {
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  std::uint32_t threshold = 0;
  float scale = 1.f;
  bool enabled = false;

  // The factor element `index` (row-major within the call) is multiplied by: scale or 0.
  __device__ __forceinline__ float multiplier(std::uint64_t index) const {
    return (philox_word(seed, offset + index) >> 1) >= threshold ? scale : 0.f;
  }
};

}  // namespace kiln
