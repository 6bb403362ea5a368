// Branch-free float32 log, exp and sin/cos that the compiler vectorizes inside `omp simd` loops
// (calls into libm would keep the Box-Muller loop scalar, about 4x slower).
//
// Polynomials: Cephes' logf, expf, sinf and cosf (S. Moshier), about 1 ulp on their ranges.
#pragma once

#include <algorithm>
#include <cstdint>

#include "isa.h"

#if PINI_CPU_X86
#include <xmmintrin.h>
#endif

namespace pini::cpu {

inline float bits_to_float(int32_t bits) { return __builtin_bit_cast(float, bits); }

inline int32_t float_to_bits(float value) { return __builtin_bit_cast(int32_t, value); }

// max(value, floor) for value, floor >= 0 as an integer max of their bits (non-negative floats
// order as their bits). GCC vectorizes the Box-Muller loop around it for every target; with a
// float max there (before or after the log) it did so only for AVX-512 and left the loop scalar,
// 5x slower, for AVX2 and SSE2 (and so, likely, for NEON).
inline float max_nonnegative(float value, float floor) {
  return bits_to_float(std::max(float_to_bits(value), float_to_bits(floor)));
}

// Natural log for positive, normal x (Box-Muller's u is in [1e-7, 1)). x = (1 + m) * 2^e with
// 1 + m in [sqrt(1/2), sqrt(2)), found with integer arithmetic on the bits (no selects, so the
// loop around it vectorizes), then Cephes' polynomial for log(1 + m).
inline float log_positive(float x) {
  constexpr int32_t kSqrtHalfBits = 0x3f3504f3;  // bits of sqrt(1/2)
  const int32_t shifted = float_to_bits(x) - kSqrtHalfBits;
  const float e = static_cast<float>(shifted >> 23);
  const float m = bits_to_float((shifted & 0x007fffff) + kSqrtHalfBits) - 1.0f;
  const float m2 = m * m;
  float poly = 7.0376836292e-2f;
  poly = poly * m - 1.1514610310e-1f;
  poly = poly * m + 1.1676998740e-1f;
  poly = poly * m - 1.2420140846e-1f;
  poly = poly * m + 1.4249322787e-1f;
  poly = poly * m - 1.6668057665e-1f;
  poly = poly * m + 2.0000714765e-1f;
  poly = poly * m - 2.4999993993e-1f;
  poly = poly * m + 3.3333331174e-1f;
  float result = poly * m * m2;
  result += -2.12194440e-4f * e;
  result += -0.5f * m2;
  return m + result + 0.693359375f * e;
}

// min(value, ceiling) for value, ceiling >= 0, as max_nonnegative; a negative value (negative
// bits) comes back unchanged.
inline float min_nonnegative(float value, float ceiling) {
  return bits_to_float(std::min(float_to_bits(value), float_to_bits(ceiling)));
}

// exp(x) for x <= 0 (log-sum-exp terms and probabilities), and exactly 0 below -87.3 (where
// exp(x) < 1.2e-38, float32's smallest normal): a sum it enters does not change, and a product
// with it never makes a denormal (those cost ~100 cycles each; the loss gradient multiplies every
// probability by a row weight). The range checks are integer ops on -x's bits: a float
// comparison there kept GCC from vectorizing the loops around it (scalar, 5-10x slower); a tiny
// positive x (rounding) passes through as it is.
inline float exp_nonpositive(float x) {
  constexpr float kLimit = 87.3f;
  const int32_t in_range = -static_cast<int32_t>(float_to_bits(-x) <= float_to_bits(kLimit));
  x = -min_nonnegative(-x, kLimit);
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float value = poly * r * r + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return bits_to_float(float_to_bits(value * scale) & in_range);
}

// sin and cos of 2*pi*turns for turns in [0, 1): reduced in turns (exact in float32), then
// Cephes' polynomials on [-pi/4, pi/4] and a quadrant swap.
inline void sincos_turns(float turns, float* sine, float* cosine) {
  const float quadrant = static_cast<float>(static_cast<int32_t>(turns * 4.0f + 0.5f));
  const float angle = (turns - 0.25f * quadrant) * 6.283185307179586f;  // in [-pi/4, pi/4]
  const float a2 = angle * angle;
  float sin_poly = -1.9515295891e-4f;
  sin_poly = sin_poly * a2 + 8.3321608736e-3f;
  sin_poly = sin_poly * a2 - 1.6666654611e-1f;
  const float s = sin_poly * a2 * angle + angle;
  float cos_poly = 2.443315711809948e-5f;
  cos_poly = cos_poly * a2 - 1.388731625493765e-3f;
  cos_poly = cos_poly * a2 + 4.166664568298827e-2f;
  const float c = cos_poly * a2 * a2 - 0.5f * a2 + 1.0f;
  const int32_t q = static_cast<int32_t>(quadrant) & 3;
  const float swapped_sin = (q & 1) ? c : s;
  const float swapped_cos = (q & 1) ? s : c;
  *sine = (q & 2) ? -swapped_sin : swapped_sin;
  *cosine = ((q + 1) & 2) ? -swapped_cos : swapped_cos;
}

// While alive, this thread's float arithmetic flushes denormal results and inputs to zero (x86's
// MXCSR FTZ and DAZ bits; nothing elsewhere). For the loss kernels, whose products of tiny
// probabilities and row weights fall below 1.2e-38, float32's smallest normal, and then cost
// ~100 cycles each (the gradient pass ran 2.7x slower at CLIP's logit scale): such values
// become 0, a change far below every tolerance. Create one per thread, inside the parallel region.
class FlushDenormals {
 public:
#if PINI_CPU_X86
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
#endif
};

}  // namespace pini::cpu
