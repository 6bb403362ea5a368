// Fused CPU kernels on raw pointers (OpenMP over tiles, SIMD inside). The PyTorch binding in
// csrc/bindings.cpp checks arguments, allocates and calls these. Each runs the AVX-512 copy of the
// kernels where the build has it and the CPU supports it, else the baseline copy (kernels.cpp).
//
// Layouts (pini_kernels/inject.py, BroadcastLayout): the perturbed tensor is viewed as
// rows x width, and the noise parameter of column c is c / inner; sample s of element i is stream
// element s * N + i.
#pragma once

#include <cstdint>

#include "../feature_rows.h"

namespace pini::cpu {

// The copy of the kernels this process runs: "avx512", "baseline" (the build's -march, x86-64-v3
// by default) or "portable" (PINI_CPU_ARCH=portable, or a machine other than x86-64). Chosen once,
// at the first call; the environment variable PINI_CPU_CAPABILITY=baseline forces the baseline.
const char* kernel_variant();

// out[0 .. count) = stream elements start .. start + count - 1 of seed.
void normal_fill(uint64_t seed, int64_t start, int64_t count, float* out, int num_threads);

struct InjectShape {
  int64_t rows, width, inner, num_samples;
  bool multiply;
};

// out[s, i] = x[i] (+ or *) (mu[p] + sigma[p] * eps[s * N + i]), p = (i % width) / inner.
template <typename In, typename Out>
void inject_forward(const In* x, const float* mu, const float* sigma, Out* out, uint64_t seed,
                    InjectShape shape, int num_threads);

// grad_x[i] = sum_s d out[s, i] / d x[i] * grad_out[s, i]; partial_mu / partial_sigma
// (row_chunks x width) hold each chunk of rows_per_chunk rows' sums, reduced by the caller.
template <typename In, typename Out>
void inject_backward(const Out* grad_out, const In* x, const float* mu, const float* sigma,
                     In* grad_x, float* partial_mu, float* partial_sigma, uint64_t seed,
                     InjectShape shape, int64_t rows_per_chunk, int num_threads);

// One side (image or text) of the noisy cosine logits (../feature_rows.h), x stored as In.
template <typename In>
using FeatureRows = ::pini::FeatureRows<const In*>;

// unit[r] = v / max(|v|, floor), norm[r] = |v|, v = x[r] (+ or *) (mu + sigma * eps).
template <typename In>
void noisy_normalize(const FeatureRows<In>& side, uint64_t seed, int64_t stream_offset,
                     float* unit, float* norm, int num_threads);

// Adds this sample's gradients (fp32 rows x D accumulators; nullptr = not needed).
template <typename In>
void noisy_normalize_backward(const FeatureRows<In>& side, uint64_t seed, int64_t stream_offset,
                              const float* unit, const float* norm, const float* grad_unit,
                              float* grad_x, float* grad_mu, float* grad_sigma, int num_threads);

// Per row of scale * cosine (rows x classes): log-sum-exp, the target's logit, the sum of logits.
void cross_entropy_stats(const float* cosine, const int64_t* target, float scale, int64_t rows,
                         int64_t classes, float* lse, float* target_logit, float* logit_sum,
                         int num_threads);

// In place: cosine -> d loss / d cosine; scale_grad[r] = sum_c dlogit * cosine.
void cross_entropy_grad(float* cosine, const float* lse, const int64_t* target,
                        const float* row_grad, float scale, float label_smoothing, int64_t rows,
                        int64_t classes, float* scale_grad, int num_threads);

}  // namespace pini::cpu

// Explicit instantiations of the templates above for the storage types the binding uses, in the
// namespace where the macro is expanded (kernels.cpp, and each copy of kernels_impl.h).
#define PINI_CPU_INSTANTIATE_INJECT(In, Out)                                                \
  template void inject_forward<In, Out>(const In*, const float*, const float*, Out*,        \
                                        uint64_t, InjectShape, int);                        \
  template void inject_backward<In, Out>(const Out*, const In*, const float*, const float*, \
                                         In*, float*, float*, uint64_t, InjectShape, int64_t, \
                                         int);
#define PINI_CPU_INSTANTIATE_ROWS(In)                                                       \
  template void noisy_normalize<In>(const FeatureRows<In>&, uint64_t, int64_t, float*,      \
                                    float*, int);                                           \
  template void noisy_normalize_backward<In>(const FeatureRows<In>&, uint64_t, int64_t,     \
                                             const float*, const float*, const float*,      \
                                             float*, float*, float*, int);
#define PINI_CPU_INSTANTIATE_KERNELS()                        \
  PINI_CPU_INSTANTIATE_INJECT(float, float)                   \
  PINI_CPU_INSTANTIATE_INJECT(c10::Half, c10::Half)           \
  PINI_CPU_INSTANTIATE_INJECT(c10::BFloat16, c10::BFloat16)   \
  PINI_CPU_INSTANTIATE_INJECT(c10::Half, float)               \
  PINI_CPU_INSTANTIATE_INJECT(c10::BFloat16, float)           \
  PINI_CPU_INSTANTIATE_ROWS(float)                            \
  PINI_CPU_INSTANTIATE_ROWS(c10::Half)                        \
  PINI_CPU_INSTANTIATE_ROWS(c10::BFloat16)
