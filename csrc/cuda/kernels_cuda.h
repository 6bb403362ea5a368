// CUDA kernels of the pini_native ops, launched on a given stream. Only CUDA runtime types here:
// the PyTorch side (cuda/bindings_cuda.cpp) checks arguments and passes raw pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../feature_rows.h"
#include "../inject_launch.h"

namespace pini::cuda {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

struct InjectShape {
  int64_t rows, width, inner, num_samples;
  bool multiply;
};

// x of a side of the noisy cosine logits: its data and storage type, read as float32.
struct TypedData {
  const void* data;
  Dtype dtype;
};

// One side (image or text) of the noisy cosine logits (../feature_rows.h).
using FeatureRows = ::pini::FeatureRows<TypedData>;

// `seed` is always a device pointer to the 0-d int64 seed tensor: the kernels read it, so a
// captured CUDA graph replays with the value the tensor holds then.

void normal_fill(const int64_t* seed, int64_t start, int64_t count, float* out,
                 cudaStream_t stream);

// The grid of both inject kernels: launch::inject_launch (../inject_launch.h).
void inject_forward(const void* x, Dtype x_dtype, const float* mu, const float* sigma, void* out,
                    Dtype out_dtype, const int64_t* seed, InjectShape shape,
                    const launch::InjectLaunch& launch, cudaStream_t stream);

void inject_backward(const void* grad_out, Dtype out_dtype, const void* x, Dtype x_dtype,
                     const float* mu, const float* sigma, void* grad_x, float* partial_mu,
                     float* partial_sigma, const int64_t* seed, InjectShape shape,
                     const launch::InjectLaunch& launch, cudaStream_t stream);

void noisy_normalize(const FeatureRows& side, const int64_t* seed, int64_t stream_offset,
                     float* unit, float* norm, cudaStream_t stream);

void noisy_normalize_backward(const FeatureRows& side, const int64_t* seed, int64_t stream_offset,
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
