// 3x3 stride-1 convolution by Winograd's minimal filtering F(MxM, 3x3), M = 2 or 4, fp32.
// Entry point: the exported kernel @SYMBOL@ (kernel_abi.h); rendered by alt_jax/ops/winograd.py.
//
// Each MxM block of outputs ("tile") comes from a TxT input patch d (T = M + 2) and each 3x3
// filter g:
//   Y = A^T [ (G g G^T) . (B^T d B) ] A
// so a tile costs T*T multiply-adds per (input, output channel) instead of 9*M*M (F(2x2):
// 16 for 36; F(4x4): 36 for 144): the T*T elementwise products, summed over input channels,
// are XI = T*T independent GEMMs M[xi] = V[xi] (tiles x C) @ U[xi] (C x K).
//   1. input transform, in parallel over blocks of TB tiles: V = B^T d B per tile and channel,
//      written into the workspace as GEMM panels [xi][tile block][C/VW][TB][VW] (zeros for
//      padding, missing channels and the tiles past the last one).
//   2. one parallel item = one tile block x one block of OCB output channels: for each xi a
//      register tile of TB tiles x OC_VECS vectors accumulates over all C (broadcasts of V,
//      vector loads of U), parks its XI results in L1, then the output transform
//      Y = A^T M A and the fused epilogue act(y * scale + shift + residual) run on them and the
//      MxM outputs are written in the equation's output layout.
// The lhs and the output may also be channel-blocked (N C/b H W bc): see LHS_CB / OUT_KB.
// The matrices are Lavin & Gray's (interpolation points 0, +-1 for M = 2; 0, +-1, +-2 for
// M = 4); each transform below is written out once per M, with its matrix beside it.
// Exact where XLA is: the transforms mix a whole patch and filter, so one inf becomes
// inf - inf over a tile and values near the float range overflow where XLA's sums do not.
// The kernel bounds what it reads (see "safe range" below) and, when an input or filter
// value is outside the bounds or NaN, computes the plain convolution instead (direct_item),
// which forms XLA's NaNs and infs where XLA does: no runtime check in the graph.
// U is the transformed filter G g G^T, [xi][K/OCB][C_pad][OCB]: inputs[1] when PREPACKED
// (WinogradFamily.pack_weights, at plan time for constant weights; the packed buffer then
// goes on with the filter itself, [K][C][3][3], and its max |g|, or -1 if a tap is not
// finite), else computed from the rhs into the workspace, in parallel with the input
// transform, on every call.
// Inputs: lhs, the packed buffer (PREPACKED) or the rhs, then scale?, shift?, residual?
// (Epilogue.inputs() order).
#include <float.h>
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <utility>
#include <type_traits>

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
// Channel blocks (layout.block_strides), as in conv2d.cc: lhs channel c sits at
// (c / LHS_CB) * LHS_CBS + (c % LHS_CB) * LHS_C, output channel k at
// (k / OUT_KB) * OUT_KBS + (k % OUT_KB) * OUT_K. A block of all C (K) channels is an
// unblocked, linear layout: LHS_C / OUT_K are then the plain strides.
constexpr int64_t LHS_CB = @LHS_CB@, LHS_CBS = @LHS_CBS@;
constexpr int64_t OUT_KB = @OUT_KB@, OUT_KBS = @OUT_KBS@;
constexpr bool PREPACKED = @PREPACKED@;

// ---- the knobs ----
constexpr int M = @OUT_TILE@;       // outputs per tile side (the F(MxM, 3x3) variant)
constexpr int T = M + 2;            // input patch side
constexpr int XI = T * T;           // GEMMs (transformed positions)
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
static_assert(M == 2 || M == 4, "F(2x2, 3x3) or F(4x4, 3x3)");
static_assert(TH == (OH + M - 1) / M && TW == (OW + M - 1) / M, "tiles");
static_assert(CP % VW == 0 && CP >= C && CP - C < VW, "CP must be C rounded up to VW");
static_assert(KB * OCB >= K && (KB - 1) * OCB < K, "KB must be ceil(K / OCB)");
static_assert(NTB * TB >= TILES && (NTB - 1) * TB < TILES, "NTB must be ceil(tiles / TB)");
static_assert(TB >= 1 && TB * OCV + OCV + 1 <= 32, "register tile out of range");
static_assert(OH == H + PT + @PB@ - 2 && OW == IW + PL + @PR@ - 2, "3x3 stride-1 geometry");

// ---- channel-blocked lhs / output (N C/b H W bc) ----
constexpr bool LHS_BLOCKED = LHS_CB < C;
constexpr bool OUT_BLOCKED = OUT_KB < K;
static_assert(LHS_CB >= 1 && C % LHS_CB == 0 && OUT_KB >= 1 && K % OUT_KB == 0,
              "channel blocks divide the channels");
// Vectors of VW channels start at multiples of VW; a power-of-two block and VW divide one
// another, so a vector's channels lie in one block or cover whole blocks: runs of
// min(VW, block) channels, each inside one block, addressed from the run's first channel.
static_assert(!LHS_BLOCKED || (LHS_CB & (LHS_CB - 1)) == 0, "lhs channel block: a power of two");
static_assert(!OUT_BLOCKED || (OUT_KB & (OUT_KB - 1)) == 0, "output channel block: a power of two");
static_assert(!OUT_BLOCKED || OUT_K == 1, "a blocked output's channels are contiguous in a block");
// the runs (lanes per vector load or store) of a blocked lhs / output
constexpr int LHS_RUN = LHS_BLOCKED && LHS_CB < VW ? static_cast<int>(LHS_CB) : VW;
constexpr int OUT_RUN = OUT_BLOCKED && OUT_KB < VW ? static_cast<int>(OUT_KB) : VW;

// Element offsets of lhs channel c and output channel k in a channel-blocked lhs / output.
// Linear layouts keep their c * LHS_C / k * OUT_K statements (constexpr branches at the
// call sites), so that their kernels compile exactly as before.
constexpr int64_t lhs_c_blocked(int64_t c) {
  return (c / LHS_CB) * LHS_CBS + (c % LHS_CB) * LHS_C;
}
constexpr int64_t out_k_blocked(int64_t k) {
  return (k / OUT_KB) * OUT_KBS + (k % OUT_KB) * OUT_K;
}

// Lanes [S * W, S * W + W) of a vector as a W-lane vector (a register extract), the
// concatenation of two W-lane vectors, and f(integral_constant<int, S>) for S in [0, N): how
// vectors meet blocks narrower than themselves (instantiated only then, so never for VW = 1).
template <int W, int S, int... I>
ALT_INLINE typename altv<W>::type lane_slice_(V y, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(y, y, (S * W + I)...);
}
template <int W, int S>
ALT_INLINE typename altv<W>::type lane_slice(V y) {
  return lane_slice_<W, S>(y, std::make_integer_sequence<int, W>{});
}
template <int W, int... I>
ALT_INLINE typename altv<2 * W>::type concat_(typename altv<W>::type a, typename altv<W>::type b,
                                              std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, I...);
}
template <int W>
ALT_INLINE typename altv<2 * W>::type concat(typename altv<W>::type a, typename altv<W>::type b) {
  return concat_<W>(a, b, std::make_integer_sequence<int, 2 * W>{});
}
template <typename F, int... S>
ALT_INLINE void for_each_slice_(F&& f, std::integer_sequence<int, S...>) {
  (f(std::integral_constant<int, S>{}), ...);
}
template <int N, typename F>
ALT_INLINE void for_each_slice(F&& f) {
  for_each_slice_(f, std::make_integer_sequence<int, N>{});
}

ALT_INLINE V bcast(const float* p) { return *p - V{}; }

// ---- the safe range ----
// With |input| <= X and |filter| <= W (partial sums and roundings included, a factor 2 spare):
//   B^T d B: sums of inputs times B's entries, largest absolute row sum of B^T 2 (M = 2) or
//     10 (M = 4: 4 d0 - 5 d2 + d4) ................................... <= 4 X, <= 100 X
//   G g G^T: partial sums of 3 taps, then of 3 of those .................. <= 4.5 W (both)
//   the GEMMs over C channels ................. <= C 4X 2.25W = 9 C X W, <= 225 C X W
//   A^T M A: largest absolute row sum of A^T 3 (M = 2) or 19 (M = 4: m1 - m2 + 8 (m3 - m4)
//     + m5) ............................................. <= 81 C X W, <= 81225 C X W
// so with those below FLT_MAX / 2 nothing overflows, XLA's own sums (<= 9 C X W) are finite,
// and the two agree up to rounding; a NaN fails every <= test.
constexpr float IN_GROWTH = M == 2 ? 4.0f : 100.0f;
constexpr float OUT_GROWTH = M == 2 ? 81.0f : 81225.0f;
constexpr float INPUT_LIMIT = FLT_MAX / (2.0f * IN_GROWTH);
constexpr float FILTER_LIMIT = FLT_MAX / (2.0f * 4.5f);
constexpr float PRODUCT_LIMIT = FLT_MAX / (2.0f * OUT_GROWTH * static_cast<float>(C));
constexpr int64_t U_FLOATS = XI * KB * UPANEL;  // the packed buffer: U, then g, then max |g|
constexpr int64_t G_FLOATS = K * C * 9;
// where the fallback reads the filter: the packed copy [K][C][3][3], or the rhs
constexpr int64_t G_O = PREPACKED ? C * 9 : RHS_O, G_I = PREPACKED ? 9 : RHS_I;
constexpr int64_t G_H = PREPACKED ? 3 : RHS_H, G_W = PREPACKED ? 1 : RHS_W;

// The largest |input| the transforms take with this filter, from its max |g| (negative or
// NaN: a tap that is not finite, or beyond FILTER_LIMIT: nothing is safe, returns -1).
inline float input_limit(float max_g) {
  if (!(max_g >= 0.0f && max_g <= FILTER_LIMIT)) return -1.0f;
  const float by_product = max_g > 0.0f ? PRODUCT_LIMIT / max_g : INPUT_LIMIT;
  return by_product < INPUT_LIMIT ? by_product : INPUT_LIMIT;
}

// max |g| over the rhs in the equation's layout, or -1 if a tap is not finite (a NaN fails
// the <= test); the non-prepacked path's counterpart of the packed buffer's last float.
float rhs_max_abs(const float* ALT_RESTRICT rhs) {
  float m = 0.0f;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c)
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) {
          const float v = rhs[k * RHS_O + c * RHS_I + a * RHS_H + b * RHS_W];
          const float av = v < 0.0f ? -v : v;
          if (!(av <= FLT_MAX)) return -1.0f;
          if (av > m) m = av;
        }
  return m;
}

typedef decltype(V{} <= V{}) VMask;  // lane masks (bool when VW == 1)

ALT_INLINE VMask all_lanes() { return V{} == V{}; }

// ok &= -lim <= v <= lim, lane by lane (false for NaN).
ALT_INLINE void check_range(VMask& ok, V v, V lim) { ok = ok & ((v <= lim) & (v >= -lim)); }

template <typename Mask>  // a template, so that the branch for the other mask type is dropped
ALT_INLINE bool every_lane(Mask ok) {
  if constexpr (std::is_same_v<Mask, bool>) {
    return ok;
  } else {
    for (int i = 0; i < VW; ++i)
      if (!ok[i]) return false;
    return true;
  }
}

// W channels from c0 (a multiple of W) of a blocked lhs with its channels contiguous in a
// block (LHS_C == 1), p at channel 0: one load per run of LHS_RUN channels, concatenated.
template <int W>
ALT_INLINE typename altv<W>::type load_runs(const float* ALT_RESTRICT p, int64_t c0) {
  if constexpr (W <= LHS_RUN) {
    return vload<W>(p + lhs_c_blocked(c0));
  } else {
    return concat<W / 2>(load_runs<W / 2>(p, c0), load_runs<W / 2>(p, c0 + W / 2));
  }
}

// Input element (n, c0 .. c0+VW, y, x) of a channel-blocked lhs (channel c at
// lhs_c_blocked(c) from the position), (y, x) inside the image. (A template, so that it is
// instantiated only for a blocked lhs.)
template <int W>
ALT_INLINE typename altv<W>::type load_in_blocked(const float* ALT_RESTRICT lhs, int64_t n,
                                                  int64_t c0, int64_t y, int64_t x) {
  const float* p = lhs + n * LHS_N + y * LHS_H + x * LHS_W;
  if constexpr (LHS_C == 1) {
    if (C % W == 0 || c0 + W <= C) return load_runs<W>(p, c0);
  }
  alignas(64) float t[W];
  for (int i = 0; i < W; ++i) t[i] = c0 + i < C ? p[lhs_c_blocked(c0 + i)] : 0.0f;
  return vload<W>(t);
}

// Input element (n, c0 .. c0+VW, y, x) as a vector, zero outside the image or past C.
ALT_INLINE V load_in(const float* ALT_RESTRICT lhs, int64_t n, int64_t c0, int64_t y, int64_t x) {
  if (y < 0 || y >= H || x < 0 || x >= IW) return vzero<VW>();
  if constexpr (LHS_BLOCKED) return load_in_blocked<VW>(lhs, n, c0, y, x);
  const float* p = lhs + n * LHS_N + c0 * LHS_C + y * LHS_H + x * LHS_W;
  if constexpr (LHS_C == 1 && C % VW == 0) return vload<VW>(p);
  alignas(64) float t[VW];
  for (int i = 0; i < VW; ++i) t[i] = c0 + i < C ? p[i * LHS_C] : 0.0f;
  return vload<VW>(t);
}

// w = B^T d for one line of T values (a column of the patch, then a row of B^T d).
// M = 2: B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
// M = 4: B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
//               0 4 0 -5 0 1]
ALT_INLINE void input_line(const V* d, V* w) {
  if constexpr (M == 2) {
    w[0] = d[0] - d[2];
    w[1] = d[1] + d[2];
    w[2] = d[2] - d[1];
    w[3] = d[1] - d[3];
  } else {
    const V two = vbroadcast<VW>(2.0f), four = vbroadcast<VW>(4.0f),
            five = vbroadcast<VW>(5.0f);
    const V p = d[4] - d[2], q = d[3] - d[1];  // shared by rows 3 and 4
    const V r = d[3] + d[4], t = d[1] + d[2];  // rows 1 and 2
    w[0] = four * d[0] - five * d[2] + d[4];
    w[1] = r - four * t;
    w[2] = d[4] - d[3] + four * (d[1] - d[2]);
    w[3] = p + two * q;
    w[4] = p - two * q;
    w[5] = four * d[1] - five * d[3] + d[5];
  }
}

// Tile block tb: V = B^T d B for its TB tiles and every channel vector. Returns whether every
// input it owns is within [-lim, lim]: a tile owns the first M rows and columns of its patch
// (all T of them in the last tile row or column), so every input a tile reads is checked
// once.
bool input_transform(const float* ALT_RESTRICT lhs, float* ALT_RESTRICT ws, int64_t tb,
                     float lim) {
  const V vlim = vbroadcast<VW>(lim);
  VMask ok = all_lanes();
  for (int j = 0; j < TB; ++j) {
    const int64_t t = tb * TB + j;
    for (int64_t cv = 0; cv < CV; ++cv) {
      V w[T][T];
      if (t < TILES) {
        const int64_t n = t / (TH * TW), r = t % (TH * TW);
        const int64_t y0 = M * (r / TW) - PT, x0 = M * (r % TW) - PL;
        const int a_own = r / TW == TH - 1 ? T : M, b_own = r % TW == TW - 1 ? T : M;
        V d[T][T];  // d[b][a]: column b of the patch, so that a line is contiguous
        for (int a = 0; a < T; ++a)
          for (int b = 0; b < T; ++b) {
            d[b][a] = load_in(lhs, n, cv * VW, y0 + a, x0 + b);
            if (a < a_own && b < b_own) check_range(ok, d[b][a], vlim);
          }
        V s[T][T];  // s[a][b] = (B^T d)[a][b], built column by column
        for (int b = 0; b < T; ++b) {
          V col[T];
          input_line(d[b], col);
          for (int a = 0; a < T; ++a) s[a][b] = col[a];
        }
        for (int a = 0; a < T; ++a) input_line(s[a], w[a]);  // rows: (B^T d) B
      } else {
        for (int a = 0; a < T; ++a)
          for (int b = 0; b < T; ++b) w[a][b] = vzero<VW>();
      }
      for (int a = 0; a < T; ++a)
        for (int b = 0; b < T; ++b)
          vstore<VW>(ws + (a * T + b) * (NTB * PANEL) + tb * PANEL + (cv * TB + j) * VW, w[a][b]);
    }
  }
  return every_lane(ok);
}

// u = G g for one line of 3 filter taps (a column of g, then a row of G g).
// M = 2: G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
// M = 4: G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
ALT_INLINE void filter_line(const V* g, V* u) {
  if constexpr (M == 2) {
    const V half = vbroadcast<VW>(0.5f);
    u[0] = g[0];
    u[1] = half * (g[0] + g[1] + g[2]);
    u[2] = half * (g[0] - g[1] + g[2]);
    u[3] = g[2];
  } else {
    const V sixth = vbroadcast<VW>(1.0f / 6.0f), quarter = vbroadcast<VW>(0.25f);
    const V even = g[0] * quarter + g[2], odd = g[1] * vbroadcast<VW>(0.5f);  // (g0/4 + g2), g1/2
    u[0] = quarter * g[0];
    u[1] = -sixth * (g[0] + g[1] + g[2]);
    u[2] = -sixth * (g[0] - g[1] + g[2]);
    u[3] = sixth * (even + odd);   // g0/24 + g1/12 + g2/6
    u[4] = sixth * (even - odd);   // g0/24 - g1/12 + g2/6
    u[5] = g[2];
  }
}

// U panels of oc block kb: G g G^T for its OCB output channels and every input channel,
// VW output channels at a time (vector loads when they are contiguous in the rhs, e.g. HWIO).
void filter_transform(const float* ALT_RESTRICT rhs, float* ALT_RESTRICT u, int64_t kb) {
  for (int64_t ci = 0; ci < CP; ++ci)
    for (int64_t o0 = 0; o0 < OCB; o0 += VW) {
      const int64_t k0 = kb * OCB + o0;
      V g[3][3];  // g[b][a]: column b of the filter
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) {
          const float* p = rhs + k0 * RHS_O + ci * RHS_I + a * RHS_H + b * RHS_W;
          if (RHS_O == 1 && ci < C && k0 + VW <= K) {
            g[b][a] = vload<VW>(p);
          } else {
            alignas(64) float t[VW];
            for (int i = 0; i < VW; ++i) t[i] = ci < C && k0 + i < K ? p[i * RHS_O] : 0.0f;
            g[b][a] = vload<VW>(t);
          }
        }
      V t[T][3], r[T][T];  // t = G g, r = (G g) G^T
      for (int b = 0; b < 3; ++b) {
        V col[T];
        filter_line(g[b], col);
        for (int a = 0; a < T; ++a) t[a][b] = col[a];
      }
      for (int a = 0; a < T; ++a) filter_line(t[a], r[a]);
      for (int xi = 0; xi < XI; ++xi)
        vstore<VW>(u + (xi * KB + kb) * UPANEL + ci * OCB + o0, r[xi / T][xi % T]);
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

// A whole channel vector (k0 a multiple of VW) into a channel-blocked output at position
// offset pos: runs of RUN channels (RUN = OUT_RUN), each inside one block, at
// out_k_blocked(channel), the residual read at the same offsets. (A template, so that the
// lane slices are instantiated only for blocks narrower than a vector, never for VW = 1.)
template <int RUN>
ALT_INLINE void store_runs(float* ALT_RESTRICT out, const float* res, int64_t pos, int64_t k0,
                           V yv) {
  if constexpr (RUN == VW) {
    const int64_t off = pos + out_k_blocked(k0);
    if constexpr (HAS_RES) yv += vload<VW>(res + off);
    vstore<VW>(out + off, alt_activate<VW, ACT>(yv));
  } else {
    for_each_slice<VW / RUN>([&](auto h) __attribute__((always_inline)) {
      constexpr int SL = decltype(h)::value;
      const int64_t off = pos + out_k_blocked(k0 + SL * RUN);
      typename altv<RUN>::type p = lane_slice<RUN, SL>(yv);
      if constexpr (HAS_RES) p += vload<RUN>(res + off);
      vstore<RUN>(out + off, alt_activate<RUN, ACT>(p));
    });
  }
}

// Output position (n, k0.., y, x) <- one channel vector of a finished tile (k valid lanes).
// The residual is read at the same offsets as the output.
ALT_INLINE void store_out(float* ALT_RESTRICT out, const float* res, int64_t n, int64_t k0,
                          int64_t kvalid, int64_t y, int64_t x, V yv, V sc, V sh) {
  if (y >= OH || x >= OW) return;
  if constexpr (OUT_BLOCKED) {
    // a channel-blocked output (N K/b OH OW bc, OUT_K == 1): a whole vector (k0 a multiple
    // of VW) is stored as runs of OUT_RUN channels, each inside one block, at
    // out_k_blocked(channel); blocks narrower than a vector take a lane slice per block, in
    // registers. A partial vector (the last one, or the fallback's single channel) goes
    // lane by lane.
    const int64_t pos = n * OUT_N + y * OUT_H + x * OUT_W;
    if constexpr (HAS_SCALE) yv = yv * sc;
    if constexpr (HAS_SHIFT) yv = yv + sh;
    if (kvalid == VW) {
      store_runs<OUT_RUN>(out, res, pos, k0, yv);
      return;
    }
    alignas(64) float t[VW];
    vstore<VW>(t, yv);
    for (int64_t i = 0; i < kvalid; ++i) {
      const int64_t off = pos + out_k_blocked(k0 + i);
      float v = t[i];
      if constexpr (HAS_RES) v += res[off];
      out[off] = alt_activate<1, ACT>(v);
    }
    return;
  }
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

// y = A^T m for one line of T values (a column of M, then a row of A^T M).
// M = 2: A^T = [1 1 1 0; 0 1 -1 -1]
// M = 4: A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
ALT_INLINE void output_line(const V* m, V* y) {
  if constexpr (M == 2) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  } else {
    const V a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
    y[0] = m[0] + a + c;
    y[1] = b + vbroadcast<VW>(2.0f) * d;
    y[2] = a + vbroadcast<VW>(4.0f) * c;
    y[3] = b + vbroadcast<VW>(8.0f) * d + m[5];
  }
}

// One item: tile block tb x oc block kb, all XI GEMM tiles, then A^T M A and the epilogue.
void item(const float* ALT_RESTRICT ws, const float* ALT_RESTRICT u, float* ALT_RESTRICT out,
          const float* scale, const float* shift, const float* res, int64_t tb, int64_t kb) {
  alignas(64) float m[XI][TB * OCB];
  for (int xi = 0; xi < XI; ++xi)
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
      V q[T][T];  // q[b][a] = M[a][b]: column b of the tile's products
      for (int xi = 0; xi < XI; ++xi) q[xi % T][xi / T] = vload<VW>(&m[xi][(j * OCV + v) * VW]);
      V r[M][T];  // A^T M, built column by column
      for (int b = 0; b < T; ++b) {
        V col[M];
        output_line(q[b], col);
        for (int a = 0; a < M; ++a) r[a][b] = col[a];
      }
      const int64_t n = t / (TH * TW), rr = t % (TH * TW);
      const int64_t y = M * (rr / TW), x = M * (rr % TW);
      for (int a = 0; a < M; ++a) {  // (A^T M) A
        V row[M];
        output_line(r[a], row);
        for (int b = 0; b < M; ++b) store_out(out, res, n, k0, kvalid, y + a, x + b, row[b], sc, sh);
      }
    }
  }
}

// The fallback for inputs or filters outside the safe range: output channel k of image n by
// the plain convolution (g: the filter, read through G_O..G_W), then the same epilogue
// (store_out, one lane). Its products and sums form NaN and inf where XLA's do.
void direct_item(const float* ALT_RESTRICT lhs, const float* ALT_RESTRICT g, float* out,
                 const float* scale, const float* shift, const float* res, int64_t n,
                 int64_t k) {
  const V sc = vbroadcast<VW>(HAS_SCALE ? scale[k] : 0.0f);
  const V sh = vbroadcast<VW>(HAS_SHIFT ? shift[k] : 0.0f);
  for (int64_t y = 0; y < OH; ++y)
    for (int64_t x = 0; x < OW; ++x) {
      float acc = 0.0f;
      for (int64_t c = 0; c < C; ++c)
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b) {
            // a padded tap is 0 * w, as in XLA (NaN for an infinite tap)
            const int64_t iy = y + a - PT, ix = x + b - PL;
            const bool inside = iy >= 0 && iy < H && ix >= 0 && ix < IW;
            float v = 0.0f;
            if constexpr (LHS_BLOCKED) {
              if (inside) v = lhs[n * LHS_N + lhs_c_blocked(c) + iy * LHS_H + ix * LHS_W];
            } else {
              v = inside ? lhs[n * LHS_N + c * LHS_C + iy * LHS_H + ix * LHS_W] : 0.0f;
            }
            acc += v * g[k * G_O + c * G_I + a * G_H + b * G_W];
          }
      store_out(out, res, n, k, 1, y, x, vbroadcast<VW>(acc), sc, sh);
    }
}

}  // namespace

ALT_EXPORT int32_t @SYMBOL@(  // the one exported symbol (kernel_abi.h)
    const alt_runtime* rt, const void* const* inputs, void* const* outputs) {
  const float* lhs = static_cast<const float*>(inputs[0]);
  const float* rhs = static_cast<const float*>(inputs[1]);
  float* out = static_cast<float*>(outputs[0]);
  float* ws = static_cast<float*>(outputs[1]);
  float* wu = ws + XI * NTB * PANEL;  // the transformed filter when not prepacked
  const float* scale = HAS_SCALE ? static_cast<const float*>(inputs[IN_SCALE]) : nullptr;
  const float* shift = HAS_SHIFT ? static_cast<const float*>(inputs[IN_SHIFT]) : nullptr;
  const float* res = HAS_RES ? static_cast<const float*>(inputs[IN_RES]) : nullptr;

  // 0. the safe range of the inputs, from the filter's largest tap
  const float lim = input_limit(PREPACKED ? rhs[U_FLOATS + G_FLOATS] : rhs_max_abs(rhs));
  // 1. transforms: the input's tile blocks (checking their inputs), then (not prepacked) the
  // filter's oc blocks
  constexpr int64_t U_ITEMS = PREPACKED ? 0 : KB;
  std::atomic<bool> in_range{lim >= 0.0f};
  alt_parallel_for(rt, NTB + U_ITEMS, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < NTB) {
        if (!input_transform(lhs, ws, i, lim)) in_range.store(false, std::memory_order_relaxed);
      } else {
        filter_transform(rhs, wu, i - NTB);
      }
    }
  });
  if (!in_range.load()) {  // rare: the plain convolution, in parallel over (image, channel)
    const float* g = PREPACKED ? rhs + U_FLOATS : rhs;
    alt_parallel_for(rt, N * K, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) direct_item(lhs, g, out, scale, shift, res, i / K, i % K);
    });
    return 0;
  }
  const float* u = PREPACKED ? rhs : wu;
  // 2. the XI GEMMs, output transform and epilogue
  alt_parallel_for(rt, NTB * KB, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t kb = KB_OUTER ? i / NTB : i % KB;
      const int64_t tb = KB_OUTER ? i % NTB : i / KB;
      item(ws, u, out, scale, shift, res, tb, kb);
    }
  });
  return 0;
}
