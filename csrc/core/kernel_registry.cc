#include "kernel_registry.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace alt_jax {
namespace {

constexpr off_t kMaxLibraryBytes = off_t{1} << 30;  // a sanity cap; kernels are ~50-300 KB
constexpr const char* kWhatToDo =
    "; alt_jax rebuilds a rejected cached kernel (or delete the file, or set "
    "ALT_JAX_CACHE_DIR to a directory only you can write)";

// ---- SHA-256 (FIPS 180-4), small and dependency-free: the digest alt_jax/runtime.py records
// with hashlib at build time.
class Sha256 {
 public:
  void Update(const unsigned char* data, size_t n) {
    bytes_ += n;
    while (n > 0) {
      size_t take = std::min(n, sizeof(block_) - fill_);
      std::memcpy(block_ + fill_, data, take);
      fill_ += take;
      data += take;
      n -= take;
      if (fill_ == sizeof(block_)) {
        Compress();
        fill_ = 0;
      }
    }
  }

  std::string HexDigest() {
    uint64_t bits = bytes_ * 8;
    unsigned char pad = 0x80;
    Update(&pad, 1);
    unsigned char zero = 0;
    while (fill_ != 56) Update(&zero, 1);
    for (int i = 7; i >= 0; --i) {
      unsigned char b = static_cast<unsigned char>(bits >> (8 * i));
      Update(&b, 1);
    }
    std::string hex;
    char buf[9];
    for (uint32_t word : h_) {
      std::snprintf(buf, sizeof(buf), "%08x", word);
      hex += buf;
    }
    return hex;
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void Compress() {
    static constexpr uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = uint32_t(block_[4 * i]) << 24 | uint32_t(block_[4 * i + 1]) << 16 |
             uint32_t(block_[4 * i + 2]) << 8 | uint32_t(block_[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6],
             h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] +
                    w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    uint32_t out[8] = {a, b, c, d, e, f, g, h};
    for (int i = 0; i < 8; ++i) h_[i] += out[i];
  }

  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char block_[64];
  size_t fill_ = 0;
  uint64_t bytes_ = 0;
};

// Closes the descriptor it owns on every return path.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

std::string Errno() { return std::strerror(errno); }

std::string Octal(mode_t mode) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "%03o", unsigned(mode & 0777));
  return buf;
}

// A directory of the private chain: ours and closed to group and others.
bool CheckPrivateDir(int fd, const std::string& what, std::string* why) {
  struct stat st;
  if (fstat(fd, &st) != 0) return *why = "cannot stat " + what + ": " + Errno(), false;
  if (st.st_uid != geteuid()) {
    return *why = what + " is owned by uid " + std::to_string(st.st_uid) + ", not by this user",
           false;
  }
  if ((st.st_mode & 077) != 0) {
    return *why = what + " is not private (mode " + Octal(st.st_mode) + ", expected 700)",
           false;
  }
  return true;
}

// A file we will trust: a regular file of ours that nobody else can write.
bool CheckOwnFile(int fd, const std::string& what, struct stat* st, std::string* why) {
  if (fstat(fd, st) != 0) return *why = "cannot stat " + what + ": " + Errno(), false;
  if (!S_ISREG(st->st_mode)) return *why = what + " is not a regular file", false;
  if (st->st_uid != geteuid()) {
    return *why = what + " is owned by uid " + std::to_string(st->st_uid) + ", not by this user",
           false;
  }
  if ((st->st_mode & 022) != 0) {
    return *why = what + " is writable by group or others (mode " + Octal(st->st_mode) + ")",
           false;
  }
  return true;
}

// O_NOFOLLOW: a symlink is rejected (ELOOP); O_NONBLOCK: a planted FIFO cannot hang us.
int OpenEntry(int dir_fd, const std::string& name) {
  return openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
}

bool ReadRecordedDigest(int dir_fd, const std::string& name, std::string* hex, std::string* why) {
  Fd fd(OpenEntry(dir_fd, name));
  if (fd.get() < 0) return *why = "digest file " + name + " cannot be opened: " + Errno(), false;
  struct stat st;
  if (!CheckOwnFile(fd.get(), "digest file " + name, &st, why)) return false;
  char buf[80];
  ssize_t n = pread(fd.get(), buf, sizeof(buf), 0);
  if (n < 64) return *why = "digest file " + name + " is truncated", false;
  hex->assign(buf, 64);
  return true;
}

bool HashFile(int fd, off_t size, std::string* hex, std::string* why) {
  Sha256 sha;
  std::vector<unsigned char> buf(1 << 16);
  off_t done = 0;
  while (done < size) {
    ssize_t n = pread(fd, buf.data(), buf.size(), done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return *why = "reading it failed: " + (n < 0 ? Errno() : "short file"), false;
    sha.Update(buf.data(), size_t(n));
    done += n;
  }
  *hex = sha.HexDigest();
  return true;
}

// Opens lib through its directory and checks everything listed in the header. Returns the
// library's descriptor (the caller closes it) or -1 with *why set.
int OpenTrustedLibrary(const std::string& lib_path, std::string* why) {
  size_t slash = lib_path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : lib_path.substr(0, slash + 1);
  std::string base = slash == std::string::npos ? lib_path : lib_path.substr(slash + 1);
  Fd dir_fd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() < 0) return *why = "its directory cannot be opened: " + Errno(), -1;
  if (!CheckPrivateDir(dir_fd.get(), "its directory", why)) return -1;
  Fd root_fd(openat(dir_fd.get(), "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (root_fd.get() < 0) return *why = "the cache directory cannot be opened: " + Errno(), -1;
  if (!CheckPrivateDir(root_fd.get(), "the cache directory", why)) return -1;

  int fd = OpenEntry(dir_fd.get(), base);
  if (fd < 0) return *why = "it cannot be opened: " + Errno(), -1;
  Fd lib_fd(fd);
  struct stat st;
  if (!CheckOwnFile(fd, "it", &st, why)) return -1;
  if (st.st_size == 0 || st.st_size > kMaxLibraryBytes) {
    return *why = "it has implausible size " + std::to_string(st.st_size), -1;
  }
  // The library is opened before its digest: runtime.py renames the digest into place first,
  // so a library seen here is never newer than the digest read next.
  std::string recorded, actual;
  if (!ReadRecordedDigest(dir_fd.get(), base + ".sha256", &recorded, why)) return -1;
  if (!HashFile(fd, st.st_size, &actual, why)) return -1;
  if (actual != recorded) {
    return *why = "its SHA-256 " + actual.substr(0, 16) + "... does not match the digest " +
                  recorded.substr(0, 16) + "... recorded when it was built (truncated or "
                  "modified)",
           -1;
  }
  return lib_fd.release();
}

bool ProcFdAvailable() {
  static const bool available = access("/proc/self/fd", X_OK) == 0;
  return available;
}

}  // namespace

KernelRegistry& KernelRegistry::Instance() {
  static KernelRegistry* registry = new KernelRegistry();  // never destroyed: kernels may
  return *registry;                                          // run during interpreter exit
}

// glibc's dlopen returns an already-loaded object whose recorded name equals the requested
// one without opening the file, so a /proc/self/fd/N name must never be reused for a
// different library: each load gets a descriptor number above every one used before
// (F_DUPFD_CLOEXEC from a watermark). Once the numbers allowed by RLIMIT_NOFILE are used up,
// or without /proc, the verified path itself is loaded: still sound against other users,
// because the checks above guarantee that only this user or root can change the directory's
// entries between the check and the dlopen, and both can already run code in this process.
void* KernelRegistry::OpenVerified(int fd, const std::string& lib_path, std::string* error) {
  std::string name = lib_path;
  int named_fd = ProcFdAvailable() ? fcntl(fd, F_DUPFD_CLOEXEC, next_fd_name_) : -1;
  if (named_fd >= 0) {
    next_fd_name_ = named_fd + 1;
    name = "/proc/self/fd/" + std::to_string(named_fd);
  }
  void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (named_fd >= 0) close(named_fd);
  if (handle == nullptr) {
    const char* why = dlerror();
    *error = "alt_jax: cannot load kernel library " + lib_path + ": " + (why ? why : "?") +
             kWhatToDo;
  }
  return handle;
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
  std::string lib_path(lib), sym(symbol), why;
  int fd = OpenTrustedLibrary(lib_path, &why);
  if (fd < 0) {
    *error = "alt_jax: kernel library " + lib_path + " rejected: " + why + kWhatToDo;
    return nullptr;
  }
  void* handle = OpenVerified(fd, lib_path, error);
  close(fd);
  if (handle == nullptr) return nullptr;
  void* fn = dlsym(handle, sym.c_str());
  if (fn == nullptr) {
    *error = "alt_jax: kernel library " + lib_path + " has no symbol " + sym + kWhatToDo;
    return nullptr;
  }
  auto kernel = reinterpret_cast<alt_kernel_fn>(fn);
  kernels_.emplace(std::move(key), kernel);
  return kernel;
}

}  // namespace alt_jax
