// The buffers of an XLA FFI call as the kernel ABI takes them: operand and result data
// pointers in order. Shared by the CPU and CUDA handlers. Entry point: CollectBuffers.
#ifndef ALT_JAX_CORE_FFI_BUFFERS_H_
#define ALT_JAX_CORE_FFI_BUFFERS_H_

#include <cstddef>

#include "xla/ffi/api/ffi.h"

namespace alt_jax {

// inputs[i] / outputs[i] <- the data of operand / result i; an error when a buffer cannot be
// decoded or there are more than max_buffers of either (the caller's arrays hold that many;
// `spare_outputs` slots are kept free after the results, e.g. for a workspace).
inline xla::ffi::Error CollectBuffers(xla::ffi::RemainingArgs args, xla::ffi::RemainingRets rets,
                                      size_t max_buffers, size_t spare_outputs,
                                      const void** inputs, void** outputs) {
  namespace ffi = xla::ffi;
  if (args.size() > max_buffers || rets.size() + spare_outputs > max_buffers) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "alt_jax: too many buffers");
  }
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
  return ffi::Error::Success();
}

}  // namespace alt_jax

#endif  // ALT_JAX_CORE_FFI_BUFFERS_H_
