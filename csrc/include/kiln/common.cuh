// Helpers shared by kiln's CUDA kernels: dtype codes and conversions, guarded
// vector loads and stores, and host-side checks that turn failures into C++
// exceptions (pybind11 maps them to Python exceptions).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// bfloat16 tensor-core fragments and conversions exist from sm_80 on.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kiln's CUDA kernels need sm_80 or newer"
#endif

namespace kiln {

// Storage dtype codes, shared with the Python side.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kNumDTypes = 3 };

template <typename I>
__host__ __device__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// ---------------------------------------------------------------------------
// Conversions between storage types and the float32 that all math runs in.

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------
// 16 bytes of T: the unit of every vectorized global and shared memory access.

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ void set_zero(Vec16<T>& vec) {
  // All-zero bits are +0 in float, half and bfloat16 alike.
  *reinterpret_cast<uint4*>(vec.v) = make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// Reads the kSize elements at columns col.. of a row that has `cols` valid columns.
// A whole, 16-byte aligned run is one vector load; anything else (the ragged edge of
// the matrix, or rows left misaligned by an odd row length) goes element by element
// with zeros past the edge, so no shape needs a separate kernel.
template <typename T>
__device__ __forceinline__ void load_row_run(const T* row, int col, int cols, Vec16<T>& out) {
  constexpr int kSize = Vec16<T>::kSize;
  if (col + kSize <= cols && is_aligned16(row + col)) {
    *reinterpret_cast<uint4*>(out.v) = __ldg(reinterpret_cast<const uint4*>(row + col));
    return;
  }
#pragma unroll
  for (int j = 0; j < kSize; ++j) {
    out.v[j] = col + j < cols ? row[col + j] : from_float<T>(0.f);
  }
}

// Writes N consecutive values at columns col.. of a row with `cols` valid columns,
// one 16-byte store when the run is whole and aligned, else element by element.
template <typename T, int N>
__device__ __forceinline__ void store_row_run(T* row, int col, int cols, const float (&values)[N]) {
  if constexpr (N == Vec16<T>::kSize) {
    if (col + N <= cols && is_aligned16(row + col)) {
      Vec16<T> packed;
#pragma unroll
      for (int j = 0; j < N; ++j) packed.v[j] = from_float<T>(values[j]);
      *reinterpret_cast<uint4*>(row + col) = *reinterpret_cast<const uint4*>(packed.v);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (col + j < cols) row[col + j] = from_float<T>(values[j]);
  }
}

// ---------------------------------------------------------------------------
// Host-side checks. `where` names the Python-facing function.

inline void check_cuda(cudaError_t err, const char* where) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(where) + ": CUDA error: " + cudaGetErrorString(err) + " (" +
                             cudaGetErrorName(err) + ")");
  }
}

inline void check_arg(bool ok, const char* where, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(where) + ": " + what);
}

// Device pointers arrive from Python as integers.
template <typename T>
const T* as_const(std::uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
T* as_mutable(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace kiln
