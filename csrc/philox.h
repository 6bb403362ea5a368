// The noise stream of docs/spec.md §3, shared by the CPU and CUDA kernels.
//
// Element k of the stream of a 64-bit seed is lane k % 4 of Triton's tl.randn4x(seed, k / 4):
// Philox4x32-10 with counter (q mod 2^32, q >> 32, 0, 0) for q = k / 4 and key (seed mod 2^32,
// seed >> 32), each word mapped to a uniform float in [0, 1), then Box-Muller on the pairs.
#pragma once

#include <cstdint>

#if !defined(__CUDACC__)
#include <math.h>
#endif

#if defined(__CUDACC__)
#define PINI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PINI_HOST_DEVICE inline
#endif

namespace pini {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// Triton's uint_to_uniform_float: the largest scale with (2^31 - 1) * scale < 1 in float32.
constexpr float kUint32ToUniform = 4.6566127342e-10f;
// Box-Muller keeps u away from 0 so that log(u) stays finite.
constexpr float kUniformFloor = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;
// Features are normalized like F.normalize: v / max(|v|, kNormFloor).
constexpr float kNormFloor = 1e-12f;

struct Words4 {
  uint32_t w0, w1, w2, w3;
};

// Philox4x32-10 of counter (quad mod 2^32, quad >> 32, 0, 0) under key (seed mod 2^32, seed >> 32).
PINI_HOST_DEVICE Words4 philox(uint64_t seed, uint64_t quad) {
  uint32_t c0 = static_cast<uint32_t>(quad), c1 = static_cast<uint32_t>(quad >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t product_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t product_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t next_c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    const uint32_t next_c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    c0 = next_c0;
    c2 = next_c2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// A word as int32, a negative v replaced by ~v, times kUint32ToUniform (in float32).
PINI_HOST_DEVICE float uniform_from_word(uint32_t word) {
  const int32_t value = static_cast<int32_t>(word);
  const int32_t magnitude = value ^ (value >> 31);  // ~value where value < 0, branch-free
  return static_cast<float>(magnitude) * kUint32ToUniform;
}

// The four normals of one quad (lanes 0..3), with the standard math library (the CUDA kernels
// use this; the CPU kernels have a vectorized version in cpu/kernels.cpp).
PINI_HOST_DEVICE void normal_quad(uint64_t seed, uint64_t quad, float normals[4]) {
  const Words4 words = philox(seed, quad);
  const float u0 = uniform_from_word(words.w0), u1 = uniform_from_word(words.w1);
  const float u2 = uniform_from_word(words.w2), u3 = uniform_from_word(words.w3);
  const float radius01 = sqrtf(-2.0f * logf(fmaxf(kUniformFloor, u0)));
  const float radius23 = sqrtf(-2.0f * logf(fmaxf(kUniformFloor, u2)));
  float sin01, cos01, sin23, cos23;
#if defined(__CUDACC__)
  sincospif(2.0f * u1, &sin01, &cos01);  // sin/cos(2 pi u) without a rounded 2 pi
  sincospif(2.0f * u3, &sin23, &cos23);
#else
  sin01 = sinf(kTwoPi * u1);
  cos01 = cosf(kTwoPi * u1);
  sin23 = sinf(kTwoPi * u3);
  cos23 = cosf(kTwoPi * u3);
#endif
  normals[0] = radius01 * cos01;
  normals[1] = radius01 * sin01;
  normals[2] = radius23 * cos23;
  normals[3] = radius23 * sin23;
}

}  // namespace pini
