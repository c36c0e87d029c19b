// Row-wise softmax / log_softmax and cross-entropy, forward and backward.
//
// Every kernel gives each row a group of G threads: a warp (G = 32, eight rows per
// block) for short rows, a whole block (G = 256 or 512) for long ones. A row is read
// once for its statistics: each thread keeps an online (running max m, sum s of
// exp(x - m)) pair, rescaling s whenever m grows, and the pairs merge through warp
// shuffles and then shared memory. Passes that write a row read it a second time.
// Columns go in three runs: a scalar head up to the first 16-byte boundary, whole
// 16-byte vectors, a scalar tail; so any C >= 1 and any row alignment works, and rows
// left misaligned by an odd C still move as vectors.
//
// Outputs may alias inputs of the same shape (in-place): every element is read and
// written by one thread, after the row's reductions, so there are no __ldg or
// __restrict__ promises on row data. Reductions run in a fixed order: deterministic.
//
// Precision at large |x|: outputs use x - m (exact for nearby floats) and log(s), never
// a rounded m + log(s), so softmax / log_softmax / the loss stay accurate at |x| ~ 1e4.
// Cross-entropy saves two float32 statistics per row, row_max m and row_logsum
// l = log(s), never their sum, so the backward's p = exp((x - m) - l) keeps that accuracy.
//
// Class-probability targets q (the soft kernels): u_c = w_c ((1 - eps) q_c + eps / C), as
// torch mixes smoothing into them; loss = ((m - ref) + l) U - sum_c u_c (x_c - ref) with
// U = sum_c u_c and ref = x_0 (so logits near 1e4 do not cancel), dx_c = g (U p_c - u_c).
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kiln/api.h"
#include "kiln/common.cuh"
#include "kiln/cross_entropy.h"
#include "kiln/reduce.cuh"

namespace kiln {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
using reduce::block_threads;
using reduce::kRowsPerWarpBlock;
using reduce::row_of_thread;
constexpr int kWarpMaxCols = 1024;    // C up to this: a warp per row
constexpr int kMediumMaxCols = 8192;  // C up to this: 256 threads per row; beyond: 512


// ---------------------------------------------------------------------------
// Online max / sum of exponentials.

struct MaxSum {
  float m;  // running maximum (-inf before the first value); NaN values never win it
  float s;  // sum of exp(x - m); a NaN value makes it NaN, which then propagates
};

// s * exp(m_old - m_new), exact when the maximum did not move (also when both are -inf).
__device__ __forceinline__ float rescale(float s, float m_old, float m_new) {
  return m_old == m_new ? s : s * expf(m_old - m_new);
}

// exp(v - m) for m = the current maximum; v == m gives 1 exactly, also for -inf and +inf.
__device__ __forceinline__ float exp_shifted(float v, float m) {
  return v == m ? 1.f : expf(v - m);
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  return {m, rescale(a.s, a.m, m) + rescale(b.s, b.m, m)};
}

__device__ __forceinline__ MaxSum update(MaxSum a, float v) {
  const float m = fmaxf(a.m, v);
  return {m, rescale(a.s, a.m, m) + exp_shifted(v, m)};
}

template <int K>
__device__ __forceinline__ MaxSum update(MaxSum a, const float (&v)[K]) {
  float vmax = v[0];
#pragma unroll
  for (int j = 1; j < K; ++j) vmax = fmaxf(vmax, v[j]);
  const float m = fmaxf(a.m, vmax);
  float s = rescale(a.s, a.m, m);
#pragma unroll
  for (int j = 0; j < K; ++j) s += exp_shifted(v[j], m);
  return {m, s};
}

// ---------------------------------------------------------------------------
// Reductions over the G threads of a row. G > 32 means one row per block: the
// barriers are then reached by the whole block. The trailing barrier lets the
// shared cells be reused by the next call.

template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  if constexpr (G > kWarp) {
    __shared__ float part[G / kWarp];
    if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = part[0];
#pragma unroll
    for (int w = 1; w < G / kWarp; ++w) v += part[w];
    __syncthreads();
  }
  return v;
}

template <int G>
__device__ __forceinline__ MaxSum group_max_sum(MaxSum a) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const MaxSum b{__shfl_xor_sync(kFullMask, a.m, o), __shfl_xor_sync(kFullMask, a.s, o)};
    a = merge(a, b);
  }
  if constexpr (G > kWarp) {
    __shared__ float part_m[G / kWarp];
    __shared__ float part_s[G / kWarp];
    if (threadIdx.x % kWarp == 0) {
      part_m[threadIdx.x / kWarp] = a.m;
      part_s[threadIdx.x / kWarp] = a.s;
    }
    __syncthreads();
    a = {part_m[0], part_s[0]};
#pragma unroll
    for (int w = 1; w < G / kWarp; ++w) a = merge(a, MaxSum{part_m[w], part_s[w]});
    __syncthreads();
  }
  return a;
}

// ---------------------------------------------------------------------------
// Row traversal.

template <typename T>
constexpr int kVecOf = Vec16<T>::kSize;

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVecOf<T>]) {
  Vec16<T> v;
  *reinterpret_cast<uint4*>(v.v) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int j = 0; j < kVecOf<T>; ++j) out[j] = to_float(v.v[j]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kVecOf<T>]) {
  Vec16<T> v;
#pragma unroll
  for (int j = 0; j < kVecOf<T>; ++j) v.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v.v);
}

// Columns before the first 16-byte boundary of row p (at most cols); cols (all scalar)
// when p is not even element-aligned.
template <typename T>
__device__ __forceinline__ int aligned_head(const T* p, int cols) {
  const auto addr = reinterpret_cast<std::uintptr_t>(p);
  if (addr % sizeof(T) != 0) return cols;
  const int mis = static_cast<int>((addr & 15u) / sizeof(T));
  const int head = mis == 0 ? 0 : kVecOf<T> - mis;
  return head < cols ? head : cols;
}

// Rows of two arrays can share one head only when they sit at the same offset mod 16.
__device__ __forceinline__ bool co_aligned(const void* a, const void* b) {
  return ((reinterpret_cast<std::uintptr_t>(a) ^ reinterpret_cast<std::uintptr_t>(b)) & 15u) == 0;
}

// Visits columns [0, cols) of a row, split among the G threads of its group (lane):
// scalar(c) for the head and the tail, vector(c) for the 16-byte runs at c.
template <typename T, int G, class Scalar, class Vector>
__device__ __forceinline__ void for_each_col(int cols, int head, int lane, Scalar&& scalar, Vector&& vector) {
  constexpr int K = kVecOf<T>;
  for (int c = lane; c < head; c += G) scalar(c);
  const int nvec = (cols - head) / K;
#pragma unroll 2
  for (int v = lane; v < nvec; v += G) vector(head + v * K);
  for (int c = head + nvec * K + lane; c < cols; c += G) scalar(c);
}


// The (max, sum) of one row, merged over its group.
template <typename T, int G>
__device__ __forceinline__ MaxSum row_max_sum(const T* xr, int cols, int head, int lane) {
  MaxSum acc{-INFINITY, 0.f};
  for_each_col<T, G>(
      cols, head, lane, [&](int c) { acc = update(acc, to_float(xr[c])); },
      [&](int c) {
        float v[kVecOf<T>];
        load_vec(xr + c, v);
        acc = update(acc, v);
      });
  return group_max_sum<G>(acc);
}

// ---------------------------------------------------------------------------
// Kernels.

// y = softmax(x) = exp((x - m) - log(s)), or log_softmax(x) = (x - m) - log(s).
template <typename T, int G, bool LOG>
__global__ void __launch_bounds__(block_threads<G>())
    softmax_forward_kernel(const T* x, T* y, std::int64_t rows, int cols) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const int head = co_aligned(xr, yr) ? aligned_head(xr, cols) : cols;

  const MaxSum ms = row_max_sum<T, G>(xr, cols, head, lane);
  const float m = ms.m;
  const float log_s = logf(ms.s);
  // No division (its IEEE slow path is a call that costs spills): exp((x - m) - log s).
  auto out = [&](float v) { return LOG ? (v - m) - log_s : expf((v - m) - log_s); };
  for_each_col<T, G>(
      cols, head, lane, [&](int c) { yr[c] = from_float<T>(out(to_float(xr[c]))); },
      [&](int c) {
        float v[kVecOf<T>];
        load_vec(xr + c, v);
#pragma unroll
        for (int j = 0; j < kVecOf<T>; ++j) v[j] = out(v[j]);
        store_vec(yr + c, v);
      });
}

// softmax: dx = y * (g - sum(g * y)); log_softmax: dx = g - exp(y) * sum(g).
template <typename T, int G, bool LOG>
__global__ void __launch_bounds__(block_threads<G>())
    softmax_backward_kernel(const T* grad_y, const T* y, T* grad_x, std::int64_t rows, int cols) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* gr = grad_y + row * cols;
  const T* yr = y + row * cols;
  T* dr = grad_x + row * cols;
  const int head = co_aligned(gr, yr) && co_aligned(gr, dr) ? aligned_head(gr, cols) : cols;

  float acc = 0.f;
  for_each_col<T, G>(
      cols, head, lane,
      [&](int c) {
        const float g = to_float(gr[c]);
        acc += LOG ? g : g * to_float(yr[c]);
      },
      [&](int c) {
        float g[kVecOf<T>];
        load_vec(gr + c, g);
        if constexpr (LOG) {
#pragma unroll
          for (int j = 0; j < kVecOf<T>; ++j) acc += g[j];
        } else {
          float yv[kVecOf<T>];
          load_vec(yr + c, yv);
#pragma unroll
          for (int j = 0; j < kVecOf<T>; ++j) acc += g[j] * yv[j];
        }
      });
  const float total = group_sum<G>(acc);
  auto out = [&](float g, float yv) { return LOG ? g - expf(yv) * total : yv * (g - total); };
  for_each_col<T, G>(
      cols, head, lane, [&](int c) { dr[c] = from_float<T>(out(to_float(gr[c]), to_float(yr[c]))); },
      [&](int c) {
        float g[kVecOf<T>];
        float yv[kVecOf<T>];
        load_vec(gr + c, g);
        load_vec(yr + c, yv);
#pragma unroll
        for (int j = 0; j < kVecOf<T>; ++j) g[j] = out(g[j], yv[j]);
        store_vec(dr + c, g);
      });
}

__device__ __forceinline__ float class_weight(const float* weight, std::int64_t c) {
  return weight != nullptr ? __ldg(weight + c) : 1.f;
}

// One pass: m, l = log(s), and with label smoothing sum_c w_c (x_c - x_0) and
// sum_c w_c, shifted by x_0 so that logits near 1e4 do not cancel.
// loss = (1 - eps) w_t ((m - x_t) + l) + (eps / C) (sum_c w_c (m - x_c) + S_w l), never
// forming m + l; eps / C comes from the host (smoothing_per_class), which keeps IEEE
// division out of the kernels.
template <typename T, int G>
__global__ void __launch_bounds__(block_threads<G>())
    cross_entropy_forward_kernel(const T* logits, const std::int64_t* target, const float* weight, float* loss,
                                 float* row_max, float* row_logsum, std::int64_t rows, int cols, std::int64_t ignore_index,
                                 float smoothing, float smoothing_per_class) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* xr = logits + row * cols;
  const int head = aligned_head(xr, cols);
  const bool smooth = smoothing != 0.f;
  const float ref = to_float(xr[0]);

  MaxSum acc{-INFINITY, 0.f};
  float wx = 0.f;  // sum_c w_c (x_c - ref)
  float ws = 0.f;  // sum_c w_c
  auto visit = [&](int c, float v) {
    if (smooth) {
      const float w = class_weight(weight, c);
      wx += w * (v - ref);
      ws += w;
    }
  };
  for_each_col<T, G>(
      cols, head, lane,
      [&](int c) {
        const float v = to_float(xr[c]);
        acc = update(acc, v);
        visit(c, v);
      },
      [&](int c) {
        float v[kVecOf<T>];
        load_vec(xr + c, v);
        acc = update(acc, v);
#pragma unroll
        for (int j = 0; j < kVecOf<T>; ++j) visit(c + j, v[j]);
      });
  acc = group_max_sum<G>(acc);
  if (smooth) {
    wx = group_sum<G>(wx);
    ws = group_sum<G>(ws);
  }
  if (lane != 0) return;

  const float log_s = logf(acc.s);
  const std::int64_t t = target[row];
  float result;
  if (t == ignore_index) {
    result = 0.f;
  } else if (t < 0 || t >= cols) {
    result = NAN;  // the caller checks for it
  } else {
    const float nll = (acc.m - to_float(xr[t])) + log_s;  // (m - x_t) + l
    result = (1.f - smoothing) * class_weight(weight, t) * nll;
    if (smooth) {
      // sum_c w_c (m - x_c) + S_w l = ((m - ref) + l) S_w - sum_c w_c (x_c - ref)
      const float m_minus_ref_plus_l = (acc.m - ref) + log_s;
      result += smoothing_per_class * (m_minus_ref_plus_l * ws - wx);
    }
  }
  loss[row] = result;
  row_max[row] = acc.m;
  row_logsum[row] = log_s;
}

// dx_c = g ((1 - eps) w_t (p_c - [c == t]) + (eps / C) (S_w p_c - w_c))
//      = a p_c - b [c == t] - d w_c,  p_c = exp((x_c - m) - l) from the saved
// row_max m and row_logsum l.
template <typename T, int G>
__global__ void __launch_bounds__(block_threads<G>())
    cross_entropy_backward_kernel(const float* grad_loss, const T* logits, const std::int64_t* target,
                                  const float* weight, const float* row_max, const float* row_logsum,
                                  T* grad_logits, std::int64_t rows, int cols,
                                  std::int64_t ignore_index, float smoothing, float smoothing_per_class) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* xr = logits + row * cols;
  T* dr = grad_logits + row * cols;
  const int head = co_aligned(xr, dr) ? aligned_head(xr, cols) : cols;
  const std::int64_t t = target[row];

  if (t == ignore_index || t < 0 || t >= cols) {
    const float fill = t == ignore_index ? 0.f : NAN;
    for_each_col<T, G>(
        cols, head, lane, [&](int c) { dr[c] = from_float<T>(fill); },
        [&](int c) {
          float v[kVecOf<T>];
#pragma unroll
          for (int j = 0; j < kVecOf<T>; ++j) v[j] = fill;
          store_vec(dr + c, v);
        });
    return;
  }

  const bool smooth = smoothing != 0.f;
  float sum_w = static_cast<float>(cols);
  if (smooth && weight != nullptr) {
    float acc = 0.f;
    for (int c = lane; c < cols; c += G) acc += __ldg(weight + c);
    sum_w = group_sum<G>(acc);
  }
  const float shift = row_max[row];     // p_c = exp((x_c - m) - l)
  const float log_s = row_logsum[row];
  const float g = grad_loss[row];
  const float w_t = class_weight(weight, t);
  const float eps_c = smoothing_per_class;
  const float a = g * ((1.f - smoothing) * w_t + eps_c * sum_w);
  const float b = g * (1.f - smoothing) * w_t;
  const float d = g * eps_c;
  const int tc = static_cast<int>(t);
  auto out = [&](int c, float v) {
    float r = a * expf((v - shift) - log_s);
    if (c == tc) r -= b;
    if (smooth) r -= d * class_weight(weight, c);
    return r;
  };
  for_each_col<T, G>(
      cols, head, lane, [&](int c) { dr[c] = from_float<T>(out(c, to_float(xr[c]))); },
      [&](int c) {
        float v[kVecOf<T>];
        load_vec(xr + c, v);
#pragma unroll
        for (int j = 0; j < kVecOf<T>; ++j) v[j] = out(c + j, v[j]);
        store_vec(dr + c, v);
      });
}

// u_c = w_c ((1 - eps) q_c + eps / C): the weight of class c in a soft-target row.
__device__ __forceinline__ float soft_weight(const float* weight, int c, float q, float keep, float eps_c) {
  return class_weight(weight, c) * fmaf(keep, q, eps_c);
}

// loss = ((m - ref) + l) U - sum_c u_c (x_c - ref), one pass over the logits and targets.
template <typename T, int G>
__global__ void __launch_bounds__(block_threads<G>())
    cross_entropy_soft_forward_kernel(const T* logits, const T* target, const float* weight, float* loss,
                                      float* row_max, float* row_logsum, std::int64_t rows, int cols,
                                      float keep, float smoothing_per_class) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* xr = logits + row * cols;
  const T* qr = target + row * cols;
  const int head = co_aligned(xr, qr) ? aligned_head(xr, cols) : cols;
  const float ref = to_float(xr[0]);

  MaxSum acc{-INFINITY, 0.f};
  float ux = 0.f;  // sum_c u_c (x_c - ref)
  float us = 0.f;  // sum_c u_c
  auto visit = [&](int c, float v, float q) {
    const float u = soft_weight(weight, c, q, keep, smoothing_per_class);
    ux = fmaf(u, v - ref, ux);
    us += u;
  };
  for_each_col<T, G>(
      cols, head, lane,
      [&](int c) {
        const float v = to_float(xr[c]);
        acc = update(acc, v);
        visit(c, v, to_float(qr[c]));
      },
      [&](int c) {
        float v[kVecOf<T>];
        float q[kVecOf<T>];
        load_vec(xr + c, v);
        load_vec(qr + c, q);
        acc = update(acc, v);
#pragma unroll
        for (int j = 0; j < kVecOf<T>; ++j) visit(c + j, v[j], q[j]);
      });
  acc = group_max_sum<G>(acc);
  ux = group_sum<G>(ux);
  us = group_sum<G>(us);
  if (lane != 0) return;
  const float log_s = logf(acc.s);
  loss[row] = ((acc.m - ref) + log_s) * us - ux;
  row_max[row] = acc.m;
  row_logsum[row] = log_s;
}

// dx_c = g (U p_c - u_c), p_c = exp((x_c - m) - l); U from a first pass over the targets.
template <typename T, int G>
__global__ void __launch_bounds__(block_threads<G>())
    cross_entropy_soft_backward_kernel(const float* grad_loss, const T* logits, const T* target,
                                       const float* weight, const float* row_max, const float* row_logsum,
                                       T* grad_logits, std::int64_t rows, int cols, float keep,
                                       float smoothing_per_class) {
  std::int64_t row;
  int lane;
  if (!row_of_thread<G>(rows, row, lane)) return;
  const T* xr = logits + row * cols;
  const T* qr = target + row * cols;
  T* dr = grad_logits + row * cols;
  const int head = co_aligned(xr, qr) && co_aligned(xr, dr) ? aligned_head(xr, cols) : cols;

  float us = 0.f;
  for_each_col<T, G>(
      cols, head, lane, [&](int c) { us += soft_weight(weight, c, to_float(qr[c]), keep, smoothing_per_class); },
      [&](int c) {
        float q[kVecOf<T>];
        load_vec(qr + c, q);
#pragma unroll
        for (int j = 0; j < kVecOf<T>; ++j) us += soft_weight(weight, c + j, q[j], keep, smoothing_per_class);
      });
  us = group_sum<G>(us);
  const float g = grad_loss[row];
  const float a = g * us;
  const float shift = row_max[row];
  const float log_s = row_logsum[row];
  auto out = [&](int c, float v, float q) {
    return a * expf((v - shift) - log_s) - g * soft_weight(weight, c, q, keep, smoothing_per_class);
  };
  for_each_col<T, G>(
      cols, head, lane, [&](int c) { dr[c] = from_float<T>(out(c, to_float(xr[c]), to_float(qr[c]))); },
      [&](int c) {
        float v[kVecOf<T>];
        float q[kVecOf<T>];
        load_vec(xr + c, v);
        load_vec(qr + c, q);
#pragma unroll
        for (int j = 0; j < kVecOf<T>; ++j) v[j] = out(c + j, v[j], q[j]);
        store_vec(dr + c, v);
      });
}

// ---------------------------------------------------------------------------
// Host side.

// Keeps every in-kernel column index (plus a vector) inside int.
constexpr std::int64_t kMaxCols = INT_MAX - 1024;

// Calls f(TypeTag<T>, integral_constant<int, G>) for the dtype code and row length.
template <class F>
void dispatch(int dtype, std::int64_t cols, F&& f) {
  auto by_cols = [&](auto type) {
    if (cols <= kWarpMaxCols) {
      f(type, std::integral_constant<int, kWarp>{});
    } else if (cols <= kMediumMaxCols) {
      f(type, std::integral_constant<int, 256>{});
    } else {
      f(type, std::integral_constant<int, 512>{});
    }
  };
  switch (dtype) {
    case kFloat32: by_cols(TypeTag<float>{}); break;
    case kFloat16: by_cols(TypeTag<__half>{}); break;
    case kBFloat16: by_cols(TypeTag<__nv_bfloat16>{}); break;
    default: break;  // rejected by check_dtype
  }
}

void check_dtype(const char* where, int dtype) {
  check_arg(dtype >= 0 && dtype < kNumDTypes, where,
            "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
}

void check_flag(const char* where, const char* name, int value) {
  check_arg(value == 0 || value == 1, where, std::string(name) + " must be 0 or 1, got " + std::to_string(value));
}

void check_shape(const char* where, const char* rows_name, std::int64_t rows, std::int64_t cols) {
  check_arg(rows >= 0, where, std::string(rows_name) + " must be >= 0, got " + std::to_string(rows));
  check_arg(cols >= 0 && cols <= kMaxCols, where,
            "C must be in [0, " + std::to_string(kMaxCols) + "], got " + std::to_string(cols));
}

void check_smoothing(const char* where, double smoothing) {
  check_arg(smoothing >= 0.0 && smoothing <= 1.0, where,
            "label_smoothing must be in [0, 1], got " + std::to_string(smoothing));
}

// A tensor with elements must have a pointer; an empty one may be null.
void check_pointer(const char* where, const char* name, std::uintptr_t ptr, std::int64_t elements) {
  check_arg(ptr != 0 || elements == 0, where,
            std::string(name) + " is null but has " + std::to_string(elements) + " elements");
}

// Blocks for `rows` rows at G threads per row.
template <int G>
unsigned row_blocks(const char* where, std::int64_t rows) {
  constexpr int kRowsPerBlock = block_threads<G>() / G;
  const std::int64_t blocks = ceil_div<std::int64_t>(rows, kRowsPerBlock);
  check_arg(blocks <= INT_MAX, where, "too many rows: " + std::to_string(rows));
  return static_cast<unsigned>(blocks);
}

}  // namespace

void softmax_forward(std::uintptr_t x, std::uintptr_t y, std::int64_t R, std::int64_t C, int log, int dtype,
                     std::uintptr_t stream) {
  constexpr const char* kWhere = "softmax_forward";
  check_dtype(kWhere, dtype);
  check_flag(kWhere, "log", log);
  check_shape(kWhere, "R", R, C);
  if (R == 0 || C == 0) return;
  check_pointer(kWhere, "x", x, R * C);
  check_pointer(kWhere, "y", y, R * C);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, C, [&](auto type, auto group) {
    using T = typename decltype(type)::type;
    constexpr int G = decltype(group)::value;
    const unsigned blocks = row_blocks<G>(kWhere, R);
    if (log) {
      softmax_forward_kernel<T, G, true><<<blocks, block_threads<G>(), 0, cuda_stream>>>(
          as_const<T>(x), as_mutable<T>(y), R, static_cast<int>(C));
    } else {
      softmax_forward_kernel<T, G, false><<<blocks, block_threads<G>(), 0, cuda_stream>>>(
          as_const<T>(x), as_mutable<T>(y), R, static_cast<int>(C));
    }
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void softmax_backward(std::uintptr_t grad_y, std::uintptr_t y, std::uintptr_t grad_x, std::int64_t R,
                      std::int64_t C, int log, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "softmax_backward";
  check_dtype(kWhere, dtype);
  check_flag(kWhere, "log", log);
  check_shape(kWhere, "R", R, C);
  if (R == 0 || C == 0) return;
  check_pointer(kWhere, "grad_y", grad_y, R * C);
  check_pointer(kWhere, "y", y, R * C);
  check_pointer(kWhere, "grad_x", grad_x, R * C);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, C, [&](auto type, auto group) {
    using T = typename decltype(type)::type;
    constexpr int G = decltype(group)::value;
    const unsigned blocks = row_blocks<G>(kWhere, R);
    if (log) {
      softmax_backward_kernel<T, G, true><<<blocks, block_threads<G>(), 0, cuda_stream>>>(
          as_const<T>(grad_y), as_const<T>(y), as_mutable<T>(grad_x), R, static_cast<int>(C));
    } else {
      softmax_backward_kernel<T, G, false><<<blocks, block_threads<G>(), 0, cuda_stream>>>(
          as_const<T>(grad_y), as_const<T>(y), as_mutable<T>(grad_x), R, static_cast<int>(C));
    }
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void cross_entropy_forward(std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight, std::uintptr_t loss,
                           std::uintptr_t row_max, std::uintptr_t row_logsum, std::int64_t N, std::int64_t C,
                           std::int64_t ignore_index, double label_smoothing, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "cross_entropy_forward";
  check_dtype(kWhere, dtype);
  check_shape(kWhere, "N", N, C);
  check_smoothing(kWhere, label_smoothing);
  if (N == 0) return;
  check_arg(C >= 1, kWhere, "C must be >= 1 when N > 0, got " + std::to_string(C));
  check_pointer(kWhere, "logits", logits, N * C);
  check_pointer(kWhere, "target", target, N);
  check_pointer(kWhere, "loss", loss, N);
  check_pointer(kWhere, "row_max", row_max, N);
  check_pointer(kWhere, "row_logsum", row_logsum, N);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, C, [&](auto type, auto group) {
    using T = typename decltype(type)::type;
    constexpr int G = decltype(group)::value;
    const unsigned blocks = row_blocks<G>(kWhere, N);
    cross_entropy_forward_kernel<T, G><<<blocks, block_threads<G>(), 0, cuda_stream>>>(
        as_const<T>(logits), as_const<std::int64_t>(target), as_const<float>(weight), as_mutable<float>(loss),
        as_mutable<float>(row_max), as_mutable<float>(row_logsum), N, static_cast<int>(C), ignore_index, static_cast<float>(label_smoothing),
        static_cast<float>(label_smoothing / static_cast<double>(C)));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void cross_entropy_backward(std::uintptr_t grad_loss, std::uintptr_t logits, std::uintptr_t target,
                            std::uintptr_t weight, std::uintptr_t row_max, std::uintptr_t row_logsum,
                            std::uintptr_t grad_logits, std::int64_t N, std::int64_t C, std::int64_t ignore_index,
                            double label_smoothing, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "cross_entropy_backward";
  check_dtype(kWhere, dtype);
  check_shape(kWhere, "N", N, C);
  check_smoothing(kWhere, label_smoothing);
  if (N == 0) return;
  check_pointer(kWhere, "row_max", row_max, N);
  check_pointer(kWhere, "row_logsum", row_logsum, N);
  if (C == 0) return;
  check_pointer(kWhere, "grad_loss", grad_loss, N);
  check_pointer(kWhere, "logits", logits, N * C);
  check_pointer(kWhere, "target", target, N);
  check_pointer(kWhere, "grad_logits", grad_logits, N * C);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, C, [&](auto type, auto group) {
    using T = typename decltype(type)::type;
    constexpr int G = decltype(group)::value;
    const unsigned blocks = row_blocks<G>(kWhere, N);
    cross_entropy_backward_kernel<T, G><<<blocks, block_threads<G>(), 0, cuda_stream>>>(
        as_const<float>(grad_loss), as_const<T>(logits), as_const<std::int64_t>(target), as_const<float>(weight),
        as_const<float>(row_max), as_const<float>(row_logsum), as_mutable<T>(grad_logits), N, static_cast<int>(C), ignore_index,
        static_cast<float>(label_smoothing), static_cast<float>(label_smoothing / static_cast<double>(C)));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void cross_entropy_soft_forward(std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight,
                                std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t row_logsum, std::int64_t N,
                                std::int64_t C, double label_smoothing, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "cross_entropy_soft_forward";
  check_dtype(kWhere, dtype);
  check_shape(kWhere, "N", N, C);
  check_smoothing(kWhere, label_smoothing);
  if (N == 0) return;
  check_arg(C >= 1, kWhere, "C must be >= 1 when N > 0, got " + std::to_string(C));
  check_pointer(kWhere, "logits", logits, N * C);
  check_pointer(kWhere, "target", target, N * C);
  check_pointer(kWhere, "loss", loss, N);
  check_pointer(kWhere, "row_max", row_max, N);
  check_pointer(kWhere, "row_logsum", row_logsum, N);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, C, [&](auto type, auto group) {
    using T = typename decltype(type)::type;
    constexpr int G = decltype(group)::value;
    const unsigned blocks = row_blocks<G>(kWhere, N);
    cross_entropy_soft_forward_kernel<T, G><<<blocks, block_threads<G>(), 0, cuda_stream>>>(
        as_const<T>(logits), as_const<T>(target), as_const<float>(weight), as_mutable<float>(loss),
        as_mutable<float>(row_max), as_mutable<float>(row_logsum), N, static_cast<int>(C),
        static_cast<float>(1.0 - label_smoothing), static_cast<float>(label_smoothing / static_cast<double>(C)));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void cross_entropy_soft_backward(std::uintptr_t grad_loss, std::uintptr_t logits, std::uintptr_t target,
                                 std::uintptr_t weight, std::uintptr_t row_max, std::uintptr_t row_logsum,
                                 std::uintptr_t grad_logits, std::int64_t N, std::int64_t C, double label_smoothing,
                                 int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "cross_entropy_soft_backward";
  check_dtype(kWhere, dtype);
  check_shape(kWhere, "N", N, C);
  check_smoothing(kWhere, label_smoothing);
  if (N == 0 || C == 0) return;
  check_pointer(kWhere, "grad_loss", grad_loss, N);
  check_pointer(kWhere, "logits", logits, N * C);
  check_pointer(kWhere, "target", target, N * C);
  check_pointer(kWhere, "row_max", row_max, N);
  check_pointer(kWhere, "row_logsum", row_logsum, N);
  check_pointer(kWhere, "grad_logits", grad_logits, N * C);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, C, [&](auto type, auto group) {
    using T = typename decltype(type)::type;
    constexpr int G = decltype(group)::value;
    const unsigned blocks = row_blocks<G>(kWhere, N);
    cross_entropy_soft_backward_kernel<T, G><<<blocks, block_threads<G>(), 0, cuda_stream>>>(
        as_const<float>(grad_loss), as_const<T>(logits), as_const<T>(target), as_const<float>(weight),
        as_const<float>(row_max), as_const<float>(row_logsum), as_mutable<T>(grad_logits), N, static_cast<int>(C),
        static_cast<float>(1.0 - label_smoothing), static_cast<float>(label_smoothing / static_cast<double>(C)));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

}  // namespace kiln
