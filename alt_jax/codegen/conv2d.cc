// Direct 2-D convolution (any dimension numbers, strides, padding, rhs dilation, groups), fp32.
// The lhs and the output may also be channel-blocked (N C/b H W bc): see LHS_CB / OUT_KB.
// Entry point: the exported kernel @SYMBOL@ (kernel_abi.h); rendered by alt_jax/ops/conv2d.py.
//
// Shape of the computation (NeoCPU / oneDNN-style direct convolution):
//   1. pack, in parallel into the workspace, the input as N, G, C/ic_block, Hp, Wp, ic_block
//      with the padding materialised as zeros (skipped when the operand can be read in
//      place), and the weights as G, K/oc_block, C/ic_block, KH, KW, ic_block, oc_block
//      panels with zero-padded channels (ahead of the compute, fused into each oc-block work
//      item, or skipped for HWIO-like weights read in place). Python picks; strides come
//      rendered, so the microkernel reads packed and original operands alike.
//   2. a register tile of OW_TILE output positions x OC_VECS vectors of output channels
//      keeps its accumulators in registers over the whole reduction (C/G x KH x KW): input
//      values are broadcast from memory, weights loaded as vectors, FMAs fully unrolled over
//      ic_block. Positions run row-major over OH x OW, so tiles wrap across output rows
//      (every wrap point is its own instantiation with constant offsets).
//   3. the fused epilogue y = act(acc * scale[k] + shift[k] + residual) runs on the tile in
//      registers (which parts exist is constexpr), then the tile is written straight into
//      the equation's output layout: vector stores when the output channels are contiguous,
//      an in-register 8x8 transpose and vector stores for 8 x 8 tiles into NCHW-like outputs
//      (scale/shift before the transpose, residual and activation after it), otherwise a
//      transposing store via the stack.
// PREPACKED: inputs[1] already holds the packed weight panels (Conv2dFamily.pack_weights,
// run once by the planner on constant weights): no weight packing and no workspace for it.
// Inputs: lhs, rhs, then scale?, shift?, residual? (Epilogue.inputs() order).
// Parallel work items are chunks of tiles of one (n, group, oc block); OC_OUTER picks whether
// chunks (weight panel reuse) or oc blocks (input reuse) vary fastest.
#include <stddef.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#include "alt_jax/epilogue.h"
#include "alt_jax/kernel_abi.h"
#include "alt_jax/simd.h"

// predictive commoning would carry broadcasts between kw iterations (column j at kw+1 is
// column j+1 at kw) in stack slots: it spills the register tile, so it is off.
#pragma GCC optimize("no-predictive-commoning")

namespace {

constexpr int VW = @VW@;
typedef altv<VW>::type V;

// ---- the problem (rendered from the Spec) ----
constexpr int64_t N = @N@, G = @G@, CG = @CG@, KG = @KG@;
constexpr int64_t H = @H@, IW = @IW@, OH = @OH@, OW = @OW@;
constexpr int64_t KH = @KH@, KW = @KW@, SH = @SH@, SW = @SW@, DH = @DH@, DW = @DW@;
constexpr int64_t PT = @PT@, PL = @PL@;
// element strides of the operands' logical dims in their original dense layouts
constexpr int64_t LHS_N = @LHS_N@, LHS_C = @LHS_C@, LHS_H = @LHS_H@, LHS_W = @LHS_W@;
constexpr int64_t RHS_O = @RHS_O@, RHS_I = @RHS_I@, RHS_H = @RHS_H@, RHS_W = @RHS_W@;
constexpr int64_t OUT_N = @OUT_N@, OUT_K = @OUT_K@, OUT_H = @OUT_H@, OUT_W = @OUT_W@;
// Channel blocks (layout.block_strides): channel c of the lhs sits at
// (c / LHS_CB) * LHS_CBS + (c % LHS_CB) * LHS_C, output channel k at
// (k / OUT_KB) * OUT_KBS + (k % OUT_KB) * OUT_K. A block of all G x CG (G x KG) channels is
// an unblocked, linear layout: LHS_C / OUT_K are then the plain strides.
constexpr int64_t LHS_CB = @LHS_CB@, LHS_CBS = @LHS_CBS@;
constexpr int64_t OUT_KB = @OUT_KB@, OUT_KBS = @OUT_KBS@;

// ---- the knobs ----
constexpr int ICB = @IC_BLOCK@;        // input channels per reduction block (unrolled)
constexpr int OCV = @OC_VECS@;         // vectors of output channels in the register tile
constexpr int OCB = OCV * VW;          // output channels per tile
constexpr int OWT = @OW_TILE@;         // output positions in the register tile
constexpr bool PACK_IN = @PACK_INPUT@;
// weights: read in place (HWIO-like), packed ahead in parallel, or packed per oc block by
// the item that then uses them (fused)
constexpr int W_INPLACE = 0, W_AHEAD = 1, W_FUSED = 2;
constexpr int WEIGHTS = @WEIGHTS@;
constexpr int64_t CHUNK_TILES = @CHUNK_TILES@;  // register tiles per parallel item
constexpr bool OC_OUTER = @OC_OUTER@;
constexpr int64_t IC_CHUNK = @IC_CHUNK@;  // ic blocks per reduction pass (>= CGB: one pass)
// inputs[1] is the packed weight panels (W_AHEAD / W_FUSED layout), not the original rhs
constexpr bool PREPACKED = @PREPACKED@;
constexpr bool PACK_W = WEIGHTS != W_INPLACE && !PREPACKED;  // weights packed per call

// ---- the fused epilogue (Spec.epilogue): y = act(acc * scale[k] + shift[k] + residual) ----
constexpr int ACT = @ACT@;  // ALT_ACT_* (epilogue.h)
constexpr bool HAS_SCALE = @HAS_SCALE@, HAS_SHIFT = @HAS_SHIFT@, HAS_RES = @HAS_RESIDUAL@;
// extra inputs follow lhs and rhs in Epilogue.inputs() order
constexpr int IN_SCALE = 2, IN_SHIFT = IN_SCALE + HAS_SCALE, IN_RES = IN_SHIFT + HAS_SHIFT;

// ---- derived sizes (computed in Python, checked here) ----
constexpr int64_t CGB = @CGB@, KGB = @KGB@, HP = @HP@, WP = @WP@;
constexpr int64_t WS_IN = @WS_IN@, WS_W = @WS_W@;  // float offsets into the workspace
// how the microkernel walks the input and weights (packed copy or original operand)
constexpr int64_t I_C = @I_C@, I_W = @I_W@, I_H = @I_H@, I_CB = @I_CB@, I_G = @I_G@,
                  I_N = @I_N@;
constexpr int64_t W_IC = @W_IC@, W_KW = @W_KW@, W_KH = @W_KH@, W_CB = @W_CB@, W_KB = @W_KB@,
                  W_G = @W_G@;

static_assert(CGB * ICB >= CG && (CGB - 1) * ICB < CG, "CGB must be ceil(CG / ICB)");
static_assert(KGB * OCB >= KG && (KGB - 1) * OCB < KG, "KGB must be ceil(KG / OCB)");
static_assert(WEIGHTS >= W_INPLACE && WEIGHTS <= W_FUSED, "weights mode");
static_assert(CHUNK_TILES >= 1, "chunk_tiles >= 1");
static_assert(IC_CHUNK >= 1, "ic_chunk >= 1");
static_assert(OWT >= 1 && OWT * OCV + OCV + 1 <= 32, "register tile out of range");
static_assert(HP >= (OH - 1) * SH + (KH - 1) * DH + 1, "packed rows must cover every window");
static_assert(WP >= (OW - 1) * SW + (KW - 1) * DW + 1, "packed cols must cover every window");
// reading in place needs every window inside the operand and whole channel/oc blocks
static_assert(PACK_IN || (PT == 0 && PL == 0 && CG % ICB == 0), "in-place input invalid");
static_assert(WEIGHTS != W_INPLACE || (RHS_O == 1 && KG % OCB == 0 && CG % ICB == 0),
              "in-place weights");

// ---- channel-blocked lhs / output (N C/b H W bc) ----
constexpr bool LHS_BLOCKED = LHS_CB < G * CG;
constexpr bool OUT_BLOCKED = OUT_KB < G * KG;
static_assert(LHS_CB >= 1 && (G * CG) % LHS_CB == 0 && OUT_KB >= 1 && (G * KG) % OUT_KB == 0,
              "channel blocks divide the channels");
// group boundaries on block boundaries (a group's channels start a block)
static_assert(!LHS_BLOCKED || G == 1 || CG % LHS_CB == 0, "lhs groups straddle channel blocks");
static_assert(!OUT_BLOCKED || G == 1 || KG % OUT_KB == 0, "output groups straddle blocks");
// in place, an ic block is one layout block: I_C = LHS_C, I_CB = LHS_CBS
static_assert(PACK_IN || !LHS_BLOCKED || ICB == LHS_CB, "in-place blocked input: ic_block = block");
// A tile's output channels are addressed from its first one (c0 = g * KG + kb * OCB) by
// out_k_blocked(k), which holds while no tile channel carries into another block than that:
// the tile lies inside one block (OUT_KB % OCB == 0), or starts one and covers whole ones
// (OCB % OUT_KB == 0). Vector stores then write runs of min(VW, OUT_KB) channels, which stay
// inside a block when one of VW, OUT_KB divides the other.
static_assert(!OUT_BLOCKED || OUT_KB % OCB == 0 ||
                  (OCB % OUT_KB == 0 && (OUT_KB % VW == 0 || VW % OUT_KB == 0)),
              "oc_block and the output's channel block must divide one another");

// Element offsets of lhs channel c (of all G x CG) in a channel-blocked lhs, and of output
// channel k (of G x KG; also of channel k of a tile from the tile's first channel, see
// above) in a channel-blocked output. Linear layouts keep their c * LHS_C / k * OUT_K
// statements (constexpr branches), so that their kernels compile exactly as before.
constexpr int64_t lhs_c_blocked(int64_t c) {
  return (c / LHS_CB) * LHS_CBS + (c % LHS_CB) * LHS_C;
}
constexpr int64_t out_k_blocked(int64_t k) {
  return (k / OUT_KB) * OUT_KBS + (k % OUT_KB) * OUT_K;
}
static_assert(!OUT_BLOCKED || OUT_K == 1, "a blocked output's channels are contiguous in a block");

// In-register transpose of an 8 x 8 block (rows = a[i][0]), three shuffle rounds.
// (W is a template parameter so that narrower ISAs never instantiate the 8-lane shuffles.)
template <int W>
struct shuffle_mask {
  typedef int32_t type __attribute__((vector_size(4 * W)));
};
template <int W, typename A>
ALT_INLINE void transpose8(A& a) {
  if constexpr (W == 8) {
    typedef typename shuffle_mask<W>::type M;
    typename altv<W>::type t[8], u[8];
#pragma GCC unroll 4
    for (int i = 0; i < 8; i += 2) {
      t[i] = __builtin_shuffle(a[i][0], a[i + 1][0], M{0, 8, 1, 9, 4, 12, 5, 13});
      t[i + 1] = __builtin_shuffle(a[i][0], a[i + 1][0], M{2, 10, 3, 11, 6, 14, 7, 15});
    }
#pragma GCC unroll 2
    for (int i = 0; i < 8; i += 4) {
      u[i] = __builtin_shuffle(t[i], t[i + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
      u[i + 1] = __builtin_shuffle(t[i], t[i + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
      u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], M{0, 1, 8, 9, 4, 5, 12, 13});
      u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], M{2, 3, 10, 11, 6, 7, 14, 15});
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      a[i][0] = __builtin_shuffle(u[i], u[i + 4], M{0, 1, 2, 3, 8, 9, 10, 11});
      a[i + 4][0] = __builtin_shuffle(u[i], u[i + 4], M{4, 5, 6, 7, 12, 13, 14, 15});
    }
  }
}

// One reduction pass over ic blocks [cb0, cb1): the first starts from zero, the others
// from `part`; all but the last park their sums in `part` instead of writing the output.
struct Pass {
  int64_t cb0, cb1;
  float* part;
};

// The epilogue operands of one tile: scale/shift of its OCB output channels (zero-padded
// copies for a partial oc block, so the vector loads stay in bounds), and the residual at the
// tile's first output position (same offsets as `out`: it has the result's layout).
struct Epi {
  const float* scale;
  const float* shift;
  const float* res;
};

// Lanes [S * PB, S * PB + PB) of a vector as a PB-lane vector (a register extract), and
// f(integral_constant<int, S>) for S in [0, N): how a blocked output narrower than a
// vector is stored (instantiated only then, so never for VW = 1).
template <int PB, int S, int... I>
ALT_INLINE typename altv<PB>::type lane_slice_(V y, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(y, y, (S * PB + I)...);
}
template <int PB, int S>
ALT_INLINE typename altv<PB>::type lane_slice(V y) {
  return lane_slice_<PB, S>(y, std::make_integer_sequence<int, PB>{});
}
template <typename F, int... S>
ALT_INLINE void for_each_slice_(F&& f, std::integer_sequence<int, S...>) {
  (f(std::integral_constant<int, S>{}), ...);
}
template <int N, typename F>
ALT_INLINE void for_each_slice(F&& f) {
  for_each_slice_(f, std::make_integer_sequence<int, N>{});
}

// Broadcast of a float loaded from memory. simd.h's vbroadcast computes {0..} + x, which the
// compiler may not fold (0 + -0 is +0), so it emits a scalar add before every broadcast and
// runs out of registers; x - 0 == x for every x, so this folds to one vbroadcastss.
ALT_INLINE V bcast(const float* p) { return *p - V{}; }

constexpr int64_t P = OH * OW;                 // output positions per (n, g)
constexpr int64_t NT = (P + OWT - 1) / OWT;    // register tiles per (n, g, oc block)
constexpr int REM = static_cast<int>(P % OWT);  // positions in the last tile (0 = full)
// moving from the end of one output row to the start of the next, in input and output
constexpr int64_t WRAP_IN = SH * I_H - OW * (SW * I_W);
constexpr int64_t WRAP_OUT = OUT_H - OW * OUT_W;
constexpr bool FLAT = WRAP_IN == 0 && WRAP_OUT == 0;
// T8: output positions contiguous per channel (NCHW-like) and 8 positions x 8 channels per
// tile: the tile transposes in registers and stores one vector per channel instead of
// scattering scalars (7x7/2 3->64@224 NCHW, 1 core: 2.9 ms vs 3.05-3.2 ms).
constexpr bool CHANNEL_RUNS = !OUT_BLOCKED && OUT_K != 1 && OUT_W == 1 && OUT_H == OW;
constexpr bool T8 = CHANNEL_RUNS && VW == 8 && OCV == 1 && OWT == 8;
// With reduction passes, at most SUB_TILES tiles keep partial sums in one 64 KiB stack buffer.
constexpr bool PASSES = IC_CHUNK < CGB;
constexpr int64_t BUF_FLOATS = 16384;
constexpr int64_t SUB_TILES = !PASSES ? CHUNK_TILES
                              : (CHUNK_TILES < BUF_FLOATS / (OWT * OCB)
                                     ? CHUNK_TILES : BUF_FLOATS / (OWT * OCB));
static_assert(SUB_TILES >= 1 && (!PASSES || SUB_TILES * OWT * OCB <= BUF_FLOATS),
              "stack buffer");

// One register tile: NW consecutive output positions (row-major over OH x OW, so a tile may
// wrap onto the next row and small images waste no remainder columns) x OCB output channels,
// reduced over all of CG x KH x KW; accumulators stay in registers. `in` and `out` point at
// the tile's first position. Positions j < S are in the first row, the rest in the next one,
// so every offset is a compile-time constant (address displacements, no index registers);
// RT = true instead reads offsets from ioff/ooff (tiles spanning more than two rows).
template <int NW, int S, bool RT>
ALT_INLINE void tile(const float* ALT_RESTRICT in, const float* ALT_RESTRICT w,
                     float* ALT_RESTRICT out, int64_t kvalid, Pass ps, Epi ep,
                     const int64_t* rt_ioff, const int64_t* rt_ooff) {
  auto ioff = [&](int j) -> int64_t {
    if constexpr (RT) return rt_ioff[j];
    return j * (SW * I_W) + (j >= S ? WRAP_IN : 0);
  };
  auto ooff = [&](int j) -> int64_t {
    if constexpr (RT) return rt_ooff[j];
    return j * OUT_W + (j >= S ? WRAP_OUT : 0);
  };
  V acc[NW][OCV];
#pragma GCC unroll 32
  for (int j = 0; j < NW; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < OCV; ++v)
      acc[j][v] = ps.cb0 == 0 ? vzero<VW>() : vload<VW>(ps.part + j * OCB + v * VW);

  for (int64_t cb = ps.cb0; cb < ps.cb1; ++cb) {
    for (int64_t kh = 0; kh < KH; ++kh) {
      const float* ir = in + cb * I_CB + kh * (DH * I_H);
      const float* wr = w + cb * W_CB + kh * W_KH;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const float* ip = ir + kw * (DW * I_W);
        const float* wp = wr + kw * W_KW;
#pragma GCC unroll 64
        for (int ic = 0; ic < ICB; ++ic) {
          V wv[OCV];
#pragma GCC unroll 8
          for (int v = 0; v < OCV; ++v) wv[v] = vload<VW>(wp + ic * W_IC + v * VW);
#pragma GCC unroll 32
          for (int j = 0; j < NW; ++j) {
            const V b = bcast(ip + ioff(j) + ic * I_C);
#pragma GCC unroll 8
            for (int v = 0; v < OCV; ++v) acc[j][v] = vfma<VW>(b, wv[v], acc[j][v]);
          }
        }
      }
    }
  }

  if (ps.cb1 != CGB) {
    // not the last reduction pass: park the partial sums
#pragma GCC unroll 32
    for (int j = 0; j < NW; ++j)
#pragma GCC unroll 8
      for (int v = 0; v < OCV; ++v) vstore<VW>(ps.part + j * OCB + v * VW, acc[j][v]);
    return;
  }
  if constexpr (HAS_SCALE || HAS_SHIFT) {
    // per-channel affine while lanes are still channels (before any transpose)
    // The empty asm keeps these loads here: hoisted out of the loop over tiles (they are
    // invariant there) they would pin vector registers through the reduction and spill it.
    const float* scp = ep.scale;
    const float* shp = ep.shift;
    asm volatile("" : "+r"(scp), "+r"(shp));
#pragma GCC unroll 8
    for (int v = 0; v < OCV; ++v) {
      V sc = vzero<VW>(), sh = vzero<VW>();
      if constexpr (HAS_SCALE) sc = vload<VW>(scp + v * VW);
      if constexpr (HAS_SHIFT) sh = vload<VW>(shp + v * VW);
#pragma GCC unroll 32
      for (int j = 0; j < NW; ++j) {
        if constexpr (HAS_SCALE && HAS_SHIFT) acc[j][v] = vfma<VW>(acc[j][v], sc, sh);
        else if constexpr (HAS_SCALE) acc[j][v] = acc[j][v] * sc;
        else acc[j][v] = acc[j][v] + sh;
      }
    }
  }
  if constexpr (T8 && NW == 8) {
    if (kvalid == OCB) {
      // 8 positions x 8 channels: transpose in registers, then one vector store per
      // channel (positions are contiguous per channel in the output, and in the residual)
      transpose8<VW>(acc);
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        V y = acc[k][0];
        if constexpr (HAS_RES) y += vload<VW>(ep.res + k * OUT_K);
        vstore<VW>(out + k * OUT_K, alt_activate<VW, ACT>(y));
      }
      return;
    }
  }
  if constexpr (OUT_BLOCKED) {
    // A channel-blocked output (N K/b OH OW bc, OUT_K == 1): vector stores of PB =
    // min(VW, OUT_KB) channels, each inside one block, at out_k_blocked(channel) from the
    // tile's first channel (see the static_assert on OUT_KB); blocks narrower than a vector
    // (8c with 16 lanes) take a lane slice per block, in registers. A partial oc block is
    // whole blocks (KG % OUT_KB == 0), so its stores end at kvalid. The residual is read
    // at the same offsets.
    // (OUT_BLOCKED in PB too: its types are formed even where the branch is discarded)
    constexpr int PB = OUT_BLOCKED && OUT_KB < VW ? static_cast<int>(OUT_KB) : VW;
    auto store = [&](int64_t limit) __attribute__((always_inline)) {
#pragma GCC unroll 32
      for (int j = 0; j < NW; ++j)
#pragma GCC unroll 8
        for (int v = 0; v < OCV; ++v) {
          V y = acc[j][v];
          if constexpr (PB == VW) {
            if (v * VW < limit) {
              if constexpr (HAS_RES) y += vload<VW>(ep.res + ooff(j) + out_k_blocked(v * VW));
              vstore<VW>(out + ooff(j) + out_k_blocked(v * VW), alt_activate<VW, ACT>(y));
            }
          } else {
            if constexpr (!HAS_RES) y = alt_activate<VW, ACT>(y);
            for_each_slice<VW / PB>([&](auto h) __attribute__((always_inline)) {
              constexpr int SL = decltype(h)::value;
              const int64_t ch = v * VW + SL * PB;
              if (ch < limit) {
                typename altv<PB>::type p = lane_slice<PB, SL>(y);
                if constexpr (HAS_RES)
                  p = alt_activate<PB, ACT>(p + vload<PB>(ep.res + ooff(j) + out_k_blocked(ch)));
                vstore<PB>(out + ooff(j) + out_k_blocked(ch), p);
              }
            });
          }
        }
    };
    if constexpr (KG % OCB == 0) {
      store(OCB);
    } else {
      if (kvalid == OCB) store(OCB);
      else store(kvalid);
    }
  } else if (OUT_K == 1 && kvalid == OCB) {
    // channels innermost in the output: straight vector stores
#pragma GCC unroll 32
    for (int j = 0; j < NW; ++j)
#pragma GCC unroll 8
      for (int v = 0; v < OCV; ++v) {
        V y = acc[j][v];
        if constexpr (HAS_RES) y += vload<VW>(ep.res + ooff(j) + v * VW);
        vstore<VW>(out + ooff(j) + v * VW, alt_activate<VW, ACT>(y));
      }
  } else {
    // any other output layout, or a partial oc block: transpose through the stack. The
    // residual is read in the scatter's order (scalar: a gather into vectors would stall on
    // store forwarding), so activations cheap in scalar run there; the others add it on the
    // stack and run vectorised.
    constexpr bool ACT_IN_SCATTER = HAS_RES && ACT <= ALT_ACT_RELU6;
    float t[NW][OCB];
#pragma GCC unroll 32
    for (int j = 0; j < NW; ++j)
#pragma GCC unroll 8
      for (int v = 0; v < OCV; ++v) {
        if constexpr (HAS_RES) vstore<VW>(&t[j][v * VW], acc[j][v]);
        else vstore<VW>(&t[j][v * VW], alt_activate<VW, ACT>(acc[j][v]));
      }
    if constexpr (HAS_RES && !ACT_IN_SCATTER) {
      for (int64_t k = 0; k < kvalid; ++k)
#pragma GCC unroll 32
        for (int j = 0; j < NW; ++j) t[j][k] += ep.res[k * OUT_K + ooff(j)];
#pragma GCC unroll 32
      for (int j = 0; j < NW; ++j)
#pragma GCC unroll 8
        for (int v = 0; v < OCV; ++v)
          vstore<VW>(&t[j][v * VW], alt_activate<VW, ACT>(vload<VW>(&t[j][v * VW])));
    }
    for (int64_t k = 0; k < kvalid; ++k)
#pragma GCC unroll 32
      for (int j = 0; j < NW; ++j) {
        if constexpr (ACT_IN_SCATTER)
          out[k * OUT_K + ooff(j)] = alt_activate<1, ACT>(t[j][k] + ep.res[k * OUT_K + ooff(j)]);
        else
          out[k * OUT_K + ooff(j)] = t[j][k];
      }
  }
}

// Does some full tile of NW positions start s = OW - S columns before a row end? Only those
// splits are instantiated (compile time); tile starts repeat with a period of at most OW.
// The remainder tile (NW = REM < OWT) ends at the last position, so it wraps only when it
// spans more than two rows, which the NW > OW path covers.
constexpr bool split_occurs(int nw, int split) {
  if (nw != OWT) return false;
  for (int64_t t = 0; t < OW && t * nw < P; ++t)
    if (OW - (t * nw) % OW == split) return true;
  return false;
}

// A wrapping tile whose first row holds s positions (0 < s < NW): one instantiation per s.
template <int NW, int S = 1>
ALT_INLINE void tile_split(int64_t s, const float* in, const float* w, float* out,
                           int64_t kvalid, Pass ps, Epi ep) {
  if constexpr (S < NW) {
    if constexpr (split_occurs(NW, S)) {
      if (s == S) return tile<NW, S, false>(in, w, out, kvalid, ps, ep, nullptr, nullptr);
    }
    tile_split<NW, S + 1>(s, in, w, out, kvalid, ps, ep);
  }
}

// The tile of NW positions starting at position p0 of one (n, g, oc block).
template <int NW>
ALT_INLINE void tile_at(const float* in, const float* w, float* out, int64_t p0,
                        int64_t kvalid, Pass ps, Epi ep) {
  const int64_t oh = p0 / OW, ow = p0 % OW;
  const float* ti = in + oh * (SH * I_H) + ow * (SW * I_W);
  float* to = out + oh * OUT_H + ow * OUT_W;
  if constexpr (HAS_RES) ep.res += oh * OUT_H + ow * OUT_W;
  if constexpr (FLAT) {
    // rows follow each other without a gap (e.g. 1x1 stride 1, no padding): no wrap case
    tile<NW, NW, false>(ti, w, to, kvalid, ps, ep, nullptr, nullptr);
  } else if constexpr (NW > OW) {
    // the tile spans three or more output rows (narrow images): offsets from registers
    int64_t io[NW], oo[NW];
    for (int j = 0; j < NW; ++j) {
      const int64_t r = (ow + j) / OW, c = (ow + j) % OW;
      io[j] = r * (SH * I_H) + (c - ow) * (SW * I_W);
      oo[j] = r * OUT_H + (c - ow) * OUT_W;
    }
    tile<NW, NW, true>(ti, w, to, kvalid, ps, ep, io, oo);
  } else if (OW % NW == 0 || ow + NW <= OW) {
    tile<NW, NW, false>(ti, w, to, kvalid, ps, ep, nullptr, nullptr);
  } else {
    tile_split<NW>(OW - ow, ti, w, to, kvalid, ps, ep);
  }
}

// Tiles [s0, s1) (s1 - s0 <= SUB_TILES) of one (n, g, oc block); the last tile of the
// image is instantiated for exactly the leftover positions (no scalar path). With IC_CHUNK <
// CGB the reduction runs in passes of IC_CHUNK ic blocks over these tiles, so the pass's
// slice of the weight panel stays in L1 while the tiles stream by; tile t parks its partial
// sums at part + (t - s0) * OWT * OCB between passes.
ALT_INLINE void sub_tiles(const float* in, const float* w, float* out, int64_t s0, int64_t s1,
                          int64_t kvalid, float* part, Epi ep) {
  constexpr int64_t FULL = P / OWT;
  const int64_t sf = s1 < FULL ? s1 : FULL;
  auto part_of = [&](int64_t t) { return PASSES ? part + (t - s0) * OWT * OCB : nullptr; };
  for (int64_t cb0 = 0; cb0 < CGB; cb0 += IC_CHUNK) {
    const int64_t cb1 = cb0 + IC_CHUNK < CGB ? cb0 + IC_CHUNK : CGB;
    for (int64_t t = s0; t < sf; ++t)
      tile_at<OWT>(in, w, out, t * OWT, kvalid, Pass{cb0, cb1, part_of(t)}, ep);
    if constexpr (REM > 0) {
      if (s1 > FULL)
        tile_at<REM>(in, w, out, FULL * OWT, kvalid, Pass{cb0, cb1, part_of(FULL)}, ep);
    }
  }
}

// Tiles [t0, t1) of one (n, g, oc block), SUB_TILES at a time. Not inlined: alt_parallel_for
// calls its lambda both directly and through the pool thunk, and two inlined copies would
// double the compile time.
__attribute__((noinline)) void tiles(const float* in, const float* w, float* out, int64_t t0,
                                     int64_t t1, int64_t kvalid, Epi ep) {
  alignas(64) float part[PASSES ? SUB_TILES * OWT * OCB : 1];
  for (int64_t s0 = t0; s0 < t1; s0 += SUB_TILES)
    sub_tiles(in, w, out, s0, s0 + SUB_TILES < t1 ? s0 + SUB_TILES : t1, kvalid, part, ep);
}

// The epilogue operands of the oc block of kvalid channels starting at channel c0 (of all
// K = G x KG), whose output starts at out + out_off. A partial block's scale/shift are copied
// into `pad` with zeros after kvalid.
struct EpiPad {
  alignas(64) float scale[OCB];
  alignas(64) float shift[OCB];
};
ALT_INLINE Epi epi_block(const float* scale, const float* shift, const float* res, int64_t c0,
                         int64_t kvalid, int64_t out_off, EpiPad& pad) {
  Epi ep{nullptr, nullptr, nullptr};
  if constexpr (HAS_SCALE || HAS_SHIFT) {
    if (kvalid == OCB) {
      if constexpr (HAS_SCALE) ep.scale = scale + c0;
      if constexpr (HAS_SHIFT) ep.shift = shift + c0;
    } else {
      for (int64_t k = 0; k < OCB; ++k) {
        if constexpr (HAS_SCALE) pad.scale[k] = k < kvalid ? scale[c0 + k] : 0.0f;
        if constexpr (HAS_SHIFT) pad.shift[k] = k < kvalid ? shift[c0 + k] : 0.0f;
      }
      ep.scale = pad.scale;
      ep.shift = pad.shift;
    }
  }
  if constexpr (HAS_RES) ep.res = res + out_off;
  return ep;
}

// Packed input row (n, g, cb, hp): Wp x ICB with zeros for padding and missing channels.
void pack_input_row(const float* ALT_RESTRICT src, float* ALT_RESTRICT ws, int64_t item) {
  const int64_t hp = item % HP;
  const int64_t cb = (item / HP) % CGB;
  const int64_t ng = item / (HP * CGB);  // n * G + g
  const int64_t n = ng / G, g = ng % G;
  float* dst = ws + WS_IN + (ng * CGB + cb) * (HP * WP * ICB) + hp * (WP * ICB);
  const int64_t h = hp - PT;
  const int64_t c0 = g * CG + cb * ICB;
  const int64_t nc = (CG - cb * ICB) < ICB ? (CG - cb * ICB) : ICB;
  if (h < 0 || h >= H) {
    for (int64_t i = 0; i < WP * ICB; ++i) dst[i] = 0.0f;
    return;
  }
  const float* s = src + n * LHS_N + c0 * LHS_C + h * LHS_H;
  // columns [0, PL) and [PL + IW, WP) are padding
  const int64_t wbeg = PL, wend = (PL + IW) < WP ? (PL + IW) : WP;
  for (int64_t i = 0; i < wbeg * ICB; ++i) dst[i] = 0.0f;
  for (int64_t i = wend * ICB; i < WP * ICB; ++i) dst[i] = 0.0f;
  if constexpr (LHS_BLOCKED) {
    // a channel-blocked lhs (N C/b H W bc): per column, the ic block's channels as runs
    // inside layout blocks (channel c at lhs_c_blocked(c))
    const float* sb = src + n * LHS_N + h * LHS_H;
    for (int64_t wp = wbeg; wp < wend; ++wp) {
      const float* sw = sb + (wp - PL) * LHS_W;
      float* d = dst + wp * ICB;
      for (int64_t ic = 0; ic < nc;) {
        const int64_t c = c0 + ic, left = LHS_CB - c % LHS_CB;
        const int64_t run = nc - ic < left ? nc - ic : left;
        const float* sc = sw + lhs_c_blocked(c);
        for (int64_t r = 0; r < run; ++r) d[ic + r] = sc[r * LHS_C];
        ic += run;
      }
      for (int64_t ic = nc; ic < ICB; ++ic) d[ic] = 0.0f;
    }
  } else if (LHS_W < LHS_C) {
    // width is the faster source dim (NCHW-like): contiguous reads along w per channel
    for (int64_t ic = 0; ic < ICB; ++ic) {
      if (ic < nc) {
        const float* sc = s + ic * LHS_C;
        for (int64_t wp = wbeg; wp < wend; ++wp) dst[wp * ICB + ic] = sc[(wp - PL) * LHS_W];
      } else {
        for (int64_t wp = wbeg; wp < wend; ++wp) dst[wp * ICB + ic] = 0.0f;
      }
    }
  } else {
    // channels are the faster source dim (NHWC-like)
    for (int64_t wp = wbeg; wp < wend; ++wp) {
      const float* sw = s + (wp - PL) * LHS_W;
      for (int64_t ic = 0; ic < ICB; ++ic) dst[wp * ICB + ic] = ic < nc ? sw[ic * LHS_C] : 0.0f;
    }
  }
}

// Packed weight panel (g, kb, cb): KH x KW x ICB x OCB, zero-padded channels.
void pack_weight_panel(const float* ALT_RESTRICT src, float* ALT_RESTRICT ws, int64_t item) {
  const int64_t cb = item % CGB;
  const int64_t kb = (item / CGB) % KGB;
  const int64_t g = item / (CGB * KGB);
  float* dst = ws + WS_W + g * W_G + kb * W_KB + cb * W_CB;
  const int64_t o0 = g * KG + kb * OCB, i0 = cb * ICB;
  const int64_t no = (KG - kb * OCB) < OCB ? (KG - kb * OCB) : OCB;
  const int64_t ni = (CG - cb * ICB) < ICB ? (CG - cb * ICB) : ICB;
  if (no < OCB || ni < ICB) {
    for (int64_t i = 0; i < KH * KW * ICB * OCB; ++i) dst[i] = 0.0f;
  }
  const float* s = src + o0 * RHS_O + i0 * RHS_I;
  if (RHS_O == 1) {
    // oc contiguous in the source (HWIO-like): copy oc runs
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw)
        for (int64_t ic = 0; ic < ni; ++ic) {
          const float* si = s + kh * RHS_H + kw * RHS_W + ic * RHS_I;
          float* d = dst + kh * W_KH + kw * W_KW + ic * W_IC;
          if (no == OCB) {
#pragma GCC unroll 8
            for (int v = 0; v < OCV; ++v) vstore<VW>(d + v * VW, vload<VW>(si + v * VW));
          } else {
            for (int64_t oc = 0; oc < no; ++oc) d[oc] = si[oc];
          }
        }
  } else {
    // oc is a slow source dim (OIHW-like): read each output channel's filter in order
    for (int64_t oc = 0; oc < no; ++oc)
      for (int64_t ic = 0; ic < ni; ++ic)
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t kw = 0; kw < KW; ++kw)
            dst[kh * W_KH + kw * W_KW + ic * W_IC + oc] =
                s[oc * RHS_O + ic * RHS_I + kh * RHS_H + kw * RHS_W];
  }
}

}  // namespace

ALT_EXPORT int32_t @SYMBOL@(  // the one exported symbol (kernel_abi.h)
    const alt_runtime* rt, const void* const* inputs, void* const* outputs) {
  const float* lhs = static_cast<const float*>(inputs[0]);
  const float* rhs = static_cast<const float*>(inputs[1]);
  float* out = static_cast<float*>(outputs[0]);
  float* ws = (PACK_IN || PACK_W) ? static_cast<float*>(outputs[1]) : nullptr;
  const float* scale = HAS_SCALE ? static_cast<const float*>(inputs[IN_SCALE]) : nullptr;
  const float* shift = HAS_SHIFT ? static_cast<const float*>(inputs[IN_SHIFT]) : nullptr;
  const float* res = HAS_RES ? static_cast<const float*>(inputs[IN_RES]) : nullptr;

  // 1. packing ahead: input rows and (WEIGHTS == W_AHEAD) weight panels in one parallel loop
  constexpr int64_t IN_ITEMS = PACK_IN ? N * G * CGB * HP : 0;
  constexpr int64_t W_ITEMS = WEIGHTS == W_AHEAD && PACK_W ? G * KGB * CGB : 0;
  if constexpr (IN_ITEMS + W_ITEMS > 0) {
    alt_parallel_for(rt, IN_ITEMS + W_ITEMS, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (i < IN_ITEMS)
          pack_input_row(lhs, ws, i);
        else
          pack_weight_panel(rhs, ws, i - IN_ITEMS);
      }
    });
  }
  const float* in = PACK_IN ? ws + WS_IN : lhs;
  const float* wt = PACK_W ? ws + WS_W : rhs;

  // 2. compute
  if constexpr (WEIGHTS == W_FUSED) {
    // one item = one (g, oc block) over every image and position: it packs its own weight
    // panels first, so they are hot in this core's L2 when the tiles read them and the
    // packing is spread over the cores without a barrier
    alt_parallel_for(rt, G * KGB, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t g = i / KGB, kb = i % KGB;
        if constexpr (PACK_W)
          for (int64_t cb = 0; cb < CGB; ++cb) pack_weight_panel(rhs, ws, i * CGB + cb);
        const int64_t kvalid = (KG - kb * OCB) < OCB ? (KG - kb * OCB) : OCB;
        const int64_t c0 = g * KG + kb * OCB;
        EpiPad pad;
        for (int64_t n = 0; n < N; ++n) {
          int64_t oo = n * OUT_N + c0 * OUT_K;
          if constexpr (OUT_BLOCKED) oo = n * OUT_N + out_k_blocked(c0);
          tiles(in + n * I_N + g * I_G, wt + g * W_G + kb * W_KB, out + oo, 0, NT, kvalid,
                epi_block(scale, shift, res, c0, kvalid, oo, pad));
        }
      }
    });
  } else {
    // one item = a chunk of CHUNK_TILES register tiles of one (n, g, oc block)
    constexpr int64_t PCH = (NT + CHUNK_TILES - 1) / CHUNK_TILES;
    alt_parallel_for(rt, N * G * KGB * PCH, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        int64_t pc, kb;
        if (OC_OUTER) {  // chunks fastest: consecutive items share a weight panel
          pc = i % PCH;
          kb = (i / PCH) % KGB;
        } else {  // oc blocks fastest: consecutive items share input rows
          kb = i % KGB;
          pc = (i / KGB) % PCH;
        }
        const int64_t ng = i / (PCH * KGB);
        const int64_t n = ng / G, g = ng % G;
        const int64_t kvalid = (KG - kb * OCB) < OCB ? (KG - kb * OCB) : OCB;
        const int64_t t0 = pc * CHUNK_TILES, t1 = t0 + CHUNK_TILES < NT ? t0 + CHUNK_TILES : NT;
        const int64_t c0 = g * KG + kb * OCB;
        int64_t oo = n * OUT_N + c0 * OUT_K;
        if constexpr (OUT_BLOCKED) oo = n * OUT_N + out_k_blocked(c0);
        EpiPad pad;
        tiles(in + n * I_N + g * I_G, wt + g * W_G + kb * W_KB, out + oo, t0, t1, kvalid,
              epi_block(scale, shift, res, c0, kvalid, oo, pad));
      }
    });
  }
  return 0;
}
