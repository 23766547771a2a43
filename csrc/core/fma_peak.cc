// fp32 FMA peak of this machine: independent FMA chains in registers, one chain set per
// thread. Entry point: alt_jax::MeasureFmaPeak (exposed as _core.fma_peak).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace alt_jax {
namespace {

constexpr int kChains = 12;  // > FMA latency (4) x ports (2): keeps both FMA pipes busy

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) double FmaLoopAvx2(long iters) {
  // Fully unrolled so the accumulators live in registers: a rolled loop over a stack array
  // makes every FMA wait for a store-to-load forward and measured half the peak.
  __m256 acc[kChains];
#pragma GCC unroll 16
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(1.0f + 0.001f * i);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0];
}

// AVX-512: 16 lanes a vector. The kernels are rendered for it where the CPU has it
// (device.detect_isa), so the peak they are measured against must be too: the AVX2 loop
// reads half of it (a 2-core Zen 5: 270 GFLOP/s, below what the models run at).
__attribute__((target("avx512f"))) double FmaLoopAvx512(long iters) {
  __m512 acc[kChains];
#pragma GCC unroll 16
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + 0.001f * i);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  float out[16];
  _mm512_storeu_ps(out, s);
  return out[0];
}
#endif

double FmaLoopScalar(long iters) {
  float acc[kChains];
#pragma GCC unroll 16
  for (int i = 0; i < kChains; ++i) acc[i] = 1.0f + 0.001f * i;
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * 0.999999f + 1e-7f;
  }
  float s = 0;
  for (int i = 0; i < kChains; ++i) s += acc[i];
  return s;
}

}  // namespace

// Returns GFLOP/s (an FMA counts 2 flops) of num_threads threads running for ~seconds.
double MeasureFmaPeak(int num_threads, double seconds) {
  bool avx2 = false, avx512 = false;
#if defined(__x86_64__)
  avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // the same test as device.detect_isa's AVX-512 (F + VL + DQ)
  avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
#endif
  const int lanes = avx512 ? 16 : avx2 ? 8 : 1;
  const long iters = 2000000;
  auto run = [&](long n) {
#if defined(__x86_64__)
    if (avx512) return FmaLoopAvx512(n);
    if (avx2) return FmaLoopAvx2(n);
#endif
    return FmaLoopScalar(n);
  };
  num_threads = std::max(1, num_threads);
  std::atomic<long> total_iters{0};
  std::atomic<double> sink{0};
  auto start = std::chrono::steady_clock::now();
  auto deadline = start + std::chrono::duration<double>(seconds);
  std::vector<std::thread> threads;
  for (int t = 0; t < num_threads; ++t) {
    threads.emplace_back([&] {
      double local = 0;
      while (std::chrono::steady_clock::now() < deadline) {
        local += run(iters);
        total_iters += iters;
      }
      sink = sink + local;
    });
  }
  for (auto& t : threads) t.join();
  double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double flops = double(total_iters.load()) * kChains * lanes * 2.0;
  return flops / elapsed / 1e9;
}

}  // namespace alt_jax
