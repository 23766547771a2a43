// The one XLA FFI handler of alt_jax ("alt_jax_kernel"): decodes buffers and the kernel's
// (lib, sym) attributes, and calls the generated kernel with XLA's intra-op thread pool.
// Entry point: AltJaxKernel (an XLA_FFI_Handler), registered from alt_jax/runtime.py.
#include <string>
#include <string_view>

#include "alt_jax/kernel_abi.h"
#include "kernel_registry.h"
#include "parallel.h"
#include "workspace.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace alt_jax {
namespace {

constexpr int kMaxBuffers = 32;

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
  if (args.size() > kMaxBuffers || rets.size() + 1 > kMaxBuffers) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "alt_jax: too many buffers");
  }
  const void* inputs[kMaxBuffers];
  void* outputs[kMaxBuffers];
  for (size_t i = 0; i < args.size(); ++i) {
    auto buf = args.get<ffi::AnyBuffer>(i);
    if (!buf.has_value()) return buf.error();
    inputs[i] = buf->untyped_data();
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto buf = rets.get<ffi::AnyBuffer>(i);
    if (!buf.has_value()) return buf.error();
    outputs[i] = (*buf)->untyped_data();
  }
  if (workspace_bytes > 0) {
    try {
      outputs[rets.size()] = ThreadWorkspace(static_cast<size_t>(workspace_bytes));
    } catch (const std::bad_alloc&) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "alt_jax: cannot allocate a kernel workspace of " +
                            std::to_string(workspace_bytes) + " bytes");
    }
  }
  alt_runtime rt;
  rt.impl = &pool;
  int64_t threads = pool.num_threads();
  rt.num_threads = static_cast<int32_t>(threads > 0 ? threads : 1);
  rt.parallel_for = &XlaPoolParallelFor;
  int32_t status = kernel(&rt, inputs, outputs);
  if (status != 0) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "alt_jax: kernel " + std::string(sym) + " returned status " +
                          std::to_string(status));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace alt_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(AltJaxKernel, alt_jax::Dispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::string_view>("lib")
                                  .Attr<std::string_view>("sym")
                                  .Attr<int64_t>("workspace_bytes"));
