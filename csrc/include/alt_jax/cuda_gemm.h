// The tiled GEMM core the CUDA templates share (codegen/cuda_matmul.cu, cuda_conv2d.cu): a
// thread block computes an MC x NC tile of C = A (M x K) @ B (K x N), staging KC-deep
// slices of A and B in shared memory, each warp a WM x WN sub-tile, each thread an MR x NR
// tile of accumulators. What A and B are (a matrix read through strides, an implicit
// im2col of a convolution's input) and where C goes is the problem's: it fills a stage and
// stores each finished element.
//
// Problem provides:
//   int64_t m_size, n_size, k_begin, k_end          (this block's problem)
//   load_slice(blk, tid, stage, m0, n0, k0)          this thread's share of stage `stage`:
//       gemm_a(blk.sh, stage, kk, mm) = A[m0 + mm][k0 + kk], gemm_b(...) = B[k0 + kk][n0 + nn],
//       zeros past m_size, n_size and k_end
//   store(blk, m, n, acc)                            one finished element of C
// Entry points: GemmTile<...> (Shared, Thread), gemm_block(blk, problem, m0, n0),
// gemm_stage_a / gemm_stage_b (a problem's load_slice from an address function).
#ifndef ALT_JAX_CUDA_GEMM_H_
#define ALT_JAX_CUDA_GEMM_H_

#include "alt_jax/cuda_block.h"

template <int MC_, int NC_, int KC_, int MR_, int NR_, int WM_, int WN_, int STAGES_>
struct GemmTile {
  static constexpr int MC = MC_, NC = NC_, KC = KC_, MR = MR_, NR = NR_, WM = WM_, WN = WN_;
  static constexpr int STAGES = STAGES_;
  static constexpr int WARPS_N = NC / WN, LANES_N = WN / NR;
  static constexpr int THREADS = (MC / WM) * (NC / WN) * 32;
  static_assert(MC % WM == 0 && NC % WN == 0 && WM % MR == 0 && WN % NR == 0, "tiles");
  static_assert((WM / MR) * (WN / NR) == 32, "a warp is 32 threads");
  static_assert(STAGES == 1 || STAGES == 2, "one or two shared-memory stages");

  struct Shared {
    float as[STAGES * KC * MC];  // [stage][k][m]
    float bs[STAGES * KC * NC];  // [stage][k][n]
  };
  struct Thread {
    float acc[MR][NR];
  };
  // A thread's rows and columns within the block tile.
  static ALT_DEV int row0(int tid) { return (tid / 32 / WARPS_N) * WM + (tid % 32 / LANES_N) * MR; }
  static ALT_DEV int col0(int tid) { return (tid / 32 % WARPS_N) * WN + (tid % 32 % LANES_N) * NR; }
  // shared-memory indices of A[kk][mm] and B[kk][nn] in a stage
  static ALT_DEV int64_t a_index(int stage, int kk, int mm) { return (stage * KC + kk) * MC + mm; }
  static ALT_DEV int64_t b_index(int stage, int kk, int nn) { return (stage * KC + kk) * NC + nn; }
};

// This thread's share of staging A (MC x KC from (m0, k0)) into stage `stage`: consecutive
// threads walk k (K_INNER: k is A's contiguous dim) or m, VEC floats at a time. at(m, k) is
// where A[m][k] is in p, or -1 outside the operand (it then reads as zero); a vector is
// inside iff its first float is (the family keeps dims whole vectors).
template <typename Tile, int VEC, bool K_INNER, typename Blk, typename At>
ALT_DEV void gemm_stage_a(Blk& blk, int tid, int stage, int64_t m0, int64_t k0, const float* p,
                          int64_t p_size, At&& at) {
  for (int e = tid * VEC; e < Tile::KC * Tile::MC; e += Tile::THREADS * VEC) {
    const int kk0 = K_INNER ? e % Tile::KC : e / Tile::MC;
    const int mm0 = K_INNER ? e / Tile::KC : e % Tile::MC;
    float v[VEC];
    const int64_t offset = at(m0 + mm0, k0 + kk0);
    if (offset >= 0) {
      alt_load_vec<VEC>(blk, p, offset, p_size, v);
    } else {
      for (int u = 0; u < VEC; ++u) v[u] = 0.0f;
    }
    for (int u = 0; u < VEC; ++u)
      ALT_SH_ST(blk, as, Tile::a_index(stage, K_INNER ? kk0 + u : kk0, K_INNER ? mm0 : mm0 + u),
                v[u]);
  }
}

// The same for B (KC x NC from (k0, n0)); N_INNER: consecutive threads walk n.
template <typename Tile, int VEC, bool N_INNER, typename Blk, typename At>
ALT_DEV void gemm_stage_b(Blk& blk, int tid, int stage, int64_t k0, int64_t n0, const float* p,
                          int64_t p_size, At&& at) {
  for (int e = tid * VEC; e < Tile::KC * Tile::NC; e += Tile::THREADS * VEC) {
    const int kk0 = N_INNER ? e / Tile::NC : e % Tile::KC;
    const int nn0 = N_INNER ? e % Tile::NC : e / Tile::KC;
    float v[VEC];
    const int64_t offset = at(k0 + kk0, n0 + nn0);
    if (offset >= 0) {
      alt_load_vec<VEC>(blk, p, offset, p_size, v);
    } else {
      for (int u = 0; u < VEC; ++u) v[u] = 0.0f;
    }
    for (int u = 0; u < VEC; ++u)
      ALT_SH_ST(blk, bs, Tile::b_index(stage, N_INNER ? kk0 : kk0 + u, N_INNER ? nn0 + u : nn0),
                v[u]);
  }
}

template <typename Tile, typename Blk>
ALT_DEV void gemm_compute_slice(Blk& blk, typename Tile::Thread& t, int tid, int stage) {
  const int r0 = Tile::row0(tid), c0 = Tile::col0(tid);
  for (int kk = 0; kk < Tile::KC; ++kk) {
    float af[Tile::MR], bf[Tile::NR];
    for (int i = 0; i < Tile::MR; ++i) af[i] = ALT_SH_LD(blk, as, Tile::a_index(stage, kk, r0 + i));
    for (int j = 0; j < Tile::NR; ++j) bf[j] = ALT_SH_LD(blk, bs, Tile::b_index(stage, kk, c0 + j));
    for (int i = 0; i < Tile::MR; ++i)
      for (int j = 0; j < Tile::NR; ++j) t.acc[i][j] += af[i] * bf[j];
  }
}

// The block's tile at (m0, n0): accumulate over [k_begin, k_end), then store each element
// inside (m_size, n_size). STAGES = 2 loads the next slice while this one is used (one
// barrier per slice: the stage written was last read before the previous barrier).
template <typename Tile, typename Blk, typename Problem>
ALT_DEV void gemm_block(Blk& blk, const Problem& p, int64_t m0, int64_t n0) {
  const int64_t kb = p.k_begin, ke = p.k_end;
  const int64_t slices = kb < ke ? (ke - kb + Tile::KC - 1) / Tile::KC : 0;
  blk.each([&](typename Tile::Thread& t, int) {
    for (int i = 0; i < Tile::MR; ++i)
      for (int j = 0; j < Tile::NR; ++j) t.acc[i][j] = 0.0f;
  });
  if constexpr (Tile::STAGES == 1) {
    for (int64_t s = 0; s < slices; ++s) {
      blk.each([&](typename Tile::Thread&, int tid) {
        p.load_slice(blk, tid, 0, m0, n0, kb + s * Tile::KC);
      });
      blk.sync();
      blk.each([&](typename Tile::Thread& t, int tid) { gemm_compute_slice<Tile>(blk, t, tid, 0); });
      blk.sync();
    }
  } else {
    if (slices > 0) {
      blk.each([&](typename Tile::Thread&, int tid) { p.load_slice(blk, tid, 0, m0, n0, kb); });
      blk.sync();
    }
    for (int64_t s = 0; s < slices; ++s) {
      blk.each([&](typename Tile::Thread& t, int tid) {
        if (s + 1 < slices) p.load_slice(blk, tid, (s + 1) % 2, m0, n0, kb + (s + 1) * Tile::KC);
        gemm_compute_slice<Tile>(blk, t, tid, s % 2);
      });
      blk.sync();
    }
  }
  blk.each([&](typename Tile::Thread& t, int tid) {
    const int r0 = Tile::row0(tid), c0 = Tile::col0(tid);
    for (int i = 0; i < Tile::MR; ++i) {
      const int64_t m = m0 + r0 + i;
      if (m >= p.m_size) continue;
      for (int j = 0; j < Tile::NR; ++j) {
        const int64_t n = n0 + c0 + j;
        if (n < p.n_size) p.store(blk, m, n, t.acc[i][j]);
      }
    }
  });
}

#endif  // ALT_JAX_CUDA_GEMM_H_
