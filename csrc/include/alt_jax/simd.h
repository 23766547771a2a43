// Portable short vectors for generated kernels: GCC/Clang vector extensions, so one source
// serves AVX-512 (16 floats), AVX2+FMA (8), SSE/NEON (4) and a scalar fallback (1).
// Entry points: altv<W>::type, vload/vstore/vbroadcast/vzero/vfma, ALT_NATIVE_FLOATS.
#ifndef ALT_JAX_SIMD_H_
#define ALT_JAX_SIMD_H_

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define ALT_NATIVE_FLOATS 16
#elif defined(__AVX2__) && defined(__FMA__)
#define ALT_NATIVE_FLOATS 8
#elif defined(__SSE2__) || defined(__ARM_NEON)
#define ALT_NATIVE_FLOATS 4
#else
#define ALT_NATIVE_FLOATS 1
#endif

#define ALT_INLINE inline __attribute__((always_inline))
#define ALT_RESTRICT __restrict__

template <int W>
struct altv {
  typedef float type __attribute__((vector_size(4 * W)));
};
template <>
struct altv<1> {
  typedef float type;
};

template <int W>
ALT_INLINE typename altv<W>::type vload(const float* p) {
  typename altv<W>::type v;
  memcpy(&v, p, sizeof(v));  // unaligned load; compiles to one vmovups
  return v;
}
template <int W>
ALT_INLINE void vstore(float* p, typename altv<W>::type v) {
  memcpy(p, &v, sizeof(v));
}
template <int W>
ALT_INLINE typename altv<W>::type vbroadcast(float x) {
  // x - 0 is exactly x for every x (0 + x is not, for x = -0), so the compiler folds the
  // subtraction away and emits a bare broadcast (vbroadcastss from memory when x is loaded).
  return x - typename altv<W>::type{};
}
template <int W>
ALT_INLINE typename altv<W>::type vzero() {
  return vbroadcast<W>(0.0f);
}
// a*b+c; with -mfma -ffp-contract=fast this is one vfmadd.
template <int W>
ALT_INLINE typename altv<W>::type vfma(typename altv<W>::type a, typename altv<W>::type b,
                                       typename altv<W>::type c) {
  return a * b + c;
}

#endif  // ALT_JAX_SIMD_H_
