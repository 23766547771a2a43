// Fused epilogues for generated kernels: activations on vectors of W floats, applied to an
// output tile while it is still in registers. Entry points: alt_activate<W, ACT>(v),
// ALT_ACT_* codes (same order as alt_jax/ops/epilogue.py ACTIVATIONS).
// exp/tanh/erf are polynomial approximations accurate to a few 1e-7 absolute, vectorised
// with GCC vector extensions (W = 1 falls back to <cmath>). At the edges every activation
// gives what XLA gives for the unfused jnp program: NaN in -> NaN out, exp overflows to inf
// (so silu(-inf) = -inf * 0 = NaN, silu(-huge) = -0), relu(-0) = +0.
#ifndef ALT_JAX_EPILOGUE_H_
#define ALT_JAX_EPILOGUE_H_

#include <math.h>
#include <stdint.h>

#include "alt_jax/activation_codes.h"
#include "alt_jax/simd.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

template <int W>
struct alt_vi {
  typedef int32_t type __attribute__((vector_size(4 * W)));
};

template <int W>
ALT_INLINE typename altv<W>::type alt_vmax(typename altv<W>::type a, typename altv<W>::type b) {
  return (a != a) | (a > b) ? a : b;
}
template <int W>
ALT_INLINE typename altv<W>::type alt_vmin(typename altv<W>::type a, typename altv<W>::type b) {
  return (a != a) | (a < b) ? a : b;
}
// alt_vmax(x, c) / alt_vmin(x, c) with x the data and c a constant: a NaN in x comes out as
// NaN, as jnp.maximum / jnp.minimum give it (a plain x > c ? x : c would turn it into c).
// On AVX one vmaxps / vminps: it returns its second operand when either is NaN.
#if defined(__AVX__)
template <>
ALT_INLINE altv<8>::type alt_vmax<8>(altv<8>::type a, altv<8>::type b) {
  return (altv<8>::type)_mm256_max_ps((__m256)b, (__m256)a);
}
template <>
ALT_INLINE altv<8>::type alt_vmin<8>(altv<8>::type a, altv<8>::type b) {
  return (altv<8>::type)_mm256_min_ps((__m256)b, (__m256)a);
}
#endif
#if defined(__AVX512F__)
template <>
ALT_INLINE altv<16>::type alt_vmax<16>(altv<16>::type a, altv<16>::type b) {
  return (altv<16>::type)_mm512_max_ps((__m512)b, (__m512)a);
}
template <>
ALT_INLINE altv<16>::type alt_vmin<16>(altv<16>::type a, altv<16>::type b) {
  return (altv<16>::type)_mm512_min_ps((__m512)b, (__m512)a);
}
#endif
template <>
ALT_INLINE float alt_vmax<1>(float a, float b) { return a != a || a > b ? a : b; }
template <>
ALT_INLINE float alt_vmin<1>(float a, float b) { return a != a || a < b ? a : b; }

// e^x: x = n ln2 + r, |r| <= ln2/2; e^r by a degree-6 polynomial; 2^n built in the exponent.
// x is clamped to [ln FLT_MIN, 89], so n <= 128, and n = 128 builds the bit pattern of +inf:
// from x = 127.5 ln2 (88.38; IEEE overflows at 88.72) e^x is inf, so silu(-inf) =
// -inf / inf = NaN and silu(-huge) = -0 as XLA gives them (an activation moves by < 1e-36
// for that early overflow). Below ln FLT_MIN e^x stays FLT_MIN, which every activation
// absorbs (1 + e^x rounds to 1) without denormal slow paths. NaN stays NaN. No select on x
// at the end: keeping x live spills the unrolled epilogue tiles (a 1x1 conv + silu: 2.3x).
#define ALT_EXP_LO -87.33654022216797f  // ln FLT_MIN, rounded up to a float
#define ALT_EXP_HI 89.0f                // n = round(89 / ln2) = 128: +inf
template <int W>
ALT_INLINE typename altv<W>::type alt_vexp(typename altv<W>::type x) {
  typedef typename altv<W>::type V;
  typedef typename alt_vi<W>::type I;
  x = alt_vmin<W>(alt_vmax<W>(x, vbroadcast<W>(ALT_EXP_LO)), vbroadcast<W>(ALT_EXP_HI));
  V fn = x * 1.44269504088896341f;
  I n = __builtin_convertvector(fn + (fn >= 0 ? vbroadcast<W>(0.5f) : vbroadcast<W>(-0.5f)), I);
  V nf = __builtin_convertvector(n, V);
  V r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  V p = vbroadcast<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I bits = (n + 127) << 23;
  V scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
template <>
ALT_INLINE float alt_vexp<1>(float x) { return expf(x); }

// tanh x = x P(x^2) / Q(x^2) on [-9, 9], P of degree 5 and Q of degree 3 with P(0) = Q(0)
// = 1 (so tanh x = x to rounding near 0, and -0 stays -0). The coefficients are our own
// weighted least-squares fit (Lawson iterations towards minimax): 6.2e-8 from tanh in exact
// arithmetic, 3.7e-7 evaluated in float32, against 1 - 2 / (e^2x + 1)'s exp and divide
// (bias + gelu_tanh epilogue of a 128x768x3072 GEMM: 1.48 ms vs 1.40 ms for bias alone).
// |x| >= 9 gives exactly +-1 (float32 tanh rounds to +-1 from 9.02), NaN stays NaN, and
// the result is clamped to [-1, 1].
template <int W>
ALT_INLINE typename altv<W>::type alt_vtanh(typename altv<W>::type x) {
  typedef typename altv<W>::type V;
  x = alt_vmin<W>(alt_vmax<W>(x, vbroadcast<W>(-9.0f)), vbroadcast<W>(9.0f));
  const V z = x * x;
  V p = vbroadcast<W>(1.817126137e-11f);
  p = p * z + -1.274976213e-08f;
  p = p * z + 9.258013961e-06f;
  p = p * z + 2.919810126e-03f;
  p = p * z + 1.291838288e-01f;
  p = p * z + 1.0f;
  V q = vbroadcast<W>(2.279636537e-04f);
  q = q * z + 2.375937998e-02f;
  q = q * z + 4.625167251e-01f;
  q = q * z + 1.0f;
  V y = alt_vmin<W>(alt_vmax<W>(x * p / q, vbroadcast<W>(-1.0f)), vbroadcast<W>(1.0f));
  // exactly +-1 from the clamp on, as the exp form gave: gelu(-44) = 0.5 x (1 + tanh) is -0
  // only if tanh is exactly -1 there (the fit is 6e-8 short of it at 9)
  y = x >= 9.0f ? vbroadcast<W>(1.0f) : y;
  return x <= -9.0f ? vbroadcast<W>(-1.0f) : y;
}
template <>
ALT_INLINE float alt_vtanh<1>(float x) { return tanhf(x); }

template <int W>
ALT_INLINE typename altv<W>::type alt_verf(typename altv<W>::type x) {
  // Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), odd extension.
  typedef typename altv<W>::type V;
  V ax = x < 0 ? -x : x;
  V t = 1.0f / (1.0f + 0.3275911f * ax);
  V poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
            0.254829592f) * t;
  V y = 1.0f - poly * alt_vexp<W>(-ax * ax);
  return x < 0 ? -y : y;
}
template <>
ALT_INLINE float alt_verf<1>(float x) { return erff(x); }

template <int W, int ACT>
ALT_INLINE typename altv<W>::type alt_activate(typename altv<W>::type v) {
  typedef typename altv<W>::type V;
  if constexpr (ACT == ALT_ACT_NONE) {
    return v;
  } else if constexpr (ACT == ALT_ACT_RELU) {
    // + 0: -0 becomes +0 as XLA's max(-0, 0) gives it (vmaxps returns -0 there); NaN and
    // every other value pass unchanged. Without -ffast-math the add is kept.
    return alt_vmax<W>(v, V{}) + 0.0f;
  } else if constexpr (ACT == ALT_ACT_RELU6) {
    return alt_vmin<W>(alt_vmax<W>(v, V{}) + 0.0f, vbroadcast<W>(6.0f));
  } else if constexpr (ACT == ALT_ACT_GELU_TANH) {
    V inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + alt_vtanh<W>(inner));
  } else if constexpr (ACT == ALT_ACT_GELU_ERF) {
    return 0.5f * v * (1.0f + alt_verf<W>(v * 0.7071067811865476f));
  } else {
    static_assert(ACT == ALT_ACT_SILU, "unknown activation code");
    return v / (1.0f + alt_vexp<W>(-v));
  }
}

#endif  // ALT_JAX_EPILOGUE_H_
