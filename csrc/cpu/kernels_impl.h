// The CPU kernels' code (what each computes: kernels.h), compiled once per instruction set, each
// copy in its own namespace: kernels.cpp includes it as `baseline` (built for setup.py's
// PINI_CPU_ARCH, x86-64-v3 by default) and kernels_avx512.cpp as `avx512`; kernels.cpp runs one
// of them. Arithmetic is float32 whatever the storage type.
//
// Every header is included before the AVX-512 target region opens, so the inline functions of
// c10, the standard library, philox.h and vector_math.h are compiled for the baseline in both
// copies: the linker keeps one definition of each, and that one must run on every CPU. They still
// inline into the AVX-512 code (GCC inlines a function into a caller whose target is a superset).
#if !defined(PINI_CPU_VARIANT)
#error "define PINI_CPU_VARIANT (the namespace of this copy of the kernels) before including"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../philox.h"
#include "isa.h"
#include "kernels.h"
#include "vector_math.h"

#if PINI_CPU_X86
#include <immintrin.h>
#endif

// PINI_CPU_AVX512: this copy uses the hand-written AVX-512 code (the AVX-512 copy, or a baseline
// built with -march=native on an AVX-512 machine).
#if defined(PINI_CPU_VARIANT_AVX512)
#if !PINI_CPU_AVX512_COPY
#error "the AVX-512 copy of the kernels needs x86-64 and GCC (see isa.h)"
#endif
#define PINI_CPU_AVX512 1
#elif PINI_CPU_X86 && defined(__AVX512F__)
#define PINI_CPU_AVX512 1
#else
#define PINI_CPU_AVX512 0
#endif

#if defined(PINI_CPU_VARIANT_AVX512)
// x86-64-v4's AVX-512 subsets (the ones kernels.cpp checks for); the loops the compiler
// vectorizes use 512-bit vectors too, as with -march=native on an AVX-512 machine.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512cd,avx512bw,avx512dq,avx512vl")
#endif

namespace pini::cpu::PINI_CPU_VARIANT {
namespace {

// Quads generated per Philox batch: 64 quads = 256 normals, 1 KB per lane array, so the batch
// stays in L1 while the SIMD loops run across it.
constexpr int kBatchQuads = 64;  // a multiple of 16 (quads_to_normals)
// Columns per task: 2048 floats per tile row (8 KB) keeps x, mu, sigma, eps and the accumulators
// of a tile in L1/L2 while a task walks its rows and samples.
constexpr int64_t kColumnChunk = 2048;
// Normals the inject kernels draw at a time (one Philox batch) before using them.
constexpr int64_t kEpsBatch = 4 * kBatchQuads;

#if PINI_CPU_AVX512
// High 32 bits of the 32 x 32-bit products of 16 lanes: vpmuludq on the even and the odd lanes
// (compilers otherwise widen to 64-bit lanes and use the slow vpmullq).
inline __m512i mul_high(__m512i words, __m512i constant) {
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(words, constant), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(words, 32), constant);
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}
#elif PINI_CPU_X86 && defined(__AVX2__)
// The same for 8 lanes (the x86-64-v3 baseline, which CPUs without AVX-512 run).
inline __m256i mul_high(__m256i words, __m256i constant) {
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(words, constant), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(words, 32), constant);
  return _mm256_blend_epi32(even, odd, 0xAA);
}
#endif

// Ten Philox rounds over counter words c0..c3 (num_quads lanes, arrays padded to kBatchQuads).
void philox_rounds(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint64_t seed,
                   int num_quads) {
#if PINI_CPU_AVX512
  const __m512i round_a = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int i = 0; i < num_quads; i += 16) {
    __m512i w0 = _mm512_load_si512(c0 + i), w1 = _mm512_load_si512(c1 + i);
    __m512i w2 = _mm512_load_si512(c2 + i), w3 = _mm512_load_si512(c3 + i);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m512i next_c0 = _mm512_xor_si512(
          _mm512_xor_si512(mul_high(w2, round_b), w1), _mm512_set1_epi32(static_cast<int>(k0)));
      const __m512i next_c2 = _mm512_xor_si512(
          _mm512_xor_si512(mul_high(w0, round_a), w3), _mm512_set1_epi32(static_cast<int>(k1)));
      w1 = _mm512_mullo_epi32(w2, round_b);
      w3 = _mm512_mullo_epi32(w0, round_a);
      w0 = next_c0;
      w2 = next_c2;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    _mm512_store_si512(c0 + i, w0);
    _mm512_store_si512(c1 + i, w1);
    _mm512_store_si512(c2 + i, w2);
    _mm512_store_si512(c3 + i, w3);
  }
#elif PINI_CPU_X86 && defined(__AVX2__)
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int i = 0; i < num_quads; i += 8) {
    const auto lanes = [i](uint32_t* words) { return reinterpret_cast<__m256i*>(words + i); };
    __m256i w0 = _mm256_load_si256(lanes(c0)), w1 = _mm256_load_si256(lanes(c1));
    __m256i w2 = _mm256_load_si256(lanes(c2)), w3 = _mm256_load_si256(lanes(c3));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m256i next_c0 = _mm256_xor_si256(
          _mm256_xor_si256(mul_high(w2, round_b), w1), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i next_c2 = _mm256_xor_si256(
          _mm256_xor_si256(mul_high(w0, round_a), w3), _mm256_set1_epi32(static_cast<int>(k1)));
      w1 = _mm256_mullo_epi32(w2, round_b);
      w3 = _mm256_mullo_epi32(w0, round_a);
      w0 = next_c0;
      w2 = next_c2;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    _mm256_store_si256(lanes(c0), w0);
    _mm256_store_si256(lanes(c1), w1);
    _mm256_store_si256(lanes(c2), w2);
    _mm256_store_si256(lanes(c3), w3);
  }
#else
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
#pragma omp simd
    for (int i = 0; i < num_quads; ++i) {
      const uint64_t product_b = static_cast<uint64_t>(kPhiloxRoundB) * c2[i];
      const uint64_t product_a = static_cast<uint64_t>(kPhiloxRoundA) * c0[i];
      const uint32_t next_c0 = static_cast<uint32_t>(product_b >> 32) ^ c1[i] ^ k0;
      const uint32_t next_c2 = static_cast<uint32_t>(product_a >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(product_b);
      c3[i] = static_cast<uint32_t>(product_a);
      c0[i] = next_c0;
      c2[i] = next_c2;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
#endif
}

// Normals of quads first_quad .. first_quad + num_quads - 1, interleaved: out[4q + lane].
void quads_to_normals(uint64_t seed, uint64_t first_quad, int num_quads, float* out) {
  alignas(64) uint32_t c0[kBatchQuads], c1[kBatchQuads], c2[kBatchQuads], c3[kBatchQuads];
#pragma omp simd
  for (int i = 0; i < kBatchQuads; ++i) {  // all lanes: the SIMD rounds read whole vectors
    const uint64_t quad = first_quad + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(quad);
    c1[i] = static_cast<uint32_t>(quad >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  philox_rounds(c0, c1, c2, c3, seed, num_quads);
  alignas(64) float n0[kBatchQuads], n1[kBatchQuads], n2[kBatchQuads], n3[kBatchQuads];
  // Box-Muller over whole 16-lane vectors (lanes past num_quads hold counters that were set but
  // not mixed, and are never stored): a row of a few quads then runs no scalar remainder loop,
  // which costs ~50 cycles a quad (a 32-wide row took 2x the time of its vector part).
  const int vector_quads = (num_quads + 15) / 16 * 16;
#pragma omp simd
  for (int i = 0; i < vector_quads; ++i) {
    const float log_u0 = log_positive(max_nonnegative(uniform_from_word(c0[i]), kUniformFloor));
    const float log_u2 = log_positive(max_nonnegative(uniform_from_word(c2[i]), kUniformFloor));
    const float radius01 = std::sqrt(-2.0f * log_u0);
    const float radius23 = std::sqrt(-2.0f * log_u2);
    float sin01, cos01, sin23, cos23;
    sincos_turns(uniform_from_word(c1[i]), &sin01, &cos01);
    sincos_turns(uniform_from_word(c3[i]), &sin23, &cos23);
    n0[i] = radius01 * cos01;
    n1[i] = radius01 * sin01;
    n2[i] = radius23 * cos23;
    n3[i] = radius23 * sin23;
  }
  int i = 0;
#if PINI_CPU_AVX512
  // Interleave 16 quads at a time with shuffles instead of 64 scalar stores.
  for (; i + 16 <= num_quads; i += 16) {
    const __m512 lane0 = _mm512_load_ps(n0 + i), lane1 = _mm512_load_ps(n1 + i);
    const __m512 lane2 = _mm512_load_ps(n2 + i), lane3 = _mm512_load_ps(n3 + i);
    const __m512 low01 = _mm512_unpacklo_ps(lane0, lane1), high01 = _mm512_unpackhi_ps(lane0, lane1);
    const __m512 low23 = _mm512_unpacklo_ps(lane2, lane3), high23 = _mm512_unpackhi_ps(lane2, lane3);
    // Each 128-bit block k of quad_r holds quad 4k + r.
    const __m512 quad0 = _mm512_shuffle_ps(low01, low23, 0x44);
    const __m512 quad1 = _mm512_shuffle_ps(low01, low23, 0xEE);
    const __m512 quad2 = _mm512_shuffle_ps(high01, high23, 0x44);
    const __m512 quad3 = _mm512_shuffle_ps(high01, high23, 0xEE);
    const __m512 blocks01_01 = _mm512_shuffle_f32x4(quad0, quad1, 0x44);  // q0.b0 q0.b1 q1.b0 q1.b1
    const __m512 blocks23_01 = _mm512_shuffle_f32x4(quad2, quad3, 0x44);
    const __m512 blocks01_23 = _mm512_shuffle_f32x4(quad0, quad1, 0xEE);  // q0.b2 q0.b3 q1.b2 q1.b3
    const __m512 blocks23_23 = _mm512_shuffle_f32x4(quad2, quad3, 0xEE);
    float* destination = out + 4 * i;
    _mm512_storeu_ps(destination, _mm512_shuffle_f32x4(blocks01_01, blocks23_01, 0x88));
    _mm512_storeu_ps(destination + 16, _mm512_shuffle_f32x4(blocks01_01, blocks23_01, 0xDD));
    _mm512_storeu_ps(destination + 32, _mm512_shuffle_f32x4(blocks01_23, blocks23_23, 0x88));
    _mm512_storeu_ps(destination + 48, _mm512_shuffle_f32x4(blocks01_23, blocks23_23, 0xDD));
  }
#endif
  for (; i < num_quads; ++i) {
    out[4 * i] = n0[i];
    out[4 * i + 1] = n1[i];
    out[4 * i + 2] = n2[i];
    out[4 * i + 3] = n3[i];
  }
}

// out[0 .. count) = stream elements start .. start + count - 1 (one thread).
void fill_span(uint64_t seed, int64_t start, int64_t count, float* out) {
  alignas(64) float batch[4 * kBatchQuads];
  while (count > 0) {
    const uint64_t quad = static_cast<uint64_t>(start) / 4;
    const int lane = static_cast<int>(start % 4);
    const int64_t wanted_quads = (lane + count + 3) / 4;
    const int num_quads = static_cast<int>(std::min<int64_t>(wanted_quads, kBatchQuads));
    const int64_t produced = std::min<int64_t>(4 * num_quads - lane, count);
    if (lane == 0 && produced == 4 * num_quads) {
      quads_to_normals(seed, quad, num_quads, out);
    } else {
      quads_to_normals(seed, quad, num_quads, batch);
      std::memcpy(out, batch + lane, static_cast<size_t>(produced) * sizeof(float));
    }
    start += produced;
    out += produced;
    count -= produced;
  }
}

template <typename T>
inline float to_float(T value) {
  return static_cast<float>(value);
}

template <typename T>
inline T from_float(float value) {
  return static_cast<T>(value);
}

struct Tiling {
  int64_t column_chunks, row_chunks, rows_per_chunk;
  int64_t tasks() const { return column_chunks * row_chunks; }
};

Tiling tile(int64_t rows, int64_t width, int64_t rows_per_chunk) {
  const int64_t column_chunks = (width + kColumnChunk - 1) / kColumnChunk;
  const int64_t row_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  return {column_chunks, row_chunks, rows_per_chunk};
}

// mu/sigma of the columns column_start .. column_start + length - 1. One division per tile, not
// per element (a 64-bit division costs tens of cycles, as much as drawing the element's normal):
// inner == 1 is a plain copy, else a run of `inner` columns repeats each parameter.
void gather_params(const float* mu, const float* sigma, int64_t inner, int64_t column_start,
                   int64_t length, float* mu_tile, float* sigma_tile) {
  if (inner == 1) {
    std::memcpy(mu_tile, mu + column_start, static_cast<size_t>(length) * sizeof(float));
    std::memcpy(sigma_tile, sigma + column_start, static_cast<size_t>(length) * sizeof(float));
    return;
  }
  int64_t param = column_start / inner;
  int64_t c = 0;
  int64_t run_end = std::min(length, (param + 1) * inner - column_start);
  while (c < length) {
    const float mu_value = mu[param], sigma_value = sigma[param];
    std::fill(mu_tile + c, mu_tile + run_end, mu_value);
    std::fill(sigma_tile + c, sigma_tile + run_end, sigma_value);
    c = run_end;
    ++param;
    run_end = std::min(length, run_end + inner);
  }
}

}  // namespace

void normal_fill(uint64_t seed, int64_t start, int64_t count, float* out, int num_threads) {
  const int64_t chunk = 4 * kBatchQuads * 16;
  const int64_t chunks = (count + chunk - 1) / chunk;
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
  for (int64_t index = 0; index < chunks; ++index) {
    const int64_t offset = index * chunk;
    fill_span(seed, start + offset, std::min(chunk, count - offset), out + offset);
  }
}

template <typename In, typename Out>
void inject_forward(const In* x, const float* mu, const float* sigma, Out* out, uint64_t seed,
                    InjectShape shape, int num_threads) {
  const int64_t numel = shape.rows * shape.width;
  // Forward has no reductions: a task walks a chunk of rows of one column tile, gathering the
  // tile's parameters once; the rows are split into as few chunks as give each thread about 8
  // tasks (one row per chunk when there are few column tiles).
  const int64_t column_chunks = (shape.width + kColumnChunk - 1) / kColumnChunk;
  const int64_t row_chunks = std::min<int64_t>(
      shape.rows, std::max<int64_t>(1, (8 * num_threads + column_chunks - 1) / column_chunks));
  const Tiling tiling = tile(shape.rows, shape.width, (shape.rows + row_chunks - 1) / row_chunks);
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
  for (int64_t task = 0; task < tiling.tasks(); ++task) {
    alignas(64) float mu_tile[kColumnChunk], sigma_tile[kColumnChunk], x_tile[kColumnChunk],
        eps[kEpsBatch];
    const int64_t column_start = (task % tiling.column_chunks) * kColumnChunk;
    const int64_t row_start = (task / tiling.column_chunks) * tiling.rows_per_chunk;
    const int64_t row_end = std::min(row_start + tiling.rows_per_chunk, shape.rows);
    const int64_t length = std::min(kColumnChunk, shape.width - column_start);
    gather_params(mu, sigma, shape.inner, column_start, length, mu_tile, sigma_tile);
    for (int64_t row = row_start; row < row_end; ++row) {
      const int64_t base = row * shape.width + column_start;
#pragma omp simd
      for (int64_t c = 0; c < length; ++c) x_tile[c] = to_float(x[base + c]);
      for (int64_t sample = 0; sample < shape.num_samples; ++sample) {
        const int64_t first = sample * numel + base;
        // A batch of normals at a time, used while it is in L1: drawing the tile's normals first
        // and then reading them back costs about a tenth more.
        for (int64_t c0 = 0; c0 < length; c0 += kEpsBatch) {
          const int64_t n = std::min(kEpsBatch, length - c0);
          fill_span(seed, first + c0, n, eps);
          Out* destination = out + first + c0;
          const float* xs = x_tile + c0;
          const float* ms = mu_tile + c0;
          const float* ss = sigma_tile + c0;
          if (shape.multiply) {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c)
              destination[c] = from_float<Out>(xs[c] * (ms[c] + ss[c] * eps[c]));
          } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c)
              destination[c] = from_float<Out>(xs[c] + (ms[c] + ss[c] * eps[c]));
          }
        }
      }
    }
  }
}

template <typename In, typename Out>
void inject_backward(const Out* grad_out, const In* x, const float* mu, const float* sigma,
                     In* grad_x, float* partial_mu, float* partial_sigma, uint64_t seed,
                     InjectShape shape, int64_t rows_per_chunk, int num_threads) {
  const int64_t numel = shape.rows * shape.width;
  const bool need_params = partial_mu != nullptr;
  const bool need_eps = need_params || shape.multiply;
  const Tiling tiling = tile(shape.rows, shape.width, rows_per_chunk);
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
  for (int64_t task = 0; task < tiling.tasks(); ++task) {
    alignas(64) float mu_tile[kColumnChunk], sigma_tile[kColumnChunk], x_tile[kColumnChunk],
        eps[kEpsBatch], x_grad[kColumnChunk], mu_grad[kColumnChunk], sigma_grad[kColumnChunk];
    const int64_t column_start = (task % tiling.column_chunks) * kColumnChunk;
    const int64_t row_chunk = task / tiling.column_chunks;
    const int64_t length = std::min(kColumnChunk, shape.width - column_start);
    const int64_t row_start = row_chunk * rows_per_chunk;
    const int64_t row_end = std::min(row_start + rows_per_chunk, shape.rows);
    // Add mode's gradients do not read mu or sigma (d/d mu = g, d/d sigma = g * eps).
    if (shape.multiply) {
      gather_params(mu, sigma, shape.inner, column_start, length, mu_tile, sigma_tile);
    }
    std::fill(mu_grad, mu_grad + length, 0.0f);
    std::fill(sigma_grad, sigma_grad + length, 0.0f);
    for (int64_t row = row_start; row < row_end; ++row) {
      const int64_t base = row * shape.width + column_start;
      if (shape.multiply) {
#pragma omp simd
        for (int64_t c = 0; c < length; ++c) x_tile[c] = to_float(x[base + c]);
      }
      std::fill(x_grad, x_grad + length, 0.0f);
      for (int64_t sample = 0; sample < shape.num_samples; ++sample) {
        const int64_t first = sample * numel + base;
        if (!need_eps) {
          const Out* grad = grad_out + first;
#pragma omp simd
          for (int64_t c = 0; c < length; ++c) x_grad[c] += to_float(grad[c]);
          continue;
        }
        // A batch of normals at a time, used while it is in L1 (see inject_forward).
        for (int64_t c0 = 0; c0 < length; c0 += kEpsBatch) {
          const int64_t n = std::min(kEpsBatch, length - c0);
          fill_span(seed, first + c0, n, eps);
          const Out* grad = grad_out + first + c0;
          float* xg = x_grad + c0;
          float* mg = mu_grad + c0;
          float* sg = sigma_grad + c0;
          if (shape.multiply) {
            const float* xs = x_tile + c0;
            const float* ms = mu_tile + c0;
            const float* ss = sigma_tile + c0;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const float g = to_float(grad[c]);
              xg[c] += g * (ms[c] + ss[c] * eps[c]);
              const float g_x = g * xs[c];
              mg[c] += g_x;
              sg[c] += g_x * eps[c];
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const float g = to_float(grad[c]);
              xg[c] += g;
              mg[c] += g;
              sg[c] += g * eps[c];
            }
          }
        }
      }
      if (grad_x != nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < length; ++c) grad_x[base + c] = from_float<In>(x_grad[c]);
      }
    }
    if (need_params) {
      const int64_t offset = row_chunk * shape.width + column_start;
      std::memcpy(partial_mu + offset, mu_grad, static_cast<size_t>(length) * sizeof(float));
      std::memcpy(partial_sigma + offset, sigma_grad,
                  static_cast<size_t>(length) * sizeof(float));
    }
  }
}

namespace {

// v = x (+ or *) (mu + sigma * eps) for one row, into value[0 .. dim).
template <typename In>
void noisy_row(const FeatureRows<In>& side, uint64_t seed, int64_t stream_offset, int64_t row,
               float* value, float* eps) {
  const In* x = side.x + row * side.x_row_stride;
#pragma omp simd
  for (int64_t d = 0; d < side.dim; ++d) value[d] = to_float(x[d]);
  if (side.mu == nullptr) return;
  fill_span(seed, stream_offset + row * side.dim, side.dim, eps);
  const float* mu = side.mu + row * side.mu_row_stride;
  const float* sigma = side.sigma + row * side.sigma_row_stride;
  for (int64_t d = 0; d < side.dim; ++d) {
    const float noise = mu[d * side.mu_col_stride] + sigma[d * side.sigma_col_stride] * eps[d];
    value[d] = side.multiply ? value[d] * noise : value[d] + noise;
  }
}

}  // namespace

template <typename In>
void noisy_normalize(const FeatureRows<In>& side, uint64_t seed, int64_t stream_offset,
                     float* unit, float* norm, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    float* eps = new float[side.dim];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < side.rows; ++row) {
      float* value = unit + row * side.dim;
      noisy_row(side, seed, stream_offset, row, value, eps);
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < side.dim; ++d) squares += value[d] * value[d];
      const float row_norm = std::sqrt(squares);
      // std::max keeps a NaN first argument: a NaN row stays NaN (as F.normalize's clamp_min).
      const float inverse = 1.0f / std::max(row_norm, kNormFloor);
#pragma omp simd
      for (int64_t d = 0; d < side.dim; ++d) value[d] *= inverse;
      norm[row] = row_norm;
    }
    delete[] eps;
  }
}

template <typename In>
void noisy_normalize_backward(const FeatureRows<In>& side, uint64_t seed, int64_t stream_offset,
                              const float* unit, const float* norm, const float* grad_unit,
                              float* grad_x, float* grad_mu, float* grad_sigma, int num_threads) {
  const bool has_noise = side.mu != nullptr;
  const bool need_eps = has_noise && (side.multiply || grad_mu != nullptr);
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    float* eps = new float[side.dim];
    float* grad_value = new float[side.dim];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < side.rows; ++row) {
      const float* u = unit + row * side.dim;
      const float* g = grad_unit + row * side.dim;
      float radial = 0.0f;
#pragma omp simd reduction(+ : radial)
      for (int64_t d = 0; d < side.dim; ++d) radial += u[d] * g[d];
      const float row_norm = norm[row];
      if (!(row_norm <= kNormFloor)) {  // a NaN norm takes this branch: NaN gradients
        const float inverse = 1.0f / row_norm;
#pragma omp simd
        for (int64_t d = 0; d < side.dim; ++d) grad_value[d] = (g[d] - u[d] * radial) * inverse;
      } else {
#pragma omp simd
        for (int64_t d = 0; d < side.dim; ++d) grad_value[d] = g[d] / kNormFloor;
      }
      if (need_eps) fill_span(seed, stream_offset + row * side.dim, side.dim, eps);
      const In* x = side.x + row * side.x_row_stride;
      const float* mu = has_noise ? side.mu + row * side.mu_row_stride : nullptr;
      const float* sigma = has_noise ? side.sigma + row * side.sigma_row_stride : nullptr;
      const int64_t offset = row * side.dim;
      if (grad_x != nullptr) {
        if (has_noise && side.multiply) {
          for (int64_t d = 0; d < side.dim; ++d)
            grad_x[offset + d] += grad_value[d] * (mu[d * side.mu_col_stride] +
                                                   sigma[d * side.sigma_col_stride] * eps[d]);
        } else {
#pragma omp simd
          for (int64_t d = 0; d < side.dim; ++d) grad_x[offset + d] += grad_value[d];
        }
      }
      if (has_noise && grad_mu != nullptr) {
        for (int64_t d = 0; d < side.dim; ++d) {
          const float mu_grad = side.multiply ? grad_value[d] * to_float(x[d]) : grad_value[d];
          grad_mu[offset + d] += mu_grad;
          grad_sigma[offset + d] += mu_grad * eps[d];
        }
      }
    }
    delete[] eps;
    delete[] grad_value;
  }
}

// Past this log-sum-exp, an ulp of it is >= 0.5 and the FMA of cosine * scale - lse can round to
// a positive exponent the vectorized exp does not take (it takes up to about 0.35).
constexpr float kLargeLogSumExp = 4194304.0f;  // 2^22

void cross_entropy_stats(const float* cosine, const int64_t* target, float scale, int64_t rows,
                         int64_t classes, float* lse, float* target_logit, float* logit_sum,
                         int num_threads) {
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    const FlushDenormals flush_denormals;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const float* values = cosine + row * classes;
      float row_max = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : row_max) reduction(+ : total)
      for (int64_t c = 0; c < classes; ++c) {
        row_max = std::max(row_max, values[c] * scale);
        total += values[c];
      }
      float exp_sum = 0.0f;
      if (std::fabs(row_max) <= kLargeLogSumExp) {
        // An FMA of cosine * scale - row_max may round to a positive exponent of at most half an
        // ulp of row_max (<= 0.25 here), which exp_nonpositive takes.
#pragma omp simd reduction(+ : exp_sum)
        for (int64_t c = 0; c < classes; ++c) {
          exp_sum += exp_nonpositive(values[c] * scale - row_max);
        }
      } else {
        // Huge logit scales (1e7 and beyond): exponents from the largest logit's cosine, exactly
        // 0 at it ((cosine - it) * scale), so the sum neither overflows nor vanishes.
        float value_max = -INFINITY, value_min = INFINITY;
        for (int64_t c = 0; c < classes; ++c) {
          value_max = std::max(value_max, values[c]);
          value_min = std::min(value_min, values[c]);
        }
        const float extreme = scale >= 0.0f ? value_max : value_min;
        for (int64_t c = 0; c < classes; ++c) exp_sum += std::exp((values[c] - extreme) * scale);
        row_max = extreme * scale;
      }
      // The max reduction drops NaN; the sum keeps it: a NaN cosine (or scale) makes the row's
      // log-sum-exp NaN, as torch's is.
      if (std::isnan(total * scale)) row_max = NAN;
      lse[row] = row_max + std::log(exp_sum);
      // Targets are validated before the call; an invalid one still never reads out of bounds.
      const int64_t row_target = target[row];
      const bool valid = row_target >= 0 && row_target < classes;
      target_logit[row] = valid ? values[row_target] * scale : NAN;
      logit_sum[row] = total * scale;
    }
  }
}

// One row of cross_entropy_grad: values (the row's cosines) become d loss / d cosine; returns
// the row's sum of dlogits * cosine. kCareful: std::exp of min(exponent, 0), which keeps NaN and
// never overflows, for the rare rows the vectorized exp cannot take (see cross_entropy_grad).
template <bool kCareful>
inline float cross_entropy_row_grad(float* values, int64_t classes, float scale, float row_lse,
                                    float g, int64_t row_target, float target_weight,
                                    float smoothing_share) {
  float scale_sum = 0.0f;
#pragma omp simd reduction(+ : scale_sum)
  for (int64_t c = 0; c < classes; ++c) {
    float probability;
    if constexpr (kCareful) {
      const float exponent = values[c] * scale - row_lse;
      probability = std::exp(exponent > 0.0f ? 0.0f : exponent);  // NaN stays NaN
    } else {
      probability = exp_nonpositive(values[c] * scale - row_lse);
    }
    // 1 - label_smoothing at the target, as a bit mask (a float select here kept GCC from
    // vectorizing the loop for AVX2).
    const float one_hot =
        bits_to_float(float_to_bits(target_weight) & -static_cast<int32_t>(c == row_target));
    const float logit_grad = g * (probability - one_hot - smoothing_share);
    scale_sum += logit_grad * values[c];
    values[c] = logit_grad * scale;
  }
  return scale_sum;
}

void cross_entropy_grad(float* cosine, const float* lse, const int64_t* target,
                        const float* row_grad, float scale, float label_smoothing, int64_t rows,
                        int64_t classes, float* scale_grad, int num_threads) {
  const float smoothing_share = label_smoothing / static_cast<float>(classes);
  const float target_weight = 1.0f - label_smoothing;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    const FlushDenormals flush_denormals;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      float* values = cosine + row * classes;
      const float g = row_grad[row], row_lse = lse[row];
      const int64_t row_target = target[row];
      // A NaN log-sum-exp (a NaN cosine or scale: its gradients are NaN, as torch's) or a huge
      // one (logit scales near 1e7 and beyond): the careful row, one element at a time.
      const bool careful = std::isnan(row_lse) || std::fabs(row_lse) > kLargeLogSumExp;
      scale_grad[row] =
          careful ? cross_entropy_row_grad<true>(values, classes, scale, row_lse, g, row_target,
                                                 target_weight, smoothing_share)
                  : cross_entropy_row_grad<false>(values, classes, scale, row_lse, g, row_target,
                                                  target_weight, smoothing_share);
    }
  }
}

PINI_CPU_INSTANTIATE_KERNELS()

}  // namespace pini::cpu::PINI_CPU_VARIANT

#if defined(PINI_CPU_VARIANT_AVX512)
#pragma GCC pop_options
#endif
