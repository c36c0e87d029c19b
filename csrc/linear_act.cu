// linear_act: y = act(x w^T + b) and its backward.
//
// forward      C = x w^T (P = M, Q = N, R = K); bias and activation in the epilogue,
//              which also writes the pre-activation z when asked to.
// grad_input   dx = dz w (P = M, Q = K, R = N).
// grad_weight  dw = dz^T x (P = N, Q = K, R = M); the blocks of the first Q tile also
//              sum their dz slices over M, which is the bias gradient.
// In both gradient GEMMs dz = dy * act'(saved) is formed while slices of dy move into
// shared memory, so dz never exists in global memory. Every reduction runs in a fixed
// order: results are deterministic.
//
// Dropout (kiln/philox.cuh, enabled when p > 0): the forward epilogue multiplies act(z)
// by 1/(1-p) or 0, the keep bit of element (m, n) from Philox(seed, offset + m N + n);
// the gradient GEMMs regenerate the same bit for each dy element they stage. With
// dropout, preact holds act(z) before dropout for tanh and sigmoid (their y is scaled).
#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kiln/activations.cuh"
#include "kiln/api.h"
#include "kiln/common.cuh"
#include "kiln/gemm.cuh"
#include "kiln/philox.cuh"

namespace kiln {
namespace {

using gemm::kMinBlocksPerSm;
using gemm::kThreads;
using gemm::kTileP;
using gemm::kTileQ;

// The dz operand: dy, with act'(saved) applied as each slice is committed.
// column_sums (dw kernel only, where dy is read M-major): when set, each thread adds the
// float32 dz of the columns it moves, before they are rounded to T, into kVec cells of
// its own there; the cells are thread-private, so they need no barrier until the end.
template <typename T, int ACT, int BX, bool R_CONTIG>
struct GradOperand {
  using Layout = gemm::SmemLayout<T, BX, R_CONTIG>;
  using Loader = gemm::TileLoader<T, Layout::kGlobalRows, Layout::kGlobalCols, Layout::kTransposeOnCommit>;

  Loader dy;
  Loader saved;
  int x0;
  float* column_sums = nullptr;
  Dropout drop;
  int row0 = 0;  // of the staged slice, for the dropout counters
  int col0 = 0;

  // dy and saved are (M, N); (rows, cols) as for gemm::MatrixOperand.
  __device__ GradOperand(const T* dy_, const T* saved_, int rows, int cols, int x0_, const Dropout& drop_)
      : dy(dy_, rows, cols), saved(saved_, rows, cols), x0(x0_), drop(drop_) {}

  __device__ __forceinline__ void fetch(int r0) {
    row0 = R_CONTIG ? x0 : r0;
    col0 = R_CONTIG ? r0 : x0;
    dy.fetch(row0, col0);
    if constexpr (kActivationReadsSaved<ACT>) saved.fetch(row0, col0);
  }

  __device__ __forceinline__ void commit(T* smem) {
    dy.commit(smem, Layout::kLd, [&](int i, int j, float grad) {
      float dz = grad;
      if (drop.enabled) {  // grid-uniform; elements past the edge are 0 whatever the factor
        const std::int64_t row = row0 + dy.thread_row + i * Loader::kRowStep;
        dz *= drop.multiplier(static_cast<std::uint64_t>(row * dy.cols + col0 + dy.thread_col + j));
      }
      if constexpr (kActivationReadsSaved<ACT>) dz *= activation_grad<ACT>(to_float(saved.staged[i].v[j]));
      if constexpr (!R_CONTIG) {
        if (column_sums != nullptr) column_sums[threadIdx.x * Loader::kVec + j] += dz;
      }
      return dz;
    });
  }
};

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    linear_act_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                              T* __restrict__ out, T* __restrict__ preact, int M, int N, int K, Dropout drop) {
  using OperandX = gemm::MatrixOperand<T, kTileP, true>;
  using OperandW = gemm::MatrixOperand<T, kTileQ, true>;
  using Math = gemm::BlockMath<T, true, true>;
  constexpr int kSmemBytes = gemm::smem_bytes<T, typename OperandX::Layout, typename OperandW::Layout>();
  static_assert(Math::kScratchBytes <= gemm::smem_b_offset<T, typename OperandX::Layout>(), "scratch overflows A");
  alignas(128) __shared__ unsigned char smem[kSmemBytes];
  T* smem_a = reinterpret_cast<T*>(smem);
  T* smem_b = reinterpret_cast<T*>(smem + gemm::smem_b_offset<T, typename OperandX::Layout>());

  const gemm::TileIndex tile = gemm::tile_of_block(ceil_div(M, kTileP), ceil_div(N, kTileQ));
  const int m0 = tile.p * kTileP;
  const int n0 = tile.q * kTileQ;
  OperandX a(x, M, K, m0);
  OperandW b(w, N, K, n0);
  Math math;
  gemm::accumulate(math, a, b, K, smem_a, smem_b);

  math.epilogue(m0, n0, reinterpret_cast<float*>(smem), [&](int m, int n, auto& z) {
    constexpr int kRun = static_cast<int>(std::extent_v<std::remove_reference_t<decltype(z)>>);
    if (m >= M) return;
    if (bias != nullptr) {
#pragma unroll
      for (int j = 0; j < kRun; ++j) {
        if (n + j < N) z[j] += to_float(bias[n + j]);
      }
    }
    const std::int64_t row = static_cast<std::int64_t>(m) * N;
    // What act' reads when y cannot serve: z, or act(z) before dropout for tanh / sigmoid.
    constexpr bool kSavesActivated = ACT == kRelu || ACT == kTanh || ACT == kSigmoid;
    if (!kSavesActivated && preact != nullptr) store_row_run(preact + row, n, N, z);
#pragma unroll
    for (int j = 0; j < kRun; ++j) z[j] = activate<ACT>(z[j]);
    if (kSavesActivated && preact != nullptr) store_row_run(preact + row, n, N, z);
    if (drop.enabled) {
#pragma unroll
      for (int j = 0; j < kRun; ++j) z[j] *= drop.multiplier(static_cast<std::uint64_t>(row + n + j));
    }
    store_row_run(out + row, n, N, z);
  });
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    linear_act_grad_input_kernel(const T* __restrict__ grad_out, const T* __restrict__ saved,
                                 const T* __restrict__ w, T* __restrict__ grad_x, int M, int N, int K,
                                 Dropout drop) {
  using OperandDz = GradOperand<T, ACT, kTileP, true>;
  using OperandW = gemm::MatrixOperand<T, kTileQ, false>;
  using Math = gemm::BlockMath<T, true, false>;
  constexpr int kSmemBytes = gemm::smem_bytes<T, typename OperandDz::Layout, typename OperandW::Layout>();
  static_assert(Math::kScratchBytes <= gemm::smem_b_offset<T, typename OperandDz::Layout>(), "scratch overflows A");
  alignas(128) __shared__ unsigned char smem[kSmemBytes];
  T* smem_a = reinterpret_cast<T*>(smem);
  T* smem_b = reinterpret_cast<T*>(smem + gemm::smem_b_offset<T, typename OperandDz::Layout>());

  const gemm::TileIndex tile = gemm::tile_of_block(ceil_div(M, kTileP), ceil_div(K, kTileQ));
  const int m0 = tile.p * kTileP;
  const int k0 = tile.q * kTileQ;
  OperandDz a(grad_out, saved, M, N, m0, drop);
  OperandW b(w, N, K, k0);
  Math math;
  gemm::accumulate(math, a, b, N, smem_a, smem_b);

  math.epilogue(m0, k0, reinterpret_cast<float*>(smem), [&](int m, int k, auto& g) {
    if (m < M) store_row_run(grad_x + static_cast<std::int64_t>(m) * K, k, K, g);
  });
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    linear_act_grad_weight_kernel(const T* __restrict__ grad_out, const T* __restrict__ saved,
                                  const T* __restrict__ x, T* __restrict__ grad_w, T* __restrict__ grad_b, int M,
                                  int N, int K, Dropout drop) {
  using OperandDz = GradOperand<T, ACT, kTileP, false>;
  using OperandX = gemm::MatrixOperand<T, kTileQ, false>;
  using Math = gemm::BlockMath<T, false, false>;
  using DzLoader = typename OperandDz::Loader;
  constexpr int kSmemGemm = gemm::smem_bytes<T, typename OperandDz::Layout, typename OperandX::Layout>();
  constexpr int kSmemB = gemm::smem_b_offset<T, typename OperandDz::Layout>();
  constexpr int kColumnCells = kThreads * DzLoader::kVec;
  static_assert(Math::kScratchBytes <= kSmemB, "scratch overflows A");
  static_assert(kTileP <= kThreads, "one thread per bias column in the final sum");
  alignas(128) __shared__ unsigned char smem[kSmemGemm];
  __shared__ float column_cells[kColumnCells];
  T* smem_a = reinterpret_cast<T*>(smem);
  T* smem_b = reinterpret_cast<T*>(smem + kSmemB);

  const gemm::TileIndex tile = gemm::tile_of_block(ceil_div(N, kTileP), ceil_div(K, kTileQ));
  const int n0 = tile.p * kTileP;
  const int k0 = tile.q * kTileQ;
  OperandDz a(grad_out, saved, M, N, n0, drop);
  OperandX b(x, M, K, k0);
  // The bias gradient comes from the blocks of the first K tile (a block-uniform branch).
  const bool sums_bias = grad_b != nullptr && tile.q == 0;
  if (sums_bias) {
#pragma unroll
    for (int j = 0; j < DzLoader::kVec; ++j) column_cells[threadIdx.x * DzLoader::kVec + j] = 0.f;
    a.column_sums = column_cells;
  }
  Math math;
  gemm::accumulate(math, a, b, M, smem_a, smem_b);

  if (sums_bias) {
    __syncthreads();  // accumulate() has no barrier at all when M = 0
    // Column p was summed by the threads that move its run of kVec columns; add theirs in thread order.
    const int p = static_cast<int>(threadIdx.x);
    if (p < kTileP && n0 + p < N) {
      const int run = p / DzLoader::kVec;
      const int j = p % DzLoader::kVec;
      float total = 0.f;
      for (int t = run; t < kThreads; t += DzLoader::kVecsPerRow) total += column_cells[t * DzLoader::kVec + j];
      grad_b[n0 + p] = from_float<T>(total);
    }
  }

  math.epilogue(n0, k0, reinterpret_cast<float*>(smem), [&](int n, int k, auto& g) {
    if (n < N) store_row_run(grad_w + static_cast<std::int64_t>(n) * K, k, K, g);
  });
}

// The bias gradient alone, for when dw is not wanted (or K = 0 leaves no dw tiles):
// each block sums 32 columns of dz over all rows, 8 row phases per column, then adds
// the 8 partial sums in order.
constexpr int kBiasCols = 32;
constexpr int kBiasRowPhases = kThreads / kBiasCols;

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads)
    linear_act_grad_bias_kernel(const T* __restrict__ grad_out, const T* __restrict__ saved, T* __restrict__ grad_b,
                                int M, int N, Dropout drop) {
  __shared__ float partial[kBiasRowPhases][kBiasCols];
  const int col = static_cast<int>(threadIdx.x) % kBiasCols;
  const int phase = static_cast<int>(threadIdx.x) / kBiasCols;
  const int n = static_cast<int>(blockIdx.x) * kBiasCols + col;
  float sum = 0.f;
  if (n < N) {
    for (int m = phase; m < M; m += kBiasRowPhases) {
      const std::int64_t at = static_cast<std::int64_t>(m) * N + n;
      float dz = to_float(grad_out[at]);
      if (drop.enabled) dz *= drop.multiplier(static_cast<std::uint64_t>(at));
      if constexpr (kActivationReadsSaved<ACT>) dz *= activation_grad<ACT>(to_float(saved[at]));
      sum += dz;
    }
  }
  partial[phase][col] = sum;
  __syncthreads();
  if (phase == 0 && n < N) {
    float total = 0.f;
#pragma unroll
    for (int r = 0; r < kBiasRowPhases; ++r) total += partial[r][col];
    grad_b[n] = from_float<T>(total);
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Keeps every in-kernel index (a column plus a tile) inside int.
constexpr std::int64_t kMaxDim = INT_MAX - 1024;

template <typename T, class F>
void dispatch_activation(int activation, F&& f) {
  switch (activation) {
    case kIdentity: f(TypeTag<T>{}, std::integral_constant<int, kIdentity>{}); break;
    case kRelu: f(TypeTag<T>{}, std::integral_constant<int, kRelu>{}); break;
    case kGelu: f(TypeTag<T>{}, std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: f(TypeTag<T>{}, std::integral_constant<int, kGeluTanh>{}); break;
    case kTanh: f(TypeTag<T>{}, std::integral_constant<int, kTanh>{}); break;
    case kSigmoid: f(TypeTag<T>{}, std::integral_constant<int, kSigmoid>{}); break;
    case kSilu: f(TypeTag<T>{}, std::integral_constant<int, kSilu>{}); break;
    default: break;  // rejected by check_codes
  }
}

// Calls f(TypeTag<T>, integral_constant<int, ACT>) for the runtime codes.
template <class F>
void dispatch(int dtype, int activation, F&& f) {
  switch (dtype) {
    case kFloat32: dispatch_activation<float>(activation, f); break;
    case kFloat16: dispatch_activation<__half>(activation, f); break;
    case kBFloat16: dispatch_activation<__nv_bfloat16>(activation, f); break;
    default: break;  // rejected by check_codes
  }
}

void check_codes(const char* where, int dtype, int activation) {
  check_arg(dtype >= 0 && dtype < kNumDTypes, where,
            "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  check_arg(activation >= 0 && activation < kNumActivations, where,
            "activation code must be in [0, " + std::to_string(kNumActivations) + "), got " +
                std::to_string(activation));
}

void check_dims(const char* where, std::int64_t M, std::int64_t N, std::int64_t K) {
  const std::pair<const char*, std::int64_t> dims[] = {{"M", M}, {"N", N}, {"K", K}};
  for (const auto& [name, value] : dims) {
    check_arg(value >= 0 && value <= kMaxDim, where,
              std::string(name) + " must be in [0, " + std::to_string(kMaxDim) + "], got " + std::to_string(value));
  }
}

// A tensor with elements must have a pointer; an empty one may be null.
void check_pointer(const char* where, const char* name, std::uintptr_t ptr, std::int64_t elements) {
  check_arg(ptr != 0 || elements == 0, where, std::string(name) + " is null but has " + std::to_string(elements) +
                                                  " elements");
}

// The kernels' dropout arguments; p == 0 disables dropout.
Dropout make_dropout(const char* where, double p, std::uint64_t seed, std::uint64_t offset, std::int64_t threshold) {
  check_arg(p >= 0.0 && p < 1.0, where, "dropout p must be in [0, 1), got " + std::to_string(p));
  check_arg(threshold >= 0 && threshold < (std::int64_t{1} << 31), where,
            "dropout threshold must be in [0, 2^31), got " + std::to_string(threshold));
  Dropout drop;
  if (p > 0.0) {
    drop.seed = seed;
    drop.offset = offset;
    drop.threshold = static_cast<std::uint32_t>(threshold);
    drop.scale = static_cast<float>(1.0 / (1.0 - p));
    drop.enabled = true;
  }
  return drop;
}

unsigned gemm_blocks(const char* where, std::int64_t P, std::int64_t Q) {
  const std::int64_t blocks = ceil_div<std::int64_t>(P, kTileP) * ceil_div<std::int64_t>(Q, kTileQ);
  check_arg(blocks <= INT_MAX, where, "problem too large: " + std::to_string(blocks) + " tiles");
  return static_cast<unsigned>(blocks);
}

}  // namespace

void linear_act_forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t out,
                        std::uintptr_t preact, std::int64_t M, std::int64_t N, std::int64_t K, int dtype,
                        int activation, double p, std::uint64_t seed, std::uint64_t offset, std::int64_t threshold,
                        std::uintptr_t stream) {
  constexpr const char* kWhere = "linear_act_forward";
  check_codes(kWhere, dtype, activation);
  const Dropout drop = make_dropout(kWhere, p, seed, offset, threshold);
  check_dims(kWhere, M, N, K);
  check_pointer(kWhere, "x", x, M * K);
  check_pointer(kWhere, "w", w, N * K);
  check_pointer(kWhere, "out", out, M * N);
  if (M == 0 || N == 0) return;
  const unsigned blocks = gemm_blocks(kWhere, M, N);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, activation, [&](auto type, auto act) {
    using T = typename decltype(type)::type;
    linear_act_forward_kernel<T, decltype(act)::value><<<blocks, kThreads, 0, cuda_stream>>>(
        as_const<T>(x), as_const<T>(w), as_const<T>(bias), as_mutable<T>(out), as_mutable<T>(preact),
        static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), drop);
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void linear_act_backward(std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t w, std::uintptr_t saved,
                         std::uintptr_t grad_x, std::uintptr_t grad_w, std::uintptr_t grad_b, std::int64_t M,
                         std::int64_t N, std::int64_t K, int dtype, int activation, double p, std::uint64_t seed,
                         std::uint64_t offset, std::int64_t threshold, std::uintptr_t stream) {
  constexpr const char* kWhere = "linear_act_backward";
  check_codes(kWhere, dtype, activation);
  const Dropout drop = make_dropout(kWhere, p, seed, offset, threshold);
  check_dims(kWhere, M, N, K);
  const bool want_x = grad_x != 0 && M > 0 && K > 0;
  const bool want_w = grad_w != 0 && N > 0 && K > 0;
  const bool want_b = grad_b != 0 && N > 0;
  if (!want_x && !want_w && !want_b) return;
  check_pointer(kWhere, "grad_out", grad_out, M * N);
  if (activation != kIdentity) check_pointer(kWhere, "saved", saved, M * N);
  if (want_x) check_pointer(kWhere, "w", w, N * K);
  if (want_w) check_pointer(kWhere, "x", x, M * K);
  const unsigned blocks_x = want_x ? gemm_blocks(kWhere, M, K) : 0;
  const unsigned blocks_w = want_w ? gemm_blocks(kWhere, N, K) : 0;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int m = static_cast<int>(M);
  const int n = static_cast<int>(N);
  const int k = static_cast<int>(K);

  dispatch(dtype, activation, [&](auto type, auto act) {
    using T = typename decltype(type)::type;
    constexpr int ACT = decltype(act)::value;
    if (want_x) {
      linear_act_grad_input_kernel<T, ACT><<<blocks_x, kThreads, 0, cuda_stream>>>(
          as_const<T>(grad_out), as_const<T>(saved), as_const<T>(w), as_mutable<T>(grad_x), m, n, k, drop);
      check_cuda(cudaGetLastError(), kWhere);
    }
    if (want_w) {
      // Also writes grad_b (when wanted) from the dz slices it already has.
      linear_act_grad_weight_kernel<T, ACT><<<blocks_w, kThreads, 0, cuda_stream>>>(
          as_const<T>(grad_out), as_const<T>(saved), as_const<T>(x), as_mutable<T>(grad_w),
          want_b ? as_mutable<T>(grad_b) : nullptr, m, n, k, drop);
      check_cuda(cudaGetLastError(), kWhere);
    } else if (want_b) {
      const unsigned blocks_b = static_cast<unsigned>(ceil_div<std::int64_t>(N, kBiasCols));
      linear_act_grad_bias_kernel<T, ACT><<<blocks_b, kThreads, 0, cuda_stream>>>(
          as_const<T>(grad_out), as_const<T>(saved), as_mutable<T>(grad_b), m, n, drop);
      check_cuda(cudaGetLastError(), kWhere);
    }
  });
}

}  // namespace kiln
