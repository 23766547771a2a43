// The XLA FFI handler for CUDA kernels (target "alt_jax_cuda_kernel", platform "CUDA"):
// looks up the nvcc-built library and its SYMBOL_launch (alt_jax/cuda_build.py, verified and
// loaded by the same registry as CPU kernels) and launches it on XLA's stream. Built only
// where nvcc was found (CMakeLists.txt: ALT_JAX_WITH_CUDA). No CUDA header is needed: the
// stream is passed through as a pointer, and the launcher (compiled by nvcc) does the rest.
// A kernel's workspace (split-K partials) is an extra result XLA allocates on the device.
// Entry point: the handler symbol AltJaxCudaKernel.
#include <string>
#include <string_view>

#include "ffi_buffers.h"
#include "kernel_registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace alt_jax {
namespace {

constexpr size_t kMaxBuffers = 64;
typedef int32_t (*alt_cuda_launch_fn)(void* stream, const void* const* inputs,
                                      void* const* outputs);

ffi::Error DispatchCuda(void* stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                        std::string_view lib, std::string_view sym) {
  std::string error;
  const std::string launch_sym = std::string(sym) + "_launch";
  alt_kernel_fn fn = KernelRegistry::Instance().Get(lib, launch_sym, &error);
  if (fn == nullptr) return ffi::Error(ffi::ErrorCode::kNotFound, error);
  auto launch = reinterpret_cast<alt_cuda_launch_fn>(reinterpret_cast<void*>(fn));
  const void* inputs[kMaxBuffers];
  void* outputs[kMaxBuffers];  // the results, a workspace among them (an XLA buffer here)
  if (ffi::Error e = CollectBuffers(args, rets, kMaxBuffers, 0, inputs, outputs); e.failure()) {
    return e;
  }
  const int32_t status = launch(stream, inputs, outputs);
  if (status != 0) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "alt_jax: CUDA kernel " + std::string(sym) + " failed to launch: " +
                          "cudaError " + std::to_string(status));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace alt_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(AltJaxCudaKernel, alt_jax::DispatchCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::string_view>("lib")
                                  .Attr<std::string_view>("sym"));
