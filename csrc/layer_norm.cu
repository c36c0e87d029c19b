// Layer normalization over the last dimension, forward and backward.
//
// Each row of N columns belongs to a group of G threads: a warp (G = 32, eight rows per
// block of 256) for N <= 512, a whole block (G = 128, 256, 512) up to N = 8192, where
// every thread holds at most 16 of the row's values in registers; longer rows stream
// through a block of 512 threads. Columns move in units of K: K = 16 bytes of T when N
// is a multiple of that and every row pointer is 16-byte aligned, else K = 1 (scalar).
//
// Statistics (float32 whatever the storage type) are taken on x - x[row, 0]: that shift
// is exact for values near each other, so a row with mean 1e4 and std 1e-2 keeps every
// digit of its deviations. Rows in registers get the mean and then the mean of squared
// deviations from it; streamed rows get exact two-pass moments per unit, merged with
// Chan's formula per thread and then over the block in a fixed order. Never E[x^2] -
// E[x]^2. The output is ((x - shift) - d) * rstd, d the shifted mean. The mean saved for
// backward is float64, (double)shift + (double)d: exact, where a float32 mean near 1e4
// would be rounded by up to 5e-4 (5% of a 1e-2 std). rstd stays float32.
//
// Backward loads the float64 mean once per row as float32 hi + lo (reduce::split_mean)
// and forms xc = (x - hi) - lo, as accurate as the forward's (x - shift) - d, so xhat =
// xc * rstd needs no re-centring on mean(xc) (which the float32 mean needed). dw and
// db: per-block float32 partials over fixed row blocks into the workspace, then a
// column reduction in a fixed order; deterministic, no atomics.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kiln/api.h"
#include "kiln/common.cuh"
#include "kiln/dispatch.cuh"
#include "kiln/reduce.cuh"

namespace kiln {
namespace {

using reduce::block_threads;
using reduce::kRowsPerWarpBlock;
using reduce::kWarp;
using reduce::load_unit;
using reduce::load_unit_ro;
using reduce::row_of_thread;
using reduce::store_unit;

template <int V>
using IntC = std::integral_constant<int, V>;

constexpr int kStreamThreads = 512;   // one block per row beyond the register path
constexpr int kValuesPerThread = 16;  // register path: row values held per thread (x and dy each)


// Calls f(IntC<G>, IntC<VPT>) for rows of `cols` elements moved in units of K: VPT units
// per thread held in registers, or VPT == 0 for the streaming kernel. G * VPT * K >= cols.
template <int K, class F>
void by_row_length(std::int64_t cols, F&& f) {
  constexpr int kVpt = kValuesPerThread / K;
  static_assert(kVpt * K == kValuesPerThread, "K divides the values per thread");
  if (cols <= kWarp * kValuesPerThread / 2) {
    f(IntC<kWarp>{}, IntC<kVpt / 2>{});
  } else if (cols <= kWarp * kValuesPerThread) {
    f(IntC<kWarp>{}, IntC<kVpt>{});
  } else if (cols <= 128 * kValuesPerThread) {
    f(IntC<128>{}, IntC<kVpt>{});
  } else if (cols <= 256 * kValuesPerThread) {
    f(IntC<256>{}, IntC<kVpt>{});
  } else if (cols <= 512 * kValuesPerThread) {
    f(IntC<512>{}, IntC<kVpt>{});
  } else {
    f(IntC<kStreamThreads>{}, IntC<0>{});
  }
}


// v = v * w + b over the unit at col; w, b may be null.
template <typename T, int K>
__device__ __forceinline__ void affine(const T* w, const T* b, int col, float (&v)[K]) {
  if (w != nullptr) {
    float wv[K];
    load_unit_ro<T, K>(w + col, wv);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] *= wv[j];
  }
  if (b != nullptr) {
    float bv[K];
    load_unit_ro<T, K>(b + col, bv);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] += bv[j];
  }
}

// The unit at p, minus shift.
template <typename T, int K>
__device__ __forceinline__ void load_shifted(const T* p, float shift, float (&v)[K]) {
  load_unit<T, K>(p, v);
#pragma unroll
  for (int j = 0; j < K; ++j) v[j] -= shift;
}

// Writes the unit at col of y: ((v - d) * r) * w + b, v already shifted.
template <typename T, int K>
__device__ __forceinline__ void normalize_unit(T* yr, const T* w, const T* b, int col, float d, float r,
                                               float (&v)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j) v[j] = (v[j] - d) * r;
  affine<T, K>(w, b, col, v);
  store_unit<T, K>(yr + col, v);
}

// mean = shift + d in double: exact (two floats), so the saved mean loses nothing.
__device__ __forceinline__ void store_stats(double* mean, float* rstd, std::int64_t row, float shift, float d,
                                            float r) {
  if (mean != nullptr) mean[row] = static_cast<double>(shift) + static_cast<double>(d);
  if (rstd != nullptr) rstd[row] = r;
}

// ---------------------------------------------------------------------------
// Forward.

// Rows of at most G * VPT * K columns, held in registers: the shifted mean d, then the
// mean of squared deviations from it.
template <typename T, int K, int G, int VPT>
__global__ void __launch_bounds__(block_threads<G>())
    layer_norm_forward_regs(const T* x, const T* w, const T* b, T* y, double* mean, float* rstd,
                            std::int64_t rows, int cols, float inv_cols, float eps) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const float shift = to_float(xr[0]);

  float v[VPT][K];
  float sum[1] = {0.f};
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = (lane + i * G) * K;
    if (col < cols) {  // cols % K == 0: a unit is whole or absent
      load_shifted<T, K>(xr + col, shift, v[i]);
#pragma unroll
      for (int j = 0; j < K; ++j) sum[0] += v[i][j];
    } else {
#pragma unroll
      for (int j = 0; j < K; ++j) v[i][j] = 0.f;  // no undefined values in the registers
    }
  }
  reduce::group_sum<G>(sum);
  const float d = sum[0] * inv_cols;

  float sq[1] = {0.f};
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if ((lane + i * G) * K < cols) {
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float t = v[i][j] - d;
        sq[0] = fmaf(t, t, sq[0]);
      }
    }
  }
  reduce::group_sum<G>(sq);
  const float r = rsqrtf(sq[0] * inv_cols + eps);

#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = (lane + i * G) * K;
    if (col < cols) normalize_unit<T, K>(yr, w, b, col, d, r, v[i]);
  }
  if (lane == 0) store_stats(mean, rstd, row, shift, d, r);
}

// Any row length, a block of G threads per row: exact moments per unit merged with
// Chan's formula (per thread in column order, then the block in a fixed order); a
// second pass over x writes y.
template <typename T, int K, int G>
__global__ void __launch_bounds__(G)
    layer_norm_forward_stream(const T* x, const T* w, const T* b, T* y, double* mean, float* rstd,
                              std::int64_t rows, int cols, float inv_cols, float eps) {
  const std::int64_t row = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x);
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const float shift = to_float(xr[0]);
  const int units = cols / K;

  reduce::Moments acc = reduce::no_moments();
#pragma unroll 4
  for (int u = lane; u < units; u += G) {
    float v[K];
    load_shifted<T, K>(xr + u * K, shift, v);
    acc = reduce::combine(acc, reduce::moments_of(v));
  }
  acc = reduce::block_combine<G>(acc);
  const float d = acc.mean;
  const float r = rsqrtf(acc.m2 * inv_cols + eps);

#pragma unroll 4
  for (int u = lane; u < units; u += G) {
    float v[K];
    load_shifted<T, K>(xr + u * K, shift, v);
    normalize_unit<T, K>(yr, w, b, u * K, d, r, v);
  }
  if (lane == 0) store_stats(mean, rstd, row, shift, d, r);
}

// ---------------------------------------------------------------------------
// Backward: dx per row.

// xc = (x - hi) - lo and g = dy * w over the unit at col, adding sum g, sum g xc to s.
template <typename T, int K>
__device__ __forceinline__ void grad_unit(const T* dyr, const T* xr, const T* w, int col, const reduce::SplitMean& m,
                                          float (&xc)[K], float (&g)[K], float (&s)[2]) {
  load_unit<T, K>(xr + col, xc);
  load_unit<T, K>(dyr + col, g);
  if (w != nullptr) {
    float wv[K];
    load_unit_ro<T, K>(w + col, wv);
#pragma unroll
    for (int j = 0; j < K; ++j) g[j] *= wv[j];
  }
#pragma unroll
  for (int j = 0; j < K; ++j) {
    xc[j] = reduce::centered(xc[j], m);
    s[0] += g[j];
    s[1] = fmaf(g[j], xc[j], s[1]);
  }
}

// The row's coefficients from its sums s = (sum g, sum g xc):
// mg = mean(g), mgx = mean(g xhat) with xhat = xc r.
struct GradRow {
  float mg;
  float mgx;
};

__device__ __forceinline__ GradRow grad_row(const float (&s)[2], float r, float inv_cols) {
  return {s[0] * inv_cols, r * s[1] * inv_cols};
}

// dx = r (g - xhat mgx - mg) over the unit at col.
template <typename T, int K>
__device__ __forceinline__ void write_dx_unit(T* dxr, int col, const GradRow& k, float r, const float (&xc)[K],
                                              const float (&g)[K]) {
  float out[K];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const float xhat = xc[j] * r;
    out[j] = r * (g[j] - fmaf(xhat, k.mgx, k.mg));
  }
  store_unit<T, K>(dxr + col, out);
}

// ptxas (CUDA 13) squeezes the warp-path backward for 16-bit T in 16-byte units with two
// units per thread (N in (256, 512]) to 48 registers at the cost of a spill; a minimum of 1
// block per SM lifts that occupancy target (56 registers, no spill). 0: no minimum given.
template <typename T, int K, int G, int VPT>
constexpr int backward_regs_min_blocks() {
  return G == kWarp && sizeof(T) == 2 && K > 1 && VPT * K == kValuesPerThread ? 1 : 0;
}

// Rows held in registers (x and dy); dx != null.
template <typename T, int K, int G, int VPT>
__global__ void __launch_bounds__(block_threads<G>(), backward_regs_min_blocks<T, K, G, VPT>())
    layer_norm_backward_regs(const T* dy, const T* x, const T* w, const double* mean, const float* rstd, T* dx,
                             std::int64_t rows, int cols, float inv_cols) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* dyr = dy + row * cols;
  const T* xr = x + row * cols;
  const reduce::SplitMean m = reduce::split_mean(__ldg(mean + row));
  const float r = __ldg(rstd + row);

  float xc[VPT][K];
  float g[VPT][K];
  float s[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = (lane + i * G) * K;
    if (col < cols) {
      grad_unit<T, K>(dyr, xr, w, col, m, xc[i], g[i], s);
    } else {
#pragma unroll
      for (int j = 0; j < K; ++j) xc[i][j] = g[i][j] = 0.f;  // no undefined values in the registers
    }
  }
  reduce::group_sum<G>(s);
  const GradRow k = grad_row(s, r, inv_cols);

  T* dxr = dx + row * cols;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = (lane + i * G) * K;
    if (col < cols) write_dx_unit<T, K>(dxr, col, k, r, xc[i], g[i]);
  }
}

// Any row length, a block per row: the sums in one pass, dx in a second; dx != null.
template <typename T, int K, int G>
__global__ void __launch_bounds__(G)
    layer_norm_backward_stream(const T* dy, const T* x, const T* w, const double* mean, const float* rstd, T* dx,
                               std::int64_t rows, int cols, float inv_cols) {
  const std::int64_t row = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x);
  const T* dyr = dy + row * cols;
  const T* xr = x + row * cols;
  const reduce::SplitMean m = reduce::split_mean(__ldg(mean + row));
  const float r = __ldg(rstd + row);
  const int units = cols / K;

  float s[2] = {0.f, 0.f};
#pragma unroll 2
  for (int u = lane; u < units; u += G) {
    float xc[K];
    float g[K];
    grad_unit<T, K>(dyr, xr, w, u * K, m, xc, g, s);
  }
  reduce::group_sum<G>(s);
  const GradRow k = grad_row(s, r, inv_cols);

  T* dxr = dx + row * cols;
  float unused[2] = {0.f, 0.f};
#pragma unroll 2
  for (int u = lane; u < units; u += G) {
    float xc[K];
    float g[K];
    grad_unit<T, K>(dyr, xr, w, u * K, m, xc, g, unused);
    write_dx_unit<T, K>(dxr, u * K, k, r, xc, g);
  }
}

// ---------------------------------------------------------------------------
// Backward: dw and db.
//
// Block (column block bx, part p) sums rows [p * rows_per_part, ...) of 128 columns:
// 8 warps take every 8th row, a lane 4 columns 32 apart (coalesced), then the 8 warps'
// sums are added in order into part_w / part_b[p][col]. A second kernel adds the parts
// of each column in a fixed order.

constexpr int kParamThreads = 256;
constexpr int kParamPhases = kParamThreads / kWarp;   // row phases (warps) per block
constexpr int kParamColsPerLane = 4;
constexpr int kParamCols = kWarp * kParamColsPerLane;  // columns per block
constexpr std::int64_t kParamTargetBlocks = 1024;      // enough blocks for any current GPU
constexpr std::int64_t kParamMaxParts = 256;
constexpr std::int64_t kParamMinRowsPerPart = 32;
static_assert(2 * kParamCols == kParamThreads, "one thread per (array, column) in the final sum");

template <typename T>
__global__ void __launch_bounds__(kParamThreads)
    layer_norm_param_partials(const T* dy, const T* x, const double* mean, const float* rstd, float* part_w,
                              float* part_b, std::int64_t rows, int cols, std::int64_t rows_per_part) {
  __shared__ float cells[2][kParamPhases][kParamCols];
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int phase = static_cast<int>(threadIdx.x / kWarp);
  const int col0 = static_cast<int>(blockIdx.x) * kParamCols;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_part;
  const std::int64_t r1 = std::min(rows, r0 + rows_per_part);
  const bool want_w = part_w != nullptr;

  float sw[kParamColsPerLane] = {};
  float sb[kParamColsPerLane] = {};
  for (std::int64_t r = r0 + phase; r < r1; r += kParamPhases) {
    const T* dyr = dy + r * cols;
    const T* xr = x + r * cols;
    reduce::SplitMean m{0.f, 0.f};
    float rs = 0.f;
    if (want_w) {
      m = reduce::split_mean(__ldg(mean + r));
      rs = __ldg(rstd + r);
    }
#pragma unroll
    for (int j = 0; j < kParamColsPerLane; ++j) {
      const int col = col0 + lane + j * kWarp;
      if (col < cols) {
        const float g = to_float(dyr[col]);
        sb[j] += g;
        if (want_w) sw[j] = fmaf(g, reduce::centered(to_float(xr[col]), m) * rs, sw[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kParamColsPerLane; ++j) {
    cells[0][phase][lane + j * kWarp] = sw[j];
    cells[1][phase][lane + j * kWarp] = sb[j];
  }
  __syncthreads();
  const int which = static_cast<int>(threadIdx.x) / kParamCols;
  const int cl = static_cast<int>(threadIdx.x) % kParamCols;
  float* out = which == 0 ? part_w : part_b;
  if (out != nullptr && col0 + cl < cols) {
    float total = cells[which][0][cl];
#pragma unroll
    for (int ph = 1; ph < kParamPhases; ++ph) total += cells[which][ph][cl];
    out[static_cast<std::int64_t>(blockIdx.y) * cols + col0 + cl] = total;
  }
}

// out[col] = sum over parts p (in a fixed order) of part[p][col]; blockIdx.y picks
// (part_w, dw) or (part_b, db). 32 columns per block, 8 phases over the parts.
template <typename T>
__global__ void __launch_bounds__(kParamThreads)
    layer_norm_param_reduce(const float* part_w, const float* part_b, T* dw, T* db, int parts, int cols) {
  const float* part = blockIdx.y == 0 ? part_w : part_b;
  T* out = blockIdx.y == 0 ? dw : db;
  if (out == nullptr) return;  // uniform over the block
  __shared__ float cells[kParamPhases][kWarp];
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int phase = static_cast<int>(threadIdx.x / kWarp);
  const int col = static_cast<int>(blockIdx.x) * kWarp + lane;
  float s = 0.f;
  if (col < cols) {
    for (int p = phase; p < parts; p += kParamPhases) s += part[static_cast<std::int64_t>(p) * cols + col];
  }
  cells[phase][lane] = s;
  __syncthreads();
  if (phase == 0 && col < cols) {
    float total = cells[0][lane];
#pragma unroll
    for (int ph = 1; ph < kParamPhases; ++ph) total += cells[ph][lane];
    out[col] = from_float<T>(total);
  }
}

// ---------------------------------------------------------------------------
// Host side.

reduce::RowParts param_parts(std::int64_t M, std::int64_t N) {
  return reduce::row_parts(M, N, kParamCols, kParamTargetBlocks, kParamMaxParts, kParamMinRowsPerPart);
}

// Calls f(TypeTag<T>, IntC<K>) with K = 16 bytes of T when N allows it and every
// pointer is aligned, else K = 1.
template <class F>
void dispatch_units(int dtype, std::int64_t N, bool aligned, F&& f) {
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    constexpr int kVec = Vec16<T>::kSize;
    if (aligned && N % kVec == 0) {
      f(type, IntC<kVec>{});
    } else {
      f(type, IntC<1>{});
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

void layer_norm_forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t b, std::uintptr_t y, std::uintptr_t mean,
                        std::uintptr_t rstd, std::int64_t M, std::int64_t N, double eps, int dtype,
                        std::uintptr_t stream) {
  constexpr const char* kWhere = "layer_norm_forward";
  check_dtype_code(kWhere, dtype);
  reduce::check_rows_cols(kWhere, M, N);
  check_arg(std::isfinite(eps) && eps >= 0.0, kWhere, "eps must be finite and >= 0, got " + std::to_string(eps));
  if (M == 0 || N == 0) return;
  check_required(kWhere, "x", x);
  check_required(kWhere, "y", y);
  check_aligned8(kWhere, "mean", mean);
  const bool aligned = all_aligned16({x, y, w, b});
  const float inv_cols = static_cast<float>(1.0 / static_cast<double>(N));
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int cols = static_cast<int>(N);

  dispatch_units(dtype, N, aligned, [&](auto type, auto unit) {
    using T = typename decltype(type)::type;
    constexpr int K = decltype(unit)::value;
    by_row_length<K>(N, [&](auto group, auto vpt) {
      constexpr int G = decltype(group)::value;
      constexpr int VPT = decltype(vpt)::value;
      if constexpr (VPT > 0) {
        layer_norm_forward_regs<T, K, G, VPT><<<row_blocks<G>(kWhere, M), block_threads<G>(), 0, cuda_stream>>>(
            as_const<T>(x), as_const<T>(w), as_const<T>(b), as_mutable<T>(y), as_mutable<double>(mean),
            as_mutable<float>(rstd), M, cols, inv_cols, static_cast<float>(eps));
      } else {
        layer_norm_forward_stream<T, K, G><<<row_blocks<G>(kWhere, M), G, 0, cuda_stream>>>(
            as_const<T>(x), as_const<T>(w), as_const<T>(b), as_mutable<T>(y), as_mutable<double>(mean),
            as_mutable<float>(rstd), M, cols, inv_cols, static_cast<float>(eps));
      }
    });
  });
  check_cuda(cudaGetLastError(), kWhere);
}

std::int64_t layer_norm_backward_workspace(std::int64_t M, std::int64_t N) {
  reduce::check_rows_cols("layer_norm_backward_workspace", M, N);
  if (M == 0 || N == 0) return 0;
  const reduce::RowParts pp = param_parts(M, N);
  return 2 * static_cast<std::int64_t>(pp.parts) * N;
}

void layer_norm_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w, std::uintptr_t mean,
                         std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
                         std::uintptr_t workspace, std::int64_t M, std::int64_t N, int dtype,
                         std::uintptr_t stream) {
  constexpr const char* kWhere = "layer_norm_backward";
  check_dtype_code(kWhere, dtype);
  reduce::check_rows_cols(kWhere, M, N);
  check_arg(dw == 0 || w != 0, kWhere, "dw was given but w is null (0): no weight, no weight gradient");
  if (N == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const std::size_t param_bytes = static_cast<std::size_t>(N) * dtype_bytes(dtype);
  if (M == 0) {
    // Sums over no rows: dw = db = 0 (all-zero bits in every dtype).
    if (dw != 0) check_cuda(cudaMemsetAsync(as_mutable<void>(dw), 0, param_bytes, cuda_stream), kWhere);
    if (db != 0) check_cuda(cudaMemsetAsync(as_mutable<void>(db), 0, param_bytes, cuda_stream), kWhere);
    return;
  }
  const bool want_rows = dx != 0;
  const bool want_params = dw != 0 || db != 0;
  if (!want_rows && !want_params) return;
  check_required(kWhere, "dy", dy);
  if (dx != 0 || dw != 0) {
    check_required(kWhere, "x", x);
    check_required(kWhere, "mean", mean);
    check_aligned8(kWhere, "mean", mean);
    check_required(kWhere, "rstd", rstd);
  }
  if (want_params) check_required(kWhere, "workspace", workspace);

  const reduce::RowParts pp = param_parts(M, N);
  float* part_w = as_mutable<float>(workspace);
  float* part_b = part_w + static_cast<std::int64_t>(pp.parts) * N;
  const bool aligned = all_aligned16({dy, x, w, dx});
  const float inv_cols = static_cast<float>(1.0 / static_cast<double>(N));
  const int cols = static_cast<int>(N);

  dispatch_units(dtype, N, aligned, [&](auto type, auto unit) {
    using T = typename decltype(type)::type;
    constexpr int K = decltype(unit)::value;
    if (want_rows) {
      by_row_length<K>(N, [&](auto group, auto vpt) {
        constexpr int G = decltype(group)::value;
        constexpr int VPT = decltype(vpt)::value;
        if constexpr (VPT > 0) {
          layer_norm_backward_regs<T, K, G, VPT><<<row_blocks<G>(kWhere, M), block_threads<G>(), 0, cuda_stream>>>(
              as_const<T>(dy), as_const<T>(x), as_const<T>(w), as_const<double>(mean), as_const<float>(rstd),
              as_mutable<T>(dx), M, cols, inv_cols);
        } else {
          layer_norm_backward_stream<T, K, G><<<row_blocks<G>(kWhere, M), G, 0, cuda_stream>>>(
              as_const<T>(dy), as_const<T>(x), as_const<T>(w), as_const<double>(mean), as_const<float>(rstd),
              as_mutable<T>(dx), M, cols, inv_cols);
        }
      });
      check_cuda(cudaGetLastError(), kWhere);
    }
    if (want_params) {
      const dim3 grid_parts(static_cast<unsigned>(ceil_div<std::int64_t>(N, kParamCols)),
                            static_cast<unsigned>(pp.parts));
      layer_norm_param_partials<T><<<grid_parts, kParamThreads, 0, cuda_stream>>>(
          as_const<T>(dy), as_const<T>(x), as_const<double>(mean), as_const<float>(rstd),
          dw != 0 ? part_w : nullptr, db != 0 ? part_b : nullptr, M, cols, pp.rows_per_part);
      check_cuda(cudaGetLastError(), kWhere);
      const dim3 grid_reduce(static_cast<unsigned>(ceil_div<std::int64_t>(N, kWarp)), 2);
      layer_norm_param_reduce<T><<<grid_reduce, kParamThreads, 0, cuda_stream>>>(
          part_w, part_b, as_mutable<T>(dw), as_mutable<T>(db), pp.parts, cols);
      check_cuda(cudaGetLastError(), kWhere);
    }
  });
}

}  // namespace kiln
