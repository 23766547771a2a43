// Kernel workspaces: a process-wide pool of page-aligned buffers lent to one kernel call at
// a time (Entry points: WorkspaceLease, WorkspacePool::Instance().Stats/Trim/SetPolicy).
//
// Why a pool at all: reuse means a workspace's pages are faulted in once, not on every call
// (an XLA-allocated 10 MB workspace cost ~0.7 ms of page faults per call in the allocator's
// bad moods). The hot path (a buffer of the size the call needs is free) takes one mutex
// twice and reads the clock once: no allocation, no page faults.
//
// Policy (issue 8, point 9; the old arena was one grow-only buffer per calling thread, and
// since XLA calls custom calls from whichever of its threads runs the thunk, one 64 MiB
// workspace cost 64 MiB on each of 4-5 threads, RSS 280-330 MB above XLA, kept forever):
//  - Buffers are shared by all threads: a call leases the smallest free buffer that fits,
//    so the pool holds as many large buffers as calls ever ran at once (1 in a sequential
//    program), not one per thread.
//  - A call that finds nothing free that fits maps a new buffer; free buffers smaller than
//    the new one are unmapped then (they are the ones that no longer fit).
//  - Buffers up to retain_bytes (default 1 MiB) are kept for the life of the process.
//  - A free buffer above retain_bytes is unmapped once no call has needed it for idle_ms
//    (default 1000 ms); a call needs a buffer when it asks for more than half of it (smaller
//    calls may borrow it, but do not keep it alive). Checked whenever any lease is
//    returned, and by Trim(). A program
//    that calls a big-workspace kernel at least once a second keeps its buffer and pays no
//    page faults; one that moved on to other work gets the memory back at its next kernel
//    call. Trim(0) (alt_jax._core.workspace_trim) returns it at once.
//  - Buffers come from mmap and go back with munmap, so released memory leaves the process
//    (free() of a heap block below glibc's dynamic mmap threshold, up to 32 MiB, stays in
//    the heap).
#ifndef ALT_JAX_CORE_WORKSPACE_H_
#define ALT_JAX_CORE_WORKSPACE_H_

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <vector>

namespace alt_jax {

struct WorkspacePolicy {
  size_t retain_bytes = size_t{1} << 20;  // kept for good, whatever the idle time
  int64_t idle_ms = 1000;                 // a larger free buffer idle this long is unmapped
};

struct WorkspaceStats {
  size_t retained_bytes = 0;  // mapped, free or leased
  size_t leased_bytes = 0;    // lent to calls running now
  size_t buffers = 0;
  int64_t maps = 0;           // buffers mapped since start (a new one = page faults)
  int64_t unmaps = 0;
};

class WorkspacePool {
 public:
  using Clock = std::chrono::steady_clock;

  static WorkspacePool& Instance() {
    static auto* pool = new WorkspacePool;  // never destroyed: leases may outlive main()
    return *pool;
  }

  // A free buffer of >= bytes (page-rounded), marked leased; throws std::bad_alloc.
  void* Acquire(size_t bytes) {
    size_t rounded = (bytes + kPage - 1) / kPage * kPage;
    std::lock_guard<std::mutex> lock(mu_);
    Buffer* best = nullptr;
    for (Buffer& b : buffers_) {
      if (!b.leased && b.size >= rounded && (best == nullptr || b.size < best->size)) best = &b;
    }
    if (best == nullptr) best = MapLocked(rounded);
    best->leased = true;
    best->needed = 2 * rounded > best->size;
    return best->data;
  }

  void Release(void* data) {
    Clock::time_point now = Clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    for (Buffer& b : buffers_) {
      if (b.data == data) {
        b.leased = false;
        if (b.needed) b.last_needed = now;
      }
    }
    TrimLocked(now, std::chrono::milliseconds(policy_.idle_ms));
  }

  // Unmaps free buffers above retain_bytes idle for at least idle_ms (0: all of them).
  void Trim(int64_t idle_ms) {
    std::lock_guard<std::mutex> lock(mu_);
    TrimLocked(Clock::now(), std::chrono::milliseconds(idle_ms));
  }

  WorkspaceStats Stats() {
    std::lock_guard<std::mutex> lock(mu_);
    WorkspaceStats s;
    for (const Buffer& b : buffers_) {
      s.retained_bytes += b.size;
      if (b.leased) s.leased_bytes += b.size;
    }
    s.buffers = buffers_.size();
    s.maps = maps_;
    s.unmaps = unmaps_;
    return s;
  }

  WorkspacePolicy Policy() {
    std::lock_guard<std::mutex> lock(mu_);
    return policy_;
  }

  void SetPolicy(const WorkspacePolicy& policy) {
    std::lock_guard<std::mutex> lock(mu_);
    policy_ = policy;
  }

 private:
  static constexpr size_t kPage = 4096;

  struct Buffer {
    void* data;
    size_t size;
    bool leased;
    bool needed;                    // the current lease asked for more than half of it
    Clock::time_point last_needed;  // when a lease that needed it was returned
  };

  Buffer* MapLocked(size_t size) {
    // Free buffers too small for this call would only be replaced by it later.
    Unmap([size](const Buffer& b) { return !b.leased && b.size < size; });
    void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) throw std::bad_alloc();
    ++maps_;
    buffers_.push_back(Buffer{data, size, false, false, Clock::now()});
    return &buffers_.back();
  }

  void TrimLocked(Clock::time_point now, Clock::duration idle) {
    size_t retain = policy_.retain_bytes;
    Unmap([&](const Buffer& b) {
      return !b.leased && b.size > retain && now - b.last_needed >= idle;
    });
  }

  template <typename Pred>
  void Unmap(Pred unused) {
    auto keep = std::partition(buffers_.begin(), buffers_.end(),
                               [&](const Buffer& b) { return !unused(b); });
    for (auto it = keep; it != buffers_.end(); ++it) {
      munmap(it->data, it->size);
      ++unmaps_;
    }
    buffers_.erase(keep, buffers_.end());
  }

  std::mutex mu_;
  std::vector<Buffer> buffers_;
  WorkspacePolicy policy_;
  int64_t maps_ = 0;
  int64_t unmaps_ = 0;
};

// One call's workspace: leased on construction (nothing for 0 bytes), returned on
// destruction. Throws std::bad_alloc when the memory cannot be mapped.
class WorkspaceLease {
 public:
  explicit WorkspaceLease(size_t bytes)
      : data_(bytes == 0 ? nullptr : WorkspacePool::Instance().Acquire(bytes)) {}
  ~WorkspaceLease() {
    if (data_ != nullptr) WorkspacePool::Instance().Release(data_);
  }
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  void* data() const { return data_; }

 private:
  void* data_;
};

}  // namespace alt_jax

#endif  // ALT_JAX_CORE_WORKSPACE_H_
