// Batch normalization over (N, C, L) contiguous tensors: per-channel statistics over
// the N * L values of a channel, the normalization itself, and the backward.
//
// Reductions over a channel run in two fixed-order steps, so results are bitwise
// reproducible and no atomics are used:
//   1. partials: each block reduces a fixed piece of one channel (or of a few columns)
//      into a slot of the workspace (3 floats for the statistics, 2 for the backward);
//   2. finish: a warp per channel combines its Q slots, lane-strided then a shuffle tree.
// The pieces depend on L:
//   - L >= 32 ("segments"): block (c, q) takes the q-th chunk of channel c's N * L
//     values, which lie in N contiguous segments of L; a thread walks units of K
//     (16 bytes when L is a multiple and the pointers are aligned, else 1) 256 apart
//     and steps (segment, position) without a division per unit. Q chunks per channel.
//   - L < 32 ("columns", (N, C) included): the tensor is an (N, W = C * L) matrix; a
//     block of 256 threads covers `lanes` neighbouring columns (lanes = W rounded up to
//     a power of two, at most 32) and 256 / lanes row phases, so a warp reads whole
//     runs of rows even when W is 3; each thread takes every (256 / lanes)-th row of
//     the block's row part p, then the phases are combined in order. Channel c owns
//     columns c * L .. c * L + L - 1: Q = L * P slots.
// Slots of channel c are workspace[(c * Q + q) * S ...] in both cases, S floats a slot.
//
// Statistics: moments (count, mean, M2) of values shifted by x[0, c, 0] (exact for
// values near each other: a channel with mean 1e4 and std 1e-2 keeps its deviations);
// exact per unit, Welford/Chan merges per thread, Chan merges over the block and the
// slots. Never E[x^2] - E[x]^2. mean = (double)shift + (double)(shifted mean), float64
// and exact (a float32 mean near 1e4 would be rounded by up to 5e-4, 5% of a 1e-2 std);
// var = M2 / (N * L), float32.
//
// Every reader of a mean (apply, backward; the batch mean in training, the running mean
// in eval) loads the float64 once per channel as float32 hi + lo (reduce::split_mean) and
// uses xc = (x - hi) - lo, so the per-element math stays float32 and a large mean loses
// nothing. Backward sums per channel: sum dy, sum dy xc; xhat = xc * invstd. No
// re-centring on mean(xc) is needed (the float32 mean needed it to undo its rounding).
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kiln/api.h"
#include "kiln/common.cuh"
#include "kiln/dispatch.cuh"
#include "kiln/reduce.cuh"

namespace kiln {
namespace {

using reduce::kWarp;
using reduce::load_unit;
using reduce::load_unit_ro;
using reduce::store_unit;

template <int V>
using IntC = std::integral_constant<int, V>;

constexpr int kThreads = 256;
constexpr std::int64_t kSegmentMinL = 32;               // L below this: the column path
constexpr std::int64_t kTargetBlocks = 1024;            // partial blocks to aim for
constexpr std::int64_t kMinValuesPerSegmentBlock = 8192;
constexpr std::int64_t kMaxColumnParts = 256;
constexpr std::int64_t kMinRowsPerColumnThread = 4;

// ---------------------------------------------------------------------------
// What a partial reduces. A policy has a State (reduce::Moments or reduce::Sums2, each
// State::kFloats floats), begin(c, L) for the channel of the thread's data, and
// add<K>(state, flat element offset) for a unit.

template <typename T>
struct StatsPolicy {
  using State = reduce::Moments;
  const T* x;
  float shift;

  __device__ __forceinline__ void begin(std::int64_t c, std::int64_t L) { shift = to_float(x[c * L]); }

  template <int K>
  __device__ __forceinline__ void add(State& s, std::int64_t at) const {
    float v[K];
    load_unit_ro<T, K>(x + at, v);  // no kernel of the stats writes x
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] -= shift;
    s = reduce::combine(s, reduce::moments_of(v));
  }
};

// (sum dy, sum dy xc), xc = (x - hi) - lo for mean[c] = hi + lo; kReadsX false: only
// sum dy (x and mean unused). A template flag, not a null test in the loop: the branch
// in the loop made ptxas spill the 16-bit, 16-byte-unit segment partials.
template <typename T, bool kReadsX>
struct GradSumsPolicy {
  using State = reduce::Sums2;
  const T* dy;
  const T* x;
  const double* mean;
  reduce::SplitMean m;

  __device__ __forceinline__ void begin(std::int64_t c, std::int64_t /*L*/) {
    if constexpr (kReadsX) m = reduce::split_mean(__ldg(mean + c));
  }

  template <int K>
  __device__ __forceinline__ void add(State& s, std::int64_t at) const {
    float g[K];
    load_unit_ro<T, K>(dy + at, g);  // the partials run before dx is written
    if constexpr (!kReadsX) {
#pragma unroll
      for (int j = 0; j < K; ++j) s.a += g[j];
      return;
    }
    float xv[K];
    load_unit_ro<T, K>(x + at, xv);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const float xc = reduce::centered(xv[j], m);
      s.a += g[j];
      s.b = fmaf(g[j], xc, s.b);
    }
  }
};

// ---------------------------------------------------------------------------
// Partials.

// Block (c, q): units [q * chunk, (q + 1) * chunk) of channel c, a unit being K
// elements of a segment (L % K == 0). Slot (c * Q + q).
template <class Policy, int K>
__global__ void __launch_bounds__(kThreads)
    channel_partials_segments(Policy policy, float* part, std::int64_t N, std::int64_t C, std::int64_t L,
                              std::int64_t chunk, int Q) {
  using State = typename Policy::State;
  const std::int64_t c = blockIdx.x;
  const int q = static_cast<int>(blockIdx.y);
  Policy pol = policy;
  pol.begin(c, L);
  const std::int64_t seg_units = L / K;
  const std::int64_t u_end = std::min(N * seg_units, (q + 1) * chunk);
  std::int64_t u = q * chunk + threadIdx.x;

  State s{};
  if (u < u_end) {
    // Unit u is at segment n, position l; a step of kThreads units moves both.
    std::int64_t n = u / seg_units;
    std::int64_t l = u - n * seg_units;
    const std::int64_t step_n = kThreads / seg_units;
    const std::int64_t step_l = kThreads % seg_units;
    for (; u < u_end; u += kThreads) {
      pol.template add<K>(s, (n * C + c) * L + l * K);
      n += step_n;
      l += step_l;
      if (l >= seg_units) {
        l -= seg_units;
        ++n;
      }
    }
  }
  s = reduce::block_combine<kThreads>(s);
  if (threadIdx.x == 0) reduce::store_slot(part + (c * Q + q) * State::kFloats, s);
}

// Block (column block bx, part p) of the (rows, W) matrix, W = C * L: rows
// [p * rows_per_part, ...) of `lanes` columns (a power of two <= 32). Slot
// (col * P + p) = (c * (L * P) + l * P + p).
template <class Policy>
__global__ void __launch_bounds__(kThreads)
    channel_partials_columns(Policy policy, float* part, std::int64_t rows, std::int64_t W, std::int64_t L, int lanes,
                             std::int64_t rows_per_part, int P) {
  using State = typename Policy::State;
  __shared__ State cells[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % lanes;
  const int phase = tid / lanes;
  const int phases = kThreads / lanes;
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * lanes + lane;
  const int p = static_cast<int>(blockIdx.y);
  const std::int64_t r0 = static_cast<std::int64_t>(p) * rows_per_part;
  const std::int64_t r1 = std::min(rows, r0 + rows_per_part);

  State s{};
  if (col < W) {
    Policy pol = policy;
    pol.begin(col / L, L);
#pragma unroll 4
    for (std::int64_t r = r0 + phase; r < r1; r += phases) pol.template add<1>(s, r * W + col);
  }
  cells[tid] = s;
  __syncthreads();
  if (tid < lanes && col < W) {
    State total = cells[lane];
    for (int ph = 1; ph < phases; ++ph) total = reduce::combine(total, cells[ph * lanes + lane]);
    reduce::store_slot(part + (col * P + p) * State::kFloats, total);
  }
}

// ---------------------------------------------------------------------------
// Finish: a warp per channel combines the channel's Q slots and hands the total to out.

constexpr int kFinishWarps = kThreads / kWarp;

template <class Out>
__global__ void __launch_bounds__(kThreads) channel_finish(const float* part, std::int64_t C, int Q, Out out) {
  using State = typename Out::State;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kFinishWarps + threadIdx.x / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (c >= C) return;  // uniform per warp
  State s{};
  for (int q = lane; q < Q; q += kWarp) {
    s = reduce::combine(s, reduce::load_slot<State>(part + (c * Q + q) * State::kFloats));
  }
  s = reduce::warp_combine(s);
  if (lane == 0) out(c, s);
}

template <typename T>
struct StatsOut {
  using State = reduce::Moments;
  const T* x;
  double* mean;
  float* var;
  std::int64_t L;
  float inv_count;

  __device__ __forceinline__ void operator()(std::int64_t c, const State& s) const {
    // The shift the partials used plus the shifted mean: exact in double.
    mean[c] = static_cast<double>(to_float(x[c * L])) + static_cast<double>(s.mean);
    var[c] = s.m2 * inv_count;
  }
};

// dw = sum dy xhat, db = sum dy (either may be null), and for the training dx
// coef[c] = (mean dy, invstd * mean(dy xhat)) (null otherwise).
constexpr int kCoefFloats = 2;

template <typename T>
struct GradOut {
  using State = reduce::Sums2;
  const float* invstd;
  T* dw;
  T* db;
  float* coef;
  float inv_count;

  __device__ __forceinline__ void operator()(std::int64_t c, const State& s) const {
    const float is = invstd != nullptr ? __ldg(invstd + c) : 0.f;
    const float sum_dy_xhat = is * s.b;
    if (dw != nullptr) dw[c] = from_float<T>(sum_dy_xhat);
    if (db != nullptr) db[c] = from_float<T>(s.a);
    if (coef != nullptr) {
      coef[c * kCoefFloats + 0] = s.a * inv_count;
      coef[c * kCoefFloats + 1] = is * sum_dy_xhat * inv_count;
    }
  }
};

// ---------------------------------------------------------------------------
// Elementwise maps over the flat (N, C, L) tensor: a thread per unit of K elements
// (16-byte units when every pointer is aligned; the last unit may be partial), the
// channel of each element stepped from the unit's first one.

template <typename T, int K>
__device__ __forceinline__ void load_guarded(const T* p, int count, float (&v)[K]) {
  if (count == K) {
    load_unit<T, K>(p, v);
    return;
  }
#pragma unroll
  for (int j = 0; j < K; ++j) v[j] = j < count ? to_float(p[j]) : 0.f;
}

template <typename T, int K>
__device__ __forceinline__ void store_guarded(T* p, int count, const float (&v)[K]) {
  if (count == K) {
    store_unit<T, K>(p, v);
    return;
  }
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (j < count) p[j] = from_float<T>(v[j]);
  }
}

// y = ((x - hi) - lo) * (invstd * w) + b, mean = hi + lo.
template <typename T>
struct ApplyOp {
  const T* x;
  const double* mean;
  const float* invstd;
  const T* w;
  const T* b;
  struct Coef {
    reduce::SplitMean m;
    float k, b;
  };
  static constexpr bool kReadsSecond = false;

  __device__ __forceinline__ Coef coef(int c) const {
    const float k = __ldg(invstd + c) * (w != nullptr ? to_float(w[c]) : 1.f);
    return {reduce::split_mean(__ldg(mean + c)), k, b != nullptr ? to_float(b[c]) : 0.f};
  }
  __device__ __forceinline__ const T* first() const { return x; }
  __device__ __forceinline__ const T* second() const { return nullptr; }
  __device__ __forceinline__ float operator()(const Coef& k, float xv, float /*unused*/) const {
    return fmaf(reduce::centered(xv, k.m), k.k, k.b);
  }
};

// training: dx = k ((dy - mean dy) - ((x - hi) - lo) g), k = w invstd, mean = hi + lo,
// (mean dy, g) from coef; eval: dx = k dy.
template <typename T, bool TRAIN>
struct DxOp {
  const T* dy;
  const T* x;
  const double* mean;
  const float* invstd;
  const T* w;
  const float* channel_coef;
  struct Coef {
    float k;
    reduce::SplitMean m;
    float mdy, g;
  };
  static constexpr bool kReadsSecond = TRAIN;

  __device__ __forceinline__ Coef coef(int c) const {
    const float k = __ldg(invstd + c) * (w != nullptr ? to_float(w[c]) : 1.f);
    if constexpr (TRAIN) {
      return {k, reduce::split_mean(__ldg(mean + c)), channel_coef[c * kCoefFloats + 0],
              channel_coef[c * kCoefFloats + 1]};
    } else {
      return {k, {0.f, 0.f}, 0.f, 0.f};
    }
  }
  __device__ __forceinline__ const T* first() const { return dy; }
  __device__ __forceinline__ const T* second() const { return x; }
  __device__ __forceinline__ float operator()(const Coef& k, float g, float xv) const {
    if constexpr (TRAIN) {
      return k.k * ((g - k.mdy) - reduce::centered(xv, k.m) * k.g);
    } else {
      return k.k * g;
    }
  }
};

template <typename T, int K, typename Index, class Op>
__global__ void __launch_bounds__(kThreads)
    channel_map(Op op, T* out, Index total, Index L, Index C) {
  const Index e0 = (static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x) * K;
  if (e0 >= total) return;
  const int count = e0 + K <= total ? K : static_cast<int>(total - e0);
  float a[K];
  float b[K];
  load_guarded<T, K>(op.first() + e0, count, a);
  if constexpr (Op::kReadsSecond) load_guarded<T, K>(op.second() + e0, count, b);

  const Index seg = e0 / L;
  Index l = e0 - seg * L;
  int c = static_cast<int>(seg % C);
  int cached = -1;
  typename Op::Coef k{};
  float o[K];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (c != cached) {
      k = op.coef(c);
      cached = c;
    }
    o[j] = op(k, a[j], Op::kReadsSecond ? b[j] : 0.f);
    if (++l == L) {
      l = 0;
      if (++c == static_cast<int>(C)) c = 0;
    }
  }
  store_guarded<T, K>(out + e0, count, o);
}

// ---------------------------------------------------------------------------
// Host side.

// How a channel's reduction is cut into slots; a function of (N, C, L) only, so that
// the workspace size and the reduction order are fixed by the shape (and the alignment).
struct Partition {
  bool columns;
  std::int64_t slots;          // Q: slots per channel (an upper bound for segments)
  int lanes;                   // columns: columns per block (a power of two <= 32)
  int parts;                   // columns: P row parts
  std::int64_t rows_per_part;  // columns
};

Partition partition(std::int64_t N, std::int64_t C, std::int64_t L) {
  if (L < kSegmentMinL) {
    const std::int64_t W = C * L;
    int lanes = 1;
    while (lanes < kWarp && lanes < W) lanes *= 2;
    const std::int64_t col_blocks = ceil_div<std::int64_t>(W, lanes);
    const std::int64_t phases = kThreads / lanes;
    std::int64_t p = ceil_div<std::int64_t>(kTargetBlocks, col_blocks);
    p = std::min({p, kMaxColumnParts, ceil_div<std::int64_t>(N, phases * kMinRowsPerColumnThread)});
    p = std::max<std::int64_t>(p, 1);
    const std::int64_t rows_per_part = ceil_div<std::int64_t>(N, p);
    const int parts = static_cast<int>(ceil_div<std::int64_t>(N, rows_per_part));
    return {true, L * parts, lanes, parts, rows_per_part};
  }
  std::int64_t q = ceil_div<std::int64_t>(kTargetBlocks, C);
  q = std::min(q, ceil_div<std::int64_t>(N * L, kMinValuesPerSegmentBlock));
  return {false, std::max<std::int64_t>(q, 1), 0, 0, 0};
}

void check_shape(const char* where, std::int64_t N, std::int64_t C, std::int64_t L) {
  const std::pair<const char*, std::int64_t> dims[] = {{"N", N}, {"C", C}, {"L", L}};
  for (const auto& [name, value] : dims) {
    check_arg(value >= 0 && value <= INT_MAX, where,
              std::string(name) + " must be in [0, " + std::to_string(INT_MAX) + "], got " + std::to_string(value));
  }
  // N * C * L plus a block of units stays far inside int64.
  check_arg(N == 0 || C == 0 || L == 0 || N <= (std::int64_t{1} << 60) / C / L, where,
            "N * C * L is too large: " + std::to_string(N) + " * " + std::to_string(C) + " * " + std::to_string(L));
}

// Runs the partials of `policy` over x's layout and then the finish with `out`.
// aligned: every pointer the policy reads is 16-byte aligned.
template <typename T, class Policy, class Out>
void reduce_channels(const char* where, const Policy& policy, const Out& out, bool aligned, float* part,
                     std::int64_t N, std::int64_t C, std::int64_t L, cudaStream_t stream) {
  const Partition pt = partition(N, C, L);
  int slots;
  if (pt.columns) {
    const std::int64_t W = C * L;
    const dim3 grid(static_cast<unsigned>(ceil_div<std::int64_t>(W, pt.lanes)), static_cast<unsigned>(pt.parts));
    channel_partials_columns<Policy><<<grid, kThreads, 0, stream>>>(policy, part, N, W, L, pt.lanes,
                                                                    pt.rows_per_part, pt.parts);
    slots = static_cast<int>(pt.slots);
  } else {
    constexpr int kVec = Vec16<T>::kSize;
    auto launch = [&](auto unit) {
      constexpr int K = decltype(unit)::value;
      const std::int64_t units = N * (L / K);
      const std::int64_t chunk = ceil_div<std::int64_t>(units, pt.slots);
      const int q = static_cast<int>(ceil_div<std::int64_t>(units, chunk));  // <= pt.slots
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(q));
      channel_partials_segments<Policy, K><<<grid, kThreads, 0, stream>>>(policy, part, N, C, L, chunk, q);
      return q;
    };
    slots = aligned && L % kVec == 0 ? launch(IntC<kVec>{}) : launch(IntC<1>{});
  }
  check_cuda(cudaGetLastError(), where);
  const unsigned finish_blocks = static_cast<unsigned>(ceil_div<std::int64_t>(C, kFinishWarps));
  channel_finish<Out><<<finish_blocks, kThreads, 0, stream>>>(part, C, slots, out);
  check_cuda(cudaGetLastError(), where);
}

// Launches channel_map<T, K, Index, Op> over the N * C * L elements.
template <typename T, class Op>
void map_channels(const char* where, const Op& op, T* out, bool aligned, std::int64_t N, std::int64_t C,
                  std::int64_t L, cudaStream_t stream) {
  const std::int64_t total = N * C * L;
  auto launch = [&](auto unit, auto index) {
    constexpr int K = decltype(unit)::value;
    using Index = typename decltype(index)::type;
    const std::int64_t blocks = ceil_div<std::int64_t>(ceil_div<std::int64_t>(total, K), kThreads);
    check_arg(blocks <= INT_MAX, where, "too many elements: " + std::to_string(total));
    channel_map<T, K, Index, Op><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        op, out, static_cast<Index>(total), static_cast<Index>(L), static_cast<Index>(C));
  };
  auto by_index = [&](auto unit) {
    if (total < (std::int64_t{1} << 31)) {
      launch(unit, TypeTag<std::uint32_t>{});
    } else {
      launch(unit, TypeTag<std::uint64_t>{});
    }
  };
  if (aligned) {
    by_index(IntC<Vec16<T>::kSize>{});
  } else {
    by_index(IntC<1>{});
  }
  check_cuda(cudaGetLastError(), where);
}

}  // namespace

std::int64_t batch_norm_stats_workspace(std::int64_t N, std::int64_t C, std::int64_t L) {
  check_shape("batch_norm_stats_workspace", N, C, L);
  if (N * L == 0 || C == 0) return 0;
  return C * partition(N, C, L).slots * reduce::Moments::kFloats;
}

void batch_norm_stats(std::uintptr_t x, std::uintptr_t mean, std::uintptr_t var, std::uintptr_t workspace,
                      std::int64_t N, std::int64_t C, std::int64_t L, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "batch_norm_stats";
  check_dtype_code(kWhere, dtype);
  check_shape(kWhere, N, C, L);
  if (N * L == 0 || C == 0) return;
  check_required(kWhere, "x", x);
  check_required(kWhere, "mean", mean);
  check_aligned8(kWhere, "mean", mean);
  check_required(kWhere, "var", var);
  check_required(kWhere, "workspace", workspace);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const float inv_count = static_cast<float>(1.0 / static_cast<double>(N * L));
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const StatsPolicy<T> policy{as_const<T>(x), 0.f};
    const StatsOut<T> out{as_const<T>(x), as_mutable<double>(mean), as_mutable<float>(var), L, inv_count};
    reduce_channels<T>(kWhere, policy, out, all_aligned16({x}), as_mutable<float>(workspace), N, C, L, cuda_stream);
  });
}

void batch_norm_apply(std::uintptr_t x, std::uintptr_t mean, std::uintptr_t invstd, std::uintptr_t w,
                      std::uintptr_t b, std::uintptr_t y, std::int64_t N, std::int64_t C, std::int64_t L, int dtype,
                      std::uintptr_t stream) {
  constexpr const char* kWhere = "batch_norm_apply";
  check_dtype_code(kWhere, dtype);
  check_shape(kWhere, N, C, L);
  if (N * C * L == 0) return;
  check_required(kWhere, "x", x);
  check_required(kWhere, "mean", mean);
  check_aligned8(kWhere, "mean", mean);
  check_required(kWhere, "invstd", invstd);
  check_required(kWhere, "y", y);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const ApplyOp<T> op{as_const<T>(x), as_const<double>(mean), as_const<float>(invstd), as_const<T>(w),
                        as_const<T>(b)};
    map_channels<T>(kWhere, op, as_mutable<T>(y), all_aligned16({x, y}), N, C, L, cuda_stream);
  });
}

std::int64_t batch_norm_backward_workspace(std::int64_t N, std::int64_t C, std::int64_t L) {
  check_shape("batch_norm_backward_workspace", N, C, L);
  if (N * L == 0 || C == 0) return 0;
  return C * partition(N, C, L).slots * reduce::Sums2::kFloats + C * kCoefFloats;
}

void batch_norm_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t mean, std::uintptr_t invstd,
                         std::uintptr_t w, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
                         std::uintptr_t workspace, std::int64_t N, std::int64_t C, std::int64_t L, int training,
                         int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "batch_norm_backward";
  check_dtype_code(kWhere, dtype);
  check_shape(kWhere, N, C, L);
  check_arg(training == 0 || training == 1, kWhere, "training must be 0 or 1, got " + std::to_string(training));
  check_arg(dw == 0 || w != 0, kWhere, "dw was given but w is null (0): no weight, no weight gradient");
  if (C == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (N * L == 0) {
    // Sums over no values: dw = db = 0 (all-zero bits in every dtype); dx is empty.
    const std::size_t bytes = static_cast<std::size_t>(C) * dtype_bytes(dtype);
    if (dw != 0) check_cuda(cudaMemsetAsync(as_mutable<void>(dw), 0, bytes, cuda_stream), kWhere);
    if (db != 0) check_cuda(cudaMemsetAsync(as_mutable<void>(db), 0, bytes, cuda_stream), kWhere);
    return;
  }
  const bool train_dx = training == 1 && dx != 0;
  const bool want_sums = dw != 0 || db != 0 || train_dx;
  const bool sums_read_x = dw != 0 || train_dx;
  if (!want_sums && dx == 0) return;
  check_required(kWhere, "dy", dy);
  if (sums_read_x) {
    check_required(kWhere, "x", x);
    check_required(kWhere, "mean", mean);
    check_aligned8(kWhere, "mean", mean);
  }
  if (sums_read_x || dx != 0) check_required(kWhere, "invstd", invstd);
  if (want_sums) check_required(kWhere, "workspace", workspace);

  const Partition pt = partition(N, C, L);
  float* part = as_mutable<float>(workspace);
  float* coef = part + C * pt.slots * reduce::Sums2::kFloats;
  const float inv_count = static_cast<float>(1.0 / static_cast<double>(N * L));

  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    if (want_sums) {
      const GradOut<T> out{as_const<float>(invstd), as_mutable<T>(dw), as_mutable<T>(db), train_dx ? coef : nullptr,
                           inv_count};
      if (sums_read_x) {
        const GradSumsPolicy<T, true> policy{as_const<T>(dy), as_const<T>(x), as_const<double>(mean), {0.f, 0.f}};
        reduce_channels<T>(kWhere, policy, out, all_aligned16({dy, x}), part, N, C, L, cuda_stream);
      } else {
        const GradSumsPolicy<T, false> policy{as_const<T>(dy), nullptr, nullptr, {0.f, 0.f}};
        reduce_channels<T>(kWhere, policy, out, all_aligned16({dy}), part, N, C, L, cuda_stream);
      }
    }
    if (dx != 0) {
      if (train_dx) {
        const DxOp<T, true> op{as_const<T>(dy), as_const<T>(x), as_const<double>(mean), as_const<float>(invstd),
                               as_const<T>(w), coef};
        map_channels<T>(kWhere, op, as_mutable<T>(dx), all_aligned16({dy, x, dx}), N, C, L, cuda_stream);
      } else {
        const DxOp<T, false> op{as_const<T>(dy), nullptr, nullptr, as_const<float>(invstd), as_const<T>(w), nullptr};
        map_channels<T>(kWhere, op, as_mutable<T>(dx), all_aligned16({dy, dx}), N, C, L, cuda_stream);
      }
    }
  });
}

}  // namespace kiln
