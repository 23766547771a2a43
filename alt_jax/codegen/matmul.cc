// Batched GEMM C[b] = A[b] @ B[b] (fp32), GotoBLAS/BLIS structure, rendered by ops/matmul.py.
// Entry points: the exported kernel @SYMBOL@; micro() (register tile, vectors along n) and
// dot_tile() (vectors along k, for B stored [N, K] with few rows) are the inner kernels.
//
// Shapes and operand strides are compile-time constants, so every remainder below is known
// to the compiler and only the edge kernels a shape needs are instantiated. A and B are read
// through element strides (any dimension order the jaxpr had); C is dense [BATCH, M, N].
// The fused epilogue C = act(C * scale[n] + shift[n] + residual[b, m, n]) is applied to each
// register tile on its last rank-KC update, before the store. Inputs: A, B, then scale?,
// shift?, residual? (ops/epilogue.py Epilogue.inputs()). With PREPACKED, B is the panel
// array ops/matmul.py pack_weights() built once: [BATCH][NPB][K][NR], zero-padded along N.
#include <stdint.h>
#include <string.h>

#include "alt_jax/epilogue.h"
#include "alt_jax/kernel_abi.h"
#include "alt_jax/simd.h"

namespace {

constexpr int W = @W@;  // fp32 lanes per vector on the target ISA
constexpr int64_t BATCH = @BATCH@, M = @M@, N = @N@, K = @K@;
constexpr int64_t A_SB = @A_SB@, A_SM = @A_SM@, A_SK = @A_SK@;  // element strides of A
constexpr int64_t B_SB = @B_SB@, B_SK = @B_SK@, B_SN = @B_SN@;  // element strides of B
constexpr int MR = @MR@;          // rows of the register tile
constexpr int NV = @NV@;          // vectors across the register tile
constexpr int NR = NV * W;        // columns of the register tile
constexpr int64_t KC = @KC@;      // depth of one rank-KC update (B micro-panel fits L1)
constexpr int64_t MC = @MC@;      // rows of one L2 block (and of a task unless FUSE_B)
constexpr int64_t NC = @NC@;      // columns per task
constexpr bool PACK_A = @PACK_A@; // copy A into MR-high panels [k][MR] in the workspace
constexpr bool PACK_B = @PACK_B@; // copy B into NR-wide panels [k][NR] in the workspace
constexpr bool FUSE_B = @FUSE_B@; // pack B slices inside the compute tasks, not up front
constexpr bool PAR_BATCH = @PAR_BATCH@;  // one task per batch item instead of per tile
constexpr bool SERIAL = @SERIAL@;  // every task on the calling thread (small problems)
// Dot-product tiles: vectors run along k (A and B both contiguous in k, e.g. B stored
// [N, K] with few rows of A); a tile is MR rows x NV columns of C, one horizontal sum each.
constexpr bool DOT = @DOT@;
// B arrives packed into panels (inputs[1] is [BATCH][NPB][K][NR]): nothing to pack per call.
constexpr bool PREPACKED = @PREPACKED@;
// Fused epilogue: activation code (ALT_ACT_*) and which per-column / per-element terms exist.
constexpr int ACT = @ACT@;
constexpr bool SCALE = @SCALE@, SHIFT = @SHIFT@, RESIDUAL = @RESIDUAL@;
constexpr bool HAS_EPI = SCALE || SHIFT || RESIDUAL || ACT != ALT_ACT_NONE;

static_assert(MC % MR == 0, "a task's row block must hold whole register tiles");
static_assert(NC % (DOT ? NV : NR) == 0, "a task's column block must hold whole tiles");
static_assert(PACK_B || DOT || B_SN == 1, "B read in place must be contiguous along N");
static_assert(PACK_B || !FUSE_B, "FUSE_B packs B, so it needs PACK_B");
static_assert(KC >= 1 && KC <= K, "KC is clamped to K by the renderer");
static_assert(!DOT || (A_SK == 1 && B_SK == 1 && !PACK_A && !PACK_B && KC == K),
              "dot tiles read A and B in place along contiguous k, in one pass");
static_assert(!PREPACKED || (PACK_B && !DOT), "prepacked B is read as panels");

constexpr int64_t NPA = (M + MR - 1) / MR;  // A panels (the last zero-padded)
constexpr int64_t NPB = (N + NR - 1) / NR;  // B panels
constexpr int64_t NIC = (M + MC - 1) / MC;
constexpr int64_t NJC = (N + NC - 1) / NC;
// Parallel tasks: batch items, or (batch, row block, column block); with FUSE_B a task owns
// whole column blocks (all rows), since it packs that block of B itself.
constexpr int64_t NI = FUSE_B ? 1 : NIC;
constexpr int64_t MI = FUSE_B ? M : MC;
constexpr int64_t NTASKS = PAR_BATCH ? BATCH : BATCH * NI * NJC;
constexpr int64_t TASK_COLS = PAR_BATCH ? NPB * NR : NC;
// Tasks pack their own B slice (FUSE_B keeps its task shape when B comes prepacked).
constexpr bool FUSE_PACK = FUSE_B && !PREPACKED;
// Elements between batch items of the B the kernel reads.
constexpr int64_t B_ITEM = PREPACKED ? NPB * K * NR : B_SB;

// Workspace (floats): packed A of every batch item, then either packed B of every batch
// item, or (FUSE_B) one KC x TASK_COLS slice per worker. Workers are at most SLOTS; only
// the slices the running threads use are ever touched (fresh pages cost faults per call).
constexpr int64_t AP_FLOATS = PACK_A ? NPA * MR * K : 0;           // per batch item
constexpr int64_t BP_FLOATS = PACK_B && !FUSE_B && !PREPACKED ? NPB * NR * K : 0;  // per item
constexpr int64_t SLOT_FLOATS = FUSE_PACK ? KC * TASK_COLS : 0;
constexpr int64_t SLOTS = FUSE_PACK ? (SERIAL ? 1 : NTASKS < 16 ? NTASKS : 16) : 0;
constexpr int64_t WS_FLOATS = BATCH * (AP_FLOATS + BP_FLOATS) + SLOTS * SLOT_FLOATS;
static_assert(WS_FLOATS * 4 == @WORKSPACE_BYTES@, "workspace size agrees with ops/matmul.py");
// Rows of the last register tile when A is read in place (packed A is padded instead).
constexpr int M_TAIL = (M % MR) ? int(M % MR) : MR;

// Epilogue operands of one tile: scale / shift at its first column, residual at its first
// element (same offset as the tile's C pointer). Unused members are null.
struct Epi {
  const float* scale;
  const float* shift;
  const float* res;
  ALT_INLINE Epi at(int64_t i, int64_t j) const {
    return Epi{SCALE ? scale + j : nullptr, SHIFT ? shift + j : nullptr,
               RESIDUAL ? res + i * N + j : nullptr};
  }
};

// act(x * scale + shift + residual) on VW columns (from column j of row i of the tile e
// addresses); terms absent are compiled out.
template <int VW>
ALT_INLINE typename altv<VW>::type epilogue(typename altv<VW>::type x, const Epi& e, int i,
                                            int j) {
  if constexpr (SCALE) x = x * vload<VW>(e.scale + j);
  if constexpr (SHIFT) x = x + vload<VW>(e.shift + j);
  if constexpr (RESIDUAL) x = x + vload<VW>(e.res + i * N + j);
  return alt_activate<VW, ACT>(x);
}

// Broadcast x to every lane. simd.h's vbroadcast computes {} + x, which GCC cannot fold
// (0 + -0 is +0), so it costs a vaddss per broadcast in the hot loop; x - {} is exact for
// every x and folds to a single vbroadcastss from memory.
template <int VW>
ALT_INLINE typename altv<VW>::type bcast(float x) {
  const typename altv<VW>::type zero = {};
  return x - zero;
}

// One register tile: C[R x NVV*VW] (+)= A[R x kc] * B[kc x NVV*VW]. A is addressed
// a[i*ARS + k*AKS] and broadcast from memory; B rows are b[k*BKS ...]. Only the first
// rows x cols of the tile are stored (the rest is panel padding). EPI: this is the last
// rank-KC update, so the epilogue is applied to the finished tile before the store.
template <int R, int NVV, int VW, int64_t ARS, int64_t AKS, int64_t BKS, bool EPI>
ALT_INLINE void micro(int64_t kc, const float* ALT_RESTRICT a, const float* ALT_RESTRICT b,
                      float* ALT_RESTRICT c, const Epi& e, int rows, int cols, bool accumulate) {
  typedef typename altv<VW>::type V;
  V acc[R][NVV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NVV; ++v) acc[i][v] = V{};
  // C rows are far apart (stride N): start their misses now, under the k loop.
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    __builtin_prefetch(c + i * N, 1);
    __builtin_prefetch(c + i * N + NVV * VW - 1, 1);
    if constexpr (EPI && RESIDUAL) {
      __builtin_prefetch(e.res + i * N, 0);
      __builtin_prefetch(e.res + i * N + NVV * VW - 1, 0);
    }
  }
#pragma GCC unroll @UNROLL@
  for (int64_t k = 0; k < kc; ++k) {
    V bv[NVV];
#pragma GCC unroll 16
    for (int v = 0; v < NVV; ++v) bv[v] = vload<VW>(b + k * BKS + v * VW);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const V av = bcast<VW>(a[i * ARS + k * AKS]);
#pragma GCC unroll 16
      for (int v = 0; v < NVV; ++v) acc[i][v] = vfma<VW>(av, bv[v], acc[i][v]);
    }
  }
  if (rows == R && cols == NVV * VW) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
      for (int v = 0; v < NVV; ++v) {
        float* p = c + i * N + v * VW;
        V x = acc[i][v];
        if (accumulate) x += vload<VW>(p);
        if constexpr (EPI)
          x = epilogue<VW>(x, e, i, v * VW);
        vstore<VW>(p, x);
      }
    return;
  }
  // Edge tile: spill to the stack, then finish the valid part one float at a time.
  float t[R][NVV * VW];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NVV; ++v) vstore<VW>(&t[i][v * VW], acc[i][v]);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      float x = (accumulate ? c[i * N + j] : 0.0f) + t[i][j];
      if constexpr (EPI) x = epilogue<1>(x, e, i, j);
      c[i * N + j] = x;
    }
}

// Addressing of A and B inside micro(): packed panels or the caller's buffers.
constexpr int64_t ARS = PACK_A ? 1 : A_SM;
constexpr int64_t AKS = PACK_A ? MR : A_SK;
constexpr int64_t BKS = PACK_B ? NR : B_SK;

// R rows, any columns up to NR. In-place B has no padding, so a partial column tile is
// covered by single vectors and then single floats.
template <int R, bool EPI>
ALT_INLINE void tile_rows(int64_t kc, const float* a, const float* b, float* c, const Epi& e,
                          int rows, int cols, bool accumulate) {
  if (PACK_B || cols == NR) {
    micro<R, NV, W, ARS, AKS, BKS, EPI>(kc, a, b, c, e, rows, cols, accumulate);
    return;
  }
  int j = 0;
  for (; j + W <= cols; j += W)
    micro<R, 1, W, ARS, AKS, BKS, EPI>(kc, a, b + j, c + j, e.at(0, j), rows, W, accumulate);
  for (; j < cols; ++j)
    micro<R, 1, 1, ARS, AKS, BKS, EPI>(kc, a, b + j, c + j, e.at(0, j), rows, 1, accumulate);
}

template <bool EPI>
ALT_INLINE void tile(int64_t kc, const float* a, const float* b, float* c, const Epi& e,
                     int rows, int cols, bool accumulate) {
  if (PACK_A || rows == MR)
    tile_rows<MR, EPI>(kc, a, b, c, e, rows, cols, accumulate);
  else
    tile_rows<M_TAIL, EPI>(kc, a, b, c, e, rows, cols, accumulate);
}

ALT_INLINE float hsum(typename altv<W>::type v) {
  float lanes[W];
  memcpy(lanes, &v, sizeof(lanes));
  float t = 0.0f;
  for (int l = 0; l < W; ++l) t += lanes[l];
  return t;
}

// C[R x J] = A[R x K] . B[J x K]^T with A rows at stride A_SM and B rows (columns of C)
// at stride B_SN, both contiguous along k. Each A vector is reused J times, each B vector
// R times; the k tail (K % W) is finished in scalar code.
template <int R, int J>
ALT_INLINE void dot_tile(const float* ALT_RESTRICT a, const float* ALT_RESTRICT b,
                         float* ALT_RESTRICT c, const Epi& e) {
  typedef typename altv<W>::type V;
  V acc[R][J];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) acc[i][j] = V{};
  constexpr int64_t KV = K / W * W;
#pragma GCC unroll @UNROLL@
  for (int64_t k = 0; k < KV; k += W) {
    V av[R];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) av[i] = vload<W>(a + i * A_SM + k);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const V bv = vload<W>(b + j * B_SN + k);
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) acc[i][j] = vfma<W>(av[i], bv, acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) {
      float t = hsum(acc[i][j]);
      for (int64_t k = KV; k < K; ++k) t += a[i * A_SM + k] * b[j * B_SN + k];
      if constexpr (HAS_EPI) t = epilogue<1>(t, e, i, j);
      c[i * N + j] = t;
    }
}

// Rows [i0, i1) x columns [j0, j1) with dot tiles. The B rows of one column tile (NV x K)
// stay in L1 while every row tile of the block passes over them. Only the last row / column
// tile of the matrix is partial, with sizes known here.
constexpr int N_TAIL = (N % NV) ? int(N % NV) : NV;
template <int R>
ALT_INLINE void dot_cols(const float* a, const float* b, float* c, const Epi& e,
                         bool full_cols) {
  if (full_cols)
    dot_tile<R, NV>(a, b, c, e);
  else
    dot_tile<R, N_TAIL>(a, b, c, e);
}
void dot_block(const float* A, const float* B, float* C, const Epi& e, int64_t i0, int64_t i1,
               int64_t j0, int64_t j1) {
  for (int64_t ic = i0; ic < i1; ic += MC) {
    const int64_t ie = ic + MC < i1 ? ic + MC : i1;
    for (int64_t j = j0; j < j1; j += NV) {
      const bool full_cols = j + NV <= j1;
      for (int64_t ir = ic; ir < ie; ir += MR) {
        if (ir + MR <= ie)
          dot_cols<MR>(A + ir * A_SM, B + j * B_SN, C + ir * N + j, e.at(ir, j), full_cols);
        else
          dot_cols<M_TAIL>(A + ir * A_SM, B + j * B_SN, C + ir * N + j, e.at(ir, j),
                           full_cols);
      }
    }
  }
}

// Panel q of A (rows q*MR ..) over all of K into dst[k][MR], zero rows past M.
void pack_a(const float* ALT_RESTRICT A, int64_t q, float* ALT_RESTRICT dst) {
  const int64_t m0 = q * MR;
  const int rows = int(M - m0 < MR ? M - m0 : MR);
  if (rows < MR) memset(dst, 0, sizeof(float) * MR * K);
  if (A_SM == 1 || rows < MR) {  // rows contiguous (transposed A) or the padded tail
    for (int64_t k = 0; k < K; ++k)
      for (int i = 0; i < rows; ++i) dst[k * MR + i] = A[(m0 + i) * A_SM + k * A_SK];
  } else {  // read each row along k, write with stride MR
    for (int i = 0; i < MR; ++i)
      for (int64_t k = 0; k < K; ++k) dst[k * MR + i] = A[(m0 + i) * A_SM + k * A_SK];
  }
}

// out[k][j] = in[j][k] for an 8x8 block, in registers: the AVX unpack / shuffle / 128-bit
// permute sequence written as GCC shuffles (no intrinsics, so the template stays portable).
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
ALT_INLINE void transpose8(v8f r[8]) {
  const v8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const v8i qlo = {0, 1, 8, 9, 4, 5, 12, 13}, qhi = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8i hlo = {0, 1, 2, 3, 8, 9, 10, 11}, hhi = {4, 5, 6, 7, 12, 13, 14, 15};
  v8f t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], qlo);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], qhi);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], qlo);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], qhi);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shuffle(u[i], u[i + 4], hlo);
    r[i + 4] = __builtin_shuffle(u[i], u[i + 4], hhi);
  }
}

// Rows [k0, k1) of panel p of B (columns p*NR ..) into dst[k - k0][NR], zero columns
// past N.
void pack_b(const float* ALT_RESTRICT B, int64_t p, int64_t k0, int64_t k1,
            float* ALT_RESTRICT dst) {
  const int64_t n0 = p * NR;
  const int cols = int(N - n0 < NR ? N - n0 : NR);
  const float* src = B + k0 * B_SK + n0 * B_SN;
  const int64_t kn = k1 - k0;
  if (cols < NR) memset(dst, 0, sizeof(float) * NR * kn);
  if (B_SN == 1 && cols == NR) {  // whole vectors per row
    for (int64_t k = 0; k < kn; ++k)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v)
        vstore<W>(dst + k * NR + v * W, vload<W>(src + k * B_SK + v * W));
  } else if (B_SN == 1) {
    for (int64_t k = 0; k < kn; ++k)
      for (int j = 0; j < cols; ++j) dst[k * NR + j] = src[k * B_SK + j];
  } else {  // B stored [N, K]: read each column along k
    int64_t k = 0;
    if (B_SK == 1 && W == 8 && cols == NR) {  // 8x8 blocks transposed in registers
      for (; k + 8 <= kn; k += 8)
        for (int g = 0; g < NV; ++g) {
          v8f r[8];
          for (int j = 0; j < 8; ++j) memcpy(&r[j], src + (g * 8 + j) * B_SN + k, 32);
          transpose8(r);
          for (int kk = 0; kk < 8; ++kk) memcpy(dst + (k + kk) * NR + g * 8, &r[kk], 32);
        }
    }
    for (int j = 0; j < cols; ++j)
      for (int64_t kk = k; kk < kn; ++kk) dst[kk * NR + j] = src[kk * B_SK + j * B_SN];
  }
}

// One rank-kc update (depth pc .. pc+kc) of rows [i0, i1) x columns [j0, j1): row blocks
// of MC (A block in L2), then a B micro-panel (stays in L1) against every A tile of the
// block. EPI: the last update, which applies the epilogue.
template <bool EPI>
void rank_update(const float* A, const float* B, const float* Ap, const float* Bp, float* C,
                 const Epi& e, int64_t pc, int64_t kc, int64_t i0, int64_t i1, int64_t j0,
                 int64_t j1) {
  const bool accumulate = pc > 0;
  for (int64_t ic = i0; ic < i1; ic += MC) {
    const int64_t ie = ic + MC < i1 ? ic + MC : i1;
    for (int64_t jr = j0; jr < j1; jr += NR) {
      const int cols = int(j1 - jr < NR ? j1 - jr : NR);
      const float* b = FUSE_PACK ? Bp + ((jr - j0) / NR) * KC * NR
                       : PACK_B  ? Bp + (jr / NR) * K * NR + pc * NR
                                 : B + pc * B_SK + jr;
      for (int64_t ir = ic; ir < ie; ir += MR) {
        const int rows = int(ie - ir < MR ? ie - ir : MR);
        const float* a =
            PACK_A ? Ap + (ir / MR) * K * MR + pc * MR : A + ir * A_SM + pc * A_SK;
        tile<EPI>(kc, a, b, C + ir * N + jr, e.at(ir, jr), rows, cols, accumulate);
      }
    }
  }
}

// Rows [i0, i1) x columns [j0, j1) of one batch item, all of K. Loop order per BLIS:
// rank-KC updates outermost, then rank_update's blocks. With FUSE_PACK the task packs its
// own KC x (j1-j0) slice of B right before use, so the packed copy is still in L2 when read.
// Bp: the B panels (workspace, or the prepacked input), or the task's slice.
void block(const float* A, const float* B, const float* Ap, float* Bp, float* C, const Epi& e,
           int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  if (DOT) {
    dot_block(A, B, C, e, i0, i1, j0, j1);
    return;
  }
  for (int64_t pc = 0; pc < K; pc += KC) {
    const int64_t kc = K - pc < KC ? K - pc : KC;
    if (FUSE_PACK)  // j0 is a multiple of NR; the slice holds panels [j0/NR, ...) of kc rows
      for (int64_t p = j0 / NR; p * NR < j1; ++p)
        pack_b(B, p, pc, pc + kc, Bp + (p - j0 / NR) * KC * NR);
    if constexpr (HAS_EPI) {
      if (pc + kc >= K) {
        rank_update<true>(A, B, Ap, Bp, C, e, pc, kc, i0, i1, j0, j1);
        continue;
      }
    }
    rank_update<false>(A, B, Ap, Bp, C, e, pc, kc, i0, i1, j0, j1);
  }
}

// Every up-front pack job of one batch item, numbered: A panels first, then B panels.
constexpr int64_t PACK_JOBS = (PACK_A ? NPA : 0) + (BP_FLOATS ? NPB : 0);

void pack_job(const float* A, const float* B, float* ap, float* bp, int64_t t) {
  if (PACK_A && t < NPA) {
    pack_a(A, t, ap + t * MR * K);
    return;
  }
  const int64_t p = PACK_A ? t - NPA : t;
  pack_b(B, p, 0, K, bp + p * NR * K);
}

struct Buffers {
  const float* A;
  const float* B;
  float* C;
  float* ws;
  Epi epi;  // scale / shift, and the residual of batch item 0
  Epi item(int64_t bi) const {
    return Epi{epi.scale, epi.shift, RESIDUAL ? epi.res + bi * M * N : nullptr};
  }
  float* ap(int64_t bi) const { return ws + bi * AP_FLOATS; }
  float* bp(int64_t bi) const { return ws + BATCH * AP_FLOATS + bi * BP_FLOATS; }
  float* slot(int64_t s) const { return ws + BATCH * (AP_FLOATS + BP_FLOATS) + s * SLOT_FLOATS; }
};

// Panels block() reads for batch item bi: the caller's slice (FUSE_PACK), the prepacked
// input, or the workspace.
ALT_INLINE float* b_panels(const Buffers& x, int64_t bi, float* slice) {
  if (FUSE_PACK) return slice;
  if (PREPACKED) return const_cast<float*>(x.B + bi * B_ITEM);  // read only
  return x.bp(bi);
}

// Task t; `slice` is the caller's B slice when FUSE_PACK.
void run_task(const Buffers& x, int64_t t, float* slice) {
  if (PAR_BATCH) {
    const float* A = x.A + t * A_SB;
    const float* B = x.B + t * B_ITEM;
    for (int64_t j = 0; j < PACK_JOBS; ++j) pack_job(A, B, x.ap(t), x.bp(t), j);
    block(A, B, x.ap(t), b_panels(x, t, slice), x.C + t * M * N, x.item(t), 0, M, 0, N);
    return;
  }
  const int64_t bi = t / (NI * NJC), ic = (t / NJC) % NI, jc = t % NJC;
  const int64_t i1 = (ic + 1) * MI < M ? (ic + 1) * MI : M;
  const int64_t j1 = (jc + 1) * NC < N ? (jc + 1) * NC : N;
  block(x.A + bi * A_SB, x.B + bi * B_ITEM, x.ap(bi), b_panels(x, bi, slice),
        x.C + bi * M * N, x.item(bi), ic * MI, i1, jc * NC, j1);
}

}  // namespace

ALT_EXPORT int32_t @SYMBOL@(  // the one exported symbol (kernel_abi.h)
    const alt_runtime* runtime, const void* const* inputs, void* const* outputs) {
  // Without a runtime alt_parallel_for runs inline: below ~1 MFLOP waking the pool costs
  // more than the work.
  const alt_runtime* rt = SERIAL ? nullptr : runtime;
  // Epilogue inputs follow A and B in the order scale, shift, residual (those present).
  constexpr int I_SCALE = 2, I_SHIFT = I_SCALE + SCALE, I_RES = I_SHIFT + SHIFT;
  const Epi epi{SCALE ? static_cast<const float*>(inputs[I_SCALE]) : nullptr,
                SHIFT ? static_cast<const float*>(inputs[I_SHIFT]) : nullptr,
                RESIDUAL ? static_cast<const float*>(inputs[I_RES]) : nullptr};
  const Buffers x{static_cast<const float*>(inputs[0]), static_cast<const float*>(inputs[1]),
                  static_cast<float*>(outputs[0]),
                  WS_FLOATS ? static_cast<float*>(outputs[1]) : nullptr, epi};
  if (!PAR_BATCH && PACK_JOBS > 0) {
    // Up-front packing pass (all batch items), then a barrier, then the compute tasks.
    constexpr int64_t jobs = PACK_JOBS > 0 ? PACK_JOBS : 1;  // not a template: compiled
    alt_parallel_for(rt, BATCH * jobs, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bi = t / jobs;
        pack_job(x.A + bi * A_SB, x.B + bi * B_ITEM, x.ap(bi), x.bp(bi), t % jobs);
      }
    });
  }
  if (!FUSE_PACK) {
    alt_parallel_for(rt, NTASKS, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run_task(x, t, nullptr);
    });
    return 0;
  }
  // FUSE_PACK: one worker per thread, each owning a B slice, pulling tasks for dynamic balance
  alt_for_tasks(rt, SLOTS, NTASKS, [&](int64_t w, int64_t t) { run_task(x, t, x.slot(w)); });
  return 0;
}
