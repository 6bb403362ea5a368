// CUDA kernels of the pini_native ops, launched on a given stream. Only CUDA runtime types here:
// the PyTorch side (cuda/bindings_cuda.cpp) checks arguments and passes raw pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pini::cuda {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

struct InjectShape {
  int64_t rows, width, inner, num_samples;
  bool multiply;
};

struct FeatureRows {
  const void* x;
  Dtype x_dtype;
  int64_t x_row_stride;
  const float* mu;  // nullptr: no noise
  const float* sigma;
  int64_t mu_row_stride, mu_col_stride, sigma_row_stride, sigma_col_stride;
  int64_t rows, dim;
  bool multiply;
};

void normal_fill(uint64_t seed, int64_t start, int64_t count, float* out, cudaStream_t stream);

void inject_forward(const void* x, Dtype x_dtype, const float* mu, const float* sigma, void* out,
                    Dtype out_dtype, uint64_t seed, InjectShape shape, cudaStream_t stream);

void inject_backward(const void* grad_out, Dtype out_dtype, const void* x, Dtype x_dtype,
                     const float* mu, const float* sigma, void* grad_x, float* partial_mu,
                     float* partial_sigma, uint64_t seed, InjectShape shape,
                     int64_t rows_per_chunk, cudaStream_t stream);

void noisy_normalize(const FeatureRows& side, uint64_t seed, int64_t stream_offset, float* unit,
                     float* norm, cudaStream_t stream);

void noisy_normalize_backward(const FeatureRows& side, uint64_t seed, int64_t stream_offset,
                              const float* unit, const float* norm, const float* grad_unit,
                              float* grad_x, float* grad_mu, float* grad_sigma,
                              cudaStream_t stream);

void cross_entropy_stats(const float* cosine, const int64_t* target, const float* scale,
                         int64_t rows, int64_t classes, float* lse, float* target_logit,
                         float* logit_sum, cudaStream_t stream);

void cross_entropy_grad(float* cosine, const float* lse, const int64_t* target,
                        const float* row_grad, const float* scale, float label_smoothing,
                        int64_t rows, int64_t classes, float* scale_grad, cudaStream_t stream);

}  // namespace pini::cuda
