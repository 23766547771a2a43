// A row-wise region (a layer norm, an RMS norm, a softmax standing alone) in one pass over
// its input, rendered by ops/rownorm.py from an alt_jax/rownorm.py match. Entry point: the
// exported kernel @SYMBOL@.
//
// Each row of X (every index of the row roles: the input's axes other than the row axis)
// is copied into slot 0, the row program runs on it equation by equation as the jaxpr has
// them (row_program.h: reductions over the row, per-row scalars, gamma / beta / eps read
// through strides), and the result slot is written to the output row. A task is ROWS
// consecutive rows on one worker, whose slots live in the workspace.
// Inputs: X, then the externals. Output: Y, then the workspace.
#include <stdint.h>
#include <string.h>

#include <utility>

#include "alt_jax/epilogue.h"
#include "alt_jax/kernel_abi.h"
#include "alt_jax/simd.h"

namespace {

constexpr int W = @W@;
typedef altv<W>::type V;
constexpr int NB = @NB@;                         // row roles (at least one, maybe size 1)
constexpr int64_t BATCH[] = @BATCH@;             // their sizes
constexpr int64_t SK = @N@;                      // floats in a row
// element strides (row roles..., an absent role, the row axis): the executor's layout
constexpr int64_t X_ST[] = @X_STRIDES@;
constexpr int64_t O_ST[] = @OUT_STRIDES@;
constexpr int NEXT = @NEXT@;                     // externals
constexpr int64_t EXT_ST[] = @EXT_STRIDES@;      // NEXT x (row roles..., absent, row)
constexpr int EXT_PRED[] = @EXT_PRED@;           // 1: a bool array (one byte per element)
constexpr int NSLOT = @NSLOT@;
constexpr int SLOT_FULL[] = @SLOT_FULL@;         // 1: a row of SK floats; 0: one per row
constexpr int NCONST = @NCONST@;
constexpr int32_t CONSTS[] = @CONSTS@;           // (slot, float bits) pairs
constexpr int NINSTR = @NINSTR@;
constexpr int CODE[] = @CODE@;                   // (op, dst, a, b, c) per instruction
constexpr int RESULT = @RESULT@;                 // the slot holding Y's row
constexpr int64_t ROWS = @ROWS@;                 // rows per task
constexpr bool SERIAL = @SERIAL@;

constexpr int64_t SKP = (SK + W - 1) / W * W;    // a row, padded to whole vectors
constexpr int64_t prod_batch() {
  int64_t n = 1;
  for (int i = 0; i < NB; ++i) n *= BATCH[i];
  return n;
}
constexpr int64_t NROWS = prod_batch();
constexpr int64_t NTASKS = (NROWS + ROWS - 1) / ROWS;
constexpr int64_t SLOT_FLOATS = NSLOT * SKP;
constexpr int64_t SLOTS = SERIAL ? 1 : (NTASKS < 16 ? NTASKS : 16);
static_assert(SLOTS * SLOT_FLOATS * 4 == @WORKSPACE_BYTES@,
              "workspace size agrees with ops/rownorm.py");
static_assert(NSLOT >= 1 && RESULT < NSLOT && SLOT_FULL[RESULT] == 1 && SLOT_FULL[0] == 1,
              "X and Y are rows");

#include "alt_jax/row_program.h"

// The offset of row index bi in an operand with row-role strides st[0..NB).
ALT_INLINE int64_t row_offset(int64_t bi, const int64_t* st) {
  int64_t off = 0;
  for (int i = NB - 1; i >= 0; --i) {
    off += (bi % BATCH[i]) * st[i];
    bi /= BATCH[i];
  }
  return off;
}

// A row read and written in place when it is contiguous in whole vectors (no lanes past
// it): slot 0 is X's row and the result slot Y's; otherwise copied through the slots.
constexpr int64_t XK = X_ST[NB + 1], OK = O_ST[NB + 1];
constexpr bool X_IN_PLACE = XK == 1 && SK % W == 0;
constexpr bool Y_IN_PLACE = OK == 1 && SK % W == 0;

struct Buffers {
  const float* x;
  float* y;
  Ext ext;
  float* ws;
};

void run_task(const Buffers& b, int64_t t, float* slots) {
  Row row;
  row.ext = &b.ext;
  for (int i = 0; i < NSLOT; ++i) row.slot[i] = slots + i * SKP;
  for (int c = 0; c < NCONST; ++c) memcpy(row.slot[CONSTS[2 * c]], &CONSTS[2 * c + 1], 4);
  float* const x_slot = row.slot[0];
  float* const y_slot = row.slot[RESULT];
  // lanes past the row compute on zeros (no reduction reads them)
  for (int64_t j = SK; j < SKP; ++j) x_slot[j] = 0.0f;
  const int64_t r1 = (t + 1) * ROWS < NROWS ? (t + 1) * ROWS : NROWS;
  for (int64_t r = t * ROWS; r < r1; ++r) {
    const float* x = b.x + row_offset(r, X_ST);
    float* y = b.y + row_offset(r, O_ST);
    if constexpr (X_IN_PLACE) {
      row.slot[0] = const_cast<float*>(x);  // read only: slot 0 is never written
    } else {
      for (int64_t j = 0; j < SK; ++j) x_slot[j] = x[j * XK];
    }
    if constexpr (Y_IN_PLACE) row.slot[RESULT] = y;
    for (int e = 0; e < NEXT; ++e) row.ext_off[e] = row_offset(r, EXT_ST + e * (NB + 2));
    row.first = r == t * ROWS;
    run_program(row);
    if constexpr (!Y_IN_PLACE) {
      for (int64_t j = 0; j < SK; ++j) y[j * OK] = y_slot[j];
    }
  }
}

}  // namespace

ALT_EXPORT int32_t @SYMBOL@(  // the one exported symbol (kernel_abi.h)
    const alt_runtime* runtime, const void* const* inputs, void* const* outputs) {
  const alt_runtime* rt = SERIAL ? nullptr : runtime;
  Buffers b{static_cast<const float*>(inputs[0]), static_cast<float*>(outputs[0]), {},
            static_cast<float*>(outputs[1])};
  for (int e = 0; e < NEXT; ++e) b.ext.ptr[e] = inputs[1 + e];
  // one worker per thread, each owning a slot set, pulling tasks
  alt_for_tasks(rt, SLOTS, NTASKS,
                [&](int64_t w, int64_t t) { run_task(b, t, b.ws + w * SLOT_FLOATS); });
  return 0;
}
