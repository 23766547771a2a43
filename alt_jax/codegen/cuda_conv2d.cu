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
constexpr int FINISH_THREADS = 256;
constexpr int64_t WORKSPACE_BYTES = @WORKSPACE_BYTES@;
static_assert(WORKSPACE_BYTES == (SPLIT_K > 1 ? 4 * SPLIT_K * PARTIALS : 0), "workspace");

struct Buffers {
  const float* in;
  const float* w;
  const float* scale;
  const float* shift;
  const float* res;
  float* out;
  float* ws;
};

ALT_DEV int64_t out_offset(int64_t m, int64_t o) {
  const int64_t ow = m % OW, oh = (m / OW) % OH, n = m / (OW * OH);
  return n * O_N + (o / O_KB) * O_KBS + (o % O_KB) * O_K + oh * O_H + ow * O_W;
}

template <typename Blk>
ALT_DEV float epilogue(Blk& blk, const Buffers& x, float y, int64_t o, int64_t at) {
  if constexpr (SCALE) y = y * ALT_GLD(blk, x.scale, o, KOUT);
  if constexpr (SHIFT) y = y + ALT_GLD(blk, x.shift, o, KOUT);
  if constexpr (RESIDUAL) y = y + ALT_GLD(blk, x.res, at, OUT_SIZE);
  return alt_cuda_activate<ACT>(y);
}

// One block's implicit GEMM (cuda_gemm.h's Problem): group g, KK slice `split`.
struct ConvBlock {
  const Buffers& x;
  int64_t g, split, k_begin, k_end;
  static constexpr int64_t m_size = M, n_size = KG;

  // A[m][kk] of [k0, k0 + KC): VEC channels at a time along a contiguous channel run (the
  // family keeps CG, the channel block and KC whole vectors), padding as zeros
  template <typename Blk>
  ALT_DEV void load_a(Blk& blk, int stage, int mm0, int kk0, int64_t m, int64_t k) const {
    float v[VEC];
    bool in = m < M && k < k_end;
    int64_t at = 0;
    if (in) {
      const int64_t ow = m % OW, oh = (m / OW) % OH, n = m / (OW * OH);
      const int64_t ic = k % CG, kw = (k / CG) % KW, kh = k / (CG * KW);
      const int64_t ih = oh * SH - PT + kh * DH, iw = ow * SW - PL + kw * DW;
      const int64_t c = g * CG + ic;
      in = ih >= 0 && ih < H && iw >= 0 && iw < IW;
      at = n * L_N + (c / L_CB) * L_CBS + (c % L_CB) * L_C + ih * L_H + iw * L_W;
    }
    if (in) {
      alt_load_vec<VEC>(blk, x.in, at, LHS_SIZE, v);
    } else {
      for (int u = 0; u < VEC; ++u) v[u] = 0.0f;
    }
    for (int u = 0; u < VEC; ++u)
      ALT_SH_ST(blk, as, Tile::a_index(stage, A_K_INNER ? kk0 + u : kk0, A_K_INNER ? mm0 : mm0 + u),
                v[u]);
  }

  template <typename Blk>
  ALT_DEV void load_slice(Blk& blk, int tid, int stage, int64_t m0, int64_t n0, int64_t k0) const {
    for (int e = tid * VEC; e < KC * MC; e += THREADS * VEC) {
      const int kk0 = A_K_INNER ? e % KC : e / MC, mm0 = A_K_INNER ? e / KC : e % MC;
      load_a(blk, stage, mm0, kk0, m0 + mm0, k0 + kk0);
    }
    for (int e = tid * VEC; e < KC * NC; e += THREADS * VEC) {
      const int kk0 = B_N_INNER ? e / NC : e % KC, nn0 = B_N_INNER ? e % NC : e / KC;
      const int64_t j = n0 + nn0, k = k0 + kk0;
      float v[VEC];
      if (j < KG && k < k_end) {
        const int64_t ic = k % CG, kw = (k / CG) % KW, kh = k / (CG * KW);
        alt_load_vec<VEC>(blk, x.w, (g * KG + j) * R_O + ic * R_I + kh * R_H + kw * R_W,
                          RHS_SIZE, v);
      } else {
        for (int u = 0; u < VEC; ++u) v[u] = 0.0f;
      }
      for (int u = 0; u < VEC; ++u)
        ALT_SH_ST(blk, bs, Tile::b_index(stage, B_N_INNER ? kk0 : kk0 + u,
                                         B_N_INNER ? nn0 + u : nn0), v[u]);
    }
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

struct FinishShared {
  float unused[1];
};
struct FinishThread {
  float unused;
};

template <typename Blk>
ALT_DEV void finish_main(Blk& blk, const Buffers& x) {
  blk.each([&](FinishThread&, int tid) {
    const int64_t e = blk.bx * FINISH_THREADS + tid;  // (g, m, j)
    if (e >= PARTIALS) return;
    float y = 0.0f;
    for (int s = 0; s < SPLIT_K; ++s)
      y += ALT_GLD(blk, x.ws, s * PARTIALS + e, SPLIT_K * PARTIALS);
    const int64_t j = e % KG, m = (e / KG) % M, g = e / (KG * M);
    const int64_t o = g * KG + j, at = out_offset(m, o);
    ALT_GST(blk, x.out, at, OUT_SIZE, epilogue(blk, x, y, o, at));
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
  __shared__ Tile::Shared sh;
  alt_block<Tile::Thread, Tile::Shared, THREADS> blk(sh);
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
// inputs: the input, the weights, then the epilogue's; outputs: the result, then the split-K
// workspace when SPLIT_K > 1. Returns the launch's cudaError_t (0: success).
extern "C" __attribute__((visibility("default"))) int32_t @SYMBOL@_launch(
    void* stream, const void* const* inputs, void* const* outputs) {
  const Buffers x = buffers(inputs, outputs);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  main_kernel<<<dim3(GX, GY, GZ), THREADS, 0, s>>>(x);
  if constexpr (SPLIT_K > 1)
    finish_kernel<<<(PARTIALS + FINISH_THREADS - 1) / FINISH_THREADS, FINISH_THREADS, 0, s>>>(x);
  return static_cast<int32_t>(cudaGetLastError());
}
#else
ALT_EXPORT int32_t @SYMBOL@(const alt_runtime* rt, const void* const* inputs,
                           void* const* outputs) {
  const Buffers x = buffers(inputs, outputs);
  int err = alt_emulate_grid<Tile::Thread, Tile::Shared, THREADS>(
      rt, GX, GY, GZ,
      [&](alt_block<Tile::Thread, Tile::Shared, THREADS>& blk) { block_main(blk, x); });
  if (err == ALT_CUDA_OK && SPLIT_K > 1)
    err = alt_emulate_grid<FinishThread, FinishShared, FINISH_THREADS>(
        rt, (PARTIALS + FINISH_THREADS - 1) / FINISH_THREADS, 1, 1,
        [&](alt_block<FinishThread, FinishShared, FINISH_THREADS>& blk) { finish_main(blk, x); });
  return err;
}
#endif
