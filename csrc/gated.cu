// Gated activations of the LLM feed-forward layers, elementwise:
//   forward  y = act(gate) * up,
//   backward dgate = dy * up * act'(gate), dup = dy * act(gate),
// act = silu (SwiGLU), gelu or gelu_tanh (GeGLU); act and act' are recomputed from gate in
// backward (kiln/activations.cuh), so the op saves only its inputs. Float32 math.
//
// A grid-stride loop over units of K elements: K = 16 bytes of T when every pointer is
// 16-byte aligned, else 1; the n % K elements past the last whole unit go one per thread.
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kiln/activations.cuh"
#include "kiln/common.cuh"
#include "kiln/dispatch.cuh"
#include "kiln/llm_ops.h"
#include "kiln/reduce.cuh"

namespace kiln {
namespace {

using reduce::load_unit;
using reduce::store_unit;

template <int V>
using IntC = std::integral_constant<int, V>;

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 65535LL * 8;

template <typename T, int K, int ACT>
__device__ __forceinline__ void forward_unit(const T* gate, const T* up, T* y, std::int64_t i) {
  float g[K], u[K];
  load_unit<T, K>(gate + i, g);
  load_unit<T, K>(up + i, u);
#pragma unroll
  for (int j = 0; j < K; ++j) g[j] = activate<ACT>(g[j]) * u[j];
  store_unit<T, K>(y + i, g);
}

template <typename T, int K, int ACT>
__global__ void __launch_bounds__(kThreads) gated_forward_kernel(const T* gate, const T* up, T* y, std::int64_t n) {
  const std::int64_t units = n / K;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (std::int64_t u = first; u < units; u += stride) forward_unit<T, K, ACT>(gate, up, y, u * K);
  if (first < n - units * K) forward_unit<T, 1, ACT>(gate, up, y, units * K + first);
}

template <typename T, int K, int ACT>
__device__ __forceinline__ void backward_unit(const T* dy, const T* gate, const T* up, T* dgate, T* dup,
                                              std::int64_t i) {
  float d[K], g[K], u[K], out[K];
  load_unit<T, K>(dy + i, d);
  load_unit<T, K>(gate + i, g);
  if (dgate != nullptr) {
    load_unit<T, K>(up + i, u);
#pragma unroll
    for (int j = 0; j < K; ++j) out[j] = d[j] * u[j] * activation_grad<ACT>(g[j]);
    store_unit<T, K>(dgate + i, out);
  }
  if (dup != nullptr) {
#pragma unroll
    for (int j = 0; j < K; ++j) out[j] = d[j] * activate<ACT>(g[j]);
    store_unit<T, K>(dup + i, out);
  }
}

template <typename T, int K, int ACT>
__global__ void __launch_bounds__(kThreads)
    gated_backward_kernel(const T* dy, const T* gate, const T* up, T* dgate, T* dup, std::int64_t n) {
  const std::int64_t units = n / K;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (std::int64_t u = first; u < units; u += stride) backward_unit<T, K, ACT>(dy, gate, up, dgate, dup, u * K);
  if (first < n - units * K) backward_unit<T, 1, ACT>(dy, gate, up, dgate, dup, units * K + first);
}

// Calls f(TypeTag<T>, IntC<K>, IntC<ACT>) for the dtype, the alignment and the activation.
template <class F>
void dispatch_gated(const char* where, int dtype, int activation, bool aligned, F&& f) {
  check_dtype_code(where, dtype);
  check_arg(activation == kSilu || activation == kGelu || activation == kGeluTanh, where,
            "activation must be silu (6), gelu (2) or gelu_tanh (3), got " + std::to_string(activation));
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    auto by_act = [&](auto unit) {
      if (activation == kSilu) f(type, unit, IntC<kSilu>{});
      else if (activation == kGelu) f(type, unit, IntC<kGelu>{});
      else f(type, unit, IntC<kGeluTanh>{});
    };
    if (aligned) {
      by_act(IntC<Vec16<T>::kSize>{});
    } else {
      by_act(IntC<1>{});
    }
  });
}

unsigned blocks_for(std::int64_t n, int k) {
  // enough threads for one unit each, and at least one for each element of the tail
  const std::int64_t work = n / k > k ? n / k : k;
  const std::int64_t blocks = ceil_div<std::int64_t>(work, kThreads);
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

}  // namespace

void gated_forward(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t y, std::int64_t n, int activation,
                   int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "gated_forward";
  check_arg(n >= 0, kWhere, "n must be >= 0, got " + std::to_string(n));
  dispatch_gated(kWhere, dtype, activation, all_aligned16({gate, up, y}), [&](auto type, auto unit, auto act) {
    using T = typename decltype(type)::type;
    constexpr int K = decltype(unit)::value;
    constexpr int ACT = decltype(act)::value;
    if (n == 0) return;
    check_required(kWhere, "gate", gate);
    check_required(kWhere, "up", up);
    check_required(kWhere, "y", y);
    gated_forward_kernel<T, K, ACT><<<blocks_for(n, K), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        as_const<T>(gate), as_const<T>(up), as_mutable<T>(y), n);
    check_cuda(cudaGetLastError(), kWhere);
  });
}

void gated_backward(std::uintptr_t dy, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t dgate,
                    std::uintptr_t dup, std::int64_t n, int activation, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "gated_backward";
  check_arg(n >= 0, kWhere, "n must be >= 0, got " + std::to_string(n));
  dispatch_gated(kWhere, dtype, activation, all_aligned16({dy, gate, up, dgate, dup}),
                 [&](auto type, auto unit, auto act) {
    using T = typename decltype(type)::type;
    constexpr int K = decltype(unit)::value;
    constexpr int ACT = decltype(act)::value;
    if (n == 0 || (dgate == 0 && dup == 0)) return;
    check_required(kWhere, "dy", dy);
    check_required(kWhere, "gate", gate);
    if (dgate != 0) check_required(kWhere, "up", up);
    gated_backward_kernel<T, K, ACT><<<blocks_for(n, K), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        as_const<T>(dy), as_const<T>(gate), as_const<T>(up), as_mutable<T>(dgate), as_mutable<T>(dup), n);
    check_cuda(cudaGetLastError(), kWhere);
  });
}

}  // namespace kiln
