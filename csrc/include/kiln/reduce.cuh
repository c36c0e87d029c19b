// Reductions shared by the normalization kernels (layer_norm.cu, batch_norm.cu):
// moments (count, mean, M2) merged with Chan's formula, fixed-order warp and block
// combinations of small states, and unguarded 16-byte / scalar unit loads.
//
// Every reduction here runs in an order fixed by the launch shape alone, so results
// are bitwise reproducible. Variances are never formed as E[x^2] - E[x]^2: a group of
// values held in registers gets its mean and then the squared deviations from it, and
// groups merge with Chan, Golub and LeVeque's pairwise update.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "kiln/common.cuh"

namespace kiln {
namespace reduce {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Row kernels: a group of G threads per row; G = 32 packs 8 rows (warps) per block.
constexpr int kRowsPerWarpBlock = 8;  // G = 32: blocks of 8 warps, a row each

template <int G>
constexpr int block_threads() {
  return G == kWarp ? kWarp * kRowsPerWarpBlock : G;
}

// The row this thread's group owns, and the thread's lane in it; false past the end.
template <int G>
__device__ __forceinline__ bool row_of_thread(std::int64_t rows, std::int64_t& row, int& lane) {
  constexpr int kRowsPerBlock = block_threads<G>() / G;
  row = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / G;
  lane = static_cast<int>(threadIdx.x % G);
  return row < rows;  // uniform per group: a warp or the whole block leaves together
}

// ---------------------------------------------------------------------------
// Units: K consecutive elements, one 16-byte access when K > 1 (the caller
// guarantees the alignment), a plain scalar access when K == 1. Plain loads by
// default (the data may be an in-place output of the same kernel); kReadOnly
// loads go through the read-only cache (__ldg), for parameters no kernel writes.

template <typename T, int K, bool kReadOnly = false>
__device__ __forceinline__ void load_unit(const T* p, float (&out)[K]) {
  if constexpr (K == 1) {
    out[0] = to_float(kReadOnly ? __ldg(p) : *p);
  } else {
    static_assert(K == Vec16<T>::kSize, "a vector unit is 16 bytes");
    const auto* q = reinterpret_cast<const uint4*>(p);
    Vec16<T> v;
    *reinterpret_cast<uint4*>(v.v) = kReadOnly ? __ldg(q) : *q;
#pragma unroll
    for (int j = 0; j < K; ++j) out[j] = to_float(v.v[j]);
  }
}

template <typename T, int K>
__device__ __forceinline__ void load_unit_ro(const T* p, float (&out)[K]) {
  load_unit<T, K, true>(p, out);
}

template <typename T, int K>
__device__ __forceinline__ void store_unit(T* p, const float (&in)[K]) {
  if constexpr (K == 1) {
    *p = from_float<T>(in[0]);
  } else {
    static_assert(K == Vec16<T>::kSize, "a vector unit is 16 bytes");
    Vec16<T> v;
#pragma unroll
    for (int j = 0; j < K; ++j) v.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v.v);
  }
}

// ---------------------------------------------------------------------------
// Saved means. A mean travels as a double (the exact shift + shifted mean, see the
// kernels) and is used as two float32 parts, hi = float(mean), lo = float(mean - hi),
// so that the per-element arithmetic stays float32: x - mean is ((x - hi) - lo). For x
// near the mean, x - hi is exact (Sterbenz), so the difference carries about 48 bits of
// the mean, not float32's 24 (a float32 mean near 1e4 is off by up to 5e-4).

struct SplitMean {
  float hi;
  float lo;
};

__device__ __forceinline__ SplitMean split_mean(double m) {
  const float hi = __double2float_rn(m);
  return {hi, __double2float_rn(m - static_cast<double>(hi))};  // m - hi is exact in double
}

__device__ __forceinline__ float centered(float x, const SplitMean& m) { return (x - m.hi) - m.lo; }

// ---------------------------------------------------------------------------
// Moments.

struct Moments {
  static constexpr int kFloats = 3;  // floats of a workspace slot
  float n;     // count (exact up to 2^24; beyond, only the merge weights round)
  float mean;  // mean of the values
  float m2;    // sum of squared deviations from mean
};

__device__ __forceinline__ Moments no_moments() { return {0.f, 0.f, 0.f}; }

// The moments of a followed by b (Chan et al.). The weight b.n / n is the one
// division, the fast one (2 ulp): an IEEE division's slow-path call costs registers.
__device__ __forceinline__ Moments combine(const Moments& a, const Moments& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n;
  const float wb = __fdividef(b.n, n);
  const float delta = b.mean - a.mean;
  return {n, fmaf(delta, wb, a.mean), a.m2 + b.m2 + delta * delta * (a.n * wb)};
}

// Exact two-pass moments of K values in registers (K a power of two, so 1/K is exact).
template <int K>
__device__ __forceinline__ Moments moments_of(const float (&v)[K]) {
  static_assert((K & (K - 1)) == 0, "K must be a power of two");
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j) s += v[j];
  const float mean = s * (1.f / static_cast<float>(K));
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const float d = v[j] - mean;
    m2 = fmaf(d, d, m2);
  }
  return {static_cast<float>(K), mean, m2};
}

// Two running sums (the batch-norm backward's per-channel partials: sum dy, sum dy xc).
struct Sums2 {
  static constexpr int kFloats = 2;  // floats of a workspace slot
  float a;
  float b;
};

__device__ __forceinline__ Sums2 combine(const Sums2& x, const Sums2& y) { return {x.a + y.a, x.b + y.b}; }

// Both states travel as their floats: through shuffles and through slots of
// S::kFloats floats of a workspace.
__device__ __forceinline__ Moments shuffle_down(const Moments& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.n, offset), __shfl_down_sync(kFullMask, s.mean, offset),
          __shfl_down_sync(kFullMask, s.m2, offset)};
}
__device__ __forceinline__ Sums2 shuffle_down(const Sums2& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.a, offset), __shfl_down_sync(kFullMask, s.b, offset)};
}
__device__ __forceinline__ Moments shuffle_idx(const Moments& s, int lane) {
  return {__shfl_sync(kFullMask, s.n, lane), __shfl_sync(kFullMask, s.mean, lane),
          __shfl_sync(kFullMask, s.m2, lane)};
}

__device__ __forceinline__ void store_slot(float* slot, const Moments& s) {
  slot[0] = s.n;
  slot[1] = s.mean;
  slot[2] = s.m2;
}
__device__ __forceinline__ void store_slot(float* slot, const Sums2& s) {
  slot[0] = s.a;
  slot[1] = s.b;
}
template <class S>
__device__ __forceinline__ S load_slot(const float* slot);
template <>
__device__ __forceinline__ Moments load_slot<Moments>(const float* slot) {
  return {slot[0], slot[1], slot[2]};
}
template <>
__device__ __forceinline__ Sums2 load_slot<Sums2>(const float* slot) {
  return {slot[0], slot[1]};
}

// Lane 0 gets the combination of the warp's 32 states, always in the same tree order
// (the other lanes get partial results). Needs the whole warp.
template <class S>
__device__ __forceinline__ S warp_combine(S s) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) s = combine(s, shuffle_down(s, o));
  return s;
}

// Every thread of a block of G threads gets the same combination of their G states:
// each warp's tree, then the warps in order. Needs the whole block; the trailing
// barrier lets the caller run it again.
template <int G, class S>
__device__ __forceinline__ S block_combine(S s) {
  static_assert(G % kWarp == 0 && G > kWarp, "a block of whole warps");
  __shared__ S part[G / kWarp];
  s = warp_combine(s);
  if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = s;
  __syncthreads();
  S total = part[0];
#pragma unroll
  for (int w = 1; w < G / kWarp; ++w) total = combine(total, part[w]);
  __syncthreads();
  return total;
}

// V sums over a group of G threads: a warp (butterfly, identical bits on all lanes)
// or, for G > 32, a whole block (warp sums, then the warps in order). Every thread of
// the group gets the totals.
template <int G, int V>
__device__ __forceinline__ void group_sum(float (&v)[V]) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], o);
  }
  if constexpr (G > kWarp) {
    __shared__ float part[V][G / kWarp];
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int i = 0; i < V; ++i) part[i][threadIdx.x / kWarp] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float total = part[i][0];
#pragma unroll
      for (int w = 1; w < G / kWarp; ++w) total += part[i][w];
      v[i] = total;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Host side: the row split of a column reduction done in parts (dw / db of the norms).

// Keeps every in-kernel column index (plus a unit) inside int.
constexpr std::int64_t kMaxCols = INT_MAX - 1024;

struct RowParts {
  int parts;
  std::int64_t rows_per_part;
};

// Row blocks of the column partials: a function of (M, N) and the kernel's constants only,
// so that the workspace size and the reduction order are fixed by the shape.
inline RowParts row_parts(std::int64_t M, std::int64_t N, std::int64_t cols_per_block,
                          std::int64_t target_blocks, std::int64_t max_parts, std::int64_t min_rows_per_part) {
  const std::int64_t col_blocks = ceil_div<std::int64_t>(N, cols_per_block);
  std::int64_t p = ceil_div<std::int64_t>(target_blocks, col_blocks);
  p = std::min({p, max_parts, ceil_div<std::int64_t>(M, min_rows_per_part)});
  p = std::max<std::int64_t>(p, 1);
  const std::int64_t rows_per_part = ceil_div<std::int64_t>(M, p);
  return {static_cast<int>(ceil_div<std::int64_t>(M, rows_per_part)), rows_per_part};
}

inline void check_rows_cols(const char* where, std::int64_t M, std::int64_t N) {
  check_arg(M >= 0, where, "M must be >= 0, got " + std::to_string(M));
  check_arg(N >= 0 && N <= kMaxCols, where,
            "N must be in [0, " + std::to_string(kMaxCols) + "], got " + std::to_string(N));
}

}  // namespace reduce
}  // namespace kiln
