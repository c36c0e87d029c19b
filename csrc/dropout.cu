// dropout: dst = src * keep / (1 - p), the keep bit of element i regenerated from
// Philox(seed, offset + i) (kiln/philox.cuh), never stored. Forward and backward are
// the same kernel: backward applies the forward's mask (same seed and offset) to dy.
//
// Each thread handles one 16-byte run of elements per step of a grid-stride loop; the
// Philox words are computed per element (10 rounds of two 32-bit multiplies each), so
// the kernel is about balanced between memory and integer math on current GPUs.
#include <climits>
#include <cstdint>
#include <string>

#include "kiln/common.cuh"
#include "kiln/dropout.h"
#include "kiln/philox.cuh"

namespace kiln {
namespace {

constexpr int kDropoutThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDropoutThreads)
    dropout_kernel(const T* __restrict__ src, T* __restrict__ dst, std::int64_t n, Dropout drop) {
  constexpr int kVec = Vec16<T>::kSize;
  const std::int64_t runs = ceil_div<std::int64_t>(n, kVec);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const bool aligned = is_aligned16(src) && is_aligned16(dst);
  for (std::int64_t run = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; run < runs;
       run += stride) {
    const std::int64_t first = run * kVec;
    if (aligned && first + kVec <= n) {
      Vec16<T> v;
      *reinterpret_cast<uint4*>(v.v) = __ldg(reinterpret_cast<const uint4*>(src + first));
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v.v[j] = from_float<T>(to_float(v.v[j]) * drop.multiplier(static_cast<std::uint64_t>(first + j)));
      }
      *reinterpret_cast<uint4*>(dst + first) = *reinterpret_cast<const uint4*>(v.v);
    } else {
      for (int j = 0; j < kVec && first + j < n; ++j) {
        dst[first + j] = from_float<T>(to_float(src[first + j]) * drop.multiplier(static_cast<std::uint64_t>(first + j)));
      }
    }
  }
}

}  // namespace

void dropout_apply(std::uintptr_t src, std::uintptr_t dst, std::int64_t n, std::uint64_t seed,
                   std::uint64_t offset, std::int64_t threshold, double scale, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "dropout_apply";
  check_arg(dtype >= 0 && dtype < kNumDTypes, kWhere,
            "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  check_arg(n >= 0, kWhere, "n must be >= 0, got " + std::to_string(n));
  check_arg(threshold >= 0 && threshold < (std::int64_t{1} << 31), kWhere,
            "threshold must be in [0, 2^31), got " + std::to_string(threshold));
  if (n == 0) return;
  check_arg(src != 0 && dst != 0, kWhere, "src and dst must be non-null when n > 0");
  Dropout drop;
  drop.seed = seed;
  drop.offset = offset;
  drop.threshold = static_cast<std::uint32_t>(threshold);
  drop.scale = static_cast<float>(scale);
  drop.enabled = true;
  int device = 0;
  int sms = 0;
  check_cuda(cudaGetDevice(&device), kWhere);
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), kWhere);
  const std::int64_t runs = ceil_div<std::int64_t>(n, 4);  // float32 runs: the most of any dtype
  const std::int64_t wanted = ceil_div<std::int64_t>(runs, kDropoutThreads);
  const unsigned blocks = static_cast<unsigned>(wanted < std::int64_t{sms} * 8 ? wanted : std::int64_t{sms} * 8);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      dropout_kernel<float><<<blocks, kDropoutThreads, 0, cuda_stream>>>(as_const<float>(src), as_mutable<float>(dst), n, drop);
      break;
    case kFloat16:
      dropout_kernel<__half><<<blocks, kDropoutThreads, 0, cuda_stream>>>(as_const<__half>(src), as_mutable<__half>(dst), n, drop);
      break;
    default:
      dropout_kernel<__nv_bfloat16><<<blocks, kDropoutThreads, 0, cuda_stream>>>(
          as_const<__nv_bfloat16>(src), as_mutable<__nv_bfloat16>(dst), n, drop);
      break;
  }
  check_cuda(cudaGetLastError(), kWhere);
}

}  // namespace kiln
