// The one XLA FFI handler of alt_jax ("alt_jax_kernel"): decodes buffers and the kernel's
// (lib, sym) attributes, and calls the generated kernel with XLA's intra-op thread pool.
// Entry point: AltJaxKernel (an XLA_FFI_Handler), registered from alt_jax/runtime.py.
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "alt_jax/kernel_abi.h"
#include "ffi_buffers.h"
#include "kernel_registry.h"
#include "parallel.h"
#include "workspace.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace ffi = xla::ffi;

namespace alt_jax {
namespace {

constexpr int kMaxBuffers = 32;

// ---- Opt-in dispatch trace (ALT_JAX_TRACE_DISPATCH=1), read by DispatchTraceJson() and
// benchmarks/process_spread.py: per kernel symbol, calls and seconds in the kernel, and at
// its first call what can make one process slower than another: each buffer's address mod
// 4096, the calling thread's CPU and MXCSR, and the CPUs and MXCSRs of XLA's pool threads.
// Off, it costs one branch on a static bool.

uint32_t ThreadMxcsr() {
#if defined(__x86_64__) || defined(__i386__)
  return _mm_getcsr();
#else
  return 0;
#endif
}

bool TraceEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("ALT_JAX_TRACE_DISPATCH");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return enabled;
}

struct KernelTrace {
  int64_t calls = 0;
  double seconds = 0;
  std::string first_call;  // a JSON object
};

std::mutex& TraceMutex() {
  static auto* mu = new std::mutex;
  return *mu;
}

std::map<std::string, KernelTrace>& Traces() {
  static auto* traces = new std::map<std::string, KernelTrace>;
  return *traces;
}

// Runs one probe task per pool thread and reports "cpu:mxcsr" of those that ran within
// 50 ms (a busy pool may run them late; they then write into the shared, still-alive state).
std::string ProbePool(ffi::ThreadPool& pool, int64_t threads) {
  struct Probe {
    std::mutex mu;
    std::vector<std::string> seen;
    std::atomic<int> started{0};
  };
  auto probe = std::make_shared<Probe>();
  for (int64_t i = 0; i < threads; ++i) {
    pool.Schedule([probe] {
      probe->started.fetch_add(1);
      std::ostringstream o;
      o << "\"" << sched_getcpu() << ":0x" << std::hex << ThreadMxcsr() << "\"";
      std::lock_guard<std::mutex> lock(probe->mu);
      probe->seen.push_back(o.str());
      // Hold the thread briefly so the other probes land on other threads.
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::lock_guard<std::mutex> lock(probe->mu);
  std::string out = "[";
  for (size_t i = 0; i < probe->seen.size(); ++i) out += (i ? "," : "") + probe->seen[i];
  return out + "]";
}

std::string Offsets(const void* const* ptrs, size_t n) {
  std::string out = "[";
  for (size_t i = 0; i < n; ++i) {
    out += (i ? "," : "") + std::to_string(reinterpret_cast<uintptr_t>(ptrs[i]) % 4096);
  }
  return out + "]";
}

std::string FirstCallJson(ffi::ThreadPool& pool, int64_t threads, const void* const* inputs,
                          size_t num_inputs, void* const* outputs, size_t num_outputs,
                          bool has_workspace) {
  std::ostringstream o;
  o << "{\"cpu\":" << sched_getcpu() << ",\"mxcsr\":\"0x" << std::hex << ThreadMxcsr()
    << std::dec << "\",\"in_mod4096\":" << Offsets(inputs, num_inputs)
    << ",\"out_mod4096\":" << Offsets(outputs, num_outputs - (has_workspace ? 1 : 0))
    << ",\"workspace_mod4096\":"
    << (has_workspace
            ? std::to_string(reinterpret_cast<uintptr_t>(outputs[num_outputs - 1]) % 4096)
            : std::string("null"))
    << ",\"pool\":" << ProbePool(pool, threads) << "}";
  return o.str();
}

void RecordCall(std::string_view sym, double seconds, std::string first_call) {
  std::lock_guard<std::mutex> lock(TraceMutex());
  KernelTrace& t = Traces()[std::string(sym)];
  if (t.calls++ == 0) t.first_call = std::move(first_call);
  t.seconds += seconds;
}

bool FirstCallOf(std::string_view sym) {
  std::lock_guard<std::mutex> lock(TraceMutex());
  auto it = Traces().find(std::string(sym));
  return it == Traces().end() || it->second.calls == 0;
}

void XlaPoolParallelFor(const alt_runtime* rt, int64_t n, int64_t grain, alt_task_fn fn,
                        void* arg) {
  auto* pool = static_cast<ffi::ThreadPool*>(rt->impl);
  ParallelFor(rt->num_threads, n, grain, fn, arg,
              [pool](auto&& task) { pool->Schedule(std::move(task)); });
}

ffi::Error Dispatch(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                    std::string_view lib, std::string_view sym, int64_t workspace_bytes) {
  std::string error;
  alt_kernel_fn kernel = KernelRegistry::Instance().Get(lib, sym, &error);
  if (kernel == nullptr) return ffi::Error(ffi::ErrorCode::kNotFound, error);
  const void* inputs[kMaxBuffers];
  void* outputs[kMaxBuffers];
  // one output slot past the results for the workspace
  if (ffi::Error e = CollectBuffers(args, rets, kMaxBuffers, 1, inputs, outputs); e.failure()) {
    return e;
  }
  std::optional<WorkspaceLease> workspace;  // returned to the pool when the call ends
  if (workspace_bytes > 0) {
    try {
      workspace.emplace(static_cast<size_t>(workspace_bytes));
    } catch (const std::bad_alloc&) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "alt_jax: cannot allocate a kernel workspace of " +
                            std::to_string(workspace_bytes) + " bytes");
    }
    outputs[rets.size()] = workspace->data();
  }
  alt_runtime rt;
  rt.impl = &pool;
  int64_t threads = pool.num_threads();
  rt.num_threads = static_cast<int32_t>(threads > 0 ? threads : 1);
  rt.parallel_for = &XlaPoolParallelFor;
  int32_t status;
  if (!TraceEnabled()) {
    status = kernel(&rt, inputs, outputs);
  } else {
    size_t num_outputs = rets.size() + (workspace_bytes > 0 ? 1 : 0);
    std::string first = FirstCallOf(sym) ? FirstCallJson(pool, rt.num_threads, inputs,
                                                         args.size(), outputs, num_outputs,
                                                         workspace_bytes > 0)
                                         : std::string();
    auto t0 = std::chrono::steady_clock::now();
    status = kernel(&rt, inputs, outputs);
    auto t1 = std::chrono::steady_clock::now();
    RecordCall(sym, std::chrono::duration<double>(t1 - t0).count(), std::move(first));
  }
  if (status != 0) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "alt_jax: kernel " + std::string(sym) + " returned status " +
                          std::to_string(status));
  }
  return ffi::Error::Success();
}

}  // namespace

// The dispatch trace as a JSON object {symbol: {calls, seconds, first_call}}; empty unless
// ALT_JAX_TRACE_DISPATCH is set.
std::string DispatchTraceJson() {
  std::lock_guard<std::mutex> lock(TraceMutex());
  std::ostringstream o;
  o << "{";
  bool comma = false;
  for (const auto& [sym, t] : Traces()) {
    o << (comma ? "," : "") << "\"" << sym << "\":{\"calls\":" << t.calls
      << ",\"seconds\":" << t.seconds << ",\"first_call\":"
      << (t.first_call.empty() ? "null" : t.first_call) << "}";
    comma = true;
  }
  o << "}";
  return o.str();
}

uint32_t CallingThreadMxcsr() { return ThreadMxcsr(); }

}  // namespace alt_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(AltJaxKernel, alt_jax::Dispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::string_view>("lib")
                                  .Attr<std::string_view>("sym")
                                  .Attr<int64_t>("workspace_bytes"));
