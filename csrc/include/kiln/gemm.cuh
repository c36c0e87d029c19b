// Building blocks of kiln's hand-written GEMMs: one thread block computes a
// kTileP x kTileQ tile of C = A B, where A is P x R and B is R x Q (R is the
// reduction). Ops assemble a kernel from
//   * operands, which move R-slices of A and B from global into shared memory in
//     two steps, fetch() into registers and commit() to shared memory, so that the
//     fetch of the next slice overlaps the math on the current one, and so that an
//     op can transform values on the way (the fused prologue of linear_act's
//     backward);
//   * BlockMath: float32 register-tiled FFMA, or tensor cores (WMMA, float32
//     accumulators) for half and bfloat16;
//   * accumulate(), the double-buffered main loop, and BlockMath::epilogue(), which
//     hands each thread's finished accumulators to the op in runs along Q.
//
// An operand is "r-contiguous" when its reduction index runs along memory (x and w
// in linear_act's forward). Every load is guarded: any P, Q, R work, including 0.
#pragma once

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "kiln/common.cuh"

namespace kiln::gemm {

constexpr int kThreads = 256;
// Two resident blocks per SM caps kernels at 128 registers a thread; the GEMM tiles
// fit that without spilling, and the second block hides the other's barriers.
constexpr int kMinBlocksPerSm = 2;
constexpr int kTileP = 128;
constexpr int kTileQ = 128;

// Reduction depth of a slice: 32 bytes of a row (a whole DRAM sector), so that each
// thread stages a single 16-byte vector per operand (the backward stages dy and saved)
// and the kernels fit the register cap of kMinBlocksPerSm.
template <typename T>
constexpr int kTileR = 32 / static_cast<int>(sizeof(T));

// Shared-memory layout of one buffered operand slice whose non-reduction extent is BX.
// The float path reads A and B along P and Q (float4 per thread), so it always stores
// slices reduction-major and transposes r-contiguous operands on the way in. Tensor-core
// fragments load either orientation, so half and bfloat16 keep the global orientation
// and store 16-byte vectors. Rows are padded by 16 bytes against bank conflicts.
template <typename T, int BX, bool R_CONTIG>
struct SmemLayout {
  static constexpr int kVec = Vec16<T>::kSize;
  static constexpr int kR = kTileR<T>;
  static constexpr bool kReductionMajor = std::is_same_v<T, float> || !R_CONTIG;
  static constexpr bool kTransposeOnCommit = std::is_same_v<T, float> && R_CONTIG;
  static constexpr int kLd = kReductionMajor ? BX + kVec : kR + kVec;
  static constexpr int kElems = kReductionMajor ? kR * kLd : BX * kLd;
  // The global tile that one slice covers, in the matrix's own rows and columns.
  static constexpr int kGlobalRows = R_CONTIG ? BX : kR;
  static constexpr int kGlobalCols = R_CONTIG ? kR : BX;
};

// Moves a ROWS x COLS tile of a row-major matrix with `rows` x `cols` elements, each
// thread owning the same kPerThread 16-byte runs of the tile whichever tile it is.
template <typename T, int ROWS, int COLS, bool TRANSPOSE>
struct TileLoader {
  static constexpr int kVec = Vec16<T>::kSize;
  static constexpr int kVecsPerRow = COLS / kVec;
  static constexpr int kRowStep = kThreads / kVecsPerRow;
  static constexpr int kPerThread = ROWS / kRowStep;
  static_assert(COLS % kVec == 0 && kThreads % kVecsPerRow == 0 && ROWS % kRowStep == 0,
                "tile does not divide evenly among the threads");

  const T* matrix;
  int rows;
  int cols;
  int thread_row;  // within the tile, of the first run
  int thread_col;
  Vec16<T> staged[kPerThread];

  __device__ TileLoader(const T* matrix_, int rows_, int cols_)
      : matrix(matrix_),
        rows(rows_),
        cols(cols_),
        thread_row(static_cast<int>(threadIdx.x) / kVecsPerRow),
        thread_col(static_cast<int>(threadIdx.x) % kVecsPerRow * kVec) {}

  __device__ __forceinline__ void fetch(int row0, int col0) {
    const int col = col0 + thread_col;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int row = row0 + thread_row + i * kRowStep;
      if (row < rows) {
        load_row_run(matrix + static_cast<std::int64_t>(row) * cols, col, cols, staged[i]);
      } else {
        set_zero(staged[i]);
      }
    }
  }

  // Stores the staged runs as they are.
  __device__ __forceinline__ void commit(T* smem, int ld) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) store_run(smem, ld, i, staged[i]);
  }

  // Stores f(i, j, value) for staged element j of run i, computed in float32.
  template <class F>
  __device__ __forceinline__ void commit(T* smem, int ld, F&& f) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      Vec16<T> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) out.v[j] = from_float<T>(f(i, j, to_float(staged[i].v[j])));
      store_run(smem, ld, i, out);
    }
  }

 private:
  __device__ __forceinline__ void store_run(T* smem, int ld, int i, const Vec16<T>& run) const {
    const int row = thread_row + i * kRowStep;
    if constexpr (TRANSPOSE) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) smem[(thread_col + j) * ld + row] = run.v[j];
    } else {
      *reinterpret_cast<uint4*>(smem + row * ld + thread_col) = *reinterpret_cast<const uint4*>(run.v);
    }
  }
};

// An operand read as is from a row-major matrix. BX is its tile extent along P (for A)
// or Q (for B); x0 is where this block's tile starts along that dimension. The matrix
// has (rows, cols) = (X, R) when R_CONTIG, else (R, X).
template <typename T, int BX, bool R_CONTIG>
struct MatrixOperand {
  using Layout = SmemLayout<T, BX, R_CONTIG>;
  TileLoader<T, Layout::kGlobalRows, Layout::kGlobalCols, Layout::kTransposeOnCommit> loader;
  int x0;

  __device__ MatrixOperand(const T* matrix, int rows, int cols, int x0_) : loader(matrix, rows, cols), x0(x0_) {}

  __device__ __forceinline__ void fetch(int r0) {
    if constexpr (R_CONTIG) {
      loader.fetch(x0, r0);
    } else {
      loader.fetch(r0, x0);
    }
  }
  __device__ __forceinline__ void commit(T* smem) { loader.commit(smem, Layout::kLd); }
};

// ---------------------------------------------------------------------------
// Block math. Both forms take slices laid out by SmemLayout and call
// f(p, q, values[N]) with N consecutive accumulators of row p from column q on,
// p and q relative to the matrix (the op guards p < P and store_row_run guards q).

// float32: 16 x 16 threads, each owning an 8 x 8 sub-tile made of four 4 x 4 pieces
// 64 apart, so that a warp's float4 reads of a slice row fall in distinct banks.
struct SimtMath {
  using A = SmemLayout<float, kTileP, false>;
  using B = SmemLayout<float, kTileQ, false>;
  static_assert(A::kReductionMajor && B::kReductionMajor, "the float path reads slices reduction-major");

  float acc[8][8];
  int thread_p;
  int thread_q;

  __device__ SimtMath()
      : thread_p(static_cast<int>(threadIdx.x) / 16 * 4), thread_q(static_cast<int>(threadIdx.x) % 16 * 4) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
  }

  __device__ __forceinline__ void mma(const float* a_slice, const float* b_slice) {
    // Unrolled by 2, not fully: full unrolling lets ptxas hoist shared-memory loads of
    // later steps, which spills under the 128-register cap of two blocks per SM.
#pragma unroll 2
    for (int r = 0; r < kTileR<float>; ++r) {
      float a[8];
      float b[8];
      load4(a, a_slice + r * A::kLd + thread_p);
      load4(a + 4, a_slice + r * A::kLd + thread_p + 64);
      load4(b, b_slice + r * B::kLd + thread_q);
      load4(b + 4, b_slice + r * B::kLd + thread_q + 64);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }

  template <class F>
  __device__ __forceinline__ void epilogue(int p0, int q0, float* /*scratch*/, F&& f) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int p = p0 + thread_p + (i & 3) + (i >> 2) * 64;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float run[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) run[j] = acc[i][half * 4 + j];
        f(p, q0 + thread_q + half * 64, run);
      }
    }
  }

  static constexpr int kScratchBytes = 0;

 private:
  __device__ __forceinline__ static void load4(float* dst, const float* src) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
  }
};

// half / bfloat16 on tensor cores: 8 warps as 2 (P) x 4 (Q), each computing a 64 x 32
// warp tile as 4 x 2 WMMA 16x16x16 fragments with float32 accumulators.
template <typename T, bool A_R_CONTIG, bool B_R_CONTIG>
struct WmmaMath {
  using A = SmemLayout<T, kTileP, A_R_CONTIG>;
  using B = SmemLayout<T, kTileQ, B_R_CONTIG>;
  // A row-major fragment is P x R with R along memory, a column-major one R-major;
  // for B, row-major means Q along memory.
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T,
                                       std::conditional_t<A_R_CONTIG, nvcuda::wmma::row_major,
                                                          nvcuda::wmma::col_major>>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T,
                                       std::conditional_t<B_R_CONTIG, nvcuda::wmma::col_major,
                                                          nvcuda::wmma::row_major>>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static_assert(kThreads == 256 && kTileP == 2 * 64 && kTileQ == 4 * 32, "warp grid assumes 2 x 4 warps");
  static_assert(A::kLd % 8 == 0 && B::kLd % 8 == 0, "WMMA needs 16-byte multiples of leading dimension");

  FragC acc[4][2];
  int warp_p;
  int warp_q;

  __device__ WmmaMath()
      : warp_p(static_cast<int>(threadIdx.x) / 32 / 4 * 64), warp_q(static_cast<int>(threadIdx.x) / 32 % 4 * 32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
    }
  }

  __device__ __forceinline__ void mma(const T* a_slice, const T* b_slice) {
#pragma unroll
    for (int r = 0; r < kTileR<T>; r += 16) {
      FragB b[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int q = warp_q + 16 * j;
        nvcuda::wmma::load_matrix_sync(b[j], b_slice + (B_R_CONTIG ? q * B::kLd + r : r * B::kLd + q), B::kLd);
      }
      // One A fragment at a time keeps fewer fragment registers live.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int p = warp_p + 16 * i;
        FragA a;
        nvcuda::wmma::load_matrix_sync(a, a_slice + (A_R_CONTIG ? p * A::kLd + r : r * A::kLd + p), A::kLd);
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
      }
    }
  }

  // Fragments have no documented element-to-lane map, so each warp stages one
  // fragment at a time through its 16 x 16 float scratch; a lane then owns half a row.
  static constexpr int kScratchBytes = kThreads / 32 * 16 * 16 * static_cast<int>(sizeof(float));

  template <class F>
  __device__ __forceinline__ void epilogue(int p0, int q0, float* scratch, F&& f) {
    const int lane = static_cast<int>(threadIdx.x) % 32;
    float* warp_scratch = scratch + static_cast<int>(threadIdx.x) / 32 * 256;
    const int row = lane / 2;
    const int col = lane % 2 * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(warp_scratch, acc[i][j], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
        float run[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) run[c] = warp_scratch[row * 16 + col + c];
        f(p0 + warp_p + 16 * i + row, q0 + warp_q + 16 * j + col, run);
        __syncwarp();
      }
    }
  }
};

template <typename T, bool A_R_CONTIG, bool B_R_CONTIG>
struct BlockMathFor {
  using type = WmmaMath<T, A_R_CONTIG, B_R_CONTIG>;
};
template <bool A_R_CONTIG, bool B_R_CONTIG>
struct BlockMathFor<float, A_R_CONTIG, B_R_CONTIG> {
  using type = SimtMath;
};
template <typename T, bool A_R_CONTIG, bool B_R_CONTIG>
using BlockMath = typename BlockMathFor<T, A_R_CONTIG, B_R_CONTIG>::type;

// ---------------------------------------------------------------------------

// Bytes of shared memory for double-buffered A and B slices; the A buffers are reused
// as the epilogue's scratch once the main loop is done.
template <typename T, class LayoutA, class LayoutB>
constexpr int smem_bytes() {
  return 2 * (LayoutA::kElems + LayoutB::kElems) * static_cast<int>(sizeof(T));
}

template <typename T, class LayoutA>
constexpr int smem_b_offset() {
  return 2 * LayoutA::kElems * static_cast<int>(sizeof(T));
}

// The double-buffered main loop over R: the next slice is fetched into registers
// before the math on the current one and committed after it, so one barrier per
// slice suffices. Ends with a barrier (unless R = 0, when it does nothing), so shared
// memory is free for the epilogue.
template <typename T, class Math, class OperandA, class OperandB>
__device__ __forceinline__ void accumulate(Math& math, OperandA& a, OperandB& b, int R, T* smem_a, T* smem_b) {
  constexpr int kR = kTileR<T>;
  constexpr int kElemsA = OperandA::Layout::kElems;
  constexpr int kElemsB = OperandB::Layout::kElems;
  const int slices = ceil_div(R, kR);
  if (slices == 0) return;
  a.fetch(0);
  b.fetch(0);
  a.commit(smem_a);
  b.commit(smem_b);
  __syncthreads();
  for (int s = 0; s < slices; ++s) {
    const int cur = s & 1;
    const bool more = s + 1 < slices;
    if (more) {
      a.fetch((s + 1) * kR);
      b.fetch((s + 1) * kR);
    }
    math.mma(smem_a + cur * kElemsA, smem_b + cur * kElemsB);
    if (more) {
      a.commit(smem_a + (1 - cur) * kElemsA);
      b.commit(smem_b + (1 - cur) * kElemsB);
    }
    __syncthreads();
  }
}

// Maps blockIdx.x to a (P, Q) tile, walking the tile grid in strips of kGroup
// P-tiles so that blocks resident together reuse each other's A and B in L2.
struct TileIndex {
  int p;
  int q;
};

__device__ __forceinline__ TileIndex tile_of_block(int tiles_p, int tiles_q) {
  constexpr int kGroup = 8;
  const int block = static_cast<int>(blockIdx.x);
  const int per_group = kGroup * tiles_q;
  const int first_p = block / per_group * kGroup;
  const int group_rows = min(tiles_p - first_p, kGroup);
  const int in_group = block % per_group;
  return {first_p + in_group % group_rows, in_group / group_rows};
}

}  // namespace kiln::gemm
