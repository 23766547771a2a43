// A small persistent thread pool for running kernels outside XLA (tests, tuning
// measurements): the same parallel_for contract as XLA's intra-op pool, and the same
// floating-point mode (XLA's threads flush denormals: ScopedXlaFloatMode).
// Entry points: ThreadPool::Schedule, ThreadPool::ForThreads, ScopedXlaFloatMode.
#ifndef ALT_JAX_CORE_THREAD_POOL_H_
#define ALT_JAX_CORE_THREAD_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace alt_jax {

// The MXCSR XLA's threads run with: flush-to-zero (bit 15) and denormals-are-zero (bit 6),
// set by tsl's thread pools on every thread they start (measured: MXCSR 0x9fe2 on the
// threads that call our kernels and on all intra-op pool threads, in 8 of 8 processes; the
// Python main thread has 0x1fa2). Host runs take the same mode so that a kernel computes
// and times there as it does under XLA (a denormal operand costs ~100 cycles without DAZ).
class ScopedXlaFloatMode {
 public:
#if defined(__x86_64__) || defined(__i386__)
  static constexpr unsigned kFlushDenormals = 0x8040;
  ScopedXlaFloatMode() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushDenormals); }
  ~ScopedXlaFloatMode() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  ScopedXlaFloatMode() {}
#endif
  ScopedXlaFloatMode(const ScopedXlaFloatMode&) = delete;
  ScopedXlaFloatMode& operator=(const ScopedXlaFloatMode&) = delete;
};

class ThreadPool {
 public:
  explicit ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void Schedule(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
  }
  // A process-wide pool with num_threads - 1 workers (the caller is the other thread).
  static ThreadPool* ForThreads(int num_threads);

 private:
  void Loop() {
    ScopedXlaFloatMode float_mode;
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
        if (stop_ && tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  std::vector<std::thread> threads_;
  bool stop_ = false;
};

}  // namespace alt_jax

#endif  // ALT_JAX_CORE_THREAD_POOL_H_
