// Flash attention (FlashAttention-2 scheme), forward and recompute-based backward.
//
// Every kernel runs blocks of 4 warps, and each warp owns 16 rows of a 64-row tile that
// stays in shared memory for the whole block: query rows (forward, dq) or key rows
// (dk / dv). The other operand streams past it through shared memory in tiles, loaded
// with cp.async (16-byte copies, zero-filled past the end of the sequence) so that each
// load overlaps the math on the tile before it.
//
// Warp-level products use the register layout of the tensor-core instruction
// mma.sync.m16n8k16 (PTX ISA, "matrix fragments for mma.m16n8k16"): lane = 4 g + t holds,
// of a 16 x 8 float32 tile, rows g and g + 8 at columns 2t and 2t + 1. A score tile
// S (16 x N) is float s[N / 8][4] with s[j][2 ri + e] = S[g + 8 ri][8 j + 2 t + e]; the
// row statistics of the softmax reduce over the 4 lanes of a quad. That layout is also
// the A operand of the next product (P V, dS K, P^T dO, dS^T Q), so P never leaves the
// registers. Two primitives cover every product:
//   mma_abt: acc += A B^T, A (16 x K) and B (N x K) rows in shared memory;
//   mma_pb:  acc += P B, P in registers (16 x K, accumulator layout), B (K x N) rows in
//            shared memory.
// float16 / bfloat16: ldmatrix (.trans for the K x N operand) and mma.sync with float32
// accumulation; P and dS are rounded to the storage type for their product, as in
// FlashAttention-2. float32: the same register layout computed with FFMA (operands read
// from shared memory; P's columns come from the quad by shuffles), no tf32.
//
// Scores stay in log2 units: p = exp2(fma(s, scale * log2(e), -m)) with m the running
// row maximum of s * scale * log2(e), so that the fused multiply-add keeps large logits
// (|s| ~ 1e4) exact up to one rounding of the small difference. lse = (m + log2 l) ln 2,
// converted in double so that the only rounding is lse's own to float32; backward turns
// it back into log2 units as a float hi + lo pair (also in double), so that
// p = exp2(fma(s, sl2, -hi) - lo) adds no error of its own. Hidden scores are -inf and
// their p is selected to 0, so any sign of scale works.
//
// Forward (grid: one block per (64-query tile, batch * query head), tiles of one head
// adjacent, the longest causal tiles first): online softmax over key tiles, running
// max m and sum l per row, o rescaled by exp2(m_old - m_new). Key tiles wholly above the
// causal diagonal are never visited (loop bound); tiles that every row of a warp sees in
// full (no padding mask, no Tk tail, below the diagonal) skip the mask.
//
// Backward: delta_i = sum_d do_id o_id into the workspace (one warp per row); dq over
// query tiles with the forward's loop (dp = do v^T, p from lse, ds = p (dp - delta),
// dq += ds k); dk / dv over 64-key tiles of each (batch, kv head): loop over the Hq / Hkv
// query heads of the group and over the query tiles that see the key tile (causal: from
// the first query whose diagonal reaches it), dv += p^T do, dk += ds^T q, registers only.
// No atomics: every output element has one writer, and the sums run in a fixed order.
//
// Outputs are staged through the warp's own rows of shared memory and written with
// 16-byte stores. Global accesses are 16-byte vectors when every pointer is 16-byte
// aligned (rows are D * sizeof(T) bytes, a multiple of 32), else element-wise.
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "kiln/attention.h"
#include "kiln/common.cuh"
#include "kiln/dispatch.cuh"

namespace kiln {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kWarpRows = 16;                   // rows of an mma tile, owned by one warp
constexpr int kBlockRows = kWarps * kWarpRows;  // the resident tile: 64 rows
constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;
constexpr int kDeltaRowsPerBlock = 8;           // delta: a warp per row, 256 threads

template <int V>
using IntC = std::integral_constant<int, V>;

// ---------------------------------------------------------------------------
// Tile shapes and shared-memory layouts. Shared rows hold D elements plus 16 bytes of
// padding, which makes every ldmatrix phase and every float4 / float2 fragment read hit
// distinct banks for all supported D. All tiles stay under 99 KB (the opt-in limit of
// sm_86 / sm_89). The kernels declare one block per SM as their minimum
// (__launch_bounds__(128, 1)), which lets ptxas use up to 255 registers: without it, it
// capped some at 168 and spilled; with it none spills (ptxas -v, sm_80 and sm_90).

template <typename T, int D>
struct Shape {
  static constexpr bool kF32 = std::is_same_v<T, float>;
  static constexpr int kLd = D + 16 / static_cast<int>(sizeof(T));
  static constexpr int kRowBytes = kLd * static_cast<int>(sizeof(T));
  // Keys per step of the forward and the dq kernel; queries per step of dk / dv.
  static constexpr int kFwdKeys = kF32 && D >= 128 ? 32 : 64;
  static constexpr int kDqKeys = !kF32 ? 64 : D >= 128 ? 16 : D >= 80 ? 32 : 64;
  static constexpr int kDkdvQueries = !kF32 ? (D > 64 ? 32 : 64) : D >= 128 ? 16 : D >= 80 ? 32 : 64;

  // forward: q (64 rows), k, v (kFwdKeys rows each), the tile's hidden-key flags.
  static constexpr int kFwdSmem = (kBlockRows + 2 * kFwdKeys) * kRowBytes + kFwdKeys;
  // dq: q, do (64 rows each), k, v (kDqKeys rows each), hidden-key flags.
  static constexpr int kDqSmem = (2 * kBlockRows + 2 * kDqKeys) * kRowBytes + kDqKeys;
  // dk / dv: k, v (64 rows each), q (two buffers), do (one); lse hi and lo (two buffers
  // each), delta (one).
  static constexpr int kDkdvSmem =
      (2 * kBlockRows + 3 * kDkdvQueries) * kRowBytes + 5 * kDkdvQueries * static_cast<int>(sizeof(float));

  static_assert(D % 16 == 0, "head dims are multiples of 16");
  static_assert(kFwdKeys % 16 == 0 && kDqKeys % 16 == 0 && kDkdvQueries % 16 == 0, "steps are k16 multiples");
  static_assert(kRowBytes % 16 == 0, "shared rows keep 16-byte alignment");
};

constexpr int kMaxSmem = 99 * 1024;

// ---------------------------------------------------------------------------
// Asynchronous copies and warp-level matrix instructions (sm_80+).

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's most recent groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// c (16 x 8, float32) += a (16 x 16) b (16 x 8).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "tensor-core path is for half and bfloat16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two float32 values as the packed pair (lo in the low half) of an A fragment register.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
  }
}

// ---------------------------------------------------------------------------
// The two warp products. acc, p: the accumulator layout (header comment). a, b point at
// row 0 of the operand in shared memory, rows LD elements apart.

// acc (16 x 8 NT) += A (16 x K) B^T, B (8 NT x K).
template <typename T, int NT, int K, int LD>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* a, const T* b, int lane) {
  if constexpr (std::is_same_v<T, float>) {
    const int g = lane >> 2;
    const int t = lane & 3;
    const float* a0p = a + g * LD;
    const float* a1p = a + (g + 8) * LD;
    const float* bp = b + 2 * t * LD;
    // Partly unrolled: full unrolling lets ptxas hoist the loads of later steps.
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
      const float4 a0 = *reinterpret_cast<const float4*>(a0p + k);
      const float4 a1 = *reinterpret_cast<const float4*>(a1p + k);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 bv = *reinterpret_cast<const float4*>(bp + (8 * j + e) * LD + k);
          float c0 = acc[j][e];
          float c1 = acc[j][2 + e];
          c0 = fmaf(a0.x, bv.x, c0);
          c1 = fmaf(a1.x, bv.x, c1);
          c0 = fmaf(a0.y, bv.y, c0);
          c1 = fmaf(a1.y, bv.y, c1);
          c0 = fmaf(a0.z, bv.z, c0);
          c1 = fmaf(a1.z, bv.z, c1);
          c0 = fmaf(a0.w, bv.w, c0);
          c1 = fmaf(a1.w, bv.w, c1);
          acc[j][e] = c0;
          acc[j][2 + e] = c1;
        }
      }
    }
  } else {
    static_assert(NT % 2 == 0, "B fragments come in pairs of n8 tiles");
    // ldmatrix.x4 row addresses: lanes 8i..8i+7 give the rows of matrix i.
    // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    const T* a_lane = a + (lane & 15) * LD + (lane >> 4) * 8;
    // B: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
    const T* b_lane = b + ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int k = 0; k < K; k += 16) {
      unsigned af[4];
      ldmatrix_x4(af, a_lane + k);
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        unsigned bf[4];
        ldmatrix_x4(bf, b_lane + jj * 16 * LD + k);
        mma_16816<T>(acc[2 * jj], af, bf[0], bf[1]);
        mma_16816<T>(acc[2 * jj + 1], af, bf[2], bf[3]);
      }
    }
  }
}

// acc (16 x 8 NT) += P (16 x 8 KT, registers) B, B (8 KT x 8 NT).
template <typename T, int KT, int NT, int LD>
__device__ __forceinline__ void mma_pb(float (&acc)[NT][4], const float (&p)[KT][4], const T* b, int lane) {
  if constexpr (std::is_same_v<T, float>) {
    const int t = lane & 3;
    const int quad = lane & ~3;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
      for (int src = 0; src < 4; ++src) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          // P[g][8 kt + 2 src + e] and P[g + 8][...] live in lane (g, src) of this quad.
          const float p0 = __shfl_sync(kFullMask, p[kt][e], quad | src);
          const float p1 = __shfl_sync(kFullMask, p[kt][2 + e], quad | src);
          const float* brow = b + (8 * kt + 2 * src + e) * LD + 2 * t;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const float2 bv = *reinterpret_cast<const float2*>(brow + 8 * j);
            acc[j][0] = fmaf(p0, bv.x, acc[j][0]);
            acc[j][1] = fmaf(p0, bv.y, acc[j][1]);
            acc[j][2] = fmaf(p1, bv.x, acc[j][2]);
            acc[j][3] = fmaf(p1, bv.y, acc[j][3]);
          }
        }
      }
    }
  } else {
    static_assert(KT % 2 == 0 && NT % 2 == 0, "k16 steps and pairs of n8 tiles");
    // .trans matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
    const T* b_lane = b + (lane & 15) * LD + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < KT / 2; ++kk) {
      // Two accumulator tiles side by side are one A fragment (rows g, g + 8; k 2t.., 2t+8..).
      const unsigned af[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                              pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                              pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        unsigned bf[4];
        ldmatrix_x4_trans(bf, b_lane + kk * 16 * LD + jj * 16);
        mma_16816<T>(acc[2 * jj], af, bf[0], bf[1]);
        mma_16816<T>(acc[2 * jj + 1], af, bf[2], bf[3]);
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

// lse (natural log) in log2 units as hi + lo floats; +inf (a row that sees no key, or a
// row past Tq) gives (+inf, 0), so that p = exp2(fma(s, sl2, -hi) - lo) = 0.
__device__ __forceinline__ void lse_log2(float lse, float& hi, float& lo) {
  if (isinf(lse)) {
    hi = lse;
    lo = 0.f;
    return;
  }
  const double x = static_cast<double>(lse) * kLog2e;
  hi = static_cast<float>(x);
  lo = static_cast<float>(x - static_cast<double>(hi));
}

// ---------------------------------------------------------------------------
// Moving tiles.

// Rows [row0, row0 + ROWS) of a (rows, D) row-major matrix into shared memory (pitch LD);
// rows at or past `rows` are zero. vec: cp.async 16-byte copies (the caller commits and
// waits); else element-wise loads and stores, complete on return.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* mat, int row0, int rows, bool vec) {
  constexpr int kVec = Vec16<T>::kSize;
  constexpr int kChunksPerRow = D / kVec;
  constexpr int kChunks = ROWS * kChunksPerRow;
  constexpr int kLd = Shape<T, D>::kLd;
  constexpr int kIters = ceil_div(kChunks, kThreads);
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int r = c / kChunksPerRow;
      const int col = c % kChunksPerRow * kVec;
      const bool valid = row0 + r < rows;
      const T* src = valid ? mat + static_cast<std::int64_t>(row0 + r) * D + col : mat;
      T* dst = smem + r * kLd + col;
      if (vec) {
        cp_async16(dst, src, valid);
      } else {
        Vec16<T> run;
#pragma unroll
        for (int j = 0; j < kVec; ++j) run.v[j] = valid ? src[j] : from_float<T>(0.f);
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(run.v);
      }
    }
  }
}

// hide[c] = 1 when key n0 + c is hidden from every query: past Tk, or padded out.
template <int BN>
__device__ __forceinline__ void load_hidden(unsigned char* hide, const unsigned char* kpm_row, int n0, int Tk) {
  for (int c = static_cast<int>(threadIdx.x); c < BN; c += kThreads) {
    const int n = n0 + c;
    hide[c] = n >= Tk || (kpm_row != nullptr && kpm_row[n] != 0);
  }
}

// Writes acc * mul[ri] as T into the warp's 16 staged rows (pitch LD).
template <typename T, int NT, int LD>
__device__ __forceinline__ void stage_rows(T* s, const float (&acc)[NT][4], float mul0, float mul1, int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const float mul = ri == 0 ? mul0 : mul1;
      T* dst = s + (g + 8 * ri) * LD + 8 * j + 2 * t;
      dst[0] = from_float<T>(acc[j][2 * ri] * mul);
      dst[1] = from_float<T>(acc[j][2 * ri + 1] * mul);
    }
  }
}

// Copies the warp's 16 staged rows (pitch LD) to rows row0.. of a (rows, D) matrix.
template <typename T, int D>
__device__ __forceinline__ void write_rows(T* out, const T* s, int row0, int rows, int lane, bool vec) {
  constexpr int kVec = Vec16<T>::kSize;
  constexpr int kChunksPerRow = D / kVec;
  constexpr int kLd = Shape<T, D>::kLd;
  static_assert(kWarpRows * kChunksPerRow % kWarp == 0, "whole warp iterations");
#pragma unroll
  for (int i = 0; i < kWarpRows * kChunksPerRow / kWarp; ++i) {
    const int c = lane + i * kWarp;
    const int r = c / kChunksPerRow;
    const int col = c % kChunksPerRow * kVec;
    if (row0 + r < rows) {
      T* dst = out + static_cast<std::int64_t>(row0 + r) * D + col;
      const T* src = s + r * kLd + col;
      if (vec) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) dst[j] = src[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Masks and probabilities on a score tile in the accumulator layout.

// Rows are queries (row_q: the query of the lane's row g), columns keys n0 + c: -inf where
// the key is hidden (hide[c]) or above the causal diagonal.
template <int NT>
__device__ __forceinline__ void mask_query_rows(float (&s)[NT][4], const unsigned char* hide, bool causal,
                                                int row_q, int n0, int diag, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = 8 * j + 2 * t + e;
      const bool hidden = hide[c] != 0;
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        if (hidden || (causal && n0 + c > row_q + 8 * ri + diag)) s[j][2 * ri + e] = -INFINITY;
      }
    }
  }
}

// Rows are keys (row_k: the key of the lane's row g), columns queries m0 + c: -inf above
// the causal diagonal.
template <int NT>
__device__ __forceinline__ void mask_key_rows(float (&s)[NT][4], int row_k, int m0, int diag, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = 8 * j + 2 * t + e;
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        if (row_k + 8 * ri > m0 + c + diag) s[j][2 * ri + e] = -INFINITY;
      }
    }
  }
}

// One online-softmax step: s (scores) becomes p = exp2(s sl2 - m_new), m (log2 units),
// the lane's partial row sums l and the output accumulator o are rescaled.
template <bool MASKED, int NT, int NO>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&o)[NO][4], float (&m)[2], float (&l)[2],
                                               float sl2) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float x = s[j][2 * ri + e];
        mx = fmaxf(mx, MASKED && x == -INFINITY ? -INFINITY : x * sl2);
      }
    }
    const float m_new = fmaxf(m[ri], quad_max(mx));
    const float shift = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen no key yet
    const float alpha = exp2f(m[ri] - shift);              // 0 while m[ri] is -inf
    m[ri] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float x = s[j][2 * ri + e];
        const float p = MASKED && x == -INFINITY ? 0.f : exp2f(fmaf(x, sl2, -shift));
        s[j][2 * ri + e] = p;
        sum += p;
      }
    }
    l[ri] = fmaf(l[ri], alpha, sum);
#pragma unroll
    for (int j = 0; j < NO; ++j) {
      o[j][2 * ri] *= alpha;
      o[j][2 * ri + 1] *= alpha;
    }
  }
}

// Backward, rows are queries: p = exp2(s sl2 - lse2[ri]) with lse2 = hi + lo;
// ds = p (dp - delta[ri]). p stays in s, ds replaces dp.
template <bool MASKED, int NT>
__device__ __forceinline__ void probs_and_ds_query_rows(float (&s)[NT][4], float (&dp)[NT][4], const float (&hi)[2],
                                                        const float (&lo)[2], const float (&delta)[2], float sl2) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float x = s[j][i];
      const float p = MASKED && x == -INFINITY ? 0.f : exp2f(fmaf(x, sl2, -hi[i >> 1]) - lo[i >> 1]);
      s[j][i] = p;
      dp[j][i] = p * (dp[j][i] - delta[i >> 1]);
    }
  }
}

// Backward, rows are keys: p^T = exp2(s sl2 - lse2[col]) from the step's lse2 = hi + lo in
// shared memory.
template <bool MASKED, int NT>
__device__ __forceinline__ void probs_key_rows(float (&s)[NT][4], const float* hi, const float* lo, float sl2,
                                               int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float hc = hi[8 * j + 2 * t + e];
      const float lc = lo[8 * j + 2 * t + e];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const float x = s[j][2 * ri + e];
        s[j][2 * ri + e] = MASKED && x == -INFINITY ? 0.f : exp2f(fmaf(x, sl2, -hc) - lc);
      }
    }
  }
}

// ds^T = p^T (dp^T - delta[col]), into dp.
template <int NT>
__device__ __forceinline__ void ds_key_rows(const float (&p)[NT][4], float (&dp)[NT][4], const float* delta, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float dc = delta[8 * j + 2 * t + e];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) dp[j][2 * ri + e] = p[j][2 * ri + e] * (dp[j][2 * ri + e] - dc);
    }
  }
}

// ---------------------------------------------------------------------------
// Kernels. bh: batch * heads + head; `group` = Hq / Hkv.

// The key range [0, n_end) that query rows [m0, m0 + 64) see at all.
__device__ __forceinline__ int key_end(int m0, int Tq, int Tk, bool causal) {
  if (!causal) return Tk;
  const int last = min(m0 + kBlockRows, Tq) - 1;
  return max(0, min(Tk, last + (Tk - Tq) + 1));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const unsigned char* __restrict__ kpm, T* __restrict__ o, float* __restrict__ lse,
                             int Hq, int Hkv, int Tq, int Tk, int q_tiles, int causal, int vec, float sl2) {
  using S = Shape<T, D>;
  constexpr int BN = S::kFwdKeys;
  constexpr int LD = S::kLd;
  constexpr int NTS = BN / 8;
  constexpr int NTO = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = q_s + kBlockRows * LD;
  T* v_s = k_s + BN * LD;
  unsigned char* hide_s = reinterpret_cast<unsigned char*>(v_s + BN * LD);

  const int bh = static_cast<int>(blockIdx.x) / q_tiles;
  const int tile_in_head = static_cast<int>(blockIdx.x) % q_tiles;
  const int tile = causal ? q_tiles - 1 - tile_in_head : tile_in_head;  // longest causal rows first
  const int m0 = tile * kBlockRows;
  const int b = bh / Hq;
  const int kvh = b * Hkv + bh % Hq / (Hq / Hkv);
  const T* q_bh = q + static_cast<std::int64_t>(bh) * Tq * D;
  const T* k_bh = k + static_cast<std::int64_t>(kvh) * Tk * D;
  const T* v_bh = v + static_cast<std::int64_t>(kvh) * Tk * D;
  const unsigned char* kpm_b = kpm != nullptr ? kpm + static_cast<std::int64_t>(b) * Tk : nullptr;
  const int diag = Tk - Tq;
  const int n_tiles = ceil_div(key_end(m0, Tq, Tk, causal), BN);

  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  T* q_w = q_s + warp * kWarpRows * LD;
  const int row_q = m0 + warp * kWarpRows + (lane >> 2);  // the lane's row g; row g + 8 is row_q + 8

  load_tile<T, D, kBlockRows>(q_s, q_bh, m0, Tq, vec);
  if (n_tiles > 0) {
    load_tile<T, D, BN>(k_s, k_bh, 0, Tk, vec);
    load_hidden<BN>(hide_s, kpm_b, 0, Tk);
  }
  cp_async_commit();

  float acc[NTO][4];
  zero(acc);
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * BN;
    cp_async_wait<0>();
    __syncthreads();  // k_j (and q) landed; every warp is done with v_{j-1}
    load_tile<T, D, BN>(v_s, v_bh, n0, Tk, vec);
    cp_async_commit();

    float s[NTS][4];
    zero(s);
    mma_abt<T, NTS, D, LD>(s, q_w, k_s, lane);
    const bool masked = kpm_b != nullptr || n0 + BN > Tk || (causal && n0 + BN - 1 > m0 + warp * kWarpRows + diag);
    if (masked) {
      mask_query_rows(s, hide_s, causal, row_q, n0, diag, lane);
      online_softmax<true>(s, acc, m, l, sl2);
    } else {
      online_softmax<false>(s, acc, m, l, sl2);
    }

    cp_async_wait<0>();
    __syncthreads();  // v_j landed; every warp is done with k_j and hide_s
    if (j + 1 < n_tiles) {
      load_tile<T, D, BN>(k_s, k_bh, n0 + BN, Tk, vec);
      load_hidden<BN>(hide_s, kpm_b, n0 + BN, Tk);
    }
    cp_async_commit();
    mma_pb<T, NTS, NTO, LD>(acc, s, v_s, lane);
  }
  cp_async_wait<0>();
  __syncthreads();  // q landed even when no key tile ran

  float inv[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const float total = quad_sum(l[ri]);
    inv[ri] = total > 0.f ? __fdividef(1.f, total) : 0.f;
    const int row = row_q + 8 * ri;
    if ((lane & 3) == 0 && row < Tq) {
      lse[static_cast<std::int64_t>(bh) * Tq + row] =
          total > 0.f ? static_cast<float>((static_cast<double>(m[ri]) + static_cast<double>(log2f(total))) * kLn2)
                      : INFINITY;
    }
  }
  __syncwarp();
  stage_rows<T, NTO, LD>(q_w, acc, inv[0], inv[1], lane);
  __syncwarp();
  write_rows<T, D>(o + static_cast<std::int64_t>(bh) * Tq * D, q_w, m0 + warp * kWarpRows, Tq, lane, vec);
}

// delta[row] = sum_d do[row, d] o[row, d], a warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kDeltaRowsPerBlock * kWarp)
    attention_delta_kernel(const T* __restrict__ grad_out, const T* __restrict__ o, float* __restrict__ delta,
                           std::int64_t rows, int vec) {
  constexpr int kVec = Vec16<T>::kSize;
  constexpr int kChunks = D / kVec;
  static_assert(kChunks <= kWarp, "one 16-byte run per lane");
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kDeltaRowsPerBlock + threadIdx.x / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  if (row >= rows) return;  // uniform per warp
  const T* dr = grad_out + row * D;
  const T* orow = o + row * D;
  float acc = 0.f;
  if (vec) {
    if (lane < kChunks) {
      Vec16<T> a;
      Vec16<T> c;
      *reinterpret_cast<uint4*>(a.v) = __ldg(reinterpret_cast<const uint4*>(dr + lane * kVec));
      *reinterpret_cast<uint4*>(c.v) = __ldg(reinterpret_cast<const uint4*>(orow + lane * kVec));
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc = fmaf(to_float(a.v[j]), to_float(c.v[j]), acc);
    }
  } else {
    for (int d = lane; d < D; d += kWarp) acc = fmaf(to_float(dr[d]), to_float(orow[d]), acc);
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
  if (lane == 0) delta[row] = acc;
}

// dq over a 64-query tile: the forward's key loop; dq = scale sum_j ds k.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                        const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                        const unsigned char* __restrict__ kpm, T* __restrict__ dq, int Hq, int Hkv, int Tq, int Tk,
                        int q_tiles, int causal, int vec, float sl2, float scale) {
  using S = Shape<T, D>;
  constexpr int BN = S::kDqKeys;
  constexpr int LD = S::kLd;
  constexpr int NTS = BN / 8;
  constexpr int NTO = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* do_s = q_s + kBlockRows * LD;
  T* k_s = do_s + kBlockRows * LD;
  T* v_s = k_s + BN * LD;
  unsigned char* hide_s = reinterpret_cast<unsigned char*>(v_s + BN * LD);

  const int bh = static_cast<int>(blockIdx.x) / q_tiles;
  const int tile_in_head = static_cast<int>(blockIdx.x) % q_tiles;
  const int tile = causal ? q_tiles - 1 - tile_in_head : tile_in_head;
  const int m0 = tile * kBlockRows;
  const int b = bh / Hq;
  const int kvh = b * Hkv + bh % Hq / (Hq / Hkv);
  const std::int64_t q_off = static_cast<std::int64_t>(bh) * Tq * D;
  const T* k_bh = k + static_cast<std::int64_t>(kvh) * Tk * D;
  const T* v_bh = v + static_cast<std::int64_t>(kvh) * Tk * D;
  const unsigned char* kpm_b = kpm != nullptr ? kpm + static_cast<std::int64_t>(b) * Tk : nullptr;
  const int diag = Tk - Tq;
  const int n_tiles = ceil_div(key_end(m0, Tq, Tk, causal), BN);

  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  T* q_w = q_s + warp * kWarpRows * LD;
  const T* do_w = do_s + warp * kWarpRows * LD;
  const int row_q = m0 + warp * kWarpRows + (lane >> 2);

  // Groups in flight, oldest first: {q, do}, {v_0}, {k_0, hide_0}.
  load_tile<T, D, kBlockRows>(q_s, q + q_off, m0, Tq, vec);
  load_tile<T, D, kBlockRows>(do_s, grad_out + q_off, m0, Tq, vec);
  cp_async_commit();
  if (n_tiles > 0) load_tile<T, D, BN>(v_s, v_bh, 0, Tk, vec);
  cp_async_commit();
  if (n_tiles > 0) {
    load_tile<T, D, BN>(k_s, k_bh, 0, Tk, vec);
    load_hidden<BN>(hide_s, kpm_b, 0, Tk);
  }
  cp_async_commit();

  float lse_hi[2];
  float lse_lo[2];
  float dlt[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int row = row_q + 8 * ri;
    const bool valid = row < Tq;
    lse_log2(valid ? lse[static_cast<std::int64_t>(bh) * Tq + row] : INFINITY, lse_hi[ri], lse_lo[ri]);
    dlt[ri] = valid ? delta[static_cast<std::int64_t>(bh) * Tq + row] : 0.f;
  }

  float acc[NTO][4];
  zero(acc);
  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * BN;
    cp_async_wait<1>();
    __syncthreads();  // q, do, v_j landed (k_j may still be in flight)
    float dp[NTS][4];
    zero(dp);
    mma_abt<T, NTS, D, LD>(dp, do_w, v_s, lane);  // do v^T

    cp_async_wait<0>();
    __syncthreads();  // k_j landed; every warp is done with v_j
    if (j + 1 < n_tiles) load_tile<T, D, BN>(v_s, v_bh, n0 + BN, Tk, vec);
    cp_async_commit();

    float s[NTS][4];
    zero(s);
    mma_abt<T, NTS, D, LD>(s, q_w, k_s, lane);  // q k^T
    const bool masked = kpm_b != nullptr || n0 + BN > Tk || (causal && n0 + BN - 1 > m0 + warp * kWarpRows + diag);
    if (masked) {
      mask_query_rows(s, hide_s, causal, row_q, n0, diag, lane);
      probs_and_ds_query_rows<true>(s, dp, lse_hi, lse_lo, dlt, sl2);
    } else {
      probs_and_ds_query_rows<false>(s, dp, lse_hi, lse_lo, dlt, sl2);
    }
    mma_pb<T, NTS, NTO, LD>(acc, dp, k_s, lane);  // ds k

    __syncthreads();  // every warp is done with k_j and hide_s
    if (j + 1 < n_tiles) {
      load_tile<T, D, BN>(k_s, k_bh, n0 + BN, Tk, vec);
      load_hidden<BN>(hide_s, kpm_b, n0 + BN, Tk);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();
  __syncthreads();  // q, do landed even when no key tile ran

  __syncwarp();
  stage_rows<T, NTO, LD>(q_w, acc, scale, scale, lane);
  __syncwarp();
  write_rows<T, D>(dq + q_off, q_w, m0 + warp * kWarpRows, Tq, lane, vec);
}

// dk, dv over a 64-key tile of one (batch, kv head), summed over its query heads.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                          const unsigned char* __restrict__ kpm, T* __restrict__ dk, T* __restrict__ dv, int Hq,
                          int Hkv, int Tq, int Tk, int k_tiles, int causal, int vec, float sl2, float scale) {
  using S = Shape<T, D>;
  constexpr int BM = S::kDkdvQueries;
  constexpr int LD = S::kLd;
  constexpr int NTS = BM / 8;
  constexpr int NTO = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kBlockRows * LD;
  T* q_s = v_s + kBlockRows * LD;  // two buffers of BM rows
  T* do_s = q_s + 2 * BM * LD;
  float* hi_s = reinterpret_cast<float*>(do_s + BM * LD);  // lse in log2 units: two buffers of BM
  float* lo_s = hi_s + 2 * BM;                             // its low part, the same
  float* dlt_s = lo_s + 2 * BM;

  const int bkv = static_cast<int>(blockIdx.x) / k_tiles;  // b * Hkv + kv head
  const int n0 = static_cast<int>(blockIdx.x) % k_tiles * kBlockRows;
  const int b = bkv / Hkv;
  const int group = Hq / Hkv;
  const int h0 = b * Hq + bkv % Hkv * group;  // b * Hq + the group's first query head
  const std::int64_t kv_off = static_cast<std::int64_t>(bkv) * Tk * D;
  const int diag = Tk - Tq;
  // Causal: query i sees key n0 first at i = n0 - diag; the query tiles start at BM multiples.
  const int first = causal ? max(0, n0 - diag) : 0;
  const int m_start = first / BM * BM;
  const int m_tiles = first < Tq ? ceil_div(Tq - m_start, BM) : 0;
  const int steps = group * m_tiles;

  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  T* k_w = k_s + warp * kWarpRows * LD;
  T* v_w = v_s + warp * kWarpRows * LD;
  const int row_k = n0 + warp * kWarpRows + (lane >> 2);

  // Step st covers query head h0 + st / m_tiles, queries m_start + (st % m_tiles) BM.
  auto step_rows = [&](int st, std::int64_t& bh_off, int& m0) {
    const int bh = h0 + st / m_tiles;
    m0 = m_start + st % m_tiles * BM;
    bh_off = static_cast<std::int64_t>(bh) * Tq;
  };
  auto load_q = [&](int st, int buf) {
    std::int64_t row_off;
    int m0;
    step_rows(st, row_off, m0);
    load_tile<T, D, BM>(q_s + buf * BM * LD, q + row_off * D, m0, Tq, vec);
    for (int r = static_cast<int>(threadIdx.x); r < BM; r += kThreads) {
      lse_log2(m0 + r < Tq ? lse[row_off + m0 + r] : INFINITY, hi_s[buf * BM + r], lo_s[buf * BM + r]);
    }
  };
  auto load_do = [&](int st) {
    std::int64_t row_off;
    int m0;
    step_rows(st, row_off, m0);
    load_tile<T, D, BM>(do_s, grad_out + row_off * D, m0, Tq, vec);
    for (int r = static_cast<int>(threadIdx.x); r < BM; r += kThreads) {
      dlt_s[r] = m0 + r < Tq ? delta[row_off + m0 + r] : 0.f;
    }
  };

  // Groups in flight, oldest first: {k, v}, {q_0}, {do_0}; then per step {q_st+1}, {do_st+1}.
  load_tile<T, D, kBlockRows>(k_s, k + kv_off, n0, Tk, vec);
  load_tile<T, D, kBlockRows>(v_s, v + kv_off, n0, Tk, vec);
  cp_async_commit();
  if (steps > 0) load_q(0, 0);
  cp_async_commit();
  if (steps > 0) load_do(0);
  cp_async_commit();

  float acc_dk[NTO][4];
  float acc_dv[NTO][4];
  zero(acc_dk);
  zero(acc_dv);
  for (int st = 0; st < steps; ++st) {
    const int buf = st & 1;
    const int m0 = m_start + st % m_tiles * BM;
    const T* q_cur = q_s + buf * BM * LD;
    cp_async_wait<1>();
    __syncthreads();  // q_st landed (do_st may be in flight); every warp is done with step st - 1
    if (st + 1 < steps) load_q(st + 1, buf ^ 1);
    cp_async_commit();

    float s[NTS][4];
    zero(s);
    mma_abt<T, NTS, D, LD>(s, k_w, q_cur, lane);  // k q^T: rows keys, columns queries
    const bool masked = causal && n0 + warp * kWarpRows + kWarpRows - 1 > m0 + diag;
    if (masked) {
      mask_key_rows(s, row_k, m0, diag, lane);
      probs_key_rows<true>(s, hi_s + buf * BM, lo_s + buf * BM, sl2, lane);
    } else {
      probs_key_rows<false>(s, hi_s + buf * BM, lo_s + buf * BM, sl2, lane);
    }

    cp_async_wait<1>();
    __syncthreads();  // do_st landed (q_st+1 may be in flight)
    mma_pb<T, NTS, NTO, LD>(acc_dv, s, do_s, lane);  // p^T do
    float dp[NTS][4];
    zero(dp);
    mma_abt<T, NTS, D, LD>(dp, v_w, do_s, lane);  // v do^T
    ds_key_rows(s, dp, dlt_s, lane);

    __syncthreads();  // every warp is done with do_s and dlt_s
    if (st + 1 < steps) load_do(st + 1);
    cp_async_commit();
    mma_pb<T, NTS, NTO, LD>(acc_dk, dp, q_cur, lane);  // ds^T q
  }
  cp_async_wait<0>();
  __syncthreads();  // k, v landed even when no step ran

  // A key hidden by the padding mask has p = 0 for every query: dk = dv = 0.
  float keep[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int key = row_k + 8 * ri;
    keep[ri] = kpm != nullptr && key < Tk && kpm[static_cast<std::int64_t>(b) * Tk + key] != 0 ? 0.f : 1.f;
  }
  __syncwarp();
  stage_rows<T, NTO, LD>(k_w, acc_dk, scale * keep[0], scale * keep[1], lane);
  stage_rows<T, NTO, LD>(v_w, acc_dv, keep[0], keep[1], lane);
  __syncwarp();
  write_rows<T, D>(dk + kv_off, k_w, n0 + warp * kWarpRows, Tk, lane, vec);
  write_rows<T, D>(dv + kv_off, v_w, n0 + warp * kWarpRows, Tk, lane, vec);
}

// ---------------------------------------------------------------------------
// Host side.

// Keeps every in-kernel row index and diagonal offset (i + Tk - Tq) inside int.
constexpr std::int64_t kMaxSeq = std::int64_t{1} << 30;

struct Dims {
  std::int64_t B, Hq, Hkv, Tq, Tk, D;
};

// Calls f(IntC<D>) for a supported head dim.
template <class F>
void dispatch_head_dim(std::int64_t D, F&& f) {
  switch (D) {
    case 16: f(IntC<16>{}); break;
    case 32: f(IntC<32>{}); break;
    case 64: f(IntC<64>{}); break;
    case 80: f(IntC<80>{}); break;
    case 96: f(IntC<96>{}); break;
    case 128: f(IntC<128>{}); break;
    default: break;  // rejected by check_dims
  }
}

void check_dims(const char* where, const Dims& d) {
  const std::pair<const char*, std::int64_t> sizes[] = {{"B", d.B}, {"Hq", d.Hq}, {"Hkv", d.Hkv}};
  for (const auto& [name, value] : sizes) {
    check_arg(value >= 0 && value <= INT_MAX, where,
              std::string(name) + " must be in [0, " + std::to_string(INT_MAX) + "], got " + std::to_string(value));
  }
  const std::pair<const char*, std::int64_t> lengths[] = {{"Tq", d.Tq}, {"Tk", d.Tk}};
  for (const auto& [name, value] : lengths) {
    check_arg(value >= 0 && value <= kMaxSeq, where,
              std::string(name) + " must be in [0, " + std::to_string(kMaxSeq) + "], got " + std::to_string(value));
  }
  check_arg(d.D == 16 || d.D == 32 || d.D == 64 || d.D == 80 || d.D == 96 || d.D == 128, where,
            "head dim D must be one of 16, 32, 64, 80, 96, 128, got " + std::to_string(d.D));
  check_arg(d.Hkv > 0 || d.Hq == 0, where, "Hkv must be >= 1 when Hq > 0, got Hkv = " + std::to_string(d.Hkv));
  check_arg(d.Hkv == 0 || d.Hq % d.Hkv == 0, where,
            "Hkv must divide Hq (grouped-query attention), got Hq = " + std::to_string(d.Hq) +
                ", Hkv = " + std::to_string(d.Hkv));
  check_arg(d.B * d.Hq <= INT_MAX && d.B * d.Hkv <= INT_MAX, where,
            "B * Hq and B * Hkv must fit in int, got B = " + std::to_string(d.B) + ", Hq = " + std::to_string(d.Hq) +
                ", Hkv = " + std::to_string(d.Hkv));
}

void check_flag(const char* where, const char* name, int value) {
  check_arg(value == 0 || value == 1, where, std::string(name) + " must be 0 or 1, got " + std::to_string(value));
}

void check_scale(const char* where, double scale) {
  check_arg(std::isfinite(scale), where, "scale must be finite, got " + std::to_string(scale));
}

// A tensor with elements must have a pointer; an empty one may be null.
void check_pointer(const char* where, const char* name, std::uintptr_t ptr, std::int64_t elements) {
  check_arg(ptr != 0 || elements == 0, where,
            std::string(name) + " is null but has " + std::to_string(elements) + " elements");
}

unsigned grid_blocks(const char* where, std::int64_t heads, std::int64_t tiles) {
  const std::int64_t blocks = heads * tiles;
  check_arg(blocks <= INT_MAX, where, "problem too large: " + std::to_string(blocks) + " thread blocks");
  return static_cast<unsigned>(blocks);
}

// Opts the kernel into `bytes` of dynamic shared memory when that exceeds the default 48 KB.
template <class Kernel>
void set_smem(Kernel kernel, int bytes, const char* where) {
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), where);
  }
}

// log2(e) scale, in double before the one rounding to float.
float scale_log2(double scale) { return static_cast<float>(scale * kLog2e); }

}  // namespace

void attention_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t key_padding_mask,
                       std::uintptr_t o, std::uintptr_t lse, std::int64_t B, std::int64_t Hq, std::int64_t Hkv,
                       std::int64_t Tq, std::int64_t Tk, std::int64_t D, int causal, double scale, int dtype,
                       std::uintptr_t stream) {
  constexpr const char* kWhere = "attention_forward";
  check_dtype_code(kWhere, dtype);
  const Dims dims{B, Hq, Hkv, Tq, Tk, D};
  check_dims(kWhere, dims);
  check_flag(kWhere, "causal", causal);
  check_scale(kWhere, scale);
  const std::int64_t q_elems = B * Hq * Tq * D;
  const std::int64_t kv_elems = B * Hkv * Tk * D;
  if (q_elems == 0) return;
  check_pointer(kWhere, "q", q, q_elems);
  check_pointer(kWhere, "k", k, kv_elems);
  check_pointer(kWhere, "v", v, kv_elems);
  check_pointer(kWhere, "o", o, q_elems);
  check_pointer(kWhere, "lse", lse, B * Hq * Tq);
  const std::int64_t q_tiles = ceil_div<std::int64_t>(Tq, kBlockRows);
  const unsigned blocks = grid_blocks(kWhere, B * Hq, q_tiles);
  const int vec = all_aligned16({q, k, v, o}) ? 1 : 0;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_head_dim(D, [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    dispatch_dtype(dtype, [&](auto type) {
      using T = typename decltype(type)::type;
      constexpr int kSmem = Shape<T, kD>::kFwdSmem;
      static_assert(kSmem <= kMaxSmem, "forward tile exceeds the shared-memory budget");
      auto kernel = attention_forward_kernel<T, kD>;
      set_smem(kernel, kSmem, kWhere);
      kernel<<<blocks, kThreads, kSmem, cuda_stream>>>(
          as_const<T>(q), as_const<T>(k), as_const<T>(v), as_const<unsigned char>(key_padding_mask), as_mutable<T>(o),
          as_mutable<float>(lse), static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(Tq),
          static_cast<int>(Tk), static_cast<int>(q_tiles), causal, vec, scale_log2(scale));
    });
  });
  check_cuda(cudaGetLastError(), kWhere);
}

std::int64_t attention_backward_workspace(std::int64_t B, std::int64_t Hq, std::int64_t Hkv, std::int64_t Tq,
                                          std::int64_t Tk, std::int64_t D) {
  constexpr const char* kWhere = "attention_backward_workspace";
  check_dims(kWhere, Dims{B, Hq, Hkv, Tq, Tk, D});
  return B * Hq * Tq;
}

void attention_backward(std::uintptr_t grad_out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                        std::uintptr_t o, std::uintptr_t lse, std::uintptr_t key_padding_mask, std::uintptr_t dq,
                        std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t workspace, std::int64_t B,
                        std::int64_t Hq, std::int64_t Hkv, std::int64_t Tq, std::int64_t Tk, std::int64_t D,
                        int causal, double scale, int dtype, std::uintptr_t stream) {
  constexpr const char* kWhere = "attention_backward";
  check_dtype_code(kWhere, dtype);
  const Dims dims{B, Hq, Hkv, Tq, Tk, D};
  check_dims(kWhere, dims);
  check_flag(kWhere, "causal", causal);
  check_scale(kWhere, scale);
  const std::int64_t q_rows = B * Hq * Tq;
  const std::int64_t q_elems = q_rows * D;
  const std::int64_t kv_elems = B * Hkv * Tk * D;
  const bool want_q = q_elems > 0;   // dq (and delta, which dk / dv read)
  const bool want_kv = kv_elems > 0;  // dk, dv: zero when no query sees the keys
  if (!want_q && !want_kv) return;
  check_pointer(kWhere, "grad_out", grad_out, q_elems);
  check_pointer(kWhere, "q", q, q_elems);
  check_pointer(kWhere, "k", k, kv_elems);
  check_pointer(kWhere, "v", v, kv_elems);
  check_pointer(kWhere, "o", o, q_elems);
  check_pointer(kWhere, "lse", lse, q_rows);
  check_pointer(kWhere, "dq", dq, q_elems);
  check_pointer(kWhere, "dk", dk, kv_elems);
  check_pointer(kWhere, "dv", dv, kv_elems);
  check_pointer(kWhere, "workspace", workspace, q_rows);
  const std::int64_t q_tiles = ceil_div<std::int64_t>(Tq, kBlockRows);
  const std::int64_t k_tiles = ceil_div<std::int64_t>(Tk, kBlockRows);
  const unsigned q_blocks = want_q ? grid_blocks(kWhere, B * Hq, q_tiles) : 0;
  const unsigned kv_blocks = want_kv ? grid_blocks(kWhere, B * Hkv, k_tiles) : 0;
  const std::int64_t delta_blocks = ceil_div<std::int64_t>(q_rows, kDeltaRowsPerBlock);
  check_arg(delta_blocks <= INT_MAX, kWhere, "too many query rows: " + std::to_string(q_rows));
  const int vec = all_aligned16({grad_out, q, k, v, o, dq, dk, dv}) ? 1 : 0;
  const float sl2 = scale_log2(scale);
  const float fscale = static_cast<float>(scale);
  auto* delta = as_mutable<float>(workspace);
  const auto* kpm = as_const<unsigned char>(key_padding_mask);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_head_dim(D, [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    dispatch_dtype(dtype, [&](auto type) {
      using T = typename decltype(type)::type;
      using S = Shape<T, kD>;
      static_assert(S::kDqSmem <= kMaxSmem && S::kDkdvSmem <= kMaxSmem, "backward tiles exceed the budget");
      if (want_q) {
        attention_delta_kernel<T, kD><<<static_cast<unsigned>(delta_blocks), kDeltaRowsPerBlock * kWarp, 0,
                                        cuda_stream>>>(as_const<T>(grad_out), as_const<T>(o), delta, q_rows, vec);
        check_cuda(cudaGetLastError(), kWhere);
        auto dq_kernel = attention_dq_kernel<T, kD>;
        set_smem(dq_kernel, S::kDqSmem, kWhere);
        dq_kernel<<<q_blocks, kThreads, S::kDqSmem, cuda_stream>>>(
            as_const<T>(grad_out), as_const<T>(q), as_const<T>(k), as_const<T>(v), as_const<float>(lse), delta, kpm,
            as_mutable<T>(dq), static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(Tq),
            static_cast<int>(Tk), static_cast<int>(q_tiles), causal, vec, sl2, fscale);
        check_cuda(cudaGetLastError(), kWhere);
      }
      if (want_kv) {
        auto dkdv_kernel = attention_dkdv_kernel<T, kD>;
        set_smem(dkdv_kernel, S::kDkdvSmem, kWhere);
        dkdv_kernel<<<kv_blocks, kThreads, S::kDkdvSmem, cuda_stream>>>(
            as_const<T>(grad_out), as_const<T>(q), as_const<T>(k), as_const<T>(v), as_const<float>(lse), delta, kpm,
            as_mutable<T>(dk), as_mutable<T>(dv), static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(Tq),
            static_cast<int>(Tk), static_cast<int>(k_tiles), causal, vec, sl2, fscale);
        check_cuda(cudaGetLastError(), kWhere);
      }
    });
  });
}

}  // namespace kiln
