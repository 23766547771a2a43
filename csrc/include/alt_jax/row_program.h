// The row-program executor: a region of a jaxpr compiled to instructions over slots
// (alt_jax/row_program.py) and run on one row at a time, each instruction specialised at
// compile time to its operands' kinds (a row of SK floats, or one float per row).
// Entry points: Ext, Row, run_program(row).
//
// Not a stand-alone header: a kernel template includes it inside its own anonymous
// namespace, after <string.h>, <utility>, alt_jax/epilogue.h and alt_jax/simd.h, and after
// defining the program's constants: W, V (altv<W>::type), NB (batch roles), SK (floats in
// a row) and SKP (SK rounded up to whole vectors), NEXT, EXT_ST[] (NEXT x (batch..., q,
// k) element strides), EXT_PRED[], NSLOT, SLOT_FULL[], NINSTR, CODE[] ((op, dst, a, b, c)
// per instruction) and RESULT (the slot the kernel reads after the program).
#ifndef ALT_JAX_ROW_PROGRAM_H_
#define ALT_JAX_ROW_PROGRAM_H_

// opcodes: alt_jax/row_program.py OP_* (same order)
enum { OP_LOAD, OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_MAX, OP_MIN, OP_EXP, OP_NEG, OP_COPY,
       OP_SELECT, OP_RMAX, OP_RSUM, OP_RSQRT, OP_SQRT, OP_ABS };

struct Ext {
  const void* ptr[NEXT > 0 ? NEXT : 1];
};

// e^x with XLA's edges: +inf above 88.7, gradual underflow to denormals and 0 below
// ln FLT_MIN (alt_vexp clamps there to FLT_MIN, which an activation absorbs but a softmax
// of a masked row must not: e^-inf is 0), NaN stays NaN. Below the clamp, e^x = (e^(x/2))^2.
ALT_INLINE V exp_row(V x) {
  V big = alt_vexp<W>(x);
  V half = alt_vexp<W>(x * 0.5f);
  return x < vbroadcast<W>(ALT_EXP_LO) ? half * half : big;
}
ALT_INLINE float exp_one(float x) { return expf(x); }

// ---- the row program, unrolled: instruction I specialised to its operands' kinds ----
struct Row {
  float* slot[NSLOT];
  const Ext* ext;
  int64_t ext_off[NEXT > 0 ? NEXT : 1];  // batch item + row offset of each external
  // the first row since the slots were last filled: a row of an external that is the same
  // for every row (a bias or gamma over the keys) is loaded then and kept (slots are
  // written by one instruction each, so nothing overwrites it)
  bool first;
};

// External E has the same values on every row (zero batch and row strides).
template <int E>
constexpr bool ext_row_invariant() {
  for (int i = 0; i < NB + 1; ++i)
    if (EXT_ST[E * (NB + 2) + i] != 0) return false;
  return true;
}

template <int S>
ALT_INLINE V operand(const Row& r, int64_t j) {
  if constexpr (SLOT_FULL[S]) {
    return vload<W>(r.slot[S] + j);
  } else {
    return vbroadcast<W>(r.slot[S][0]);
  }
}

// a binary step on VW lanes: a vector of a row (VW = W) or one float per row (VW = 1)
template <int OP, int VW>
ALT_INLINE typename altv<VW>::type binary(typename altv<VW>::type a, typename altv<VW>::type b) {
  if constexpr (OP == OP_ADD) return a + b;
  if constexpr (OP == OP_SUB) return a - b;
  if constexpr (OP == OP_MUL) return a * b;
  if constexpr (OP == OP_DIV) return a / b;
  if constexpr (OP == OP_MAX) return alt_vmax<VW>(a, b);
  if constexpr (OP == OP_MIN) return alt_vmin<VW>(a, b);
}

template <int E>
ALT_INLINE float ext_at(const Row& r, int64_t j) {
  constexpr int64_t KS = EXT_ST[E * (NB + 2) + NB + 1];
  const int64_t at = r.ext_off[E] + j * KS;
  if constexpr (EXT_PRED[E]) {
    return static_cast<const uint8_t*>(r.ext->ptr[E])[at] ? 1.0f : 0.0f;
  } else {
    return static_cast<const float*>(r.ext->ptr[E])[at];
  }
}

// ---- scheduling: which instructions run as one loop over the row ----
// A run is a sequence of instructions that each write a row elementwise ("chunked": all but
// loads of externals, reductions and the per-row scalar steps), then the reductions right
// after them: one loop over the row's vectors, each value passed on in a register (stored
// only when something after the run reads it) and each reduction accumulated as the loop
// goes. The rest (loads, per-row steps) runs alone. alt_jax/row_program.py orders the
// program so that per-row steps come as early as they can, which makes runs long.
constexpr int op_of(int i) { return CODE[5 * i]; }
constexpr int dst_of(int i) { return CODE[5 * i + 1]; }
constexpr bool reduction(int i) { return op_of(i) == OP_RMAX || op_of(i) == OP_RSUM; }
constexpr bool chunked(int i) {
  return SLOT_FULL[dst_of(i)] && op_of(i) != OP_LOAD && !reduction(i);
}
// Whether instruction k reads slot s.
constexpr bool reads(int k, int s) {
  const int op = op_of(k), a = CODE[5 * k + 2], b = CODE[5 * k + 3], c = CODE[5 * k + 4];
  if (op == OP_LOAD) return false;
  if (op >= OP_ADD && op <= OP_MIN) return a == s || b == s;
  if (op == OP_SELECT) return a == s || b == s || c == s;
  return a == s;  // unary steps and reductions
}
// The end of the run starting at i (i + 1 for an instruction that runs alone).
constexpr int run_end(int i) {
  if (!chunked(i) && !reduction(i)) return i + 1;
  int e = i;
  while (e < NINSTR && chunked(e)) ++e;
  while (e < NINSTR && reduction(e)) ++e;
  return e;
}
// Whether slot s was written by an instruction in [i0, i) (it is in a register there).
constexpr bool in_register(int s, int i0, int i) {
  for (int k = i0; k < i; ++k)
    if (dst_of(k) == s) return true;
  return false;
}
// Whether instruction i's row must reach memory: the kernel reads it (the result), or an
// instruction after its run does.
constexpr bool stored(int i, int end) {
  if (dst_of(i) == RESULT) return true;
  for (int k = end; k < NINSTR; ++k)
    if (reads(k, dst_of(i))) return true;
  return false;
}

// Instruction I alone: a load of an external, or a step on one float per row.
template <int I>
ALT_INLINE void step(const Row& r) {
  constexpr int OP = CODE[5 * I], DST = CODE[5 * I + 1];
  constexpr int A = CODE[5 * I + 2], B = CODE[5 * I + 3], C = CODE[5 * I + 4];
  float* dst = r.slot[DST];
  if constexpr (OP == OP_LOAD) {
    if constexpr (SLOT_FULL[DST]) {
      if constexpr (ext_row_invariant<A>()) {
        if (!r.first) return;
      }
      if constexpr (!EXT_PRED[A] && EXT_ST[A * (NB + 2) + NB + 1] == 1) {
        memcpy(dst, static_cast<const float*>(r.ext->ptr[A]) + r.ext_off[A], SK * sizeof(float));
      } else {
        for (int64_t j = 0; j < SK; ++j) dst[j] = ext_at<A>(r, j);
      }
      for (int64_t j = SK; j < SKP; ++j) dst[j] = 0.0f;
    } else {
      dst[0] = ext_at<A>(r, 0);
    }
  } else {
    static_assert(!SLOT_FULL[DST] && !reduction(I), "rows are written in runs (vstep)");
    const float a = r.slot[A][0];
    if constexpr (OP >= OP_ADD && OP <= OP_MIN) {
      dst[0] = binary<OP, 1>(a, r.slot[B][0]);
    } else if constexpr (OP == OP_EXP || OP == OP_NEG || OP == OP_COPY) {
      dst[0] = OP == OP_EXP ? exp_one(a) : OP == OP_NEG ? -a : a;
    } else if constexpr (OP == OP_ABS) {
      dst[0] = fabsf(a);  // the sign bit cleared: abs(-0) = 0, NaN stays NaN, as XLA
    } else if constexpr (OP == OP_RSQRT || OP == OP_SQRT) {
      // correctly rounded sqrt (and one rounding more for 1 / sqrt): what XLA's rsqrt /
      // sqrt give to an ulp, with their edges (rsqrt 0 = inf, rsqrt -1 = NaN, rsqrt inf = 0)
      dst[0] = OP == OP_SQRT ? sqrtf(a) : 1.0f / sqrtf(a);
    } else {
      static_assert(OP == OP_SELECT, "unknown opcode");  // select_n(pred A, B, C)
      dst[0] = a != 0.0f ? r.slot[C][0] : r.slot[B][0];
    }
  }
}

// Operand slot S of instruction I in the run starting at I0, at vector j: from the
// register the run computed it into, else from its slot (a row, or a float per row).
template <int I0, int I, int S>
ALT_INLINE V vin(const Row& r, int64_t j, const V* reg) {
  if constexpr (in_register(S, I0, I)) {
    return reg[S];
  } else {
    return operand<S>(r, j);
  }
}

template <int OP>
constexpr float identity() {
  return OP == OP_RMAX ? -__builtin_inff() : 0.0f;
}

// Row-writing instruction I of the run [I0, E) on vector j of the row.
template <int I0, int E, int I>
ALT_INLINE void vstep_row(const Row& r, int64_t j, V* reg) {
  constexpr int OP = CODE[5 * I], DST = CODE[5 * I + 1];
  constexpr int A = CODE[5 * I + 2], B = CODE[5 * I + 3], C = CODE[5 * I + 4];
  V x;
  if constexpr (OP >= OP_ADD && OP <= OP_MIN) {
    x = binary<OP, W>(vin<I0, I, A>(r, j, reg), vin<I0, I, B>(r, j, reg));
  } else if constexpr (OP == OP_EXP || OP == OP_NEG || OP == OP_COPY) {
    const V a = vin<I0, I, A>(r, j, reg);
    x = OP == OP_EXP ? exp_row(a) : OP == OP_NEG ? -a : a;
  } else if constexpr (OP == OP_ABS) {
    typedef typename alt_vi<W>::type I32;
    const V a = vin<I0, I, A>(r, j, reg);
    I32 bits;
    memcpy(&bits, &a, sizeof(bits));
    bits &= 0x7fffffff;  // the sign bit cleared
    memcpy(&x, &bits, sizeof(bits));
  } else if constexpr (OP == OP_RSQRT || OP == OP_SQRT) {
    float lanes[W];
    const V a = vin<I0, I, A>(r, j, reg);
    memcpy(lanes, &a, sizeof(lanes));
    for (int l = 0; l < W; ++l) lanes[l] = OP == OP_SQRT ? sqrtf(lanes[l]) : 1.0f / sqrtf(lanes[l]);
    memcpy(&x, lanes, sizeof(lanes));
  } else {
    static_assert(OP == OP_SELECT, "a row-writing step of an unknown opcode");
    const V p = vin<I0, I, A>(r, j, reg);
    x = p != vzero<W>() ? vin<I0, I, C>(r, j, reg) : vin<I0, I, B>(r, j, reg);
  }
  reg[DST] = x;
  if constexpr (stored(I, E)) vstore<W>(r.slot[DST] + j, x);
}

// Instruction I of the run [I0, E) on vector j of the row. acc: the reductions' running
// values (by destination slot). TAIL: j is the last, partial vector (lanes from SK - j on
// lie past the row and are left out of reductions).
template <int I0, int E, int I, bool TAIL>
ALT_INLINE void vstep(const Row& r, int64_t j, V* reg, V* acc) {
  constexpr int OP = CODE[5 * I], DST = CODE[5 * I + 1], A = CODE[5 * I + 2];
  if constexpr (OP == OP_RMAX || OP == OP_RSUM) {
    V x = vin<I0, I, A>(r, j, reg);
    if constexpr (TAIL) {
      float lanes[W];
      memcpy(lanes, &x, sizeof(lanes));
      for (int l = int(SK - j); l < W; ++l) lanes[l] = identity<OP>();
      memcpy(&x, lanes, sizeof(lanes));
    }
    acc[DST] = OP == OP_RMAX ? alt_vmax<W>(x, acc[DST]) : acc[DST] + x;
  } else {
    vstep_row<I0, E, I>(r, j, reg);
  }
}

// Each reduction of the run: its chains combined, then its lanes, into its slot.
template <int I>
ALT_INLINE void finish_reduction(const Row& r, V (*acc)[NSLOT]) {
  if constexpr (reduction(I)) {
    constexpr int OP = op_of(I), DST = dst_of(I);
    V v = acc[0][DST];
    for (int c = 1; c < 4; ++c)
      v = OP == OP_RMAX ? alt_vmax<W>(acc[c][DST], v) : v + acc[c][DST];
    float lanes[W];
    memcpy(lanes, &v, sizeof(lanes));
    float out = identity<OP>();
    for (int l = 0; l < W; ++l) out = OP == OP_RMAX ? alt_vmax<1>(lanes[l], out) : out + lanes[l];
    r.slot[DST][0] = out;
  }
}

template <int I0, int E, int... K>
ALT_INLINE void run_vectors(const Row& r, std::integer_sequence<int, K...>) {
  // four chains per reduction (vectors j, j + W, ... of a step of 4W go to chains 0..3):
  // one add's latency is about four vectors' worth of issue
  V acc[4][NSLOT];
  for (int c = 0; c < 4; ++c)
    ((reduction(I0 + K) ? (void)(acc[c][dst_of(I0 + K)] =
                                     vbroadcast<W>(op_of(I0 + K) == OP_RMAX
                                                       ? -__builtin_inff() : 0.0f))
                        : (void)0), ...);
  constexpr int64_t SKV = SK / W * W;  // whole vectors of the row
  int64_t j = 0;
  for (; j + 4 * W <= SKV; j += 4 * W) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      V reg[NSLOT];
      (vstep<I0, E, I0 + K, false>(r, j + c * W, reg, acc[c]), ...);
    }
  }
  for (; j < SKV; j += W) {
    V reg[NSLOT];
    (vstep<I0, E, I0 + K, false>(r, j, reg, acc[0]), ...);
  }
  if constexpr (SKV < SKP) {
    V reg[NSLOT];
    (vstep<I0, E, I0 + K, true>(r, SKV, reg, acc[0]), ...);
  }
  (finish_reduction<I0 + K>(r, acc), ...);
}

// The program from instruction I on: runs as loops over the row, the rest one by one.
template <int I>
ALT_INLINE void run_from(const Row& r) {
  if constexpr (I < NINSTR) {
    constexpr int E = run_end(I);
    if constexpr (chunked(I) || reduction(I)) {
      run_vectors<I, E>(r, std::make_integer_sequence<int, E - I>{});
    } else {
      step<I>(r);
    }
    run_from<E>(r);
  }
}

ALT_INLINE void run_program(const Row& r) { run_from<0>(r); }

#endif  // ALT_JAX_ROW_PROGRAM_H_
