// 2-D convolution (any strides, padding, dilation, groups) for NVIDIA GPUs as an implicit
// GEMM on the shared tiled core (alt_jax/cuda_gemm.h), written once for nvcc and for the
// host emulation (alt_jax/cuda_block.h). Rendered by alt_jax/ops/cuda_conv2d.py.
//
// Per group g: C (M x KG) = A (M x KK) @ B (KK x KG) with M = N * OH * OW output pixels,
// KK = KH * KW * CG (ic fastest), A the input gathered on the fly (im2col: padding reads as
// zero), B the weights, C the output. The input and output are addressed by (block, outer,
// inner) strides per dim, so one template reads and writes NHWC, NCHW and channel-blocked
// NCHW[x]c alike: offset = n*S_N + (c / CB)*S_CB + (c % CB)*S_C + h*S_H + w*S_W.
// SPLIT_K > 1: grid z also splits KK; partial tiles go to the workspace ([split][g][m][j])
// and a second kernel sums them and applies the epilogue.
#include "alt_jax/cuda_entry.h"
#include "alt_jax/cuda_gemm.h"

namespace {

constexpr int64_t NB = @N@, C = @C@, H = @H@, IW = @IW@, KOUT = @K@;
constexpr int64_t KH = @KH@, KW = @KW@, OH = @OH@, OW = @OW@, G = @G@, CG = @CG@, KG = @KG@;
constexpr int64_t SH = @SH@, SW = @SW@, DH = @DH@, DW = @DW@, PT = @PT@, PL = @PL@;
// input: n, h, w strides; channels by block CB: outer stride CBS, inner stride CS
constexpr int64_t L_N = @LHS_N@, L_H = @LHS_H@, L_W = @LHS_W@;
constexpr int64_t L_CB = @LHS_CB@, L_CBS = @LHS_CBS@, L_C = @LHS_C@;
// weights (O, I, KH, KW) strides
constexpr int64_t R_O = @RHS_O@, R_I = @RHS_I@, R_H = @RHS_H@, R_W = @RHS_W@;
// output, as the input
constexpr int64_t O_N = @OUT_N@, O_H = @OUT_H@, O_W = @OUT_W@;
constexpr int64_t O_KB = @OUT_KB@, O_KBS = @OUT_KBS@, O_K = @OUT_K@;
constexpr int64_t LHS_SIZE = @LHS_SIZE@, RHS_SIZE = @RHS_SIZE@, OUT_SIZE = @OUT_SIZE@;
constexpr int ACT = @ACT@;
constexpr bool SCALE = @SCALE@, SHIFT = @SHIFT@, RESIDUAL = @RESIDUAL@;

constexpr int MC = @MC@, NC = @NC@, KC = @KC@, MR = @MR@, NR = @NR@, WM = @WM@, WN = @WN@;
constexpr int STAGES = @STAGES@, VEC = @VEC@, SPLIT_K = @SPLIT_K@;

typedef GemmTile<MC, NC, KC, MR, NR, WM, WN, STAGES> Tile;
constexpr int THREADS = Tile::THREADS;
constexpr int64_t M = NB * OH * OW, KK = KH * KW * CG;
constexpr int64_t GX = (KG + NC - 1) / NC, GY = (M + MC - 1) / MC, GZ = G * SPLIT_K;
constexpr int64_t KSPAN = ((KK + SPLIT_K - 1) / SPLIT_K + KC - 1) / KC * KC;
constexpr int64_t PARTIALS = G * M * KG;  // one split's partial tiles
// consecutive threads walk the input's channels when they are contiguous (NHWC, NCHW[x]c),
// else its pixels (NCHW); the weights' output channels when contiguous (HWIO), else KK
constexpr bool A_K_INNER = L_C == 1, B_N_INNER = R_O == 1;
constexpr int64_t WORKSPACE_BYTES = @WORKSPACE_BYTES@;
static_assert(WORKSPACE_BYTES == (SPLIT_K > 1 ? 4 * SPLIT_K * PARTIALS : 0), "workspace");

typedef AltCudaBuffers Buffers;

ALT_DEV int64_t out_offset(int64_t m, int64_t o) {
  const int64_t ow = m % OW, oh = (m / OW) % OH, n = m / (OW * OH);
  return n * O_N + (o / O_KB) * O_KBS + (o % O_KB) * O_K + oh * O_H + ow * O_W;
}

template <typename Blk>
ALT_DEV float epilogue(Blk& blk, const Buffers& x, float y, int64_t o, int64_t at) {
  return alt_cuda_epilogue<ACT, SCALE, SHIFT, RESIDUAL>(blk, x, y, o, KOUT, at, OUT_SIZE);
}

// One block's implicit GEMM (cuda_gemm.h's Problem): group g, KK slice `split`.
struct ConvBlock {
  const Buffers& x;
  int64_t g, split, k_begin, k_end;
  static constexpr int64_t m_size = M, n_size = KG;

  // A (the input gathered: padding reads as zero; VEC channels at a time along a contiguous
  // channel run, the family keeping CG, the channel block and KC whole vectors) and B (the
  // weights) of [k0, k0 + KC) into stage `stage`, this thread's share
  template <typename Blk>
  ALT_DEV void load_slice(Blk& blk, int tid, int stage, int64_t m0, int64_t n0, int64_t k0) const {
    const int64_t gi = g, ke = k_end;
    gemm_stage_a<Tile, VEC, A_K_INNER>(blk, tid, stage, m0, k0, x.in, LHS_SIZE,
                                       [&](int64_t m, int64_t k) -> int64_t {
      if (m >= M || k >= ke) return -1;
      const int64_t ow = m % OW, oh = (m / OW) % OH, n = m / (OW * OH);
      const int64_t ic = k % CG, kw = (k / CG) % KW, kh = k / (CG * KW);
      const int64_t ih = oh * SH - PT + kh * DH, iw = ow * SW - PL + kw * DW, c = gi * CG + ic;
      if (ih < 0 || ih >= H || iw < 0 || iw >= IW) return -1;  // padding
      return n * L_N + (c / L_CB) * L_CBS + (c % L_CB) * L_C + ih * L_H + iw * L_W;
    });
    gemm_stage_b<Tile, VEC, B_N_INNER>(blk, tid, stage, k0, n0, x.w, RHS_SIZE,
                                       [&](int64_t k, int64_t j) -> int64_t {
      if (j >= KG || k >= ke) return -1;
      const int64_t ic = k % CG, kw = (k / CG) % KW, kh = k / (CG * KW);
      return (gi * KG + j) * R_O + ic * R_I + kh * R_H + kw * R_W;
    });
  }

  template <typename Blk>
  ALT_DEV void store(Blk& blk, int64_t m, int64_t j, float acc) const {
    if constexpr (SPLIT_K == 1) {
      const int64_t o = g * KG + j, at = out_offset(m, o);
      ALT_GST(blk, x.out, at, OUT_SIZE, epilogue(blk, x, acc, o, at));
    } else {
      ALT_GST(blk, x.ws, split * PARTIALS + (g * M + m) * KG + j, SPLIT_K * PARTIALS, acc);
    }
  }
};

template <typename Blk>
ALT_DEV void block_main(Blk& blk, const Buffers& x) {
  const int64_t g = blk.bz / SPLIT_K, split = blk.bz % SPLIT_K;
  const int64_t kb = split * KSPAN, ke = kb + KSPAN < KK ? kb + KSPAN : KK;
  const ConvBlock p{x, g, split, kb, ke};
  gemm_block<Tile>(blk, p, blk.by * MC, blk.bx * NC);
}

template <typename Blk>
ALT_DEV void finish_main(Blk& blk, const Buffers& x) {
  alt_cuda_finish<SPLIT_K>(blk, x, PARTIALS, [&](int64_t e, float y) {  // e: (g, m, j)
    const int64_t j = e % KG, m = (e / KG) % M, g = e / (KG * M);
    const int64_t o = g * KG + j, at = out_offset(m, o);
    ALT_GST(blk, x.out, at, OUT_SIZE, epilogue(blk, x, y, o, at));
  });
}

Buffers buffers(const void* const* inputs, void* const* outputs) {
  return alt_cuda_buffers<SCALE, SHIFT, RESIDUAL, (SPLIT_K > 1)>(inputs, outputs);
}

}  // namespace

ALT_CUDA_ENTRY(@SYMBOL@, Tile::Thread, Tile::Shared, THREADS, GX, GY, GZ,
               SPLIT_K > 1 ? PARTIALS : 0)
