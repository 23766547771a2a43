// The C interface between the static FFI handler (csrc/core) and runtime-generated kernels.
// Entry points: alt_runtime (what a kernel may call), alt_kernel_fn (what a kernel exports).
//
// Generated kernels are plain C++ that include only this header and simd.h: no XLA headers,
// so they compile in a fraction of a second and do not depend on the jaxlib version.
#ifndef ALT_JAX_KERNEL_ABI_H_
#define ALT_JAX_KERNEL_ABI_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ALT_JAX_ABI_VERSION 1

// One unit of parallel work: handles items [begin, end).
typedef void (*alt_task_fn)(void* arg, int64_t begin, int64_t end);

typedef struct alt_runtime {
  void* impl;           // opaque to kernels
  int32_t num_threads;  // threads parallel_for may use, the calling thread included
  // Runs fn over disjoint ranges that cover [0, n), at most num_threads at a time, in
  // chunks of at least `grain` items (the last may be shorter); returns when all are done.
  // Chunks are handed out dynamically, so a core the host takes away costs balance, not time.
  void (*parallel_for)(const struct alt_runtime* rt, int64_t n, int64_t grain, alt_task_fn fn,
                       void* arg);
} alt_runtime;

// What every generated kernel exports (extern "C"). inputs are the operands of the replaced
// jaxpr equation in their original logical shapes, dense row-major; outputs are the
// equation's result(s), then, if the kernel asked for one, a byte workspace buffer that XLA
// allocates for the call. Returns 0 on success; non-zero is reported as an FFI error.
typedef int32_t (*alt_kernel_fn)(const alt_runtime* rt, const void* const* inputs,
                                 void* const* outputs);

// Kernels are compiled with -fvisibility=hidden; the entry point is declared with this.
#ifdef __cplusplus
#define ALT_EXPORT extern "C" __attribute__((visibility("default")))
#else
#define ALT_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
}  // extern "C"

// C++ convenience for kernels: parallel_for over a lambda. The body is reached only through
// one thunk, so it is compiled once whether the work runs inline or on the pool.
template <typename F>
inline void alt_parallel_for(const alt_runtime* rt, int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  auto thunk = [](void* arg, int64_t b, int64_t e) { (*static_cast<F*>(arg))(b, e); };
  void* arg = static_cast<void*>(&f);
  if (rt == nullptr || rt->num_threads <= 1 || n <= grain) {
    thunk(arg, 0, n);
    return;
  }
  rt->parallel_for(rt, n, grain, thunk, arg);
}

// Tasks 0..ntasks-1 on workers that each own per-worker state (a workspace slot): one
// worker per thread, at most `slots`, identified by an index below `slots` unique among
// the running workers (its chunk's first index), each pulling the next task number from a
// shared counter (dynamic balance; a worker's tasks come in increasing order).
// body(worker, task).
template <typename F>
inline void alt_for_tasks(const alt_runtime* rt, int64_t slots, int64_t ntasks, F&& body) {
  const int64_t threads = rt ? rt->num_threads : 1;
  const int64_t workers = threads < slots ? (threads > 0 ? threads : 1) : slots;
  int64_t next = 0;
  alt_parallel_for(rt, workers, 1, [&](int64_t w0, int64_t) {
    for (;;) {
      const int64_t t = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
      if (t >= ntasks) break;
      body(w0, t);
    }
  });
}
#endif

#endif  // ALT_JAX_KERNEL_ABI_H_
