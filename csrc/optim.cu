// Fused optimizer steps over many tensors in one launch, as apex's multi_tensor_apply.
//
// The table (kiln/optim.h, kernels/multi_tensor.py) lives in device memory, so one launch
// covers any number of tensors (apex packs up to ~100 pointers in kernel arguments and
// launches again for more). Block b reads its chunk's tensor and first element, then the
// addresses of that tensor in each list; each thread moves kIlp elements per iteration
// (loads of all of them first, then the math, then the stores: kIlp independent memory
// requests in flight per thread), strided by the block so that every access is coalesced.
// Math in float32 (float64 for float64 storage); state tensors keep the storage dtype.
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kiln/common.cuh"
#include "kiln/dispatch.cuh"
#include "kiln/optim.h"

namespace kiln {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;
constexpr int kFloat64 = 3;  // the optimizers' extra dtype code (kiln.ops.optim.CUDA_DTYPE_CODE)

template <typename T>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};

template <typename M, typename T>
__device__ __forceinline__ M load_math(const T* p) {
  if constexpr (std::is_same_v<T, double>) {
    return *p;
  } else {
    return static_cast<M>(to_float<T>(*p));
  }
}

template <typename T, typename M>
__device__ __forceinline__ void store_math(T* p, M v) {
  if constexpr (std::is_same_v<T, double>) {
    *p = v;
  } else {
    *p = from_float<T>(static_cast<float>(v));
  }
}

// This block's chunk: tensor t, first element start, n elements; and the table's views.
struct Chunk {
  const std::int64_t* table;
  std::int64_t tensors;
  std::int64_t t;
  std::int64_t start;
  std::int64_t n;
  const double* scalars;

  template <typename T>
  __device__ T* tensor(int list) const {
    return reinterpret_cast<T*>(table[list * tensors + t]) + start;
  }
  __device__ double scalar(int row) const { return scalars[row * tensors + t]; }
};

__device__ __forceinline__ Chunk block_chunk(const std::int64_t* table, int lists, std::int64_t tensors,
                                             std::int64_t chunks, std::int64_t chunk) {
  const std::int64_t c = blockIdx.x;
  const std::int64_t t = table[(lists + 1) * tensors + c];
  const std::int64_t start = table[(lists + 1) * tensors + chunks + c];
  const std::int64_t size = table[lists * tensors + t];
  const auto* scalars = reinterpret_cast<const double*>(table + (lists + 1) * tensors + 2 * chunks);
  return Chunk{table, tensors, t, start, size - start < chunk ? size - start : chunk, scalars};
}

// Calls f(i) for each element index of the chunk this thread owns, kIlp at a time: f gets
// the kIlp indices (valid ones flagged) so it can issue all loads before any math.
template <class F>
__device__ __forceinline__ void for_chunk(std::int64_t n, F&& f) {
  for (std::int64_t base = 0; base < n; base += static_cast<std::int64_t>(blockDim.x) * kIlp) {
    std::int64_t idx[kIlp];
    bool ok[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      idx[j] = base + threadIdx.x + static_cast<std::int64_t>(j) * blockDim.x;
      ok[j] = idx[j] < n;
    }
    f(idx, ok);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const std::int64_t* table, int lists, std::int64_t tensors,
                                                       std::int64_t chunks, std::int64_t chunk, double lr_d,
                                                       double wd_d, double momentum_d, double keep_d, bool nesterov,
                                                       bool maximize, bool first_step) {
  using M = typename MathOf<T>::type;
  const Chunk ch = block_chunk(table, lists, tensors, chunks, chunk);
  const M lr = lr_d, wd = wd_d, momentum = momentum_d, keep = keep_d;
  const bool has_momentum = lists == 3;
  T* p = ch.tensor<T>(0);
  const T* g = ch.tensor<T>(1);
  T* buf = has_momentum ? ch.tensor<T>(2) : nullptr;
  for_chunk(ch.n, [&](const std::int64_t (&idx)[kIlp], const bool (&ok)[kIlp]) {
    M pv[kIlp], dv[kIlp], bv[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (!ok[j]) continue;
      pv[j] = load_math<M>(p + idx[j]);
      dv[j] = load_math<M>(g + idx[j]);
      bv[j] = has_momentum && !first_step ? load_math<M>(buf + idx[j]) : M(0);
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (!ok[j]) continue;
      M d = maximize ? -dv[j] : dv[j];
      if (wd != M(0)) d += wd * pv[j];
      if (has_momentum) {
        const M b = first_step ? d : momentum * bv[j] + keep * d;
        store_math(buf + idx[j], b);
        d = nesterov ? d + momentum * b : b;
      }
      store_math(p + idx[j], pv[j] - lr * d);
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) adam_kernel(const std::int64_t* table, int lists, std::int64_t tensors,
                                                        std::int64_t chunks, std::int64_t chunk, double beta2_d,
                                                        double eps_d, double wd_d, double keep1_d, double keep2_d,
                                                        double decay_d, bool amsgrad, bool maximize,
                                                        bool decoupled) {
  using M = typename MathOf<T>::type;
  const Chunk ch = block_chunk(table, lists, tensors, chunks, chunk);
  const M beta2 = beta2_d, eps = eps_d, wd = wd_d, keep1 = keep1_d, keep2 = keep2_d, decay = decay_d;
  const M step_size = ch.scalar(0), bc2_sqrt = ch.scalar(1);
  T* p = ch.tensor<T>(0);
  const T* g = ch.tensor<T>(1);
  T* m = ch.tensor<T>(2);
  T* v = ch.tensor<T>(3);
  T* vmax = amsgrad ? ch.tensor<T>(4) : nullptr;
  for_chunk(ch.n, [&](const std::int64_t (&idx)[kIlp], const bool (&ok)[kIlp]) {
    M pv[kIlp], dv[kIlp], mv[kIlp], vv[kIlp], xv[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (!ok[j]) continue;
      pv[j] = load_math<M>(p + idx[j]);
      dv[j] = load_math<M>(g + idx[j]);
      mv[j] = load_math<M>(m + idx[j]);
      vv[j] = load_math<M>(v + idx[j]);
      xv[j] = amsgrad ? load_math<M>(vmax + idx[j]) : M(0);
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (!ok[j]) continue;
      M d = maximize ? -dv[j] : dv[j];
      M w = pv[j];
      if (wd != M(0)) {
        if (decoupled) {
          w *= decay;
        } else {
          d += wd * w;
        }
      }
      const M mi = mv[j] + keep1 * (d - mv[j]);
      M vi = beta2 * vv[j] + keep2 * d * d;
      store_math(m + idx[j], mi);
      store_math(v + idx[j], vi);
      if (amsgrad) {
        vi = xv[j] > vi ? xv[j] : vi;
        store_math(vmax + idx[j], vi);
      }
      store_math(p + idx[j], w - step_size * (mi / (sqrt(vi) / bc2_sqrt + eps)));
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rmsprop_kernel(const std::int64_t* table, int lists,
                                                           std::int64_t tensors, std::int64_t chunks,
                                                           std::int64_t chunk, double lr_d, double alpha_d,
                                                           double eps_d, double wd_d, double momentum_d,
                                                           double keep_d, bool has_momentum, bool centered,
                                                           bool maximize) {
  using M = typename MathOf<T>::type;
  const Chunk ch = block_chunk(table, lists, tensors, chunks, chunk);
  const M lr = lr_d, alpha = alpha_d, eps = eps_d, wd = wd_d, momentum = momentum_d, keep = keep_d;
  T* p = ch.tensor<T>(0);
  const T* g = ch.tensor<T>(1);
  T* sq = ch.tensor<T>(2);
  // the optional lists follow square_avg: momentum_buffer, then grad_avg (the last)
  T* buf = has_momentum ? ch.tensor<T>(3) : nullptr;
  T* gavg = centered ? ch.tensor<T>(lists - 1) : nullptr;
  for_chunk(ch.n, [&](const std::int64_t (&idx)[kIlp], const bool (&ok)[kIlp]) {
    M pv[kIlp], dv[kIlp], sv[kIlp], bv[kIlp], av[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (!ok[j]) continue;
      pv[j] = load_math<M>(p + idx[j]);
      dv[j] = load_math<M>(g + idx[j]);
      sv[j] = load_math<M>(sq + idx[j]);
      bv[j] = has_momentum ? load_math<M>(buf + idx[j]) : M(0);
      av[j] = centered ? load_math<M>(gavg + idx[j]) : M(0);
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (!ok[j]) continue;
      M d = maximize ? -dv[j] : dv[j];
      if (wd != M(0)) d += wd * pv[j];
      M s = alpha * sv[j] + keep * d * d;
      store_math(sq + idx[j], s);
      if (centered) {
        const M a = av[j] + keep * (d - av[j]);
        store_math(gavg + idx[j], a);
        s -= a * a;
      }
      M u = d / (sqrt(s) + eps);
      if (has_momentum) {
        u = momentum * bv[j] + u;
        store_math(buf + idx[j], u);
      }
      store_math(p + idx[j], pv[j] - lr * u);
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(const std::int64_t* table, int lists,
                                                               std::int64_t tensors, std::int64_t chunks,
                                                               std::int64_t chunk, int list, double* partial) {
  const Chunk ch = block_chunk(table, lists, tensors, chunks, chunk);
  const T* g = ch.tensor<T>(list);
  double acc = 0.0;
  for_chunk(ch.n, [&](const std::int64_t (&idx)[kIlp], const bool (&ok)[kIlp]) {
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (ok[j]) {
        const double x = load_math<double>(g + idx[j]);
        acc += x * x;
      }
    }
  });
  // fixed-order block reduction: warp shuffles, then the first warp over the warp sums
  __shared__ double warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scaled_descent_kernel(const std::int64_t* table, int lists,
                                                                  std::int64_t tensors, std::int64_t chunks,
                                                                  std::int64_t chunk) {
  using M = typename MathOf<T>::type;
  const Chunk ch = block_chunk(table, lists, tensors, chunks, chunk);
  const M scale = ch.scalar(0);
  T* p = ch.tensor<T>(0);
  const T* g = ch.tensor<T>(1);
  for_chunk(ch.n, [&](const std::int64_t (&idx)[kIlp], const bool (&ok)[kIlp]) {
    M pv[kIlp], gv[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (!ok[j]) continue;
      pv[j] = load_math<M>(p + idx[j]);
      gv[j] = load_math<M>(g + idx[j]);
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (ok[j]) store_math(p + idx[j], pv[j] - scale * gv[j]);
    }
  });
}

// dispatch_dtype plus float64, which the optimizers also store (float64 parameters on a GPU).
template <class F>
void dispatch_optim_dtype(const char* where, int dtype, F&& f) {
  check_arg(dtype >= 0 && dtype <= kFloat64, where,
            "dtype code must be 0 (float32), 1 (float16), 2 (bfloat16) or 3 (float64), got " + std::to_string(dtype));
  if (dtype == kFloat64) {
    f(TypeTag<double>{});
  } else {
    dispatch_dtype(dtype, f);
  }
}

void check_table(const char* where, std::uintptr_t table, std::int64_t lists, std::int64_t min_lists,
                 std::int64_t max_lists, std::int64_t tensors, std::int64_t chunks, std::int64_t chunk) {
  check_arg(lists >= min_lists && lists <= max_lists, where,
            "lists must be between " + std::to_string(min_lists) + " and " + std::to_string(max_lists) + ", got " +
                std::to_string(lists));
  check_arg(tensors >= 0 && chunks >= 0 && chunks <= 0x7fffffff, where,
            "tensors and chunks must be >= 0 (chunks < 2^31), got " + std::to_string(tensors) + ", " +
                std::to_string(chunks));
  check_arg(chunk > 0, where, "chunk must be > 0, got " + std::to_string(chunk));
  if (chunks > 0) check_required(where, "table", table);
  check_aligned8(where, "table", table);
}

}  // namespace

void optim_sgd(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
               std::int64_t chunk, double lr, double weight_decay, double momentum, double dampening, bool nesterov,
               bool maximize, bool first_step, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "optim_sgd";
  check_table(kWhere, table, lists, 2, 3, tensors, chunks, chunk);
  check_arg((lists == 3) == (momentum != 0.0), kWhere,
            "lists must be 3 (with momentum_buffer) exactly when momentum != 0");
  if (chunks == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_optim_dtype(kWhere, dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    sgd_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, cuda_stream>>>(
        as_const<std::int64_t>(table), static_cast<int>(lists), tensors, chunks, chunk, lr, weight_decay, momentum,
        1.0 - dampening, nesterov, maximize, first_step);
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void optim_adam(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
                std::int64_t chunk, double lr, double beta1, double beta2, double eps, double weight_decay,
                bool amsgrad, bool maximize, bool decoupled_weight_decay, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "optim_adam";
  check_table(kWhere, table, lists, 4, 5, tensors, chunks, chunk);
  check_arg((lists == 5) == amsgrad, kWhere, "lists must be 5 (with max_exp_avg_sq) exactly when amsgrad");
  if (chunks == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_optim_dtype(kWhere, dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    adam_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, cuda_stream>>>(
        as_const<std::int64_t>(table), static_cast<int>(lists), tensors, chunks, chunk, beta2, eps, weight_decay,
        1.0 - beta1, 1.0 - beta2, 1.0 - lr * weight_decay, amsgrad, maximize, decoupled_weight_decay);
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void optim_rmsprop(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
                   std::int64_t chunk, double lr, double alpha, double eps, double weight_decay, double momentum,
                   bool centered, bool maximize, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "optim_rmsprop";
  check_table(kWhere, table, lists, 3, 5, tensors, chunks, chunk);
  const bool has_momentum = momentum > 0.0;
  check_arg(lists == 3 + has_momentum + centered, kWhere,
            "lists must be 3, plus 1 with momentum > 0, plus 1 when centered, got " + std::to_string(lists));
  if (chunks == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_optim_dtype(kWhere, dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    rmsprop_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, cuda_stream>>>(
        as_const<std::int64_t>(table), static_cast<int>(lists), tensors, chunks, chunk, lr, alpha, eps, weight_decay,
        momentum, 1.0 - alpha, has_momentum, centered, maximize);
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void optim_sum_squares(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
                       std::int64_t chunk, std::int64_t list, std::uintptr_t partial, int dtype,
                       std::uintptr_t stream) {
  constexpr const char* kWhere = "optim_sum_squares";
  check_table(kWhere, table, lists, 1, 8, tensors, chunks, chunk);
  check_arg(list >= 0 && list < lists, kWhere, "list must name one of the table's lists, got " + std::to_string(list));
  if (chunks == 0) return;
  check_required(kWhere, "partial", partial);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_optim_dtype(kWhere, dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    sum_squares_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, cuda_stream>>>(
        as_const<std::int64_t>(table), static_cast<int>(lists), tensors, chunks, chunk, static_cast<int>(list),
        as_mutable<double>(partial));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void optim_scaled_descent(std::uintptr_t table, std::int64_t lists, std::int64_t tensors, std::int64_t chunks,
                          std::int64_t chunk, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "optim_scaled_descent";
  check_table(kWhere, table, lists, 2, 2, tensors, chunks, chunk);
  if (chunks == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_optim_dtype(kWhere, dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    scaled_descent_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, cuda_stream>>>(
        as_const<std::int64_t>(table), static_cast<int>(lists), tensors, chunks, chunk);
  });
  check_cuda(cudaGetLastError(), kWhere);
}

}  // namespace kiln
