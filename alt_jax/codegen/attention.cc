// Fused attention out = f(Q K^T) V (fp32), rendered by ops/attention.py from an
// alt_jax/attention.py match. Entry point: the exported kernel @SYMBOL@.
//
// A task is TQ query rows of one batch item (every batch role, e.g. batch x head): with
// PACK_K it packs K^T [D][SKP] of its batch item into its worker's slot (kept while the
// worker's next task has the same item; the scores then run vectors along the keys),
// without it (few query rows: a decode step) each score is a dot product along d read from
// K in place; V is read in place when its rows are contiguous whole vectors, else packed
// [SK][DVP] likewise. It computes the scores S = Q K^T of its rows into a
// TQ x SKP block that stays in L1/L2, runs the row program f on each row, equation by
// equation as the jaxpr has them (so a softmax is max, subtract, exp, sum, divide, exactly
// XLA's steps, with its masks and scales), and multiplies the rows of P by V into the
// output. The row program is a table (CODE) unrolled at compile time: each instruction is
// specialised to its operands' kinds (a row of SK floats, or one float per row).
// Inputs: Q, K, V, then the externals (masks, biases, scalars) read through strides.
#include <stdint.h>
#include <string.h>

#include <utility>

#include "alt_jax/epilogue.h"
#include "alt_jax/kernel_abi.h"
#include "alt_jax/simd.h"

namespace {

constexpr int W = @W@;
typedef altv<W>::type V;
constexpr int NB = @NB@;                         // batch roles (at least one, maybe size 1)
constexpr int64_t BATCH[] = @BATCH@;             // their sizes
constexpr int64_t SQ = @SQ@, SK = @SK@, D = @D@, DV = @DV@;
// element strides: NB batch strides, then the row role, then the inner role
constexpr int64_t Q_ST[] = @Q_STRIDES@;          // (batch..., q, d)
constexpr int64_t K_ST[] = @K_STRIDES@;          // (batch..., k, d)
constexpr int64_t V_ST[] = @V_STRIDES@;          // (batch..., k, dv)
constexpr int64_t O_ST[] = @OUT_STRIDES@;        // (batch..., q, dv)
constexpr int64_t OFFSETS[] = @OFFSETS@;         // where Q, K, V start in their buffers
constexpr int NEXT = @NEXT@;                     // externals
constexpr int64_t EXT_ST[] = @EXT_STRIDES@;      // NEXT x (batch..., q, k)
constexpr int EXT_PRED[] = @EXT_PRED@;           // 1: a bool array (one byte per element)
constexpr int NSLOT = @NSLOT@;
constexpr int SLOT_FULL[] = @SLOT_FULL@;         // 1: a row of SK floats; 0: one per row
constexpr int NCONST = @NCONST@;
constexpr int32_t CONSTS[] = @CONSTS@;           // (slot, float bits) pairs
constexpr int NINSTR = @NINSTR@;
constexpr int CODE[] = @CODE@;                   // (op, dst, a, b, c) per instruction
constexpr int RESULT = @RESULT@;                 // the slot holding P
constexpr int TQ = @TQ@;                         // query rows per task
constexpr bool SERIAL = @SERIAL@;
constexpr bool PACK_K = @PACK_K@;                // K^T packed (else dots along d, in place)


constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
constexpr int64_t SKP = round_up(SK, W);         // a row of keys, padded to whole vectors
constexpr int64_t DVP = round_up(DV, W);
constexpr int64_t prod_batch() {
  int64_t n = 1;
  for (int i = 0; i < NB; ++i) n *= BATCH[i];
  return n;
}
constexpr int64_t NBATCH = prod_batch();
constexpr int64_t NQB = (SQ + TQ - 1) / TQ;
constexpr int64_t NTASKS = NBATCH * NQB;
// V read in place: its rows contiguous along dv in whole vectors (no padding needed)
constexpr bool PACK_V = !(V_ST[NB + 1] == 1 && DV % W == 0);
constexpr int64_t VROW = PACK_V ? ((DV + W - 1) / W * W) : V_ST[NB];  // between V rows
static_assert(PACK_K || (K_ST[NB + 1] == 1 && D % W == 0 && Q_ST[NB + 1] == 1),
              "scores without packing read Q and K contiguous along d in whole vectors");
// One worker's slot: K^T, V, the score block, and the row program's slots.
constexpr int64_t KT_FLOATS = PACK_K ? D * SKP : 0, VP_FLOATS = PACK_V ? SK * DVP : 0;
constexpr int64_t S_FLOATS = TQ * SKP;
constexpr int64_t SLOT_FLOATS = KT_FLOATS + VP_FLOATS + S_FLOATS + NSLOT * SKP;
constexpr int64_t SLOTS = SERIAL ? 1 : (NTASKS < 16 ? NTASKS : 16);
static_assert(SLOTS * SLOT_FLOATS * 4 == @WORKSPACE_BYTES@,
              "workspace size agrees with ops/attention.py");
static_assert(NSLOT >= 1 && RESULT < NSLOT && SLOT_FULL[RESULT] == 1, "P is a row");

// The row program executor (Ext, Row, step<I>, run_program): shared with the row-wise
// kernel; it reads the constants above (W, NB, SK, SKP, NEXT, EXT_ST, EXT_PRED, NSLOT,
// SLOT_FULL, CODE).
#include "alt_jax/row_program.h"


// ---- the two products ----
template <int R, int NV>
ALT_INLINE void score_tile(const float* q, const float* kt, float* s, int64_t j) {
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = vzero<W>();
  for (int64_t d = 0; d < D; ++d) {
    V kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = vload<W>(kt + d * SKP + j + c * W);
    for (int i = 0; i < R; ++i) {
      V qv = vbroadcast<W>(q[i * Q_ST[NB] + d * Q_ST[NB + 1]]);
      for (int c = 0; c < NV; ++c) acc[i][c] = vfma<W>(qv, kv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) vstore<W>(s + i * SKP + j + c * W, acc[i][c]);
}

template <int R>
ALT_INLINE void score_rows(const float* q, const float* kt, float* s) {
  int64_t j = 0;
  for (; j + 2 * W <= SKP; j += 2 * W) score_tile<R, 2>(q, kt, s, j);
  if (j < SKP) score_tile<R, 1>(q, kt, s, j);
}

// Without PACK_K: score (i, j) = sum over d of q[i][d] k[j][d], vectors along d, K read in
// place (one pass over K per row block; a decode step has one row).
template <int R>
ALT_INLINE void score_rows_dot(const float* q, const float* k, float* s) {
  for (int64_t j = 0; j < SK; ++j) {
    const float* kj = k + j * K_ST[NB];
    V acc[R];
    for (int i = 0; i < R; ++i) acc[i] = vzero<W>();
    for (int64_t d = 0; d < D; d += W) {
      V kv = vload<W>(kj + d);
      for (int i = 0; i < R; ++i) acc[i] = vfma<W>(vload<W>(q + i * Q_ST[NB] + d), kv, acc[i]);
    }
    for (int i = 0; i < R; ++i) {
      float lanes[W];
      memcpy(lanes, &acc[i], sizeof(lanes));
      float sum = 0.0f;
      for (int l = 0; l < W; ++l) sum += lanes[l];
      s[i * SKP + j] = sum;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int64_t j = SK; j < SKP; ++j) s[i * SKP + j] = 0.0f;
}

template <int R, int NV>
ALT_INLINE void pv_tile(const float* p, const float* vp, float* out, int64_t c0) {
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = vzero<W>();
  for (int64_t j = 0; j < SK; ++j) {
    V vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = vload<W>(vp + j * VROW + c0 + c * W);
    for (int i = 0; i < R; ++i) {
      V pv = vbroadcast<W>(p[i * SKP + j]);
      for (int c = 0; c < NV; ++c) acc[i][c] = vfma<W>(pv, vv[c], acc[i][c]);
    }
  }
  constexpr int64_t OQ = O_ST[NB], OD = O_ST[NB + 1];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) {
      const int64_t col = c0 + c * W;
      if (OD == 1 && col + W <= DV) {
        vstore<W>(out + i * OQ + col, acc[i][c]);
      } else {
        float lanes[W];
        memcpy(lanes, &acc[i][c], sizeof(lanes));
        for (int l = 0; l < W && col + l < DV; ++l) out[i * OQ + (col + l) * OD] = lanes[l];
      }
    }
}

template <int R>
ALT_INLINE void pv_rows(const float* p, const float* vp, float* out) {
  int64_t c = 0;
  for (; c + 2 * W <= DVP; c += 2 * W) pv_tile<R, 2>(p, vp, out, c);
  if (c < DVP) pv_tile<R, 1>(p, vp, out, c);
}

// rows per register tile of both products: 8 x 2 vectors on 16-lane ISAs (32 registers)
constexpr int RB = W >= 16 ? 8 : 4;

template <typename F4, typename F1>
ALT_INLINE void by_rows(int64_t nr, F4&& four, F1&& one) {
  int64_t i = 0;
  for (; i + RB <= nr; i += RB) four(i);
  for (; i < nr; ++i) one(i);
}

struct Buffers {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  Ext ext;
  float* ws;
};

// The offset of batch item bi in an operand with batch strides st[0..NB).
ALT_INLINE int64_t batch_offset(int64_t bi, const int64_t* st) {
  int64_t off = 0;
  for (int i = NB - 1; i >= 0; --i) {
    off += (bi % BATCH[i]) * st[i];
    bi /= BATCH[i];
  }
  return off;
}

void pack(const Buffers& x, int64_t bi, float* kt, float* vp) {
  const float* k = x.k + batch_offset(bi, K_ST);
  const float* v = x.v + batch_offset(bi, V_ST);
  if constexpr (PACK_K) {
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = 0; j < SK; ++j) kt[d * SKP + j] = k[j * K_ST[NB] + d * K_ST[NB + 1]];
      for (int64_t j = SK; j < SKP; ++j) kt[d * SKP + j] = 0.0f;
    }
  }
  if constexpr (PACK_V) {
    for (int64_t j = 0; j < SK; ++j) {
      for (int64_t c = 0; c < DV; ++c) vp[j * DVP + c] = v[j * V_ST[NB] + c * V_ST[NB + 1]];
      for (int64_t c = DV; c < DVP; ++c) vp[j * DVP + c] = 0.0f;
    }
  }
}

void run_task(const Buffers& x, int64_t t, float* slot, int64_t* packed) {
  float* kt = slot;
  float* vp = kt + KT_FLOATS;
  float* s = vp + VP_FLOATS;
  float* rows = s + S_FLOATS;
  const int64_t bi = t / NQB, r0 = (t % NQB) * TQ;
  const int64_t nr = SQ - r0 < TQ ? SQ - r0 : TQ;
  if ((PACK_K || PACK_V) && *packed != bi) {
    pack(x, bi, kt, vp);
    *packed = bi;
  }
  const float* k_in = x.k + batch_offset(bi, K_ST);
  const float* v_rows = PACK_V ? vp : x.v + batch_offset(bi, V_ST);  // rows VROW apart
  const float* q = x.q + batch_offset(bi, Q_ST) + r0 * Q_ST[NB];
  if constexpr (PACK_K) {
    by_rows(nr, [&](int64_t i) { score_rows<RB>(q + i * Q_ST[NB], kt, s + i * SKP); },
            [&](int64_t i) { score_rows<1>(q + i * Q_ST[NB], kt, s + i * SKP); });
  } else {
    by_rows(nr, [&](int64_t i) { score_rows_dot<RB>(q + i * Q_ST[NB], k_in, s + i * SKP); },
            [&](int64_t i) { score_rows_dot<1>(q + i * Q_ST[NB], k_in, s + i * SKP); });
  }
  Row row;
  row.ext = &x.ext;
  for (int i = 0; i < NSLOT; ++i) row.slot[i] = rows + i * SKP;
  for (int c = 0; c < NCONST; ++c) memcpy(row.slot[CONSTS[2 * c]], &CONSTS[2 * c + 1], 4);
  int64_t ext_base[NEXT > 0 ? NEXT : 1];
  for (int e = 0; e < NEXT; ++e) ext_base[e] = batch_offset(bi, EXT_ST + e * (NB + 2));
  for (int64_t i = 0; i < nr; ++i) {
    float* srow = s + i * SKP;
    row.slot[0] = srow;
    row.first = i == 0;
    for (int e = 0; e < NEXT; ++e) row.ext_off[e] = ext_base[e] + (r0 + i) * EXT_ST[e * (NB + 2) + NB];
    run_program(row);
    if (RESULT != 0) memcpy(srow, row.slot[RESULT], SK * sizeof(float));
  }
  float* out = x.out + batch_offset(bi, O_ST) + r0 * O_ST[NB];
  by_rows(nr, [&](int64_t i) { pv_rows<RB>(s + i * SKP, v_rows, out + i * O_ST[NB]); },
          [&](int64_t i) { pv_rows<1>(s + i * SKP, v_rows, out + i * O_ST[NB]); });
}

}  // namespace

ALT_EXPORT int32_t @SYMBOL@(  // the one exported symbol (kernel_abi.h)
    const alt_runtime* runtime, const void* const* inputs, void* const* outputs) {
  const alt_runtime* rt = SERIAL ? nullptr : runtime;
  // Q, K and V may be views of one buffer (a split QKV projection): read at an offset
  Buffers x{static_cast<const float*>(inputs[0]) + OFFSETS[0],
            static_cast<const float*>(inputs[1]) + OFFSETS[1],
            static_cast<const float*>(inputs[2]) + OFFSETS[2], static_cast<float*>(outputs[0]), {},
            static_cast<float*>(outputs[1])};
  for (int e = 0; e < NEXT; ++e) x.ext.ptr[e] = inputs[3 + e];
  // one worker per thread, each owning a slot, pulling tasks in order, so that a worker's
  // next task is mostly of the batch item it has packed
  int64_t packed[SLOTS];  // per worker: the batch item its slot holds packed (-1: none)
  for (int64_t w = 0; w < SLOTS; ++w) packed[w] = -1;
  alt_for_tasks(rt, SLOTS, NTASKS, [&](int64_t w, int64_t t) {
    run_task(x, t, x.ws + w * SLOT_FLOATS, &packed[w]);
  });
  return 0;
}
