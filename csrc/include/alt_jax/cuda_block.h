// One CUDA kernel source, two ways to run it: compiled by nvcc for a GPU, or compiled by the
// host compiler as an emulation that runs each block's threads one after another, phase by
// phase, so that indexing, tiling, bounds and epilogues are checked against lax on a CPU.
//
// A template writes its block's work once, as a function of an alt_block<Thread, Shared, NT>:
//   blk.each([&](Thread& t, int tid) { ... });   // one phase: every thread of the block
//   blk.sync();                                  // __syncthreads()
// Control flow between phases must be the same for every thread of a block (as barriers
// require anyway). What a thread keeps across a barrier lives in its Thread struct; shared
// memory is the Shared struct. On the GPU a Thread is the thread's registers and each()
// runs the phase for this thread; in emulation each() runs it for thread 0, 1, ..., NT-1 in
// turn (a race-free kernel computes the same either way). A phase, for the race check, is
// everything between two barriers, however many each() calls it takes.
//
// The emulation also checks what the GPU would not report:
//   ALT_SH_LD / ALT_SH_ST: shared-memory reads and writes. A read of an element another
//     thread wrote in the same phase, or two threads writing one element in the same phase,
//     is a race (a missing barrier); the kernel then returns ALT_CUDA_RACE.
//   ALT_GLD(ptr, i, n): a global read of element i of n; outside [0, n) the kernel returns
//     ALT_CUDA_OUT_OF_BOUNDS (on the GPU: a plain load).
//   ALT_GST(ptr, i, n, v): the same for writes.
// Entry points: alt_block, ALT_DEV, ALT_SH_*, ALT_GLD, ALT_GST, alt_load_vec<VEC>,
// alt_cuda_activate<ACT>,
// alt_emulate_grid (emulation only).
#ifndef ALT_JAX_CUDA_BLOCK_H_
#define ALT_JAX_CUDA_BLOCK_H_

#include <math.h>
#include <stdint.h>

#include "alt_jax/activation_codes.h"

#define ALT_CUDA_OK 0
#define ALT_CUDA_RACE 101
#define ALT_CUDA_OUT_OF_BOUNDS 102

#if defined(__CUDACC__)

#define ALT_DEV __device__ __forceinline__
#define ALT_HOST_DEV __host__ __device__ __forceinline__

template <typename Thread, typename Shared, int NT>
struct alt_block {
  Shared& sh;
  Thread t;
  int64_t bx, by, bz;
  ALT_DEV explicit alt_block(Shared& s) : sh(s), bx(blockIdx.x), by(blockIdx.y), bz(blockIdx.z) {}
  template <typename F>
  ALT_DEV void each(F&& f) { f(t, static_cast<int>(threadIdx.x)); }
  ALT_DEV void sync() { __syncthreads(); }
  ALT_DEV bool failed() const { return false; }
};

#define ALT_SH_LD(blk, arr, i) ((blk).sh.arr[(i)])
#define ALT_SH_ST(blk, arr, i, v) ((blk).sh.arr[(i)] = (v))
#define ALT_GLD(blk, p, i, n) ((p)[(i)])
#define ALT_GST(blk, p, i, n, v) ((p)[(i)] = (v))

#else  // emulation on the host

#include <stdlib.h>
#include <string.h>

#include "alt_jax/kernel_abi.h"

#define ALT_DEV inline
#define ALT_HOST_DEV inline

// Who touched each shared float in which phase. Within one phase, a thread's access to an
// element another thread wrote, or a write to an element another thread read, is a race.
struct alt_shadow {
  int32_t* writer = nullptr;  // the thread that wrote the element in phase[]
  int64_t* phase = nullptr;   // phase of that write (0: none yet)
  int32_t* reader = nullptr;  // a thread that read it in rphase[] (-2: several)
  int64_t* rphase = nullptr;
  int64_t n = 0;
};

template <typename Thread, typename Shared, int NT>
struct alt_block {
  Shared& sh;
  Thread* threads;
  int64_t bx, by, bz;
  int64_t phase = 1;  // barriers so far + 1 (the shadow's 0 means never touched)
  int current = 0;    // the thread running the phase
  int error = ALT_CUDA_OK;
  alt_shadow shadow;

  alt_block(Shared& s, Thread* t, int64_t x, int64_t y, int64_t z, alt_shadow sh_)
      : sh(s), threads(t), bx(x), by(y), bz(z), shadow(sh_) {}
  template <typename F>
  void each(F&& f) {
    for (int i = 0; i < NT && error == ALT_CUDA_OK; ++i) {
      current = i;
      f(threads[i], i);
    }
  }
  // a barrier ends the phase: accesses on either side of it never race; consecutive each()
  // calls without one are one phase, as on the GPU
  void sync() { ++phase; }
  bool failed() const { return error != ALT_CUDA_OK; }

  // the index of arr's element i among Shared's floats, for the shadow
  int64_t slot(const void* arr, int64_t i) const {
    return (static_cast<const char*>(arr) - reinterpret_cast<const char*>(&sh)) / 4 + i;
  }
  float load(const float* arr, int64_t i, int64_t n) {
    if (i < 0 || i >= n) {
      error = ALT_CUDA_OUT_OF_BOUNDS;
      return 0.0f;
    }
    int64_t s = slot(arr, i);
    if (shadow.phase[s] == phase && shadow.writer[s] != current) error = ALT_CUDA_RACE;
    if (shadow.rphase[s] != phase) {
      shadow.rphase[s] = phase;
      shadow.reader[s] = current;
    } else if (shadow.reader[s] != current) {
      shadow.reader[s] = -2;
    }
    return arr[i];
  }
  void store(float* arr, int64_t i, int64_t n, float v) {
    if (i < 0 || i >= n) {
      error = ALT_CUDA_OUT_OF_BOUNDS;
      return;
    }
    int64_t s = slot(arr, i);
    if ((shadow.phase[s] == phase && shadow.writer[s] != current) ||
        (shadow.rphase[s] == phase && shadow.reader[s] != current))
      error = ALT_CUDA_RACE;
    shadow.phase[s] = phase;
    shadow.writer[s] = current;
    arr[i] = v;
  }
  float gload(const float* p, int64_t i, int64_t n) {
    if (i < 0 || i >= n) {
      error = ALT_CUDA_OUT_OF_BOUNDS;
      return 0.0f;
    }
    return p[i];
  }
  void gstore(float* p, int64_t i, int64_t n, float v) {
    if (i < 0 || i >= n) {
      error = ALT_CUDA_OUT_OF_BOUNDS;
      return;
    }
    p[i] = v;
  }
};

#define ALT_SH_LD(blk, arr, i) \
  ((blk).load((blk).sh.arr, (i), static_cast<int64_t>(sizeof((blk).sh.arr) / sizeof(float))))
#define ALT_SH_ST(blk, arr, i, v) \
  ((blk).store((blk).sh.arr, (i), static_cast<int64_t>(sizeof((blk).sh.arr) / sizeof(float)), (v)))
#define ALT_GLD(blk, p, i, n) ((blk).gload((p), (i), (n)))
#define ALT_GST(blk, p, i, n, v) ((blk).gstore((p), (i), (n), (v)))

// Runs body(blk) for every block of a grid (gx, gy, gz) with NT threads, blocks spread over
// the runtime's threads (each worker its own thread states, shared array and shadow).
// Returns the first error a block reported, ALT_CUDA_OK if none.
template <typename Thread, typename Shared, int NT, typename Body>
int alt_emulate_grid(const alt_runtime* rt, int64_t gx, int64_t gy, int64_t gz, Body&& body) {
  static_assert(sizeof(Shared) % sizeof(float) == 0, "Shared must hold floats only");
  const int64_t nfloats = static_cast<int64_t>(sizeof(Shared) / sizeof(float));
  int error = ALT_CUDA_OK;
  alt_parallel_for(rt, gx * gy * gz, 1, [&](int64_t b0, int64_t b1) {
    Shared* sh = static_cast<Shared*>(calloc(1, sizeof(Shared)));
    Thread* threads = static_cast<Thread*>(calloc(NT, sizeof(Thread)));
    alt_shadow shadow;
    shadow.n = nfloats;
    shadow.writer = static_cast<int32_t*>(malloc(sizeof(int32_t) * (nfloats + 1)));
    shadow.phase = static_cast<int64_t*>(calloc(nfloats + 1, sizeof(int64_t)));
    shadow.reader = static_cast<int32_t*>(malloc(sizeof(int32_t) * (nfloats + 1)));
    shadow.rphase = static_cast<int64_t*>(calloc(nfloats + 1, sizeof(int64_t)));
    for (int64_t b = b0; b < b1; ++b) {
      memset(shadow.phase, 0, sizeof(int64_t) * (nfloats + 1));
      memset(shadow.rphase, 0, sizeof(int64_t) * (nfloats + 1));
      // a fresh block: garbage in shared memory and registers, as on a GPU (NaN, so that a
      // read before a write shows in the result)
      for (int64_t i = 0; i < nfloats; ++i) reinterpret_cast<float*>(sh)[i] = NAN;
      alt_block<Thread, Shared, NT> blk(*sh, threads, b % gx, (b / gx) % gy, b / (gx * gy),
                                        shadow);
      body(blk);
      if (blk.error != ALT_CUDA_OK) __atomic_store_n(&error, blk.error, __ATOMIC_RELAXED);
    }
    free(shadow.rphase);
    free(shadow.reader);
    free(shadow.phase);
    free(shadow.writer);
    free(threads);
    free(sh);
  });
  return error;
}

#endif  // __CUDACC__

// VEC (1, 2 or 4) consecutive floats of p from element i into out: one vector load on the
// GPU (the caller keeps p + i aligned to VEC floats), checked scalar loads in emulation.
template <int VEC, typename Blk>
ALT_DEV void alt_load_vec(Blk& blk, const float* p, int64_t i, int64_t n, float* out) {
#if defined(__CUDACC__)
  if constexpr (VEC == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p + i);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else if constexpr (VEC == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p + i);
    out[0] = v.x; out[1] = v.y;
  } else {
    out[0] = p[i];
  }
#else
  for (int v = 0; v < VEC; ++v) out[v] = ALT_GLD(blk, p, i + v, n);
#endif
}

// The fused epilogue's activation on one float, as XLA computes the unfused jnp program:
// NaN in -> NaN out, relu(-0) = +0.
template <int ACT>
ALT_HOST_DEV float alt_cuda_activate(float x) {
  if (ACT == ALT_ACT_RELU) return (x != x) ? x : (x > 0.0f ? x : 0.0f) + 0.0f;
  if (ACT == ALT_ACT_RELU6) {
    if (x != x) return x;
    float r = (x > 0.0f ? x : 0.0f) + 0.0f;
    return r < 6.0f ? r : 6.0f;
  }
  if (ACT == ALT_ACT_GELU_TANH)
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  if (ACT == ALT_ACT_GELU_ERF) return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
  if (ACT == ALT_ACT_SILU) return x / (1.0f + expf(-x));
  return x;
}

#endif  // ALT_JAX_CUDA_BLOCK_H_
