// RMS normalization over the last dimension, forward and backward.
//
// Each row of N columns belongs to a group of G threads: a warp (G = 32, eight rows per
// block of 256) for N <= 1024, a whole block of 256 threads beyond. Columns move in units
// of K: K = 16 bytes of T when N is a multiple of that and every pointer is 16-byte
// aligned, else K = 1. The row is read twice, the second time from cache: once for
// sum(x^2) (float32; every term is positive, no cancellation), once to write y (forward)
// or dx (backward, after sum(g xhat)).
//
// dw: per-block float32 partial column sums over fixed row blocks into the workspace,
// then a column reduction in a fixed order; deterministic, no atomics.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kiln/common.cuh"
#include "kiln/dispatch.cuh"
#include "kiln/llm_ops.h"
#include "kiln/reduce.cuh"

namespace kiln {
namespace {

using reduce::block_threads;
using reduce::kWarp;
using reduce::load_unit;
using reduce::load_unit_ro;
using reduce::row_of_thread;
using reduce::store_unit;

template <int V>
using IntC = std::integral_constant<int, V>;

constexpr int kWarpRowMax = 1024;      // rows up to this many columns: a warp each
constexpr int kBlockRowThreads = 256;  // longer rows: a block each
constexpr int kPartThreads = 256;      // dw partials: one thread per column
constexpr std::int64_t kTargetBlocks = 1024;
constexpr std::int64_t kMaxParts = 256;
constexpr std::int64_t kMinRowsPerPart = 32;

// (offset + w) over the unit at col, 1 without a weight.
template <typename T, int K>
__device__ __forceinline__ void load_scale(const T* w, int col, float offset, float (&s)[K]) {
  if (w == nullptr) {
#pragma unroll
    for (int j = 0; j < K; ++j) s[j] = 1.f;
    return;
  }
  load_unit_ro<T, K>(w + col, s);
#pragma unroll
  for (int j = 0; j < K; ++j) s[j] += offset;
}

template <typename T, int K, int G>
__global__ void __launch_bounds__(block_threads<G>())
    rms_norm_forward_kernel(const T* x, const T* w, T* y, float* rstd, std::int64_t rows, int cols,
                            float inv_cols, float eps, float offset) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const int units = cols / K;

  float ss[1] = {0.f};
  for (int u = lane; u < units; u += G) {
    float v[K];
    load_unit<T, K>(xr + u * K, v);
#pragma unroll
    for (int j = 0; j < K; ++j) ss[0] = fmaf(v[j], v[j], ss[0]);
  }
  reduce::group_sum<G>(ss);
  const float r = rsqrtf(ss[0] * inv_cols + eps);

  for (int u = lane; u < units; u += G) {
    float v[K], s[K];
    load_unit<T, K>(xr + u * K, v);
    load_scale<T, K>(w, u * K, offset, s);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = v[j] * r * s[j];
    store_unit<T, K>(yr + u * K, v);
  }
  if (lane == 0 && rstd != nullptr) rstd[row] = r;
}

template <typename T, int K, int G>
__global__ void __launch_bounds__(block_threads<G>())
    rms_norm_backward_dx_kernel(const T* dy, const T* x, const T* w, const float* rstd, T* dx,
                                std::int64_t rows, int cols, float inv_cols, float offset) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  T* dxr = dx + row * cols;
  const int units = cols / K;
  const float r = rstd[row];

  float dot[1] = {0.f};  // sum g xhat
  for (int u = lane; u < units; u += G) {
    float v[K], d[K], s[K];
    load_unit<T, K>(xr + u * K, v);
    load_unit<T, K>(dyr + u * K, d);
    load_scale<T, K>(w, u * K, offset, s);
#pragma unroll
    for (int j = 0; j < K; ++j) dot[0] = fmaf(d[j] * s[j], v[j] * r, dot[0]);
  }
  reduce::group_sum<G>(dot);
  const float c = dot[0] * inv_cols;

  for (int u = lane; u < units; u += G) {
    float v[K], d[K], s[K];
    load_unit<T, K>(xr + u * K, v);
    load_unit<T, K>(dyr + u * K, d);
    load_scale<T, K>(w, u * K, offset, s);
#pragma unroll
    for (int j = 0; j < K; ++j) d[j] = r * (d[j] * s[j] - v[j] * r * c);
    store_unit<T, K>(dxr + u * K, d);
  }
}

// part[p, col] = sum over the rows of part p of dy xhat: a thread per column, rows in order.
template <typename T>
__global__ void __launch_bounds__(kPartThreads)
    rms_norm_dw_partials(const T* dy, const T* x, const float* rstd, float* part, std::int64_t rows, int cols,
                         std::int64_t rows_per_part) {
  const int col = blockIdx.x * kPartThreads + threadIdx.x;
  if (col >= cols) return;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_part;
  const std::int64_t r1 = r0 + rows_per_part < rows ? r0 + rows_per_part : rows;
  float acc = 0.f;
  for (std::int64_t row = r0; row < r1; ++row) {
    const std::int64_t i = row * cols + col;
    acc = fmaf(to_float(dy[i]), to_float(x[i]) * rstd[row], acc);
  }
  part[static_cast<std::int64_t>(blockIdx.y) * cols + col] = acc;
}

// dw[col] = sum_p part[p, col], p in order.
template <typename T>
__global__ void __launch_bounds__(kPartThreads)
    rms_norm_dw_reduce(const float* part, T* dw, int parts, int cols) {
  const int col = blockIdx.x * kPartThreads + threadIdx.x;
  if (col >= cols) return;
  float acc = 0.f;
  for (int p = 0; p < parts; ++p) acc += part[static_cast<std::int64_t>(p) * cols + col];
  dw[col] = from_float<T>(acc);
}

reduce::RowParts dw_parts(std::int64_t M, std::int64_t N) {
  return reduce::row_parts(M, N, kPartThreads, kTargetBlocks, kMaxParts, kMinRowsPerPart);
}

// Calls f(TypeTag<T>, IntC<K>, IntC<G>): K = 16 bytes of T when N allows it and every
// pointer is aligned, else 1; G = a warp for rows up to kWarpRowMax columns, else a block.
template <class F>
void dispatch_rows(int dtype, std::int64_t N, bool aligned, F&& f) {
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    constexpr int kVec = Vec16<T>::kSize;
    auto by_group = [&](auto unit) {
      if (N <= kWarpRowMax) {
        f(type, unit, IntC<kWarp>{});
      } else {
        f(type, unit, IntC<kBlockRowThreads>{});
      }
    };
    if (aligned && N % kVec == 0) {
      by_group(IntC<kVec>{});
    } else {
      by_group(IntC<1>{});
    }
  });
}

template <int G>
unsigned row_blocks(const char* where, std::int64_t rows) {
  constexpr int kRowsPerBlock = block_threads<G>() / G;
  const std::int64_t blocks = ceil_div<std::int64_t>(rows, kRowsPerBlock);
  check_arg(blocks <= INT_MAX, where, "too many rows: " + std::to_string(rows));
  return static_cast<unsigned>(blocks);
}

}  // namespace

void rms_norm_forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t y, std::uintptr_t rstd, std::int64_t M,
                      std::int64_t N, double eps, double offset, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "rms_norm_forward";
  check_dtype_code(kWhere, dtype);
  reduce::check_rows_cols(kWhere, M, N);
  check_arg(std::isfinite(eps) && eps >= 0.0, kWhere, "eps must be finite and >= 0, got " + std::to_string(eps));
  if (M == 0 || N == 0) return;
  check_required(kWhere, "x", x);
  check_required(kWhere, "y", y);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const float inv_cols = static_cast<float>(1.0 / static_cast<double>(N));
  dispatch_rows(dtype, N, all_aligned16({x, y, w}), [&](auto type, auto unit, auto group) {
    using T = typename decltype(type)::type;
    constexpr int K = decltype(unit)::value;
    constexpr int G = decltype(group)::value;
    rms_norm_forward_kernel<T, K, G><<<row_blocks<G>(kWhere, M), block_threads<G>(), 0, cuda_stream>>>(
        as_const<T>(x), as_const<T>(w), as_mutable<T>(y), as_mutable<float>(rstd), M, static_cast<int>(N),
        inv_cols, static_cast<float>(eps), static_cast<float>(offset));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

std::int64_t rms_norm_backward_workspace(std::int64_t M, std::int64_t N) {
  reduce::check_rows_cols("rms_norm_backward_workspace", M, N);
  if (M == 0 || N == 0) return 0;
  return static_cast<std::int64_t>(dw_parts(M, N).parts) * N;
}

void rms_norm_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w, std::uintptr_t rstd, std::uintptr_t dx,
                       std::uintptr_t dw, std::uintptr_t workspace, std::int64_t M, std::int64_t N, double offset,
                       int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "rms_norm_backward";
  check_dtype_code(kWhere, dtype);
  reduce::check_rows_cols(kWhere, M, N);
  check_arg(dw == 0 || w != 0, kWhere, "dw was given but w is null (0): no weight, no weight gradient");
  if (N == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (M == 0) {  // a sum over no rows: dw = 0 (all-zero bits in every dtype)
    if (dw != 0) {
      check_cuda(cudaMemsetAsync(as_mutable<void>(dw), 0, static_cast<std::size_t>(N) * dtype_bytes(dtype),
                                 cuda_stream), kWhere);
    }
    return;
  }
  if (dx == 0 && dw == 0) return;
  check_required(kWhere, "dy", dy);
  check_required(kWhere, "x", x);
  check_required(kWhere, "rstd", rstd);
  if (dw != 0) check_required(kWhere, "workspace", workspace);
  const float inv_cols = static_cast<float>(1.0 / static_cast<double>(N));
  const int cols = static_cast<int>(N);
  dispatch_rows(dtype, N, all_aligned16({dy, x, w, dx}), [&](auto type, auto unit, auto group) {
    using T = typename decltype(type)::type;
    constexpr int K = decltype(unit)::value;
    constexpr int G = decltype(group)::value;
    if (dx != 0) {
      rms_norm_backward_dx_kernel<T, K, G><<<row_blocks<G>(kWhere, M), block_threads<G>(), 0, cuda_stream>>>(
          as_const<T>(dy), as_const<T>(x), as_const<T>(w), as_const<float>(rstd), as_mutable<T>(dx), M, cols,
          inv_cols, static_cast<float>(offset));
      check_cuda(cudaGetLastError(), kWhere);
    }
  });
  if (dw != 0) {
    const reduce::RowParts pp = dw_parts(M, N);
    const unsigned col_blocks = static_cast<unsigned>(ceil_div<std::int64_t>(N, kPartThreads));
    dispatch_dtype(dtype, [&](auto type) {
      using T = typename decltype(type)::type;
      rms_norm_dw_partials<T><<<dim3(col_blocks, static_cast<unsigned>(pp.parts)), kPartThreads, 0, cuda_stream>>>(
          as_const<T>(dy), as_const<T>(x), as_const<float>(rstd), as_mutable<float>(workspace), M, cols,
          pp.rows_per_part);
      check_cuda(cudaGetLastError(), kWhere);
      rms_norm_dw_reduce<T><<<col_blocks, kPartThreads, 0, cuda_stream>>>(as_const<float>(workspace),
                                                                           as_mutable<T>(dw), pp.parts, cols);
      check_cuda(cudaGetLastError(), kWhere);
    });
  }
}

}  // namespace kiln
