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
constexpr int FINISH_THREADS = 256;
constexpr int64_t WORKSPACE_BYTES = @WORKSPACE_BYTES@;  // the split-K partials
static_assert(WORKSPACE_BYTES == (SPLIT_K > 1 ? 4 * SPLIT_K * OUT_SIZE : 0), "workspace");

typedef Tile::Shared Shared;
typedef Tile::Thread Thread;

struct Buffers {
  const float* a;
  const float* b;
  const float* scale;
  const float* shift;
  const float* res;
  float* c;
  float* ws;  // SPLIT_K partial tiles, [split][batch][m][n]
};

template <typename Blk>
ALT_DEV float epilogue(Blk& blk, const Buffers& x, float y, int64_t bi, int64_t m, int64_t n) {
  if constexpr (SCALE) y = y * ALT_GLD(blk, x.scale, n, N);
  if constexpr (SHIFT) y = y + ALT_GLD(blk, x.shift, n, N);
  if constexpr (RESIDUAL) y = y + ALT_GLD(blk, x.res, (bi * M + m) * N + n, OUT_SIZE);
  return alt_cuda_activate<ACT>(y);
}

// One block's GEMM (cuda_gemm.h's Problem): batch item bi, K slice `split`.
struct MatmulBlock {
  const Buffers& x;
  int64_t bi, split, k_begin, k_end;
  static constexpr int64_t m_size = M, n_size = N;

  // A and B of [k0, k0 + KC) into stage `stage`, this thread's share: consecutive threads
  // walk an operand's contiguous dim, VEC floats at a time (a vector is in range iff its
  // first float is: the family keeps M, N, K and the block tile whole vectors along it)
  template <typename Blk>
  ALT_DEV void load_slice(Blk& blk, int tid, int stage, int64_t m0, int64_t n0,
                          int64_t k0) const {
    for (int e = tid * VEC; e < KC * MC; e += THREADS * VEC) {
      const int kk0 = A_K_INNER ? e % KC : e / MC, mm0 = A_K_INNER ? e / KC : e % MC;
      const int64_t m = m0 + mm0, k = k0 + kk0;
      float v[VEC];
      if (m < M && k < k_end) {
        alt_load_vec<VEC>(blk, x.a, bi * A_SB + m * A_SM + k * A_SK, A_SIZE, v);
      } else {
        for (int u = 0; u < VEC; ++u) v[u] = 0.0f;
      }
      for (int u = 0; u < VEC; ++u)
        ALT_SH_ST(blk, as, Tile::a_index(stage, A_K_INNER ? kk0 + u : kk0,
                                         A_K_INNER ? mm0 : mm0 + u), v[u]);
    }
    for (int e = tid * VEC; e < KC * NC; e += THREADS * VEC) {
      const int kk0 = B_N_INNER ? e / NC : e % KC, nn0 = B_N_INNER ? e % NC : e / KC;
      const int64_t n = n0 + nn0, k = k0 + kk0;
      float v[VEC];
      if (n < N && k < k_end) {
        alt_load_vec<VEC>(blk, x.b, bi * B_SB + k * B_SK + n * B_SN, B_SIZE, v);
      } else {
        for (int u = 0; u < VEC; ++u) v[u] = 0.0f;
      }
      for (int u = 0; u < VEC; ++u)
        ALT_SH_ST(blk, bs, Tile::b_index(stage, B_N_INNER ? kk0 : kk0 + u,
                                         B_N_INNER ? nn0 + u : nn0), v[u]);
    }
  }

  template <typename Blk>
  ALT_DEV void store(Blk& blk, int64_t m, int64_t n, float acc) const {
    if constexpr (SPLIT_K == 1) {
      ALT_GST(blk, x.c, (bi * M + m) * N + n, OUT_SIZE, epilogue(blk, x, acc, bi, m, n));
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
struct FinishShared {
  float unused[1];
};
struct FinishThread {
  float unused;
};

template <typename Blk>
ALT_DEV void finish_main(Blk& blk, const Buffers& x) {
  blk.each([&](FinishThread&, int tid) {
    const int64_t e = blk.bx * FINISH_THREADS + tid;
    if (e >= OUT_SIZE) return;
    float y = 0.0f;
    for (int s = 0; s < SPLIT_K; ++s) y += ALT_GLD(blk, x.ws, s * OUT_SIZE + e, SPLIT_K * OUT_SIZE);
    const int64_t bi = e / (M * N), m = (e / N) % M, n = e % N;
    ALT_GST(blk, x.c, e, OUT_SIZE, epilogue(blk, x, y, bi, m, n));
  });
}

constexpr int I_SCALE = 2, I_SHIFT = I_SCALE + SCALE, I_RES = I_SHIFT + SHIFT;

Buffers buffers(const void* const* inputs, void* const* outputs) {
  return Buffers{static_cast<const float*>(inputs[0]), static_cast<const float*>(inputs[1]),
                 SCALE ? static_cast<const float*>(inputs[I_SCALE]) : nullptr,
                 SHIFT ? static_cast<const float*>(inputs[I_SHIFT]) : nullptr,
                 RESIDUAL ? static_cast<const float*>(inputs[I_RES]) : nullptr,
                 static_cast<float*>(outputs[0]),
                 SPLIT_K > 1 ? static_cast<float*>(outputs[1]) : nullptr};
}

#if defined(__CUDACC__)
__global__ void __launch_bounds__(THREADS) main_kernel(Buffers x) {
  __shared__ Shared sh;
  alt_block<Thread, Shared, THREADS> blk(sh);
  block_main(blk, x);
}
__global__ void __launch_bounds__(FINISH_THREADS) finish_kernel(Buffers x) {
  __shared__ FinishShared sh;
  alt_block<FinishThread, FinishShared, FINISH_THREADS> blk(sh);
  finish_main(blk, x);
}
#endif

}  // namespace

#if defined(__CUDACC__)
// The launcher the CUDA FFI handler calls: inputs A, B, then the epilogue's; outputs C, then
// the split-K workspace when SPLIT_K > 1. Returns the launch's cudaError_t (0: success).
extern "C" __attribute__((visibility("default"))) int32_t @SYMBOL@_launch(
    void* stream, const void* const* inputs, void* const* outputs) {
  const Buffers x = buffers(inputs, outputs);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  main_kernel<<<dim3(GX, GY, GZ), THREADS, 0, s>>>(x);
  if constexpr (SPLIT_K > 1)
    finish_kernel<<<(OUT_SIZE + FINISH_THREADS - 1) / FINISH_THREADS, FINISH_THREADS, 0, s>>>(x);
  return static_cast<int32_t>(cudaGetLastError());
}
#else
// The emulation, as a host kernel of the alt_runtime ABI (kernel_abi.h): blocks spread over
// the runtime's threads, each block's threads run in turn. Returns ALT_CUDA_RACE or
// ALT_CUDA_OUT_OF_BOUNDS when the kernel raced on shared memory or read or wrote out of
// its buffers.
ALT_EXPORT int32_t @SYMBOL@(const alt_runtime* rt, const void* const* inputs,
                           void* const* outputs) {
  const Buffers x = buffers(inputs, outputs);
  int err = alt_emulate_grid<Thread, Shared, THREADS>(
      rt, GX, GY, GZ, [&](alt_block<Thread, Shared, THREADS>& blk) { block_main(blk, x); });
  if (err == ALT_CUDA_OK && SPLIT_K > 1)
    err = alt_emulate_grid<FinishThread, FinishShared, FINISH_THREADS>(
        rt, (OUT_SIZE + FINISH_THREADS - 1) / FINISH_THREADS, 1, 1,
        [&](alt_block<FinishThread, FinishShared, FINISH_THREADS>& blk) { finish_main(blk, x); });
  return err;
}
#endif
