// LSTM, GRU and the Elman RNN: the fused step kernels (all three) and a persistent
// whole-sequence forward and backward (LSTM and GRU).
//
// The op layer (python/kiln/ops/rnn.py) forms the input projection gx of every step with
// one big GEMM up front and dW_hh with one big GEMM at the end; what runs here is the
// recurrence. Gate order and layout are torch's (LSTM [i | f | g | o], GRU [r | z | n]).
// The state is float32; w_hh is float32, float16 or bfloat16 and is converted to float32
// as it is staged, so every dot product is float32 FFMA (no operand rounding, no tf32).
//
// Step kernels: a block of 256 threads owns a tile of kTileRows (16) batch rows x
// kTileUnits (32) hidden units j; grid (cdiv(H, 32), cdiv(B, 16)).
//   (The Elman RNN is G = 1: its forward epilogue is act(acc + gx), tanh or relu, its
//   backward prologue dpre = dh_next act' read from h_next; it has no persistent kernel.)
//   forward   the GEMM h w_hh^T with G (4 LSTM, 3 GRU, 1 Elman) accumulators per (row, unit), the
//             columns j, H + j, 2H + j (, 3H + j) of w_hh^T; the reduction over k runs in
//             slices of kTileK (32) staged in shared memory, and the epilogue does the
//             whole cell update. Lane = unit j of the tile, warp w = rows 2w, 2w + 1, so a
//             thread holds 2 x G accumulators.
//   backward  dh = dpre w_hh (or dgh w_hh): tile (rows x units j), loop over the hidden
//             units k in slices; the prologue forms the G pointwise gradients of slice k
//             from the saved gates into shared memory and the slice's G x 32 rows of w_hh
//             are staged beside them. kTileK == kTileUnits, so slice k0 is the unit tile
//             j0 == k0 of the same row tile: that block alone stores dpre / dc (dgx / dgh)
//             of the slice, so each element is written once, deterministically.
//
// Persistent forward (lstm_sequence_forward, gru_sequence_forward): one cooperative
// launch runs all T steps. Block b owns U = cdiv(H, SMs) hidden units j0 = b U .. and
// keeps their G x U rows of w_hh (rows q H + j, every gate q, all H columns) in shared
// memory for the whole sequence. Per step it stages a tile of up to 64 rows of h_{t-1}
// (L2, __ldcg) in shared memory; each warp takes (unit u, 8 rows) items: the lanes split
// k, hold 8 x G partial dot products, reduce them over the warp with shuffles, and lanes
// 0..7 finish rows b0 .. b0 + 7 (gates, c, h, stored to global). Then a grid-wide barrier
// (cooperative_groups::this_grid().sync()) before step t + 1 reads h_t.
//   Why cooperative groups: cudaLaunchCooperativeKernel refuses (an error, not a hang) a
//   grid whose blocks cannot all be resident at once, which is the condition under
//   which a spin-waiting barrier deadlocks; a hand-rolled atomic counter would need the
//   same occupancy argument without that guarantee (MPS, other streams' kernels). Every
//   block, including one with no units, executes every grid.sync(): the step loop and
//   the barrier are outside all unit-dependent branches.
//   Limits: the slice must fit with at least 8 rows of h: G U H bytes(w) + 8 H 4 <= the
//   opt-in shared memory per block (227 KiB on H100, 132 SMs; 163 KiB on A100, 108 SMs).
//   With U = cdiv(H, SMs) that gives, on H100: H <= 1210 (LSTM, float32 weights), 1709
//   (LSTM, 16-bit weights), 1417 / 1905 (GRU); on A100: 948 / 1296 (LSTM), 1080 / 1438
//   (GRU); any B (rows are tiled). rnn_sequence_fits() says exactly (forward and
//   backward); otherwise the op runs the step loop over the step kernels.
//
// Persistent backward (lstm_sequence_backward, gru_sequence_backward): the same one-wave
// cooperative scheme, steps T-1 down to 0. Block b owns the same units j and keeps the
// columns j of every gate row of w_hh (w[q H + k, j], all q, k: G U H values, the same
// bytes and limits as the forward). dh_t[:, j] = dh_all[t][:, j] + (dpre_{t+1} w_hh)[:, j]
// (GRU: + dh_{t+1} z_{t+1}); the dots stage dpre_{t+1} (GRU dgh_{t+1}, written by every
// block before the barrier, __ldcg) one gate's H columns at a time in the forward's
// tile, so each warp item (unit, 8 rows) reduces over k per gate and accumulates into
// dh0[:, j], which the block owns and uses as its dh carry; dc (LSTM) is per unit and is
// carried in dc0[:, j]. The epilogue then forms the step's gradients of the block's units
// (dpre_t, or dgx_t and dgh_t, at columns q H + j) from the saved gates, and a grid
// barrier publishes them. One more round of dots after the last barrier gives dh0.
#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "kiln/activations.cuh"
#include "kiln/common.cuh"
#include "kiln/dispatch.cuh"
#include "kiln/rnn.h"

namespace kiln {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------
// Step kernels.

constexpr int kTileRows = 16;   // batch rows of a block's tile
constexpr int kTileUnits = 32;  // hidden units of a block's tile: lane = unit
constexpr int kTileK = 32;      // reduction slice
constexpr int kRowsPerThread = kTileRows / kWarps;
constexpr int kLdW = kTileUnits + 1;  // padded row (one k, all units) of a staged weight slice
static_assert(kTileUnits == 32, "a warp's lanes are the tile's hidden units");
static_assert(kTileK == kTileUnits, "backward: slice k0 is stored by the block of unit tile j0 == k0");
static_assert(kTileRows % kWarps == 0, "every warp owns the same number of rows");
static_assert((kTileRows * kTileK) % kThreads == 0, "the prologue's (row, k) pairs divide among the threads");

// Stages a (G gates x kTileK x kTileUnits) slice of w_hh as ws[(q kTileK + kk) kLdW + u]:
//   kForward:  w[q H + j0 + u, k0 + kk], the forward's slice of w_hh^T;
//   !kForward: w[q H + k0 + kk, j0 + u], the backward's slice of w_hh.
// Consecutive threads take consecutive global addresses (along k forward, along j
// backward); the padded rows keep the transposed shared stores and the lane-wise reads
// free of bank conflicts. Zero past H either way.
template <typename T, int G, bool kForward>
__device__ __forceinline__ void stage_w(const T* __restrict__ w, int H, int j0, int k0, float* ws) {
  for (int e = static_cast<int>(threadIdx.x); e < G * kTileUnits * kTileK; e += kThreads) {
    const int u = kForward ? e / kTileK % kTileUnits : e % kTileUnits;
    const int kk = kForward ? e % kTileK : e / kTileUnits % kTileK;
    const int q = e / (kTileK * kTileUnits);
    const int j = j0 + u;
    const int k = k0 + kk;
    float v = 0.f;
    if (j < H && k < H) {
      const std::int64_t row = static_cast<std::int64_t>(q) * H + (kForward ? j : k);
      v = to_float(w[row * H + (kForward ? k : j)]);
    }
    ws[(q * kTileK + kk) * kLdW + u] = v;
  }
}

// acc[i][q] = sum_k h[b0 + row_i, k] w[q H + j0 + lane, k], row_i = warp kRowsPerThread + i.
// Rows past B and units past H accumulate zeros (never stored).
template <typename T, int G>
__device__ __forceinline__ void step_forward_gemm(const float* __restrict__ h, const T* __restrict__ w, int B, int H,
                                                  int b0, int j0, float (&acc)[kRowsPerThread][G], float* hs,
                                                  float* ws) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int row0 = static_cast<int>(threadIdx.x) / 32 * kRowsPerThread;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int q = 0; q < G; ++q) acc[i][q] = 0.f;
  }
  for (int k0 = 0; k0 < H; k0 += kTileK) {
    for (int e = static_cast<int>(threadIdx.x); e < kTileRows * kTileK; e += kThreads) {
      const int b = b0 + e / kTileK;
      const int k = k0 + e % kTileK;
      hs[e] = b < B && k < H ? h[static_cast<std::int64_t>(b) * H + k] : 0.f;
    }
    stage_w<T, G, true>(w, H, j0, k0, ws);
    __syncthreads();
    // 2 and 4 left one 4-byte spill on sm_80 or sm_90 (ptxas 13.0), 8 has none; G = 1 (Elman)
    // spilled 4 bytes at 8, none at 16
#pragma unroll (G == 1 ? 16 : 8)
    for (int kk = 0; kk < kTileK; ++kk) {
      float wv[G];
#pragma unroll
      for (int q = 0; q < G; ++q) wv[q] = ws[(q * kTileK + kk) * kLdW + lane];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float a = hs[(row0 + i) * kTileK + kk];  // a broadcast: one row for the whole warp
#pragma unroll
        for (int q = 0; q < G; ++q) acc[i][q] = fmaf(a, wv[q], acc[i][q]);
      }
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_step_forward_kernel(const float* __restrict__ gx, const float* __restrict__ h, const float* __restrict__ c,
                             const T* __restrict__ w, float* __restrict__ h_next, float* __restrict__ c_next,
                             float* __restrict__ gates, int B, int H) {
  __shared__ float hs[kTileRows * kTileK];
  __shared__ float ws[4 * kTileK * kLdW];
  const int b0 = static_cast<int>(blockIdx.y) * kTileRows;
  const int j0 = static_cast<int>(blockIdx.x) * kTileUnits;
  float acc[kRowsPerThread][4];
  step_forward_gemm<T, 4>(h, w, B, H, b0, j0, acc, hs, ws);

  const int j = j0 + static_cast<int>(threadIdx.x) % 32;
  if (j >= H) return;  // after the last barrier
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int b = b0 + static_cast<int>(threadIdx.x) / 32 * kRowsPerThread + i;
    if (b >= B) continue;
    const std::int64_t g = static_cast<std::int64_t>(b) * 4 * H + j;
    const std::int64_t s = static_cast<std::int64_t>(b) * H + j;
    const float ig = sigmoid(acc[i][0] + gx[g]);
    const float fg = sigmoid(acc[i][1] + gx[g + H]);
    const float gg = tanhf(acc[i][2] + gx[g + 2 * H]);
    const float og = sigmoid(acc[i][3] + gx[g + 3 * H]);
    const float cn = fg * c[s] + ig * gg;
    c_next[s] = cn;
    h_next[s] = og * tanhf(cn);
    gates[g] = ig;
    gates[g + H] = fg;
    gates[g + 2 * H] = gg;
    gates[g + 3 * H] = og;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gru_step_forward_kernel(const float* __restrict__ gx, const float* __restrict__ h, const T* __restrict__ w,
                            const T* __restrict__ bias, float* __restrict__ h_next, float* __restrict__ saved, int B,
                            int H) {
  __shared__ float hs[kTileRows * kTileK];
  __shared__ float ws[3 * kTileK * kLdW];
  const int b0 = static_cast<int>(blockIdx.y) * kTileRows;
  const int j0 = static_cast<int>(blockIdx.x) * kTileUnits;
  float acc[kRowsPerThread][3];
  step_forward_gemm<T, 3>(h, w, B, H, b0, j0, acc, hs, ws);

  const int j = j0 + static_cast<int>(threadIdx.x) % 32;
  if (j >= H) return;  // after the last barrier
  float br = 0.f, bz = 0.f, bn = 0.f;
  if (bias != nullptr) {
    br = to_float(bias[j]);
    bz = to_float(bias[H + j]);
    bn = to_float(bias[2 * H + j]);
  }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int b = b0 + static_cast<int>(threadIdx.x) / 32 * kRowsPerThread + i;
    if (b >= B) continue;
    const std::int64_t g = static_cast<std::int64_t>(b) * 3 * H + j;
    const std::int64_t s = static_cast<std::int64_t>(b) * H + j;
    const std::int64_t v = static_cast<std::int64_t>(b) * 4 * H + j;
    const float r = sigmoid(gx[g] + (acc[i][0] + br));
    const float z = sigmoid(gx[g + H] + (acc[i][1] + bz));
    const float ghn = acc[i][2] + bn;
    const float n = tanhf(gx[g + 2 * H] + r * ghn);
    h_next[s] = (1.f - z) * n + z * h[s];
    saved[v] = r;
    saved[v + H] = z;
    saved[v + 2 * H] = n;
    saved[v + 3 * H] = ghn;
  }
}

// acc[i] += sum_{q, kk} ds[q][row_i][kk] ws[q][kk][lane] over one staged slice.
template <int G>
__device__ __forceinline__ void step_backward_mma(const float* ds, const float* ws, float (&acc)[kRowsPerThread]) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int row0 = static_cast<int>(threadIdx.x) / 32 * kRowsPerThread;
#pragma unroll 4
  for (int kk = 0; kk < kTileK; ++kk) {
#pragma unroll
    for (int q = 0; q < G; ++q) {
      const float wv = ws[(q * kTileK + kk) * kLdW + lane];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        acc[i] = fmaf(ds[(q * kTileRows + row0 + i) * kTileK + kk], wv, acc[i]);
      }
    }
  }
}

// The dh GEMM of a step backward, dh[:, j] = sum_{q, k} d_q[:, k] w[q H + k, j], over slices
// k0 of the hidden units. prologue(b, k, owner, d) forms the G pointwise gradients of (row b,
// unit k) into d and, when owner (the one block of the row tile whose unit tile is slice
// k0), stores the step's own outputs for them; they are staged beside the slice of w.
template <typename T, int G, typename Prologue>
__device__ __forceinline__ void step_backward_gemm(const T* __restrict__ w, int B, int H, int b0, int j0,
                                                   float* ds, float* ws, float (&acc)[kRowsPerThread],
                                                   Prologue prologue) {
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.f;
  for (int k0 = 0; k0 < H; k0 += kTileK) {
    const bool owner = k0 == j0;
    for (int e = static_cast<int>(threadIdx.x); e < kTileRows * kTileK; e += kThreads) {
      const int r = e / kTileK;
      const int kk = e % kTileK;
      float d[G];
#pragma unroll
      for (int q = 0; q < G; ++q) d[q] = 0.f;
      if (b0 + r < B && k0 + kk < H) prologue(b0 + r, k0 + kk, owner, d);
#pragma unroll
      for (int q = 0; q < G; ++q) ds[(q * kTileRows + r) * kTileK + kk] = d[q];
    }
    stage_w<T, G, false>(w, H, j0, k0, ws);
    __syncthreads();
    step_backward_mma<G>(ds, ws, acc);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_step_backward_kernel(const float* __restrict__ dh_next, const float* __restrict__ dc_next,
                              const float* __restrict__ gates, const float* __restrict__ c,
                              const float* __restrict__ c_next, const T* __restrict__ w, float* __restrict__ dpre,
                              float* __restrict__ dh, float* __restrict__ dc, int B, int H) {
  __shared__ float ds[4 * kTileRows * kTileK];  // ds[q][row][kk]: the slice's dpre
  __shared__ float ws[4 * kTileK * kLdW];
  const int b0 = static_cast<int>(blockIdx.y) * kTileRows;
  const int j0 = static_cast<int>(blockIdx.x) * kTileUnits;
  float acc[kRowsPerThread];
  step_backward_gemm<T, 4>(w, B, H, b0, j0, ds, ws, acc, [&](int b, int k, bool owner, float (&d)[4]) {
    const std::int64_t s = static_cast<std::int64_t>(b) * H + k;
    const std::int64_t g = static_cast<std::int64_t>(b) * 4 * H + k;
    const float ig = gates[g];
    const float fg = gates[g + H];
    const float gg = gates[g + 2 * H];
    const float og = gates[g + 3 * H];
    const float tc = tanhf(c_next[s]);
    const float dhn = dh_next[s];
    const float dct = dc_next[s] + dhn * og * (1.f - tc * tc);
    d[0] = dct * gg * (ig * (1.f - ig));
    d[1] = dct * c[s] * (fg * (1.f - fg));
    d[2] = dct * ig * (1.f - gg * gg);
    d[3] = dhn * tc * (og * (1.f - og));
    if (owner) {
#pragma unroll
      for (int q = 0; q < 4; ++q) dpre[g + q * H] = d[q];
      dc[s] = dct * fg;
    }
  });

  const int j = j0 + static_cast<int>(threadIdx.x) % 32;
  if (j >= H) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int b = b0 + static_cast<int>(threadIdx.x) / 32 * kRowsPerThread + i;
    if (b < B) dh[static_cast<std::int64_t>(b) * H + j] = acc[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gru_step_backward_kernel(const float* __restrict__ dh_next, const float* __restrict__ saved,
                             const float* __restrict__ h, const T* __restrict__ w, float* __restrict__ dgx,
                             float* __restrict__ dgh, float* __restrict__ dh, int B, int H) {
  __shared__ float ds[3 * kTileRows * kTileK];  // ds[q][row][kk]: the slice's dgh
  __shared__ float ws[3 * kTileK * kLdW];
  const int b0 = static_cast<int>(blockIdx.y) * kTileRows;
  const int j0 = static_cast<int>(blockIdx.x) * kTileUnits;
  float acc[kRowsPerThread];
  step_backward_gemm<T, 3>(w, B, H, b0, j0, ds, ws, acc, [&](int b, int k, bool owner, float (&d)[3]) {
    const std::int64_t s = static_cast<std::int64_t>(b) * H + k;
    const std::int64_t v = static_cast<std::int64_t>(b) * 4 * H + k;
    const float r = saved[v];
    const float z = saved[v + H];
    const float n = saved[v + 2 * H];
    const float ghn = saved[v + 3 * H];
    const float dhn = dh_next[s];
    const float dn = dhn * (1.f - z) * (1.f - n * n);
    d[0] = dn * ghn * (r * (1.f - r));  // dr
    d[1] = dhn * (h[s] - n) * (z * (1.f - z));  // dz
    d[2] = dn * r;  // the n gate's dgh
    if (owner) {
      const std::int64_t g = static_cast<std::int64_t>(b) * 3 * H + k;
      dgx[g] = d[0];
      dgx[g + H] = d[1];
      dgx[g + 2 * H] = dn;
      dgh[g] = d[0];
      dgh[g + H] = d[1];
      dgh[g + 2 * H] = d[2];
    }
  });

  const int j = j0 + static_cast<int>(threadIdx.x) % 32;
  if (j >= H) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int b = b0 + static_cast<int>(threadIdx.x) / 32 * kRowsPerThread + i;
    if (b >= B) continue;
    const std::int64_t s = static_cast<std::int64_t>(b) * H + j;
    const float z = saved[static_cast<std::int64_t>(b) * 4 * H + H + j];
    dh[s] = acc[i] + dh_next[s] * z;
  }
}

// Elman: h_next = act(gx + h w_hh^T), act tanh or relu (kRelu).
template <typename T, bool kRelu>
__global__ void __launch_bounds__(kThreads)
    rnn_step_forward_kernel(const float* __restrict__ gx, const float* __restrict__ h, const T* __restrict__ w,
                            float* __restrict__ h_next, int B, int H) {
  __shared__ float hs[kTileRows * kTileK];
  __shared__ float ws[kTileK * kLdW];
  const int b0 = static_cast<int>(blockIdx.y) * kTileRows;
  const int j0 = static_cast<int>(blockIdx.x) * kTileUnits;
  float acc[kRowsPerThread][1];
  step_forward_gemm<T, 1>(h, w, B, H, b0, j0, acc, hs, ws);

  const int j = j0 + static_cast<int>(threadIdx.x) % 32;
  if (j >= H) return;  // after the last barrier
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int b = b0 + static_cast<int>(threadIdx.x) / 32 * kRowsPerThread + i;
    if (b >= B) continue;
    const std::int64_t s = static_cast<std::int64_t>(b) * H + j;
    const float pre = acc[i][0] + gx[s];
    h_next[s] = kRelu ? (pre < 0.f ? 0.f : pre) : tanhf(pre);  // relu: NaN passes, as torch's
  }
}

// Elman backward: dpre = dh_next act'(pre) (from h_next: 1 - h^2, or h > 0), dh = dpre w_hh.
template <typename T, bool kRelu>
__global__ void __launch_bounds__(kThreads)
    rnn_step_backward_kernel(const float* __restrict__ dh_next, const float* __restrict__ h_next,
                             const T* __restrict__ w, float* __restrict__ dpre, float* __restrict__ dh, int B,
                             int H) {
  __shared__ float ds[kTileRows * kTileK];  // ds[row][kk]: the slice's dpre
  __shared__ float ws[kTileK * kLdW];
  const int b0 = static_cast<int>(blockIdx.y) * kTileRows;
  const int j0 = static_cast<int>(blockIdx.x) * kTileUnits;
  float acc[kRowsPerThread];
  step_backward_gemm<T, 1>(w, B, H, b0, j0, ds, ws, acc, [&](int b, int k, bool owner, float (&d)[1]) {
    const std::int64_t s = static_cast<std::int64_t>(b) * H + k;
    const float hn = h_next[s];
    d[0] = dh_next[s] * (kRelu ? (hn > 0.f ? 1.f : 0.f) : 1.f - hn * hn);
    if (owner) dpre[s] = d[0];
  });

  const int j = j0 + static_cast<int>(threadIdx.x) % 32;
  if (j >= H) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int b = b0 + static_cast<int>(threadIdx.x) / 32 * kRowsPerThread + i;
    if (b < B) dh[static_cast<std::int64_t>(b) * H + j] = acc[i];
  }
}

// ---------------------------------------------------------------------------
// Persistent whole-sequence forward.

constexpr int kSeqRows = 8;          // rows of one warp item; lanes 0..7 finish them
constexpr int kSeqMaxTileRows = 64;  // rows of h_{t-1} staged in shared memory at once
static_assert(kSeqRows <= 32 && kSeqMaxTileRows % kSeqRows == 0, "tile rows come in whole warp items");

// acc[r][q] = sum_k hs[r H + k] ws[(q U + u) H + k] for the item's kSeqRows rows of hs; the
// lanes split k and every lane ends with every total (butterfly shuffles).
template <typename T, int G>
__device__ __forceinline__ void sequence_item_dots(const float* hs, const T* ws, int U, int u, int H,
                                                   float (&acc)[kSeqRows][G]) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int r = 0; r < kSeqRows; ++r) {
#pragma unroll
    for (int q = 0; q < G; ++q) acc[r][q] = 0.f;
  }
  for (int k = lane; k < H; k += 32) {
    float wv[G];
#pragma unroll
    for (int q = 0; q < G; ++q) wv[q] = to_float(ws[(q * U + u) * H + k]);
#pragma unroll
    for (int r = 0; r < kSeqRows; ++r) {
      const float a = hs[r * H + k];
#pragma unroll
      for (int q = 0; q < G; ++q) acc[r][q] = fmaf(a, wv[q], acc[r][q]);
    }
  }
#pragma unroll
  for (int r = 0; r < kSeqRows; ++r) {
#pragma unroll
    for (int q = 0; q < G; ++q) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) acc[r][q] += __shfl_xor_sync(0xffffffffu, acc[r][q], offset);
    }
  }
}

// Lane r < kSeqRows takes row r's G totals (register arrays need compile-time indices).
template <int G>
__device__ __forceinline__ void row_of_lane(const float (&acc)[kSeqRows][G], float (&pre)[G]) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int q = 0; q < G; ++q) pre[q] = 0.f;
#pragma unroll
  for (int r = 0; r < kSeqRows; ++r) {
    if (lane == r) {
#pragma unroll
      for (int q = 0; q < G; ++q) pre[q] = acc[r][q];
    }
  }
}

// Shared memory: the slice of w_hh (G U H elements of T, from offset 0) and then the
// staged rows of h (tile_rows H floats).
__host__ __device__ constexpr std::int64_t sequence_w_bytes(int gates, std::int64_t U, std::int64_t H,
                                                            std::int64_t elem_bytes) {
  return (gates * U * H * elem_bytes + 15) / 16 * 16;
}

// The block's slice of w (u < units, every gate q, every k), G U H elements either way:
//   kForward:  ws[(q U + u) H + k] = w[q H + j0 + u, k], rows j of every gate (h w^T);
//   !kForward: ws[(q U + u) H + k] = w[q H + k, j0 + u], columns j of every gate row (dpre w).
// Consecutive threads take consecutive global addresses (along k forward, along u backward).
template <typename T, int G, bool kForward>
__device__ __forceinline__ void load_weight_slice(const T* __restrict__ w, int H, int j0, int U, int units, T* ws) {
  const int per_gate = units * H;
  for (int e = static_cast<int>(threadIdx.x); e < G * per_gate; e += kThreads) {
    const int q = e / per_gate;
    const int u = kForward ? e % per_gate / H : e % units;
    const int k = kForward ? e % H : e % per_gate / units;
    const std::int64_t row = static_cast<std::int64_t>(q) * H + (kForward ? j0 + u : k);
    ws[(q * U + u) * H + k] = w[row * H + (kForward ? k : j0 + u)];
  }
}

// hs[r H + k] = x[(b0 + r) ld + k] for r < tile_rows, k < H, zero past B; x was written by
// other blocks before the last grid barrier, so it is read from L2 (__ldcg), never from L1.
__device__ __forceinline__ void stage_state_rows(const float* x, int ld, int B, int H, int b0, int tile_rows,
                                                 float* hs) {
  const int n = tile_rows * H;
  for (int e = static_cast<int>(threadIdx.x); e < n; e += kThreads) {
    const int b = b0 + e / H;
    hs[e] = b < B ? __ldcg(x + static_cast<std::int64_t>(b) * ld + e % H) : 0.f;
  }
}

// The step loop of a persistent forward (G gates): per step t the block stages h_{t-1} in
// row tiles, forms the G dot products of every (row b, unit j) of its slice, and hands them
// to epilogue(t, b, j, pre, h_prev_bj), which applies the cell and stores h_t[b, j] and what
// backward saves; then a grid barrier, so that step t + 1 stages a complete h_t.
template <typename T, int G, typename Epilogue>
__device__ __forceinline__ void sequence_forward(const float* __restrict__ h0, const float* h_all,
                                                 const T* __restrict__ w, int steps, int B, int H, int U,
                                                 int tile_rows, Epilogue epilogue) {
  extern __shared__ __align__(16) unsigned char seq_smem[];
  T* ws = reinterpret_cast<T*>(seq_smem);
  float* hs = reinterpret_cast<float*>(seq_smem + sequence_w_bytes(G, U, H, sizeof(T)));
  cg::grid_group grid = cg::this_grid();
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int j0 = static_cast<int>(blockIdx.x) * U;
  const int units = max(0, min(U, H - j0));  // 0 only if the grid were oversized; still syncs
  load_weight_slice<T, G, true>(w, H, j0, U, units, ws);
  const int items = units * (tile_rows / kSeqRows);
  const std::int64_t step_state = static_cast<std::int64_t>(B) * H;

  for (int t = 0; t < steps; ++t) {
    const float* h_prev = t == 0 ? h0 : h_all + (t - 1) * step_state;
    for (int b0 = 0; b0 < B; b0 += tile_rows) {
      __syncthreads();  // the previous tile's items are done with hs (and ws is loaded)
      stage_state_rows(h_prev, H, B, H, b0, tile_rows, hs);
      __syncthreads();
      for (int item = warp; item < items; item += kWarps) {
        const int u = item % units;
        const int rows0 = item / units * kSeqRows;
        float acc[kSeqRows][G];
        sequence_item_dots<T, G>(hs + rows0 * H, ws, U, u, H, acc);
        float pre[G];
        row_of_lane<G>(acc, pre);
        const int b = b0 + rows0 + lane;
        if (lane < kSeqRows && b < B) epilogue(t, b, j0 + u, pre, hs[(rows0 + lane) * H + j0 + u]);
      }
    }
    grid.sync();  // h_t complete everywhere before any block stages it; every block, every step
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    lstm_sequence_kernel(const float* __restrict__ gx, const float* __restrict__ h0, const float* __restrict__ c0,
                         const T* __restrict__ w, float* h_all, float* c_all, float* __restrict__ gates, int steps,
                         int B, int H, int U, int tile_rows) {
  const std::int64_t step_state = static_cast<std::int64_t>(B) * H;
  sequence_forward<T, 4>(h0, h_all, w, steps, B, H, U, tile_rows, [&](int t, int b, int j, const float (&pre)[4],
                                                                      float) {
    const std::int64_t s = static_cast<std::int64_t>(b) * H + j;
    const std::int64_t ts = t * step_state + s;
    const std::int64_t g = (t * step_state + static_cast<std::int64_t>(b) * H) * 4 + j;
    const float ig = sigmoid(pre[0] + gx[g]);
    const float fg = sigmoid(pre[1] + gx[g + H]);
    const float gg = tanhf(pre[2] + gx[g + 2 * H]);
    const float og = sigmoid(pre[3] + gx[g + 3 * H]);
    // c_{t-1}[b, j] was written by this block (or is c0); read past L1 like h.
    const float cn = fg * (t == 0 ? c0[s] : __ldcg(c_all + ts - step_state)) + ig * gg;
    c_all[ts] = cn;
    h_all[ts] = og * tanhf(cn);
    gates[g] = ig;
    gates[g + H] = fg;
    gates[g + 2 * H] = gg;
    gates[g + 3 * H] = og;
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    gru_sequence_kernel(const float* __restrict__ gx, const float* __restrict__ h0, const T* __restrict__ w,
                        const T* __restrict__ bias, float* h_all, float* __restrict__ saved, int steps, int B, int H,
                        int U, int tile_rows) {
  const std::int64_t step_state = static_cast<std::int64_t>(B) * H;
  sequence_forward<T, 3>(h0, h_all, w, steps, B, H, U, tile_rows, [&](int t, int b, int j, const float (&pre)[3],
                                                                      float h_prev) {
    float br = 0.f, bz = 0.f, bn = 0.f;
    if (bias != nullptr) {
      br = to_float(bias[j]);
      bz = to_float(bias[H + j]);
      bn = to_float(bias[2 * H + j]);
    }
    const std::int64_t row = t * step_state + static_cast<std::int64_t>(b) * H;
    const std::int64_t g = row * 3 + j;
    const std::int64_t v = row * 4 + j;
    const float r = sigmoid(gx[g] + (pre[0] + br));
    const float z = sigmoid(gx[g + H] + (pre[1] + bz));
    const float ghn = pre[2] + bn;
    const float n = tanhf(gx[g + 2 * H] + r * ghn);
    h_all[row + j] = (1.f - z) * n + z * h_prev;  // h_{t-1}[b, j], staged
    saved[v] = r;
    saved[v + H] = z;
    saved[v + 2 * H] = n;
    saved[v + 3 * H] = ghn;
  });
}

// ---------------------------------------------------------------------------
// Persistent whole-sequence backward.

// For the rows b0 .. b0 + tile_rows of one staged tile: acc[b, j0 + u] += sum over the
// G H columns n of src[b, n] w[n, j0 + u] (src: the previous step's dpre / dgh, (B, G H),
// written by every block before the last grid barrier), one gate's H columns at a time
// so that the staged tile is the forward's (tile_rows x H floats). A warp item is
// (unit u, kSeqRows rows), the same items for every gate, so lane r < kSeqRows of the
// item's warp is the only thread that ever touches acc[b0 + rows0 + r, j0 + u] here.
template <typename T, int G>
__device__ __forceinline__ void sequence_backward_dots(const float* src, const T* ws, int B, int H, int U, int units,
                                                       int j0, int b0, int tile_rows, float* hs, float* acc_out) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int items = units * (tile_rows / kSeqRows);
  for (int q = 0; q < G; ++q) {
    __syncthreads();  // the previous users of hs are done (and ws is loaded)
    stage_state_rows(src + q * H, G * H, B, H, b0, tile_rows, hs);
    __syncthreads();
    for (int item = warp; item < items; item += kWarps) {
      const int u = item % units;
      const int rows0 = item / units * kSeqRows;
      float acc[kSeqRows][1];
      sequence_item_dots<T, 1>(hs + rows0 * H, ws + q * U * H, U, u, H, acc);
      float total[1];
      row_of_lane<1>(acc, total);
      const int b = b0 + rows0 + lane;
      if (lane < kSeqRows && b < B) {
        float* a = acc_out + static_cast<std::int64_t>(b) * H + j0 + u;
        *a = __ldcg(a) + total[0];
      }
    }
  }
  __syncthreads();  // acc_out of the tile complete for the epilogue's threads
}

// The step loop of a persistent backward (G gates): t = T-1 .. 0 and then t = -1 (dh0
// only). Per step: the dots of the block's units with the previous step's gradients
// src_all[t + 1] (dpre / dgh; none at t = T-1), accumulated onto the carry in dh0[:, j]
// (the block's own columns), then epilogue(t, b, j, carry) for every (row, unit) of the
// block: it reads dh_t = dh_all[t] + dh0 (carry: whether dh0 and the cell's own carries
// were written by step t + 1), stores the step's gradients at columns q H + j and the new
// carries; then a grid barrier. After the last barrier the dots of src_all[0] complete dh0.
template <typename T, int G, typename Epilogue>
__device__ __forceinline__ void sequence_backward(const T* __restrict__ w, const float* src_all, float* dh0,
                                                  int steps, int B, int H, int U, int tile_rows,
                                                  Epilogue epilogue) {
  extern __shared__ __align__(16) unsigned char seq_smem[];
  T* ws = reinterpret_cast<T*>(seq_smem);
  float* hs = reinterpret_cast<float*>(seq_smem + sequence_w_bytes(G, U, H, sizeof(T)));
  cg::grid_group grid = cg::this_grid();
  const int j0 = static_cast<int>(blockIdx.x) * U;
  const int units = max(0, min(U, H - j0));  // 0 only if the grid were oversized; still syncs
  load_weight_slice<T, G, false>(w, H, j0, U, units, ws);
  const std::int64_t step_grads = static_cast<std::int64_t>(B) * G * H;

  for (int t = steps - 1; t >= -1; --t) {
    const float* src = t + 1 < steps ? src_all + (t + 1) * step_grads : nullptr;
    for (int b0 = 0; b0 < B; b0 += tile_rows) {
      if (src != nullptr) sequence_backward_dots<T, G>(src, ws, B, H, U, units, j0, b0, tile_rows, hs, dh0);
      if (t < 0) continue;
      const int rows = min(tile_rows, B - b0);
      for (int e = static_cast<int>(threadIdx.x); e < rows * units; e += kThreads) {
        epilogue(t, b0 + e / units, j0 + e % units, src != nullptr);
      }
    }
    if (t >= 0) grid.sync();  // step t's gradients complete everywhere before any block stages them
  }
}

// LSTM: the carries dh0[:, j] = 0 (dh is all dots) and dc0[:, j] = dc_tot f; after the last
// barrier dh0 = dpre_0 w_hh, dc0 that of step 0.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    lstm_sequence_backward_kernel(const float* __restrict__ dh_all, const float* __restrict__ dc_all,
                                  const float* __restrict__ gates, const float* __restrict__ c0,
                                  const float* __restrict__ c_all, const T* __restrict__ w, float* dpre, float* dh0,
                                  float* dc0, int steps, int B, int H, int U, int tile_rows) {
  const std::int64_t step_state = static_cast<std::int64_t>(B) * H;
  sequence_backward<T, 4>(w, dpre, dh0, steps, B, H, U, tile_rows, [&](int t, int b, int j, bool carry) {
    const std::int64_t s = static_cast<std::int64_t>(b) * H + j;
    const std::int64_t ts = t * step_state + s;
    const std::int64_t g = (t * step_state + static_cast<std::int64_t>(b) * H) * 4 + j;
    const float dh = dh_all[ts] + (carry ? __ldcg(dh0 + s) : 0.f);
    const float dc_next = dc_all[ts] + (carry ? __ldcg(dc0 + s) : 0.f);
    const float ig = gates[g];
    const float fg = gates[g + H];
    const float gg = gates[g + 2 * H];
    const float og = gates[g + 3 * H];
    const float tc = tanhf(c_all[ts]);
    const float c_prev = t == 0 ? c0[s] : c_all[ts - step_state];
    const float dct = dc_next + dh * og * (1.f - tc * tc);
    dpre[g] = dct * gg * (ig * (1.f - ig));
    dpre[g + H] = dct * c_prev * (fg * (1.f - fg));
    dpre[g + 2 * H] = dct * ig * (1.f - gg * gg);
    dpre[g + 3 * H] = dh * tc * (og * (1.f - og));
    dh0[s] = 0.f;
    dc0[s] = dct * fg;
  });
}

// GRU: the carry dh0[:, j] = dh_t z (the direct path h_{t-1} -> h_t) and src the previous
// step's dgh = [dr | dz | dn r]; after the last barrier dh0 = dh_0 z_0 + dgh_0 w_hh.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    gru_sequence_backward_kernel(const float* __restrict__ dh_all, const float* __restrict__ saved,
                                 const float* __restrict__ h0, const float* __restrict__ h_all,
                                 const T* __restrict__ w, float* __restrict__ dgx, float* dgh, float* dh0, int steps,
                                 int B, int H, int U, int tile_rows) {
  const std::int64_t step_state = static_cast<std::int64_t>(B) * H;
  sequence_backward<T, 3>(w, dgh, dh0, steps, B, H, U, tile_rows, [&](int t, int b, int j, bool carry) {
    const std::int64_t s = static_cast<std::int64_t>(b) * H + j;
    const std::int64_t ts = t * step_state + s;
    const std::int64_t row = t * step_state + static_cast<std::int64_t>(b) * H;
    const std::int64_t g = row * 3 + j;
    const std::int64_t v = row * 4 + j;
    const float dh = dh_all[ts] + (carry ? __ldcg(dh0 + s) : 0.f);
    const float r = saved[v];
    const float z = saved[v + H];
    const float n = saved[v + 2 * H];
    const float ghn = saved[v + 3 * H];
    const float h_prev = t == 0 ? h0[s] : h_all[ts - step_state];
    const float dn = dh * (1.f - z) * (1.f - n * n);
    const float dz = dh * (h_prev - n) * (z * (1.f - z));
    const float dr = dn * ghn * (r * (1.f - r));
    dgx[g] = dr;
    dgx[g + H] = dz;
    dgx[g + 2 * H] = dn;
    dgh[g] = dr;
    dgh[g + H] = dz;
    dgh[g + 2 * H] = dn * r;
    dh0[s] = dh * z;
  });
}

// ---------------------------------------------------------------------------
// Host side.

// Keeps every in-kernel int index (a row or unit plus a tile, G H) inside int.
constexpr std::int64_t kMaxDim = INT_MAX / 4 - 1024;

void check_sizes(const char* where, std::int64_t B, std::int64_t H) {
  check_arg(B >= 0 && B <= kMaxDim, where,
            "B must be in [0, " + std::to_string(kMaxDim) + "], got " + std::to_string(B));
  check_arg(H >= 0 && H <= kMaxDim, where,
            "H must be in [0, " + std::to_string(kMaxDim) + "], got " + std::to_string(H));
  check_arg(ceil_div<std::int64_t>(B, kTileRows) <= 65535, where,
            "B must be at most " + std::to_string(65535 * kTileRows) + " (grid rows), got " + std::to_string(B));
}

void check_pointers(const char* where, std::initializer_list<std::pair<const char*, std::uintptr_t>> ptrs) {
  for (const auto& [name, p] : ptrs) check_required(where, name, p);
}

dim3 step_grid(std::int64_t B, std::int64_t H) {
  return dim3(static_cast<unsigned>(ceil_div<std::int64_t>(H, kTileUnits)),
              static_cast<unsigned>(ceil_div<std::int64_t>(B, kTileRows)));
}

// How a persistent launch is laid out: `blocks` blocks of U units, tile_rows rows of h
// per staged tile, smem bytes of dynamic shared memory. blocks == 0: it does not fit.
struct SequencePlan {
  int blocks = 0;
  int U = 0;
  int tile_rows = 0;
  int smem = 0;
};

template <typename T>
SequencePlan plan_sequence(const char* where, const void* kernel, int gates, std::int64_t B, std::int64_t H) {
  SequencePlan none;
  int device = 0;
  check_cuda(cudaGetDevice(&device), where);
  int sms = 0, smem_optin = 0, cooperative = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), where);
  check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), where);
  check_cuda(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device), where);
  if (cooperative == 0 || sms <= 0 || H <= 0) return none;
  const std::int64_t U = ceil_div<std::int64_t>(H, sms);
  const std::int64_t blocks = ceil_div<std::int64_t>(H, U);  // <= sms: one wave at one block per SM
  const std::int64_t w_bytes = sequence_w_bytes(gates, U, H, sizeof(T));
  const std::int64_t row_bytes = H * static_cast<std::int64_t>(sizeof(float));
  if (w_bytes + kSeqRows * row_bytes > smem_optin) return none;
  const std::int64_t room_rows = (smem_optin - w_bytes) / row_bytes / kSeqRows * kSeqRows;
  const std::int64_t want_rows = std::max<std::int64_t>(ceil_div<std::int64_t>(B, kSeqRows) * kSeqRows, kSeqRows);
  const std::int64_t tile_rows = std::min({room_rows, want_rows, static_cast<std::int64_t>(kSeqMaxTileRows)});
  const std::int64_t smem = w_bytes + tile_rows * row_bytes;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             where);
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<std::size_t>(smem)),
             where);
  if (static_cast<std::int64_t>(per_sm) * sms < blocks) return none;  // not co-resident: a grid barrier would hang
  SequencePlan plan;
  plan.blocks = static_cast<int>(blocks);
  plan.U = static_cast<int>(U);
  plan.tile_rows = static_cast<int>(tile_rows);
  plan.smem = static_cast<int>(smem);
  return plan;
}

template <typename T>
const void* sequence_kernel(int gates, bool forward) {
  if (gates == 4) {
    return forward ? reinterpret_cast<const void*>(&lstm_sequence_kernel<T>)
                   : reinterpret_cast<const void*>(&lstm_sequence_backward_kernel<T>);
  }
  return forward ? reinterpret_cast<const void*>(&gru_sequence_kernel<T>)
                 : reinterpret_cast<const void*>(&gru_sequence_backward_kernel<T>);
}

// Plans and launches a persistent kernel (weight dtype T, `gates`, forward or backward)
// whose arguments are ptrs... (exactly its pointer parameter types) followed by
// (steps, B, H, U, tile_rows); false, launching nothing, when it does not fit.
template <typename T, typename... Ptrs>
bool launch_sequence(const char* where, int gates, bool forward, std::int64_t steps, std::int64_t B,
                     std::int64_t H, std::uintptr_t stream, Ptrs... ptrs) {
  const void* kernel = sequence_kernel<T>(gates, forward);
  const SequencePlan plan = plan_sequence<T>(where, kernel, gates, B, H);
  if (plan.blocks == 0) return false;
  int steps_ = static_cast<int>(steps), b = static_cast<int>(B), h = static_cast<int>(H), u = plan.U,
      rows = plan.tile_rows;
  void* args[] = {&ptrs..., &steps_, &b, &h, &u, &rows};
  check_cuda(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kThreads), args,
                                         static_cast<std::size_t>(plan.smem), reinterpret_cast<cudaStream_t>(stream)),
             where);
  check_cuda(cudaGetLastError(), where);
  return true;
}

void check_sequence_sizes(const char* where, std::int64_t T, std::int64_t B, std::int64_t H) {
  check_sizes(where, B, H);
  check_arg(T >= 0 && T <= INT_MAX, where, "T must be in [0, " + std::to_string(INT_MAX) + "], got " +
                                               std::to_string(T));
}

}  // namespace

void lstm_step_forward(std::uintptr_t gx, std::uintptr_t h, std::uintptr_t c, std::uintptr_t w_hh,
                       std::uintptr_t h_next, std::uintptr_t c_next, std::uintptr_t gates, std::int64_t B,
                       std::int64_t H, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "lstm_step_forward";
  check_dtype_code(kWhere, dtype);
  check_sizes(kWhere, B, H);
  if (B == 0 || H == 0) return;
  check_pointers(kWhere, {{"gx", gx}, {"h", h}, {"c", c}, {"w_hh", w_hh}, {"h_next", h_next}, {"c_next", c_next},
                          {"gates", gates}});
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    lstm_step_forward_kernel<T><<<step_grid(B, H), kThreads, 0, cuda_stream>>>(
        as_const<float>(gx), as_const<float>(h), as_const<float>(c), as_const<T>(w_hh), as_mutable<float>(h_next),
        as_mutable<float>(c_next), as_mutable<float>(gates), static_cast<int>(B), static_cast<int>(H));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void lstm_step_backward(std::uintptr_t dh_next, std::uintptr_t dc_next, std::uintptr_t gates, std::uintptr_t c,
                        std::uintptr_t c_next, std::uintptr_t w_hh, std::uintptr_t dpre, std::uintptr_t dh,
                        std::uintptr_t dc, std::int64_t B, std::int64_t H, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "lstm_step_backward";
  check_dtype_code(kWhere, dtype);
  check_sizes(kWhere, B, H);
  if (B == 0 || H == 0) return;
  check_pointers(kWhere, {{"dh_next", dh_next}, {"dc_next", dc_next}, {"gates", gates}, {"c", c}, {"c_next", c_next},
                          {"w_hh", w_hh}, {"dpre", dpre}, {"dh", dh}, {"dc", dc}});
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    lstm_step_backward_kernel<T><<<step_grid(B, H), kThreads, 0, cuda_stream>>>(
        as_const<float>(dh_next), as_const<float>(dc_next), as_const<float>(gates), as_const<float>(c),
        as_const<float>(c_next), as_const<T>(w_hh), as_mutable<float>(dpre), as_mutable<float>(dh),
        as_mutable<float>(dc), static_cast<int>(B), static_cast<int>(H));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void gru_step_forward(std::uintptr_t gx, std::uintptr_t h, std::uintptr_t w_hh, std::uintptr_t b_hh,
                      std::uintptr_t h_next, std::uintptr_t saved, std::int64_t B, std::int64_t H, int dtype,
                      std::uintptr_t stream) {
  constexpr const char* kWhere = "gru_step_forward";
  check_dtype_code(kWhere, dtype);
  check_sizes(kWhere, B, H);
  if (B == 0 || H == 0) return;
  check_pointers(kWhere, {{"gx", gx}, {"h", h}, {"w_hh", w_hh}, {"h_next", h_next}, {"saved", saved}});
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    gru_step_forward_kernel<T><<<step_grid(B, H), kThreads, 0, cuda_stream>>>(
        as_const<float>(gx), as_const<float>(h), as_const<T>(w_hh), as_const<T>(b_hh), as_mutable<float>(h_next),
        as_mutable<float>(saved), static_cast<int>(B), static_cast<int>(H));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void gru_step_backward(std::uintptr_t dh_next, std::uintptr_t saved, std::uintptr_t h, std::uintptr_t w_hh,
                       std::uintptr_t dgx, std::uintptr_t dgh, std::uintptr_t dh, std::int64_t B, std::int64_t H,
                       int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "gru_step_backward";
  check_dtype_code(kWhere, dtype);
  check_sizes(kWhere, B, H);
  if (B == 0 || H == 0) return;
  check_pointers(kWhere, {{"dh_next", dh_next}, {"saved", saved}, {"h", h}, {"w_hh", w_hh}, {"dgx", dgx},
                          {"dgh", dgh}, {"dh", dh}});
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    gru_step_backward_kernel<T><<<step_grid(B, H), kThreads, 0, cuda_stream>>>(
        as_const<float>(dh_next), as_const<float>(saved), as_const<float>(h), as_const<T>(w_hh),
        as_mutable<float>(dgx), as_mutable<float>(dgh), as_mutable<float>(dh), static_cast<int>(B),
        static_cast<int>(H));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void rnn_step_forward(std::uintptr_t gx, std::uintptr_t h, std::uintptr_t w_hh, std::uintptr_t h_next,
                      std::int64_t B, std::int64_t H, bool relu, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "rnn_step_forward";
  check_dtype_code(kWhere, dtype);
  check_sizes(kWhere, B, H);
  if (B == 0 || H == 0) return;
  check_pointers(kWhere, {{"gx", gx}, {"h", h}, {"w_hh", w_hh}, {"h_next", h_next}});
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    auto kernel = relu ? &rnn_step_forward_kernel<T, true> : &rnn_step_forward_kernel<T, false>;
    kernel<<<step_grid(B, H), kThreads, 0, cuda_stream>>>(as_const<float>(gx), as_const<float>(h), as_const<T>(w_hh),
                                                          as_mutable<float>(h_next), static_cast<int>(B),
                                                          static_cast<int>(H));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

void rnn_step_backward(std::uintptr_t dh_next, std::uintptr_t h_next, std::uintptr_t w_hh, std::uintptr_t dpre,
                       std::uintptr_t dh, std::int64_t B, std::int64_t H, bool relu, int dtype,
                       std::uintptr_t stream) {
  constexpr const char* kWhere = "rnn_step_backward";
  check_dtype_code(kWhere, dtype);
  check_sizes(kWhere, B, H);
  if (B == 0 || H == 0) return;
  check_pointers(kWhere, {{"dh_next", dh_next}, {"h_next", h_next}, {"w_hh", w_hh}, {"dpre", dpre}, {"dh", dh}});
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    auto kernel = relu ? &rnn_step_backward_kernel<T, true> : &rnn_step_backward_kernel<T, false>;
    kernel<<<step_grid(B, H), kThreads, 0, cuda_stream>>>(as_const<float>(dh_next), as_const<float>(h_next),
                                                          as_const<T>(w_hh), as_mutable<float>(dpre),
                                                          as_mutable<float>(dh), static_cast<int>(B),
                                                          static_cast<int>(H));
  });
  check_cuda(cudaGetLastError(), kWhere);
}

bool rnn_sequence_fits(int gates, std::int64_t B, std::int64_t H, int dtype) {
  constexpr const char* kWhere = "rnn_sequence_fits";
  check_dtype_code(kWhere, dtype);
  check_arg(gates == 3 || gates == 4, kWhere, "gates must be 4 (LSTM) or 3 (GRU), got " + std::to_string(gates));
  check_sizes(kWhere, B, H);
  bool fits = false;
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    fits = plan_sequence<T>(kWhere, sequence_kernel<T>(gates, true), gates, B, H).blocks > 0 &&
           plan_sequence<T>(kWhere, sequence_kernel<T>(gates, false), gates, B, H).blocks > 0;
  });
  return fits;
}

bool lstm_sequence_forward(std::uintptr_t gx, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t w_hh,
                           std::uintptr_t h_all, std::uintptr_t c_all, std::uintptr_t gates, std::int64_t T,
                           std::int64_t B, std::int64_t H, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "lstm_sequence_forward";
  check_dtype_code(kWhere, dtype);
  check_sequence_sizes(kWhere, T, B, H);
  if (T == 0 || B == 0 || H == 0) return true;
  check_pointers(kWhere, {{"gx", gx}, {"h0", h0}, {"c0", c0}, {"w_hh", w_hh}, {"h_all", h_all}, {"c_all", c_all},
                          {"gates", gates}});
  bool launched = false;
  dispatch_dtype(dtype, [&](auto type) {
    using T_ = typename decltype(type)::type;
    launched = launch_sequence<T_>(kWhere, 4, true, T, B, H, stream, as_const<float>(gx), as_const<float>(h0),
                                   as_const<float>(c0), as_const<T_>(w_hh), as_mutable<float>(h_all),
                                   as_mutable<float>(c_all), as_mutable<float>(gates));
  });
  return launched;
}

bool gru_sequence_forward(std::uintptr_t gx, std::uintptr_t h0, std::uintptr_t w_hh, std::uintptr_t b_hh,
                          std::uintptr_t h_all, std::uintptr_t saved, std::int64_t T, std::int64_t B,
                          std::int64_t H, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "gru_sequence_forward";
  check_dtype_code(kWhere, dtype);
  check_sequence_sizes(kWhere, T, B, H);
  if (T == 0 || B == 0 || H == 0) return true;
  check_pointers(kWhere, {{"gx", gx}, {"h0", h0}, {"w_hh", w_hh}, {"h_all", h_all}, {"saved", saved}});
  bool launched = false;
  dispatch_dtype(dtype, [&](auto type) {
    using T_ = typename decltype(type)::type;
    launched = launch_sequence<T_>(kWhere, 3, true, T, B, H, stream, as_const<float>(gx), as_const<float>(h0),
                                   as_const<T_>(w_hh), as_const<T_>(b_hh), as_mutable<float>(h_all),
                                   as_mutable<float>(saved));
  });
  return launched;
}

bool lstm_sequence_backward(std::uintptr_t dh_all, std::uintptr_t dc_all, std::uintptr_t gates, std::uintptr_t c0,
                            std::uintptr_t c_all, std::uintptr_t w_hh, std::uintptr_t dpre_all, std::uintptr_t dh0,
                            std::uintptr_t dc0, std::int64_t T, std::int64_t B, std::int64_t H, int dtype,
                            std::uintptr_t stream) {
  constexpr const char* kWhere = "lstm_sequence_backward";
  check_dtype_code(kWhere, dtype);
  check_sequence_sizes(kWhere, T, B, H);
  if (T == 0 || B == 0 || H == 0) return true;
  check_pointers(kWhere, {{"dh_all", dh_all}, {"dc_all", dc_all}, {"gates", gates}, {"c0", c0}, {"c_all", c_all},
                          {"w_hh", w_hh}, {"dpre_all", dpre_all}, {"dh0", dh0}, {"dc0", dc0}});
  bool launched = false;
  dispatch_dtype(dtype, [&](auto type) {
    using T_ = typename decltype(type)::type;
    launched = launch_sequence<T_>(kWhere, 4, false, T, B, H, stream, as_const<float>(dh_all),
                                   as_const<float>(dc_all), as_const<float>(gates), as_const<float>(c0),
                                   as_const<float>(c_all), as_const<T_>(w_hh), as_mutable<float>(dpre_all),
                                   as_mutable<float>(dh0), as_mutable<float>(dc0));
  });
  return launched;
}

bool gru_sequence_backward(std::uintptr_t dh_all, std::uintptr_t saved, std::uintptr_t h0, std::uintptr_t h_all,
                           std::uintptr_t w_hh, std::uintptr_t dgx_all, std::uintptr_t dgh_all, std::uintptr_t dh0,
                           std::int64_t T, std::int64_t B, std::int64_t H, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "gru_sequence_backward";
  check_dtype_code(kWhere, dtype);
  check_sequence_sizes(kWhere, T, B, H);
  if (T == 0 || B == 0 || H == 0) return true;
  check_pointers(kWhere, {{"dh_all", dh_all}, {"saved", saved}, {"h0", h0}, {"h_all", h_all}, {"w_hh", w_hh},
                          {"dgx_all", dgx_all}, {"dgh_all", dgh_all}, {"dh0", dh0}});
  bool launched = false;
  dispatch_dtype(dtype, [&](auto type) {
    using T_ = typename decltype(type)::type;
    launched = launch_sequence<T_>(kWhere, 3, false, T, B, H, stream, as_const<float>(dh_all),
                                   as_const<float>(saved), as_const<float>(h0), as_const<float>(h_all),
                                   as_const<T_>(w_hh), as_mutable<float>(dgx_all), as_mutable<float>(dgh_all),
                                   as_mutable<float>(dh0));
  });
  return launched;
}

}  // namespace kiln
