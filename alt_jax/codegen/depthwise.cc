// Depthwise 2-D convolution (one input channel per group, channel multiplier MULT), fp32.
// Entry point: extern "C" @SYMBOL@(rt, inputs = {lhs, rhs, scale?, shift?, residual?},
// outputs = {out, workspace}).
//
// Vectorised over output channels: a register tile holds OW_TILE output columns x CB
// channels (CB / VW vectors). Operands arrive in their original dimension order, described
// by element strides; the weights are read from [channel block][kh][kw][CB] panels: packed
// per call into the workspace (tiny), or, when PREPACKED, given in that layout as inputs[1]
// (alt_jax/ops/depthwise.py pack_weights, run once on constant weights). The input is
// either read in place (PACK=false: channels are unit-stride; border rows clip the kernel
// rows, border columns take a bounds-checked path per pixel; both add the skipped padded
// taps' 0 * w, so a non-finite weight on padding gives XLA's NaN) or each task copies the
// input rows it needs, zero-padded and channel-blocked, into its own workspace slot first
// (PACK=true: any layout, any multiplier, no bounds checks in the hot loop, and the copy is
// still in L1/L2 when it is read).
// The output is written directly in the equation's layout, after the fused epilogue
// y = act(acc * scale[k] + shift[k] + residual) is applied to the tile in registers (every
// store path: whole blocks, partial channel blocks, transposed stores, single columns).
#include "alt_jax/epilogue.h"
#include "alt_jax/kernel_abi.h"
#include "alt_jax/simd.h"

namespace {

constexpr int VW = @VEC@;  // floats per vector register
typedef altv<VW>::type vf;

// ---- the computation (fixed by the spec) ----
constexpr int64_t N = @N@, C = @C@, MULT = @MULT@, K = C * MULT;
constexpr int64_t H = @H@, W = @W@, KH = @KH@, KW = @KW@, OH = @OH@, OW = @OW@;
constexpr int64_t SH = @SH@, SW = @SW@, DH = @DH@, DW = @DW@, PT = @PT@, PL = @PL@;
// element strides of the logical dims in the dense operands
constexpr int64_t LS_N = @LS_N@, LS_C = @LS_C@, LS_H = @LS_H@, LS_W = @LS_W@;
constexpr int64_t RS_K = @RS_K@, RS_KH = @RS_KH@, RS_KW = @RS_KW@;
constexpr int64_t OS_N = @OS_N@, OS_K = @OS_K@, OS_H = @OS_H@, OS_W = @OS_W@;
// output columns whose whole window row lies inside the unpadded input
constexpr int64_t OW_LO = @OW_LO@, OW_HI = @OW_HI@;

// ---- how it loops (knobs) ----
constexpr int64_t CB = @C_BLOCK@;     // channels per block, a multiple of VW
constexpr int T = @OW_TILE@;          // output columns per register tile
constexpr int64_t R = @OH_ROWS@;      // output rows per task
constexpr bool PACK = @PACK@;         // copy input rows into a padded blocked slot first
constexpr bool C_INNER = @C_INNER@;   // a task covers all channel blocks (else one block)
// 8x8 register transposes (8-float vectors only) for width-contiguous operands: packing a
// channel-major input and storing to a channel-major output (both decided in Python)
constexpr bool TRANSPOSE_PACK = @TRANSPOSE_PACK@;
constexpr bool TRANSPOSE_STORE = @TRANSPOSE_STORE@;
constexpr int V = CB / VW;            // vectors per channel block

// ---- the fused epilogue (fixed by the spec) ----
constexpr int ACT = @ACTIVATION@;             // ALT_ACT_* (alt_jax/epilogue.h)
constexpr bool HAS_SCALE = @HAS_SCALE@;       // inputs[IN_SCALE]: K floats
constexpr bool HAS_SHIFT = @HAS_SHIFT@;       // inputs[IN_SHIFT]: K floats
constexpr bool HAS_RESIDUAL = @HAS_RESIDUAL@; // inputs[IN_RESIDUAL]: the output's shape/layout
constexpr int IN_SCALE = 2, IN_SHIFT = IN_SCALE + HAS_SCALE, IN_RESIDUAL = IN_SHIFT + HAS_SHIFT;
constexpr bool PREPACKED = @PREPACKED@;       // inputs[1] already holds the weight panels

constexpr int64_t NBLK = (K + CB - 1) / CB;
constexpr int64_t BLK_PER_TASK = C_INNER ? NBLK : 1;
constexpr int64_t CGROUPS = NBLK / BLK_PER_TASK;
constexpr int64_t ROW_BLOCKS = (OH + R - 1) / R;
constexpr int64_t TASKS = N * CGROUPS * ROW_BLOCKS;
// a slot holds, per channel block, the input rows one task reads, at full padded width
constexpr int64_t ROWS_IN = (R - 1) * SH + (KH - 1) * DH + 1;
constexpr int64_t WP = (OW - 1) * SW + (KW - 1) * DW + 1;
constexpr int64_t SLOT = BLK_PER_TASK * ROWS_IN * WP * CB;
constexpr int64_t WPACK = NBLK * KH * KW * CB;  // packed weights, floats
constexpr int64_t WPACK_ALIGNED = (WPACK + 15) / 16 * 16;
constexpr int64_t WS_WPACK = PREPACKED ? 0 : WPACK_ALIGNED;  // workspace floats for weights
constexpr int64_t WS_FLOATS = WS_WPACK + (PACK ? TASKS * SLOT : 0);

static_assert(CB % VW == 0 && V >= 1, "c_block must be a multiple of the vector width");
static_assert(T >= 1 && R >= 1, "tiles must be non-empty");
static_assert(WS_FLOATS * 4 == @WS_BYTES@, "workspace size disagrees with the Python side");
static_assert(PACK || (LS_C == 1 && MULT == 1 && K % CB == 0),
              "in-place input needs unit-stride channels, multiplier 1, whole blocks");
static_assert(!TRANSPOSE_PACK || (VW == 8 && PACK && LS_W == 1),
              "transposed packing needs 8-float vectors and a width-contiguous input");
static_assert(!TRANSPOSE_STORE || (VW == 8 && OS_W == 1),
              "transposed stores need 8-float vectors and a width-contiguous output");
static_assert(OW_LO <= OW_HI, "interior range is ordered");

// Accumulates one TT-column tile of CB channels over kernel rows [kh0, kh1) (the rows that
// fall inside the input; all of them when packed). ip points at the input of the tile's first
// column and the window's top-left tap; IRS/ICS are its row and column strides in floats.
// Each tap loads CB weights once and FMAs them into all TT columns: TT*V accumulators live in
// registers for the whole window (validate() checks the register budget).
template <int TT, int64_t IRS, int64_t ICS>
ALT_INLINE void tile(const float* ALT_RESTRICT ip, const float* ALT_RESTRICT wp,
                     int64_t kh0, int64_t kh1, vf (&acc)[TT][V]) {
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[t][v] = vzero<VW>();
  for (int64_t kh = kh0; kh < kh1; ++kh) {
    for (int64_t kw = 0; kw < KW; ++kw) {
      const float* ALT_RESTRICT tap = ip + kh * DH * IRS + kw * DW * ICS;
      const float* ALT_RESTRICT wt = wp + (kh * KW + kw) * CB;
      vf w[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) w[v] = vload<VW>(wt + v * VW);
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v)
          acc[t][v] = vfma<VW>(vload<VW>(tap + t * SW * ICS + v * VW), w[v], acc[t][v]);
    }
  }
}

// Transposes 8 rows of 8 floats in registers (unpack, shuffle, swap 128-bit halves);
// templated so that it is only instantiated for 8-float vectors.
typedef int32_t Mask8 __attribute__((vector_size(32)));
template <typename Vec>
ALT_INLINE void transpose8(Vec (&r)[8]) {
  static_assert(sizeof(Vec) == 32, "8-float vectors only");
  typedef Mask8 Mask;
  const Mask lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const Mask lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const Mask lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  Vec t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], lo);
    t[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1], hi);
  }
  for (int i = 0; i < 2; ++i) {  // u[4i + m] holds column m (and m + 4) of rows 4i..4i+3
    u[4 * i + 0] = __builtin_shuffle(t[4 * i], t[4 * i + 2], lo2);
    u[4 * i + 1] = __builtin_shuffle(t[4 * i], t[4 * i + 2], hi2);
    u[4 * i + 2] = __builtin_shuffle(t[4 * i + 1], t[4 * i + 3], lo2);
    u[4 * i + 3] = __builtin_shuffle(t[4 * i + 1], t[4 * i + 3], hi2);
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = __builtin_shuffle(u[m], u[4 + m], lo4);
    r[m + 4] = __builtin_shuffle(u[m], u[4 + m], hi4);
  }
}

// Epilogue operands: per-channel vectors and the residual, which has the output's layout,
// so the residual of an output element sits at the same offset from `res` as it does from
// `out`. Pointers of absent parts are null and never read (the bools are constexpr).
struct Epi {
  const float* scale;
  const float* shift;
  const float* res;
  const float* out;
};

// y = act(x * s + b + r), each part only if present.
ALT_INLINE vf epi_apply(vf x, vf s, vf b, vf r) {
  if constexpr (HAS_SCALE) x = x * s;
  if constexpr (HAS_SHIFT) x = x + b;
  if constexpr (HAS_RESIDUAL) x = x + r;
  return alt_activate<VW, ACT>(x);
}

// Applies the epilogue and writes a TT-column tile of channels [k0, k0 + kvalid) at op
// (output of column 0, channel k0).
template <int TT>
ALT_INLINE void store(float* ALT_RESTRICT op, int64_t k0, int64_t kvalid, vf (&acc)[TT][V],
                      const Epi& e) {
  const float* rp = HAS_RESIDUAL ? e.res + (op - e.out) : nullptr;
  if (OS_K == 1 && kvalid == CB) {  // channels-last output, whole block: vector stores
    vf s[V], b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      s[v] = HAS_SCALE ? vload<VW>(e.scale + k0 + v * VW) : vf{};
      b[v] = HAS_SHIFT ? vload<VW>(e.shift + k0 + v * VW) : vf{};
    }
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const vf r = HAS_RESIDUAL ? vload<VW>(rp + t * OS_W + v * VW) : vf{};
        vstore<VW>(op + t * OS_W + v * VW, epi_apply(acc[t][v], s[v], b[v], r));
      }
    return;
  }
  int t0 = 0;
  if constexpr (TRANSPOSE_STORE && TT >= 8) {  // channel-major output: 8 columns at a time
    for (; t0 + 8 <= TT; t0 += 8)
      for (int v = 0; v < V; ++v) {
        vf r[8];
        for (int i = 0; i < 8; ++i) r[i] = acc[t0 + i][v];
        transpose8(r);  // r[j] = channel v*8+j at columns t0..t0+7
        for (int j = 0; j < 8; ++j) {
          const int64_t k = k0 + v * 8 + j;
          if (v * 8 + j < kvalid) {
            const vf s = HAS_SCALE ? vbroadcast<VW>(e.scale[k]) : vf{};
            const vf b = HAS_SHIFT ? vbroadcast<VW>(e.shift[k]) : vf{};
            const vf res = HAS_RESIDUAL ? vload<VW>(rp + (v * 8 + j) * OS_K + t0) : vf{};
            vstore<VW>(op + (v * 8 + j) * OS_K + t0, epi_apply(r[j], s, b, res));
          }
        }
      }
    if (t0 == TT) return;
  }
  // any other layout, a partial block or leftover columns: through small buffers in L1
  // (channels past kvalid get zeros, are computed and dropped)
  alignas(32) float sb[2][CB];
  for (int64_t j = 0; j < CB; ++j) {
    sb[0][j] = HAS_SCALE && j < kvalid ? e.scale[k0 + j] : 0.0f;
    sb[1][j] = HAS_SHIFT && j < kvalid ? e.shift[k0 + j] : 0.0f;
  }
  alignas(32) float buf[TT][CB];
  if constexpr (HAS_RESIDUAL) {
    for (int64_t j = 0; j < CB; ++j)
      for (int t = t0; t < TT; ++t) buf[t][j] = j < kvalid ? rp[j * OS_K + t * OS_W] : 0.0f;
  }
  for (int t = t0; t < TT; ++t)
    for (int v = 0; v < V; ++v) {
      const vf r = HAS_RESIDUAL ? vload<VW>(&buf[t][v * VW]) : vf{};
      vstore<VW>(&buf[t][v * VW], epi_apply(acc[t][v], vload<VW>(&sb[0][v * VW]),
                                            vload<VW>(&sb[1][v * VW]), r));
    }
  for (int64_t j = 0; j < kvalid; ++j)
    for (int t = t0; t < TT; ++t) op[j * OS_K + t * OS_W] = buf[t][j];
}

// XLA multiplies the padded taps too, and 0 * w is NaN for an infinite or NaN weight (+-0
// otherwise). The in-place path skips padded taps, so it adds their 0 * w instead: `pad`
// holds that sum for the kernel rows outside [kh0, kh1) (a zero vector unless a weight
// there is not finite), added to every tile of a border row.
ALT_INLINE void skipped_rows(const float* ALT_RESTRICT wp, int64_t kh0, int64_t kh1,
                             vf (&pad)[V]) {
  for (int v = 0; v < V; ++v) pad[v] = vzero<VW>();
  for (int64_t kh = 0; kh < KH; ++kh) {
    if (kh >= kh0 && kh < kh1) continue;
    for (int64_t kw = 0; kw < KW; ++kw)
      for (int v = 0; v < V; ++v)
        pad[v] = vfma<VW>(vzero<VW>(), vload<VW>(wp + (kh * KW + kw) * CB + v * VW), pad[v]);
  }
}

template <int TT>
ALT_INLINE void add_skipped(vf (&acc)[TT][V], const vf* pad) {
  if (pad == nullptr) return;
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < V; ++v) acc[t][v] += pad[v];
}

// Tiles output columns [lo, hi) of one row; ip0/op0 point at column 0 of the row. pad:
// the skipped rows' 0 * w (skipped_rows), or null when the row skips none.
template <int64_t IRS, int64_t ICS>
ALT_INLINE void row_tiles(const float* ip0, const float* wp, float* op0, int64_t k0,
                          int64_t kvalid, int64_t lo, int64_t hi, int64_t kh0, int64_t kh1,
                          const vf* pad, const Epi& e) {
  int64_t ow = lo;
  for (; ow + T <= hi; ow += T) {
    vf acc[T][V];
    tile<T, IRS, ICS>(ip0 + ow * SW * ICS, wp, kh0, kh1, acc);
    add_skipped<T>(acc, pad);
    store<T>(op0 + ow * OS_W, k0, kvalid, acc, e);
  }
  if (ow == hi) return;
  if (hi - lo >= T) {  // recompute an overlapping full tile rather than a slow tail
    ow = hi - T;
    vf acc[T][V];
    tile<T, IRS, ICS>(ip0 + ow * SW * ICS, wp, kh0, kh1, acc);
    add_skipped<T>(acc, pad);
    store<T>(op0 + ow * OS_W, k0, kvalid, acc, e);
    return;
  }
  for (; ow < hi; ++ow) {
    vf acc[1][V];
    tile<1, IRS, ICS>(ip0 + ow * SW * ICS, wp, kh0, kh1, acc);
    add_skipped<1>(acc, pad);
    store<1>(op0 + ow * OS_W, k0, kvalid, acc, e);
  }
}

// One output pixel with bounds checks (in-place input only: the padded border). A padded
// tap contributes 0 * w, as in XLA (NaN for a weight that is not finite).
ALT_INLINE void pixel_checked(const float* in_nk, const float* wp, float* op, int64_t oh,
                              int64_t ow, int64_t k0, const Epi& e) {
  vf acc[1][V];
  for (int v = 0; v < V; ++v) acc[0][v] = vzero<VW>();
  for (int64_t kh = 0; kh < KH; ++kh) {
    const int64_t ih = oh * SH - PT + kh * DH;
    for (int64_t kw = 0; kw < KW; ++kw) {
      const int64_t iw = ow * SW - PL + kw * DW;
      const float* wt = wp + (kh * KW + kw) * CB;
      if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
        for (int v = 0; v < V; ++v)
          acc[0][v] = vfma<VW>(vzero<VW>(), vload<VW>(wt + v * VW), acc[0][v]);
        continue;
      }
      const float* tap = in_nk + ih * LS_H + iw * LS_W;
      for (int v = 0; v < V; ++v)
        acc[0][v] = vfma<VW>(vload<VW>(tap + v * VW), vload<VW>(wt + v * VW), acc[0][v]);
    }
  }
  store<1>(op, k0, CB, acc, e);
}

// Weights [k][0][kh][kw] (any order) -> [block][kh][kw][CB], channels past K zero.
void pack_weights(const float* ALT_RESTRICT rhs, float* ALT_RESTRICT wpk) {
  for (int64_t b = 0; b < NBLK; ++b)
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw)
        for (int64_t j = 0; j < CB; ++j) {
          const int64_t k = b * CB + j;
          wpk[((b * KH + kh) * KW + kw) * CB + j] =
              k < K ? rhs[k * RS_K + kh * RS_KH + kw * RS_KW] : 0.0f;
        }
}

// Copies the input rows [ih0, ih0 + rows) of channel block b, image n, into slot rows
// [ROWS_IN][WP][CB] with zeros for padding and for channels past K.
// Not auto-vectorized: g++ 12 -O3 vectorizes the pixel-by-pixel copy wrongly for a one-column
// input whose rows are one block apart (W = 1, c_block 16, >= 5 rows per task: garbage in
// the slot; tests/test_depthwise_kernel.py::test_one_column_packed_input). The copy is a
// small share of the kernel (its FMAs read the slot many times).
__attribute__((optimize("no-tree-vectorize"))) void pack_rows(const float* ALT_RESTRICT in_n, float* ALT_RESTRICT dst, int64_t b, int64_t ih0,
               int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t ih = ih0 + r;
    float* ALT_RESTRICT drow = dst + r * WP * CB;
    if (ih < 0 || ih >= H) {
      for (int64_t i = 0; i < WP * CB; ++i) drow[i] = 0.0f;
      continue;
    }
    const float* srow = in_n + ih * LS_H;
    for (int64_t x = 0; x < WP; ++x) {  // zero the left/right padding columns
      const int64_t iw = x - PL;
      if (iw < 0 || iw >= W)
        for (int64_t j = 0; j < CB; ++j) drow[x * CB + j] = 0.0f;
    }
    const int64_t x0 = PL, x1 = W + PL < WP ? W + PL : WP;  // columns inside the input
    const int64_t k0 = b * CB;
    const int64_t kvalid = K - k0 < CB ? K - k0 : CB;
    int64_t xt = x0;
    if constexpr (TRANSPOSE_PACK) {  // 8 channels x 8 columns per register transpose
      for (; xt + 8 <= x1; xt += 8)
        for (int v = 0; v < V; ++v) {
          vf r[8];
          for (int i = 0; i < 8; ++i) {
            const int64_t j = v * 8 + i;
            r[i] = j < kvalid ? vload<VW>(srow + ((k0 + j) / MULT) * LS_C + (xt - PL))
                              : vzero<VW>();
          }
          transpose8(r);  // r[i] = channels v*8.. of column xt+i
          for (int i = 0; i < 8; ++i) vstore<VW>(drow + (xt + i) * CB + v * 8, r[i]);
        }
    }
    if (@PACK_CHANNELS_INNER@) {  // channel stride is the small one: copy pixel by pixel
      for (int64_t x = xt; x < x1; ++x)
        for (int64_t j = 0; j < CB; ++j)
          drow[x * CB + j] = j < kvalid ? srow[(x - PL) * LS_W + ((k0 + j) / MULT) * LS_C] : 0.0f;
    } else {  // width stride is the small one: copy channel rows, scatter into the block
      for (int64_t j = 0; j < CB; ++j) {
        if (j < kvalid) {
          const float* src = srow + ((k0 + j) / MULT) * LS_C - PL * LS_W;
          for (int64_t x = xt; x < x1; ++x) drow[x * CB + j] = src[x * LS_W];
        } else {
          for (int64_t x = xt; x < x1; ++x) drow[x * CB + j] = 0.0f;
        }
      }
    }
  }
}

void run_task(const float* lhs, const float* wpk, float* out, float* slot, int64_t task,
              const Epi& e) {
  const int64_t rb = task % ROW_BLOCKS;
  const int64_t g = (task / ROW_BLOCKS) % CGROUPS;
  const int64_t n = task / (ROW_BLOCKS * CGROUPS);
  const int64_t oh0 = rb * R, oh1 = oh0 + R < OH ? oh0 + R : OH;
  const float* in_n = lhs + n * LS_N;
  for (int64_t bi = 0; bi < BLK_PER_TASK; ++bi) {
    const int64_t b = g * BLK_PER_TASK + bi;
    const int64_t k0 = b * CB;
    const int64_t kvalid = K - k0 < CB ? K - k0 : CB;
    const float* wp = wpk + b * KH * KW * CB;
    float* out_nk = out + n * OS_N + k0 * OS_K;
    if (PACK) {
      float* dst = slot + bi * ROWS_IN * WP * CB;
      pack_rows(in_n, dst, b, oh0 * SH - PT, (oh1 - oh0 - 1) * SH + (KH - 1) * DH + 1);
      for (int64_t oh = oh0; oh < oh1; ++oh)
        row_tiles<WP * CB, CB>(dst + (oh - oh0) * SH * WP * CB, wp, out_nk + oh * OS_H, k0,
                               kvalid, 0, OW, 0, KH, nullptr, e);
    } else {
      const float* in_nk = in_n + k0;  // LS_C == 1
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        float* op = out_nk + oh * OS_H;
        // kernel rows inside the input: top/bottom border rows still take the tiled path
        const int64_t top = PT - oh * SH, bottom = H - 1 + PT - oh * SH;  // ih = 0, H-1
        const int64_t kh0 = top > 0 ? (top + DH - 1) / DH : 0;
        const int64_t kh1 = bottom < 0 ? 0 : (bottom / DH + 1 < KH ? bottom / DH + 1 : KH);
        for (int64_t ow = 0; ow < OW_LO; ++ow)
          pixel_checked(in_nk, wp, op + ow * OS_W, oh, ow, k0, e);
        // ip0 is the (virtual) input of column 0's top-left tap; only columns >= OW_LO are read
        const float* ip0 = in_nk + (oh * SH - PT) * LS_H - PL * LS_W;
        vf pad[V];
        const bool skips = kh0 > 0 || kh1 < KH;
        if (skips) skipped_rows(wp, kh0, kh1, pad);
        row_tiles<LS_H, LS_W>(ip0, wp, op, k0, kvalid, OW_LO, OW_HI, kh0, kh1,
                              skips ? pad : nullptr, e);
        for (int64_t ow = OW_HI; ow < OW; ++ow)
          pixel_checked(in_nk, wp, op + ow * OS_W, oh, ow, k0, e);
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
  float* ws = WS_FLOATS > 0 ? static_cast<float*>(outputs[1]) : nullptr;
  const Epi epi{HAS_SCALE ? static_cast<const float*>(inputs[IN_SCALE]) : nullptr,
                HAS_SHIFT ? static_cast<const float*>(inputs[IN_SHIFT]) : nullptr,
                HAS_RESIDUAL ? static_cast<const float*>(inputs[IN_RESIDUAL]) : nullptr, out};
  const float* wpk = rhs;
  if constexpr (!PREPACKED) {
    pack_weights(rhs, ws);
    wpk = ws;
  }
  float* slots = PACK ? ws + WS_WPACK : nullptr;
  // A chunk [b, e) of tasks reuses the slot of its first task, so it stays hot in cache.
  alt_parallel_for(rt, TASKS, 1, [&](int64_t b, int64_t e) {
    float* slot = PACK ? slots + b * SLOT : nullptr;
    for (int64_t task = b; task < e; ++task) run_task(lhs, wpk, out, slot, task, epi);
  });
  return 0;
}
