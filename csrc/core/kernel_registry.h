// Loaded kernels by (library path, symbol): dlopen'd once per process, looked up on every
// call. Entry points: KernelRegistry::Get, KernelRegistry::Instance.
#ifndef ALT_JAX_CORE_KERNEL_REGISTRY_H_
#define ALT_JAX_CORE_KERNEL_REGISTRY_H_

#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "alt_jax/kernel_abi.h"

namespace alt_jax {

class KernelRegistry {
 public:
  static KernelRegistry& Instance();
  // The kernel, loading its library on first use (so executables restored from a
  // persistent compilation cache work in a fresh process). On failure returns nullptr and
  // fills *error.
  alt_kernel_fn Get(std::string_view lib, std::string_view symbol, std::string* error);

 private:
  std::mutex mu_;
  std::unordered_map<std::string, alt_kernel_fn> kernels_;
};

}  // namespace alt_jax

#endif  // ALT_JAX_CORE_KERNEL_REGISTRY_H_
