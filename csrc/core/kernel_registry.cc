#include "kernel_registry.h"

#include <dlfcn.h>

namespace alt_jax {

KernelRegistry& KernelRegistry::Instance() {
  static KernelRegistry* registry = new KernelRegistry();  // never destroyed: kernels may
  return *registry;                                          // run during interpreter exit
}

alt_kernel_fn KernelRegistry::Get(std::string_view lib, std::string_view symbol,
                                  std::string* error) {
  std::string key;
  key.reserve(lib.size() + symbol.size() + 1);
  key.append(lib).push_back('\n');
  key.append(symbol);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = kernels_.find(key);
  if (it != kernels_.end()) return it->second;
  std::string lib_path(lib), sym(symbol);
  void* handle = dlopen(lib_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    *error = "alt_jax: cannot load kernel library " + lib_path + ": " + (why ? why : "?");
    return nullptr;
  }
  void* fn = dlsym(handle, sym.c_str());
  if (fn == nullptr) {
    *error = "alt_jax: kernel library " + lib_path + " has no symbol " + sym;
    return nullptr;
  }
  auto kernel = reinterpret_cast<alt_kernel_fn>(fn);
  kernels_.emplace(std::move(key), kernel);
  return kernel;
}

}  // namespace alt_jax
