// Depthwise 2-D convolution (one group per input channel, channel multiplier MULT) for NVIDIA
// GPUs, written once for nvcc and for the host emulation (alt_jax/cuda_block.h). Rendered by
// alt_jax/ops/cuda_depthwise.py.
//
// A thread block covers C_BLOCK output channels x OW_THREADS * OW_TILE output columns of
// OH_ROWS output rows of one image; a thread owns VEC consecutive channels x OW_TILE
// consecutive columns (consecutive threads: consecutive channels, so NHWC loads coalesce),
// keeps its weights for the window in registers and walks the rows. STAGE_INPUT: each
// output row's input window (KH taps high, every column the block reads, C_BLOCK channels)
// is first staged in shared memory by the whole block, then read from there.
// Input and output are addressed by (block, outer, inner) strides per dim (NHWC, NCHW,
// NCHW[x]c); the weights (O, 1, KH, KW) by one stride per dim.
#include "alt_jax/cuda_entry.h"

namespace {

constexpr int64_t NB = @N@, C = @C@, MULT = @MULT@, H = @H@, IW = @IW@;
constexpr int64_t KH = @KH@, KW = @KW@, OH = @OH@, OW = @OW@;
constexpr int64_t SH = @SH@, SW = @SW@, DH = @DH@, DW = @DW@, PT = @PT@, PL = @PL@;
constexpr int64_t L_N = @LHS_N@, L_H = @LHS_H@, L_W = @LHS_W@;
constexpr int64_t L_CB = @LHS_CB@, L_CBS = @LHS_CBS@, L_C = @LHS_C@;
constexpr int64_t R_O = @RHS_O@, R_H = @RHS_H@, R_W = @RHS_W@;
constexpr int64_t O_N = @OUT_N@, O_H = @OUT_H@, O_W = @OUT_W@;
constexpr int64_t O_KB = @OUT_KB@, O_KBS = @OUT_KBS@, O_K = @OUT_K@;
constexpr int64_t LHS_SIZE = @LHS_SIZE@, RHS_SIZE = @RHS_SIZE@, OUT_SIZE = @OUT_SIZE@;
constexpr int ACT = @ACT@;
constexpr bool SCALE = @SCALE@, SHIFT = @SHIFT@, RESIDUAL = @RESIDUAL@;

constexpr int C_BLOCK = @C_BLOCK@, OW_THREADS = @OW_THREADS@, OW_TILE = @OW_TILE@;
constexpr int OH_ROWS = @OH_ROWS@, VEC = @VEC@;
constexpr bool STAGE_INPUT = @STAGE_INPUT@;
constexpr int64_t WORKSPACE_BYTES = @WORKSPACE_BYTES@;
static_assert(WORKSPACE_BYTES == 0, "no workspace");

constexpr int64_t KOUT = C * MULT;
constexpr int C_THREADS = C_BLOCK / VEC;
constexpr int THREADS = C_THREADS * OW_THREADS;
constexpr int OW_SPAN = OW_THREADS * OW_TILE;                  // output columns of a block
constexpr int64_t GX = (KOUT + C_BLOCK - 1) / C_BLOCK, GY = (OW + OW_SPAN - 1) / OW_SPAN;
constexpr int64_t ROW_BLOCKS = (OH + OH_ROWS - 1) / OH_ROWS, GZ = NB * ROW_BLOCKS;
// the input window of one output row (STAGE_INPUT: MULT == 1, channels = output channels)
constexpr int64_t KH_SPAN = (KH - 1) * DH + 1, W_SPAN = (OW_SPAN - 1) * SW + (KW - 1) * DW + 1;
constexpr int64_t PATCH = STAGE_INPUT ? KH_SPAN * W_SPAN * C_BLOCK : 1;

struct Shared {
  float patch[PATCH];  // [row][column][channel]
};
struct Thread {
  float wt[KH * KW][VEC];  // this thread's weights, for its whole life
};

typedef AltCudaBuffers Buffers;

ALT_DEV int64_t in_offset(int64_t n, int64_t c, int64_t ih, int64_t iw) {
  return n * L_N + (c / L_CB) * L_CBS + (c % L_CB) * L_C + ih * L_H + iw * L_W;
}
ALT_DEV int64_t out_offset(int64_t n, int64_t k, int64_t oh, int64_t ow) {
  return n * O_N + (k / O_KB) * O_KBS + (k % O_KB) * O_K + oh * O_H + ow * O_W;
}

template <typename Blk>
ALT_DEV float epilogue(Blk& blk, const Buffers& x, float y, int64_t k, int64_t at) {
  return alt_cuda_epilogue<ACT, SCALE, SHIFT, RESIDUAL>(blk, x, y, k, KOUT, at, OUT_SIZE);
}

// The input at (n, channel c, ih, iw) for VEC consecutive channels, zeros outside the image.
template <typename Blk>
ALT_DEV void input_vec(Blk& blk, const Buffers& x, int64_t n, int64_t c, int64_t ih, int64_t iw,
                       float* v) {
  if (c < C && ih >= 0 && ih < H && iw >= 0 && iw < IW) {
    alt_load_vec<VEC>(blk, x.in, in_offset(n, c, ih, iw), LHS_SIZE, v);
  } else {
    for (int u = 0; u < VEC; ++u) v[u] = 0.0f;
  }
}

template <typename Blk>
ALT_DEV void block_main(Blk& blk, const Buffers& x) {
  const int64_t k0 = blk.bx * C_BLOCK, ow0 = blk.by * OW_SPAN;
  const int64_t n = blk.bz / ROW_BLOCKS, oh0 = (blk.bz % ROW_BLOCKS) * OH_ROWS;
  blk.each([&](Thread& t, int tid) {  // weights into registers
    const int64_t k = k0 + (tid % C_THREADS) * VEC;
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) {
        if (k < KOUT) {
          alt_load_vec<VEC>(blk, x.w, k * R_O + kh * R_H + kw * R_W, RHS_SIZE, t.wt[kh * KW + kw]);
        } else {
          for (int u = 0; u < VEC; ++u) t.wt[kh * KW + kw][u] = 0.0f;
        }
      }
  });
  for (int r = 0; r < OH_ROWS; ++r) {
    const int64_t oh = oh0 + r;
    if (oh >= OH) break;  // the same for every thread of the block
    const int64_t ih0 = oh * SH - PT, iw0 = ow0 * SW - PL;
    if constexpr (STAGE_INPUT) {
      blk.each([&](Thread&, int tid) {
        for (int64_t e = tid * VEC; e < PATCH; e += THREADS * VEC) {
          const int64_t cc = e % C_BLOCK, col = (e / C_BLOCK) % W_SPAN, row = e / (C_BLOCK * W_SPAN);
          float v[VEC];
          input_vec(blk, x, n, k0 + cc, ih0 + row, iw0 + col, v);
          for (int u = 0; u < VEC; ++u) ALT_SH_ST(blk, patch, e + u, v[u]);
        }
      });
      blk.sync();
    }
    blk.each([&](Thread& t, int tid) {
      const int tc = tid % C_THREADS, tw = tid / C_THREADS;
      const int64_t k = k0 + tc * VEC;
      float acc[OW_TILE][VEC];
      for (int i = 0; i < OW_TILE; ++i)
        for (int u = 0; u < VEC; ++u) acc[i][u] = 0.0f;
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw)
          for (int i = 0; i < OW_TILE; ++i) {
            const int64_t col = (tw * OW_TILE + i) * SW + kw * DW;  // within the window
            float v[VEC];
            if constexpr (STAGE_INPUT) {
              for (int u = 0; u < VEC; ++u)
                v[u] = ALT_SH_LD(blk, patch, (kh * DH * W_SPAN + col) * C_BLOCK + tc * VEC + u);
            } else {
              input_vec(blk, x, n, k / MULT, ih0 + kh * DH, iw0 + col, v);
            }
            for (int u = 0; u < VEC; ++u) acc[i][u] += v[u] * t.wt[kh * KW + kw][u];
          }
      for (int i = 0; i < OW_TILE; ++i) {
        const int64_t ow = ow0 + tw * OW_TILE + i;
        if (ow >= OW) continue;
        for (int u = 0; u < VEC; ++u) {
          if (k + u >= KOUT) continue;
          const int64_t at = out_offset(n, k + u, oh, ow);
          ALT_GST(blk, x.out, at, OUT_SIZE, epilogue(blk, x, acc[i][u], k + u, at));
        }
      }
    });
    if constexpr (STAGE_INPUT) blk.sync();  // the patch is rewritten for the next row
  }
}

template <typename Blk>
ALT_DEV void finish_main(Blk&, const Buffers&) {}  // no split K: nothing to finish

Buffers buffers(const void* const* inputs, void* const* outputs) {
  return alt_cuda_buffers<SCALE, SHIFT, RESIDUAL, false>(inputs, outputs);
}

}  // namespace

ALT_CUDA_ENTRY(@SYMBOL@, Thread, Shared, THREADS, GX, GY, GZ, 0)
