// Rotary position embedding of one tensor x (B, S1, S2, D) into y: every pair (a, b) of
// columns (i, i + D/2) (rotate-half, Hugging Face's LLaMA layout) or (2i, 2i + 1)
// (interleaved, GPT-J / RoFormer) is rotated by the cos / sin of the row's position:
//   y_a = x_a c_a - x_b s_a,   y_b = x_b c_b + x_a s_b,
// and backward applies the transpose (inverse == 1): y_a = x_a c_a + x_b s_b, y_b = x_b c_b
// - x_a s_a (with equal halves of cos / sin, the inverse rotation, sin -> -sin). The full
// cos / sin rows are read, so any table (equal halves or not) gets its exact transpose.
//
// One thread per pair, a grid-stride loop; float32 math. The position of row (b, s1, s2)
// is s2 (x is (B, H, T, D)) or s1 (x is (B, T, H, D), the layout a projection writes).
#include <climits>
#include <cstdint>
#include <string>

#include "kiln/common.cuh"
#include "kiln/dispatch.cuh"
#include "kiln/llm_ops.h"

namespace kiln {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 65535LL * 8;

template <typename T, bool kInterleaved, bool kInverse>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* x, const T* cos, const T* sin, T* y, std::int64_t S1, std::int64_t S2, std::int64_t D,
                  std::int64_t T_len, bool per_batch, bool seq_is_s2, std::int64_t pairs) {
  const std::int64_t half = D / 2;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  for (std::int64_t p = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < pairs; p += stride) {
    const std::int64_t row = p / half;
    const std::int64_t i = p - row * half;
    const std::int64_t s2 = row % S2;
    const std::int64_t s1 = (row / S2) % S1;
    const std::int64_t b = row / (S1 * S2);
    const std::int64_t t = seq_is_s2 ? s2 : s1;
    const std::int64_t table = ((per_batch ? b : 0) * T_len + t) * D;
    const std::int64_t ca = kInterleaved ? 2 * i : i;
    const std::int64_t cb = kInterleaved ? 2 * i + 1 : i + half;
    const float xa = to_float(x[row * D + ca]);
    const float xb = to_float(x[row * D + cb]);
    const float cos_a = to_float(__ldg(cos + table + ca));
    const float cos_b = to_float(__ldg(cos + table + cb));
    // forward: y_a uses s_a and y_b s_b; the transpose swaps them and flips the signs
    const float sin_for_a = to_float(__ldg(sin + table + (kInverse ? cb : ca)));
    const float sin_for_b = to_float(__ldg(sin + table + (kInverse ? ca : cb)));
    const float sign = kInverse ? -1.f : 1.f;
    y[row * D + ca] = from_float<T>(xa * cos_a - sign * xb * sin_for_a);
    y[row * D + cb] = from_float<T>(xb * cos_b + sign * xa * sin_for_b);
  }
}

}  // namespace

void rotary_apply(std::uintptr_t x, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t y, std::int64_t B,
                  std::int64_t S1, std::int64_t S2, std::int64_t D, std::int64_t CB, int seq_dim, int interleaved,
                  int inverse, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "rotary_apply";
  check_dtype_code(kWhere, dtype);
  check_arg(B >= 0 && S1 >= 0 && S2 >= 0, kWhere,
            "B, S1, S2 must be >= 0, got " + std::to_string(B) + ", " + std::to_string(S1) + ", " +
                std::to_string(S2));
  check_arg(D >= 0 && D % 2 == 0, kWhere, "D must be even and >= 0, got " + std::to_string(D));
  check_arg(CB == 1 || CB == B, kWhere,
            "CB (cos / sin batch) must be 1 or B = " + std::to_string(B) + ", got " + std::to_string(CB));
  check_arg(seq_dim == 1 || seq_dim == 2, kWhere, "seq_dim must be 1 or 2, got " + std::to_string(seq_dim));
  const std::int64_t pairs = B * S1 * S2 * (D / 2);
  if (pairs == 0) return;
  check_required(kWhere, "x", x);
  check_required(kWhere, "cos", cos);
  check_required(kWhere, "sin", sin);
  check_required(kWhere, "y", y);
  const std::int64_t blocks = ceil_div<std::int64_t>(pairs, kThreads);
  const unsigned grid = static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const std::int64_t T_len = seq_dim == 2 ? S2 : S1;
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, cuda_stream>>>(as_const<T>(x), as_const<T>(cos), as_const<T>(sin), as_mutable<T>(y),
                                                 S1, S2, D, T_len, CB != 1, seq_dim == 2, pairs);
    };
    if (interleaved) {
      inverse ? launch(rotary_kernel<T, true, true>) : launch(rotary_kernel<T, true, false>);
    } else {
      inverse ? launch(rotary_kernel<T, false, true>) : launch(rotary_kernel<T, false, false>);
    }
  });
  check_cuda(cudaGetLastError(), kWhere);
}

}  // namespace kiln
