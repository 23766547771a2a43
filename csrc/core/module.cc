// The pybind11 module alt_jax._core: the FFI handler capsule, kernel loading, and running
// or timing a kernel on host buffers outside XLA (tests and tuning).
// Entry points: ffi_handler(), load(lib, sym), run(...), time(...), abi_version().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "alt_jax/kernel_abi.h"
#include "kernel_registry.h"
#include "parallel.h"
#include "thread_pool.h"
#include "workspace.h"
#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

extern "C" XLA_FFI_Error* AltJaxKernel(XLA_FFI_CallFrame* call_frame);
#ifdef ALT_JAX_WITH_CUDA
extern "C" XLA_FFI_Error* AltJaxCudaKernel(XLA_FFI_CallFrame* call_frame);  // ffi_cuda.cc
#endif

namespace alt_jax {

double MeasureFmaPeak(int num_threads, double seconds);
std::string DispatchTraceJson();  // ffi_handler.cc
uint32_t CallingThreadMxcsr();    // ffi_handler.cc

ThreadPool* ThreadPool::ForThreads(int num_threads) {
  static std::mutex mu;
  static auto* pools = new std::map<int, std::unique_ptr<ThreadPool>>();
  std::lock_guard<std::mutex> lock(mu);
  auto& pool = (*pools)[num_threads];
  if (!pool) pool = std::make_unique<ThreadPool>(std::max(0, num_threads - 1));
  return pool.get();
}

namespace {

void OwnPoolParallelFor(const alt_runtime* rt, int64_t n, int64_t grain, alt_task_fn fn,
                        void* arg) {
  auto* pool = static_cast<ThreadPool*>(rt->impl);
  ParallelFor(rt->num_threads, n, grain, fn, arg,
              [pool](auto&& task) { pool->Schedule(std::move(task)); });
}

alt_kernel_fn Lookup(const std::string& lib, const std::string& sym) {
  std::string error;
  alt_kernel_fn fn = KernelRegistry::Instance().Get(lib, sym, &error);
  if (fn == nullptr) throw std::runtime_error(error);
  return fn;
}

struct HostCall {
  std::vector<py::buffer_info> infos;  // keep the buffers alive and pinned
  std::vector<const void*> inputs;
  std::vector<void*> outputs;
  std::unique_ptr<WorkspaceLease> workspace;  // held for all the calls made with this
  alt_runtime rt{};
};

// The workspace is leased from the process's pool (workspace.h), as under XLA.
void Prepare(HostCall& call, const std::vector<py::buffer>& inputs,
             const std::vector<py::buffer>& outputs, int num_threads, int64_t workspace_bytes) {
  for (const auto& b : inputs) {
    call.infos.push_back(b.request());
    call.inputs.push_back(call.infos.back().ptr);
  }
  for (const auto& b : outputs) {
    call.infos.push_back(b.request(/*writable=*/true));
    call.outputs.push_back(call.infos.back().ptr);
  }
  if (workspace_bytes > 0) {
    call.workspace = std::make_unique<WorkspaceLease>(static_cast<size_t>(workspace_bytes));
    call.outputs.push_back(call.workspace->data());
  }
  num_threads = std::max(1, num_threads);
  call.rt.impl = ThreadPool::ForThreads(num_threads);
  call.rt.num_threads = num_threads;
  call.rt.parallel_for = &OwnPoolParallelFor;
}

// The caller works on the kernel too (parallel.h), so it takes XLA's float mode as well.
int32_t Invoke(alt_kernel_fn fn, const HostCall& call) {
  ScopedXlaFloatMode float_mode;
  return fn(&call.rt, call.inputs.data(), call.outputs.data());
}

}  // namespace
}  // namespace alt_jax

PYBIND11_MODULE(_core, m) {
  using namespace alt_jax;
  m.doc() = "alt_jax native core: FFI handler, kernel loading, host-side kernel runs";
  m.def("fma_peak", [](int num_threads, double seconds) {
    py::gil_scoped_release release;
    return MeasureFmaPeak(num_threads, seconds);
  }, py::arg("num_threads") = 2, py::arg("seconds") = 1.0,
     "Measured fp32 FMA GFLOP/s of num_threads threads (an FMA = 2 flops).");
  m.def("abi_version", [] { return ALT_JAX_ABI_VERSION; });
  m.def("dispatch_trace", [] { return DispatchTraceJson(); },
        "JSON {symbol: {calls, seconds, first_call}} of the FFI handler's kernel calls; "
        "recorded only when ALT_JAX_TRACE_DISPATCH=1 (benchmarks/process_spread.py).");
  m.def("workspace_stats", [] {
    WorkspaceStats s = WorkspacePool::Instance().Stats();
    py::dict d;
    d["retained_bytes"] = s.retained_bytes;
    d["leased_bytes"] = s.leased_bytes;
    d["buffers"] = s.buffers;
    d["maps"] = s.maps;
    d["unmaps"] = s.unmaps;
    return d;
  }, "The kernel workspace pool (csrc/core/workspace.h): bytes mapped (retained_bytes), "
     "lent to running calls (leased_bytes), buffer count, maps and unmaps since start.");
  m.def("workspace_trim", [](int64_t idle_ms) { WorkspacePool::Instance().Trim(idle_ms); },
        py::arg("idle_ms") = 0,
        "Unmaps free workspaces above the retained size that have been idle >= idle_ms "
        "(0: all of them now); kernel calls do this on their own with the policy's idle_ms.");
  m.def("workspace_policy", [](py::object retain_bytes, py::object idle_ms) {
    WorkspacePolicy p = WorkspacePool::Instance().Policy();
    if (!retain_bytes.is_none()) p.retain_bytes = retain_bytes.cast<size_t>();
    if (!idle_ms.is_none()) p.idle_ms = idle_ms.cast<int64_t>();
    WorkspacePool::Instance().SetPolicy(p);
    return py::make_tuple(p.retain_bytes, p.idle_ms);
  }, py::arg("retain_bytes") = py::none(), py::arg("idle_ms") = py::none(),
     "Sets what is given (retained size in bytes kept forever; idle ms after which a larger "
     "free workspace is unmapped) and returns the policy (retain_bytes, idle_ms).");
  m.def("mxcsr", [] { return CallingThreadMxcsr(); },
        "The calling thread's MXCSR (x86; 0 elsewhere): bit 15 FTZ, bit 6 DAZ.");
  m.def("ffi_handler", [] {
    return py::capsule(reinterpret_cast<void*>(&AltJaxKernel));
  }, "PyCapsule of the XLA FFI handler for target 'alt_jax_kernel'.");
#ifdef ALT_JAX_WITH_CUDA
  m.def("cuda_ffi_handler", [] {
    return py::capsule(reinterpret_cast<void*>(&AltJaxCudaKernel));
  }, "PyCapsule of the XLA FFI handler for target 'alt_jax_cuda_kernel' (platform CUDA).");
#endif
  m.def("load", [](const std::string& lib, const std::string& sym) {
    Lookup(lib, sym);
  }, py::arg("lib"), py::arg("sym"), "dlopen lib and resolve sym; raises on failure.");
  m.def("run", [](const std::string& lib, const std::string& sym,
                  const std::vector<py::buffer>& inputs, const std::vector<py::buffer>& outputs,
                  int64_t workspace_bytes, int num_threads) {
    alt_kernel_fn fn = Lookup(lib, sym);
    HostCall call;
    Prepare(call, inputs, outputs, num_threads, workspace_bytes);
    int32_t status;
    {
      py::gil_scoped_release release;
      status = Invoke(fn, call);
    }
    if (status != 0) throw std::runtime_error("alt_jax: kernel " + sym + " returned status " +
                                              std::to_string(status));
  }, py::arg("lib"), py::arg("sym"), py::arg("inputs"), py::arg("outputs"),
     py::arg("workspace_bytes") = 0, py::arg("num_threads") = 2);
  m.def("time", [](const std::string& lib, const std::string& sym,
                   const std::vector<py::buffer>& inputs, const std::vector<py::buffer>& outputs,
                   int64_t workspace_bytes, int num_threads, int number, int repeat,
                   const std::vector<std::vector<py::buffer>>& rotate) {
    alt_kernel_fn fn = Lookup(lib, sym);
    HostCall call;
    Prepare(call, inputs, outputs, num_threads, workspace_bytes);
    // Input sets the calls cycle through (the given inputs first): with enough copies of the
    // weights, every call reads them from memory, as a call inside a model does.
    std::vector<py::buffer_info> rotated_infos;
    std::vector<std::vector<const void*>> sets{call.inputs};
    for (const auto& set : rotate) {
      if (set.size() != inputs.size()) {
        throw std::invalid_argument("alt_jax.time: every rotated input set needs " +
                                    std::to_string(inputs.size()) + " arrays");
      }
      std::vector<const void*> ptrs;
      for (const auto& b : set) {
        rotated_infos.push_back(b.request());
        ptrs.push_back(rotated_infos.back().ptr);
      }
      sets.push_back(std::move(ptrs));
    }
    size_t next = 0;
    auto invoke_next = [&] {
      call.inputs = sets[next];
      next = (next + 1) % sets.size();
      return Invoke(fn, call);
    };
    std::vector<double> seconds;
    {
      py::gil_scoped_release release;
      if (invoke_next() != 0) number = 0;  // warm-up; failure reported below
      for (int r = 0; r < repeat && number > 0; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < number; ++i) invoke_next();
        auto t1 = std::chrono::steady_clock::now();
        seconds.push_back(std::chrono::duration<double>(t1 - t0).count() / number);
      }
    }
    if (number == 0) throw std::runtime_error("alt_jax: kernel " + sym + " failed");
    return seconds;
  }, py::arg("lib"), py::arg("sym"), py::arg("inputs"), py::arg("outputs"),
     py::arg("workspace_bytes") = 0, py::arg("num_threads") = 2, py::arg("number") = 10,
     py::arg("repeat") = 5, py::arg("rotate") = std::vector<std::vector<py::buffer>>{},
     "Seconds per call for each of `repeat` rounds of `number` calls (after one warm-up); "
     "the calls cycle through [inputs, *rotate].");
}
