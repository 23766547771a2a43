// Loaded kernels by (library path, symbol): verified and dlopen'd once per process, looked
// up on every call. Entry points: KernelRegistry::Get, KernelRegistry::Instance.
//
// What is loaded (checked here, not only in Python, because the FFI handler loads lazily by
// path: an executable restored from jax's persistent compilation cache reaches Get without
// alt_jax/runtime.py having looked at the file):
//   - the library's directory and that directory's parent (the cache root) are owned by
//     this user and private (no group/other bits);
//   - the library and its digest file `<lib>.sha256` are regular files (not symlinks),
//     owned by this user, not writable by group or others;
//   - the SHA-256 of the library's bytes equals the digest recorded at build time.
// The checks run on file descriptors (openat relative to the checked directory, O_NOFOLLOW,
// fstat), the digest is computed by reading that descriptor, and the library is dlopen'd as
// /proc/self/fd/N: the inode hashed is the inode mapped, with no window for a path swap.
//
// Libraries are never dlclose'd. An XLA executable compiled in this process holds the
// kernel's function pointer resolved by this registry and may call it at any time (jax caches
// executables for the life of the process, and a persistent-cache executable can be
// re-created later); nothing tells us when the last one referencing a kernel is gone, so
// closing would turn such a call into a jump into unmapped memory. The cost is bounded by the
// number of distinct kernels this process loads: one mapping of each library (its file size,
// ~50-300 KB, plus a few pages) and one registry entry. The on-disk cache bound
// (ALT_JAX_CACHE_MAX_MB) does not bound it; a process that must load an unbounded number of
// kernels should load them in worker processes (as tuning measurement does).
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
  // The kernel, verifying and loading its library on first use (so executables restored from
  // a persistent compilation cache work in a fresh process). On failure returns nullptr and
  // fills *error with the path, what is wrong, and what to do.
  alt_kernel_fn Get(std::string_view lib, std::string_view symbol, std::string* error);

 private:
  // dlopen's the verified library open as `fd`; see the .cc for why names are never reused.
  void* OpenVerified(int fd, const std::string& lib_path, std::string* error);

  std::mutex mu_;
  std::unordered_map<std::string, alt_kernel_fn> kernels_;
  int next_fd_name_ = 0;  // /proc/self/fd/N names below this were already given to dlopen
};

}  // namespace alt_jax

#endif  // ALT_JAX_CORE_KERNEL_REGISTRY_H_
