// 3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3), fp32.
// Entry point: the exported kernel @SYMBOL@ (kernel_abi.h); rendered by alt_jax/ops/winograd.py.
//
// Each 2x2 block of outputs ("tile") comes from a 4x4 input patch d and each 3x3 filter g:
//   Y = A^T [ (G g G^T) . (B^T d B) ] A
// so a tile costs 16 multiply-adds per (input, output channel) instead of 36: the 16
// elementwise products, summed over input channels, are 16 independent GEMMs
// M[xi] = V[xi] (tiles x C) @ U[xi] (C x K), xi = 0..15.
//   1. input transform, in parallel over blocks of TB tiles: V = B^T d B per tile and channel,
//      written into the workspace as GEMM panels [xi][tile block][C/VW][TB][VW] (zeros for
//      padding, missing channels and the tiles past the last one).
//   2. one parallel item = one tile block x one block of OCB output channels: for each xi a
//      register tile of TB tiles x OC_VECS vectors accumulates over all C (broadcasts of V,
//      vector loads of U), parks its 16 results in L1, then the output transform
//      Y = A^T M A and the fused epilogue act(y * scale + shift + residual) run on them and the
//      2x2 outputs are written in the equation's output layout.
// U is the transformed filter G g G^T, [xi][K/OCB][C_pad][OCB]: inputs[1] when PREPACKED
// (WinogradFamily.pack_weights, at plan time for constant weights), else computed from the
// rhs into the workspace, in parallel with the input transform, on every call.
// Inputs: lhs, U, then scale?, shift?, residual? (Epilogue.inputs() order).
#include <stddef.h>
#include <stdint.h>

#include "alt_jax/epilogue.h"
#include "alt_jax/kernel_abi.h"
#include "alt_jax/simd.h"

#pragma GCC optimize("no-predictive-commoning")

namespace {

constexpr int VW = @VW@;
typedef altv<VW>::type V;

// ---- the problem ----
constexpr int64_t N = @N@, C = @C@, H = @H@, IW = @IW@, K = @K@, OH = @OH@, OW = @OW@;
constexpr int64_t PT = @PT@, PL = @PL@;
constexpr int64_t LHS_N = @LHS_N@, LHS_C = @LHS_C@, LHS_H = @LHS_H@, LHS_W = @LHS_W@;
constexpr int64_t RHS_O = @RHS_O@, RHS_I = @RHS_I@, RHS_H = @RHS_H@, RHS_W = @RHS_W@;
constexpr int64_t OUT_N = @OUT_N@, OUT_K = @OUT_K@, OUT_H = @OUT_H@, OUT_W = @OUT_W@;
constexpr bool PREPACKED = @PREPACKED@;

// ---- the knobs ----
constexpr int TB = @TILE_BLOCK@;    // tiles in the register tile (rows of the GEMM tile)
constexpr int OCV = @OC_VECS@;      // vectors of output channels in the register tile
constexpr int OCB = OCV * VW;
constexpr bool KB_OUTER = @KB_OUTER@;  // items ordered oc block major (U panels reused)

// ---- the fused epilogue ----
constexpr int ACT = @ACT@;
constexpr bool HAS_SCALE = @HAS_SCALE@, HAS_SHIFT = @HAS_SHIFT@, HAS_RES = @HAS_RESIDUAL@;
constexpr int IN_SCALE = 2, IN_SHIFT = IN_SCALE + HAS_SCALE, IN_RES = IN_SHIFT + HAS_SHIFT;

// ---- derived sizes (computed in Python, checked here) ----
constexpr int64_t TH = @TH@, TW = @TW@;           // tiles per image along h and w
constexpr int64_t CP = @CP@, KB = @KB@, NTB = @NTB@;  // padded C, oc blocks, tile blocks
constexpr int64_t TILES = N * TH * TW;
constexpr int64_t CV = CP / VW;                   // channel vectors
constexpr int64_t PANEL = CP * TB;                // floats of one (xi, tile block) V panel
constexpr int64_t UPANEL = CP * OCB;              // floats of one (xi, oc block) U panel
static_assert(TH == (OH + 1) / 2 && TW == (OW + 1) / 2, "tiles");
static_assert(CP % VW == 0 && CP >= C && CP - C < VW, "CP must be C rounded up to VW");
static_assert(KB * OCB >= K && (KB - 1) * OCB < K, "KB must be ceil(K / OCB)");
static_assert(NTB * TB >= TILES && (NTB - 1) * TB < TILES, "NTB must be ceil(tiles / TB)");
static_assert(TB >= 1 && TB * OCV + OCV + 1 <= 32, "register tile out of range");
static_assert(OH == H + PT + @PB@ - 2 && OW == IW + PL + @PR@ - 2, "3x3 stride-1 geometry");

ALT_INLINE V bcast(const float* p) { return *p - V{}; }

// Input element (n, c0 .. c0+VW, y, x) as a vector, zero outside the image or past C.
ALT_INLINE V load_in(const float* ALT_RESTRICT lhs, int64_t n, int64_t c0, int64_t y, int64_t x) {
  if (y < 0 || y >= H || x < 0 || x >= IW) return vzero<VW>();
  const float* p = lhs + n * LHS_N + c0 * LHS_C + y * LHS_H + x * LHS_W;
  if constexpr (LHS_C == 1 && C % VW == 0) return vload<VW>(p);
  alignas(64) float t[VW];
  for (int i = 0; i < VW; ++i) t[i] = c0 + i < C ? p[i * LHS_C] : 0.0f;
  return vload<VW>(t);
}

// Tile block tb: V = B^T d B for its TB tiles and every channel vector.
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
void input_transform(const float* ALT_RESTRICT lhs, float* ALT_RESTRICT ws, int64_t tb) {
  for (int j = 0; j < TB; ++j) {
    const int64_t t = tb * TB + j;
    for (int64_t cv = 0; cv < CV; ++cv) {
      V w[4][4];
      if (t < TILES) {
        const int64_t n = t / (TH * TW), r = t % (TH * TW);
        const int64_t y0 = 2 * (r / TW) - PT, x0 = 2 * (r % TW) - PL;
        V d[4][4];
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) d[a][b] = load_in(lhs, n, cv * VW, y0 + a, x0 + b);
        V s[4][4];  // B^T d
        for (int b = 0; b < 4; ++b) {
          s[0][b] = d[0][b] - d[2][b];
          s[1][b] = d[1][b] + d[2][b];
          s[2][b] = d[2][b] - d[1][b];
          s[3][b] = d[1][b] - d[3][b];
        }
        for (int a = 0; a < 4; ++a) {  // (B^T d) B
          w[a][0] = s[a][0] - s[a][2];
          w[a][1] = s[a][1] + s[a][2];
          w[a][2] = s[a][2] - s[a][1];
          w[a][3] = s[a][1] - s[a][3];
        }
      } else {
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) w[a][b] = vzero<VW>();
      }
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          vstore<VW>(ws + (a * 4 + b) * (NTB * PANEL) + tb * PANEL + (cv * TB + j) * VW, w[a][b]);
    }
  }
}

// U panels of oc block kb: G g G^T for its OCB output channels and every input channel,
// VW output channels at a time (vector loads when they are contiguous in the rhs, e.g. HWIO).
// G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]
void filter_transform(const float* ALT_RESTRICT rhs, float* ALT_RESTRICT u, int64_t kb) {
  const V half = vbroadcast<VW>(0.5f);
  for (int64_t ci = 0; ci < CP; ++ci)
    for (int64_t o0 = 0; o0 < OCB; o0 += VW) {
      const int64_t k0 = kb * OCB + o0;
      V g[3][3];
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) {
          const float* p = rhs + k0 * RHS_O + ci * RHS_I + a * RHS_H + b * RHS_W;
          if (RHS_O == 1 && ci < C && k0 + VW <= K) {
            g[a][b] = vload<VW>(p);
          } else {
            alignas(64) float t[VW];
            for (int i = 0; i < VW; ++i) t[i] = ci < C && k0 + i < K ? p[i * RHS_O] : 0.0f;
            g[a][b] = vload<VW>(t);
          }
        }
      V t[4][3], r[4][4];
      for (int b = 0; b < 3; ++b) {  // G g
        t[0][b] = g[0][b];
        t[1][b] = half * (g[0][b] + g[1][b] + g[2][b]);
        t[2][b] = half * (g[0][b] - g[1][b] + g[2][b]);
        t[3][b] = g[2][b];
      }
      for (int a = 0; a < 4; ++a) {  // (G g) G^T
        r[a][0] = t[a][0];
        r[a][1] = half * (t[a][0] + t[a][1] + t[a][2]);
        r[a][2] = half * (t[a][0] - t[a][1] + t[a][2]);
        r[a][3] = t[a][2];
      }
      for (int xi = 0; xi < 16; ++xi)
        vstore<VW>(u + (xi * KB + kb) * UPANEL + ci * OCB + o0, r[xi / 4][xi % 4]);
    }
}

// acc[j][v] = sum over c of V[j][c] * U[c][v]: one xi of one (tile block, oc block).
ALT_INLINE void gemm_tile(const float* ALT_RESTRICT vp, const float* ALT_RESTRICT up,
                          float* ALT_RESTRICT m) {
  V acc[TB][OCV];
#pragma GCC unroll 16
  for (int j = 0; j < TB; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < OCV; ++v) acc[j][v] = vzero<VW>();
  for (int64_t cv = 0; cv < CV; ++cv) {
    const float* a = vp + cv * (TB * VW);
    const float* b = up + cv * (VW * OCB);
#pragma GCC unroll 16
    for (int i = 0; i < VW; ++i) {
      V wv[OCV];
#pragma GCC unroll 8
      for (int v = 0; v < OCV; ++v) wv[v] = vload<VW>(b + i * OCB + v * VW);
#pragma GCC unroll 16
      for (int j = 0; j < TB; ++j) {
        const V x = bcast(a + j * VW + i);
#pragma GCC unroll 8
        for (int v = 0; v < OCV; ++v) acc[j][v] = vfma<VW>(x, wv[v], acc[j][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < TB; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < OCV; ++v) vstore<VW>(m + (j * OCV + v) * VW, acc[j][v]);
}

// Output position (n, k0.., y, x) <- one channel vector of a finished tile (k valid lanes).
ALT_INLINE void store_out(float* ALT_RESTRICT out, const float* res, int64_t n, int64_t k0,
                          int64_t kvalid, int64_t y, int64_t x, V yv, V sc, V sh) {
  if (y >= OH || x >= OW) return;
  const int64_t off = n * OUT_N + k0 * OUT_K + y * OUT_H + x * OUT_W;
  if constexpr (HAS_SCALE) yv = yv * sc;
  if constexpr (HAS_SHIFT) yv = yv + sh;
  if (OUT_K == 1 && kvalid == VW) {
    if constexpr (HAS_RES) yv += vload<VW>(res + off);
    vstore<VW>(out + off, alt_activate<VW, ACT>(yv));
    return;
  }
  alignas(64) float t[VW];
  vstore<VW>(t, yv);
  for (int64_t i = 0; i < kvalid; ++i) {
    float v = t[i];
    if constexpr (HAS_RES) v += res[off + i * OUT_K];
    out[off + i * OUT_K] = alt_activate<1, ACT>(v);
  }
}

// One item: tile block tb x oc block kb, all 16 GEMM tiles, then A^T M A and the epilogue.
// A^T = [1 1 1 0; 0 1 -1 -1]
void item(const float* ALT_RESTRICT ws, const float* ALT_RESTRICT u, float* ALT_RESTRICT out,
          const float* scale, const float* shift, const float* res, int64_t tb, int64_t kb) {
  alignas(64) float m[16][TB * OCB];
  for (int xi = 0; xi < 16; ++xi)
    gemm_tile(ws + xi * (NTB * PANEL) + tb * PANEL, u + (xi * KB + kb) * UPANEL, m[xi]);
  for (int v = 0; v < OCV; ++v) {
    const int64_t k0 = kb * OCB + v * VW;
    if (k0 >= K) break;
    const int64_t kvalid = K - k0 < VW ? K - k0 : VW;
    V sc = vzero<VW>(), sh = vzero<VW>();
    if constexpr (HAS_SCALE || HAS_SHIFT) {
      alignas(64) float s[VW], b[VW];
      for (int i = 0; i < VW; ++i) {
        s[i] = HAS_SCALE && i < kvalid ? scale[k0 + i] : 0.0f;
        b[i] = HAS_SHIFT && i < kvalid ? shift[k0 + i] : 0.0f;
      }
      sc = vload<VW>(s);
      sh = vload<VW>(b);
    }
    for (int j = 0; j < TB; ++j) {
      const int64_t t = tb * TB + j;
      if (t >= TILES) break;
      V q[4][4];
      for (int xi = 0; xi < 16; ++xi) q[xi / 4][xi % 4] = vload<VW>(&m[xi][(j * OCV + v) * VW]);
      V r[2][4];  // A^T M
      for (int b = 0; b < 4; ++b) {
        r[0][b] = q[0][b] + q[1][b] + q[2][b];
        r[1][b] = q[1][b] - q[2][b] - q[3][b];
      }
      const int64_t n = t / (TH * TW), rr = t % (TH * TW);
      const int64_t y = 2 * (rr / TW), x = 2 * (rr % TW);
      for (int a = 0; a < 2; ++a) {  // (A^T M) A
        store_out(out, res, n, k0, kvalid, y + a, x, r[a][0] + r[a][1] + r[a][2], sc, sh);
        store_out(out, res, n, k0, kvalid, y + a, x + 1, r[a][1] - r[a][2] - r[a][3], sc, sh);
      }
    }
  }
}

}  // namespace

ALT_EXPORT int32_t @SYMBOL@(  // the one exported symbol (kernel_abi.h)
    const alt_runtime* rt, const void* const* inputs, void* const* outputs) {
  const float* lhs = static_cast<const float*>(inputs[0]);
  const float* rhs = static_cast<const float*>(inputs[1]);
  float* out = static_cast<float*>(outputs[0]);
  float* ws = static_cast<float*>(outputs[1]);
  float* wu = ws + 16 * NTB * PANEL;  // the transformed filter when not prepacked
  const float* scale = HAS_SCALE ? static_cast<const float*>(inputs[IN_SCALE]) : nullptr;
  const float* shift = HAS_SHIFT ? static_cast<const float*>(inputs[IN_SHIFT]) : nullptr;
  const float* res = HAS_RES ? static_cast<const float*>(inputs[IN_RES]) : nullptr;

  // 1. transforms: the input's tile blocks, then (not prepacked) the filter's oc blocks
  constexpr int64_t U_ITEMS = PREPACKED ? 0 : KB;
  alt_parallel_for(rt, NTB + U_ITEMS, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < NTB)
        input_transform(lhs, ws, i);
      else
        filter_transform(rhs, wu, i - NTB);
    }
  });
  const float* u = PREPACKED ? rhs : wu;
  // 2. the 16 GEMMs, output transform and epilogue
  alt_parallel_for(rt, NTB * KB, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t kb = KB_OUTER ? i / NTB : i % KB;
      const int64_t tb = KB_OUTER ? i % NTB : i / KB;
      item(ws, u, out, scale, shift, res, tb, kb);
    }
  });
  return 0;
}
