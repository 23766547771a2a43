// Batched GEMM C[b] = epilogue(A[b] @ B[b]) for NVIDIA GPUs, written once for nvcc and for
// the host emulation (alt_jax/cuda_block.h). Rendered by alt_jax/ops/cuda_matmul.py.
//
// Tiling: a thread block computes an MC x NC tile of C, staging KC-deep slices of A and B
// through shared memory (STAGES = 2: the next slice is loaded while this one is used, one
// barrier per slice); its warps own WM x WN sub-tiles and each thread an MR x NR tile of
// accumulators in registers. Global loads go VEC floats at a time along the operand's
// contiguous dim. SPLIT_K > 1: grid z also splits K; each slice writes its partial tile to
// the workspace and a second kernel sums the slices and applies the epilogue.
// Out-of-range rows, columns and k are zero-filled in shared memory and never stored.
#include "alt_jax/cuda_entry.h"
#include "alt_jax/cuda_gemm.h"

namespace {

constexpr int64_t BATCH = @BATCH@, M = @M@, N = @N@, K = @K@;
constexpr int64_t A_ST_[] = @A_STRIDES@;  // element strides of (batch, m, k) in A
constexpr int64_t B_ST_[] = @B_STRIDES@;  // (batch, k, n) in B
// as scalars: device code may read constexpr scalars, not host arrays
constexpr int64_t A_SB = A_ST_[0], A_SM = A_ST_[1], A_SK = A_ST_[2];
constexpr int64_t B_SB = B_ST_[0], B_SK = B_ST_[1], B_SN = B_ST_[2];
constexpr int64_t A_SIZE = @A_SIZE@, B_SIZE = @B_SIZE@;  // elements of the buffers
constexpr int ACT = @ACT@;
constexpr bool SCALE = @SCALE@, SHIFT = @SHIFT@, RESIDUAL = @RESIDUAL@;

constexpr int MC = @MC@, NC = @NC@, KC = @KC@;  // block tile and staged depth
constexpr int MR = @MR@, NR = @NR@;             // a thread's register tile
constexpr int WM = @WM@, WN = @WN@;             // a warp's tile
constexpr int STAGES = @STAGES@, VEC = @VEC@, SPLIT_K = @SPLIT_K@;

typedef GemmTile<MC, NC, KC, MR, NR, WM, WN, STAGES> Tile;
constexpr int THREADS = Tile::THREADS;
constexpr int64_t GX = (N + NC - 1) / NC, GY = (M + MC - 1) / MC, GZ = BATCH * SPLIT_K;
// K per split, whole KC slices
constexpr int64_t KSPAN = ((K + SPLIT_K - 1) / SPLIT_K + KC - 1) / KC * KC;
constexpr int64_t OUT_SIZE = BATCH * M * N;
// Which dim of A / B is contiguous decides which one consecutive threads walk (coalescing).
constexpr bool A_K_INNER = A_SK == 1, B_N_INNER = B_SN == 1;
constexpr int64_t WORKSPACE_BYTES = @WORKSPACE_BYTES@;  // the split-K partials
static_assert(WORKSPACE_BYTES == (SPLIT_K > 1 ? 4 * SPLIT_K * OUT_SIZE : 0), "workspace");

typedef Tile::Shared Shared;
typedef Tile::Thread Thread;

typedef AltCudaBuffers Buffers;  // in: A, w: B, out: C

template <typename Blk>
ALT_DEV float epilogue(Blk& blk, const Buffers& x, float y, int64_t bi, int64_t m, int64_t n) {
  return alt_cuda_epilogue<ACT, SCALE, SHIFT, RESIDUAL>(blk, x, y, n, N, (bi * M + m) * N + n,
                                                        OUT_SIZE);
}

// One block's GEMM (cuda_gemm.h's Problem): batch item bi, K slice `split`.
struct MatmulBlock {
  const Buffers& x;
  int64_t bi, split, k_begin, k_end;
  static constexpr int64_t m_size = M, n_size = N;

  // A and B of [k0, k0 + KC) into stage `stage`, this thread's share, read through strides
  template <typename Blk>
  ALT_DEV void load_slice(Blk& blk, int tid, int stage, int64_t m0, int64_t n0,
                          int64_t k0) const {
    const int64_t b = bi, ke = k_end;
    gemm_stage_a<Tile, VEC, A_K_INNER>(blk, tid, stage, m0, k0, x.in, A_SIZE,
                                       [&](int64_t m, int64_t k) -> int64_t {
      return m < M && k < ke ? b * A_SB + m * A_SM + k * A_SK : -1;
    });
    gemm_stage_b<Tile, VEC, B_N_INNER>(blk, tid, stage, k0, n0, x.w, B_SIZE,
                                       [&](int64_t k, int64_t n) -> int64_t {
      return n < N && k < ke ? b * B_SB + k * B_SK + n * B_SN : -1;
    });
  }

  template <typename Blk>
  ALT_DEV void store(Blk& blk, int64_t m, int64_t n, float acc) const {
    if constexpr (SPLIT_K == 1) {
      ALT_GST(blk, x.out, (bi * M + m) * N + n, OUT_SIZE, epilogue(blk, x, acc, bi, m, n));
    } else {
      ALT_GST(blk, x.ws, (split * BATCH + bi) * M * N + m * N + n, SPLIT_K * OUT_SIZE, acc);
    }
  }
};

template <typename Blk>
ALT_DEV void block_main(Blk& blk, const Buffers& x) {
  const int64_t bi = blk.bz / SPLIT_K, split = blk.bz % SPLIT_K;
  const int64_t kb = split * KSPAN, ke = kb + KSPAN < K ? kb + KSPAN : K;
  const MatmulBlock p{x, bi, split, kb, ke};
  gemm_block<Tile>(blk, p, blk.by * MC, blk.bx * NC);
}

// SPLIT_K > 1: every output element is the sum of its slices' partials, then the epilogue.
template <typename Blk>
ALT_DEV void finish_main(Blk& blk, const Buffers& x) {
  alt_cuda_finish<SPLIT_K>(blk, x, OUT_SIZE, [&](int64_t e, float y) {
    const int64_t bi = e / (M * N), m = (e / N) % M, n = e % N;
    ALT_GST(blk, x.out, e, OUT_SIZE, epilogue(blk, x, y, bi, m, n));
  });
}

Buffers buffers(const void* const* inputs, void* const* outputs) {
  return alt_cuda_buffers<SCALE, SHIFT, RESIDUAL, (SPLIT_K > 1)>(inputs, outputs);
}

}  // namespace

ALT_CUDA_ENTRY(@SYMBOL@, Thread, Shared, THREADS, GX, GY, GZ, SPLIT_K > 1 ? OUT_SIZE : 0)
