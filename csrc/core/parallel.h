// parallel_for over any pool that can Schedule(std::function-like): the calling thread works
// too and only waits for chunks already claimed, so a pool whose threads are all busy (or
// that runs tasks late) can never deadlock a kernel. Entry point: ParallelFor<Pool>.
#ifndef ALT_JAX_CORE_PARALLEL_H_
#define ALT_JAX_CORE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "alt_jax/kernel_abi.h"

namespace alt_jax {

struct ParallelJob {
  int64_t n = 0, chunk = 1, num_chunks = 0;
  alt_task_fn fn = nullptr;
  void* arg = nullptr;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Claims and runs chunks until none are left.
  void Work() {
    for (;;) {
      int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= num_chunks) return;
      int64_t b = c * chunk;
      int64_t e = std::min(n, b + chunk);
      fn(arg, b, e);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Splits [0, n) into chunks of >= grain items, about 8 per thread: fine enough that a
// thread the host preempts holds back little work, coarse enough that claiming is free.
template <typename Schedule>
void ParallelFor(int num_threads, int64_t n, int64_t grain, alt_task_fn fn, void* arg,
                 Schedule&& schedule) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  int64_t target_chunks = std::max<int64_t>(1, int64_t{num_threads} * 8);
  int64_t chunk = std::max(grain, (n + target_chunks - 1) / target_chunks);
  int64_t num_chunks = (n + chunk - 1) / chunk;
  if (num_threads <= 1 || num_chunks <= 1) {
    fn(arg, 0, n);
    return;
  }
  auto job = std::make_shared<ParallelJob>();
  job->n = n;
  job->chunk = chunk;
  job->num_chunks = num_chunks;
  job->fn = fn;
  job->arg = arg;
  int helpers = static_cast<int>(std::min<int64_t>(num_threads - 1, num_chunks - 1));
  for (int i = 0; i < helpers; ++i) {
    // The job outlives this call if a helper starts late; it then finds no chunk left.
    schedule([job] { job->Work(); });
  }
  job->Work();
  // Every chunk is claimed; wait for the ones still running on helpers.
  int spins = 0;
  while (job->done.load(std::memory_order_acquire) < num_chunks) {
    if (++spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace alt_jax

#endif  // ALT_JAX_CORE_PARALLEL_H_
