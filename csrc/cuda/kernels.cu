// CUDA kernels of the pini_native ops (see kernels_cuda.h). Small includes only: this file
// compiles in seconds, unlike one that includes torch/extension.h.
//
// Noise: a thread works on 4 consecutive stream elements at a time; when they start at a multiple
// of 4 (rows of a width divisible by 4), one Philox call feeds all four.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../philox.h"
#include "kernels_cuda.h"

namespace pini::cuda {
namespace {

// 256 threads: 8 warps per block, enough to hide latency in these bandwidth-bound kernels.
constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float load_float(const void* data, Dtype dtype, int64_t index) {
  switch (dtype) {
    case Dtype::kFloat32:
      return static_cast<const float*>(data)[index];
    case Dtype::kFloat16:
      return __half2float(static_cast<const __half*>(data)[index]);
    default:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[index]);
  }
}

__device__ __forceinline__ void store_float(void* data, Dtype dtype, int64_t index, float value) {
  switch (dtype) {
    case Dtype::kFloat32:
      static_cast<float*>(data)[index] = value;
      break;
    case Dtype::kFloat16:
      static_cast<__half*>(data)[index] = __float2half_rn(value);
      break;
    default:
      static_cast<__nv_bfloat16*>(data)[index] = __float2bfloat16_rn(value);
  }
}

// Stream elements first .. first + 3 (any alignment: two quads when first % 4 != 0).
__device__ __forceinline__ void stream_normals4(uint64_t seed, int64_t first, float out[4]) {
  const uint64_t quad = static_cast<uint64_t>(first) >> 2;
  const int lane = static_cast<int>(first & 3);
  float low[4];
  normal_quad(seed, quad, low);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = low[j];
    return;
  }
  float high[4];
  normal_quad(seed, quad + 1, high);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int index = lane + j;
    float value = high[0];
    value = index == 1 ? low[1] : value;
    value = index == 2 ? low[2] : value;
    value = index == 3 ? low[3] : value;
    value = index == 5 ? high[1] : value;
    value = index == 6 ? high[2] : value;
    out[j] = value;
  }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

__global__ void normal_fill_kernel(uint64_t seed, int64_t start, int64_t count, float* out) {
  const int64_t element = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (element >= count) return;
  float normals[4];
  stream_normals4(seed, start + element, normals);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (element + j < count) out[element + j] = normals[j];
}

__device__ __forceinline__ int64_t param_index(int64_t element, const InjectShape& shape) {
  return (element % shape.width) / shape.inner;
}

// One thread: elements i .. i + 3 of x, every sample.
__global__ void inject_forward_kernel(const void* x, Dtype x_dtype, const float* mu,
                                      const float* sigma, void* out, Dtype out_dtype,
                                      uint64_t seed, InjectShape shape) {
  const int64_t numel = shape.rows * shape.width;
  const int64_t first = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (first >= numel) return;
  float x_values[4], mu_values[4], sigma_values[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bool inside = first + j < numel;
    const int64_t param = inside ? param_index(first + j, shape) : 0;
    x_values[j] = inside ? load_float(x, x_dtype, first + j) : 0.0f;
    mu_values[j] = mu[param];
    sigma_values[j] = sigma[param];
  }
  for (int64_t sample = 0; sample < shape.num_samples; ++sample) {
    const int64_t stream_first = sample * numel + first;
    float eps[4];
    stream_normals4(seed, stream_first, eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (first + j >= numel) break;
      const float noise = mu_values[j] + sigma_values[j] * eps[j];
      const float value = shape.multiply ? x_values[j] * noise : x_values[j] + noise;
      store_float(out, out_dtype, stream_first + j, value);
    }
  }
}

// One thread: columns c .. c + 3 of a chunk of rows, every sample; writes grad_x and one row of
// parameter partial sums (no atomics: each column of each chunk has one owner).
__global__ void inject_backward_kernel(const void* grad_out, Dtype out_dtype, const void* x,
                                       Dtype x_dtype, const float* mu, const float* sigma,
                                       void* grad_x, float* partial_mu, float* partial_sigma,
                                       uint64_t seed, InjectShape shape, int64_t rows_per_chunk) {
  const int64_t numel = shape.rows * shape.width;
  const int64_t column = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (column >= shape.width) return;
  const int64_t row_chunk = blockIdx.y;
  const int64_t row_start = row_chunk * rows_per_chunk;
  const int64_t row_end = min(row_start + rows_per_chunk, shape.rows);
  const bool need_params = partial_mu != nullptr;
  const bool need_eps = need_params || shape.multiply;
  float mu_values[4], sigma_values[4], mu_grad[4] = {0, 0, 0, 0}, sigma_grad[4] = {0, 0, 0, 0};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t param = column + j < shape.width ? (column + j) / shape.inner : 0;
    mu_values[j] = mu[param];
    sigma_values[j] = sigma[param];
  }
  for (int64_t row = row_start; row < row_end; ++row) {
    const int64_t base = row * shape.width + column;
    float x_values[4], x_grad[4] = {0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < 4; ++j)
      x_values[j] = column + j < shape.width ? load_float(x, x_dtype, base + j) : 0.0f;
    for (int64_t sample = 0; sample < shape.num_samples; ++sample) {
      const int64_t stream_first = sample * numel + base;
      float eps[4] = {0, 0, 0, 0};
      if (need_eps) stream_normals4(seed, stream_first, eps);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (column + j >= shape.width) break;
        const float g = load_float(grad_out, out_dtype, stream_first + j);
        if (shape.multiply) {
          x_grad[j] += g * (mu_values[j] + sigma_values[j] * eps[j]);
          mu_grad[j] += g * x_values[j];
          sigma_grad[j] += g * x_values[j] * eps[j];
        } else {
          x_grad[j] += g;
          mu_grad[j] += g;
          sigma_grad[j] += g * eps[j];
        }
      }
    }
    if (grad_x != nullptr) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (column + j < shape.width) store_float(grad_x, x_dtype, base + j, x_grad[j]);
    }
  }
  if (need_params) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (column + j >= shape.width) break;
      partial_mu[row_chunk * shape.width + column + j] = mu_grad[j];
      partial_sigma[row_chunk * shape.width + column + j] = sigma_grad[j];
    }
  }
}

// v[d .. d + 3] of one row: x (+ or *) (mu + sigma * eps).
__device__ __forceinline__ void noisy_values4(const FeatureRows& side, uint64_t seed,
                                              int64_t stream_offset, int64_t row, int64_t d,
                                              float values[4], float eps[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    values[j] = d + j < side.dim ? load_float(side.x, side.x_dtype, row * side.x_row_stride + d + j)
                                 : 0.0f;
    eps[j] = 0.0f;
  }
  if (side.mu == nullptr) return;
  stream_normals4(seed, stream_offset + row * side.dim + d, eps);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (d + j >= side.dim) {
      values[j] = 0.0f;
      continue;
    }
    const float noise = side.mu[row * side.mu_row_stride + (d + j) * side.mu_col_stride] +
                        side.sigma[row * side.sigma_row_stride + (d + j) * side.sigma_col_stride] *
                            eps[j];
    values[j] = side.multiply ? values[j] * noise : values[j] + noise;
  }
}

// One warp per row: unit = v / max(|v|, floor), norm = |v|.
__global__ void noisy_normalize_kernel(FeatureRows side, uint64_t seed, int64_t stream_offset,
                                       float* unit, float* norm) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= side.rows) return;
  float squares = 0.0f;
  for (int64_t d = 4 * lane; d < side.dim; d += 4 * kWarpSize) {
    float values[4], eps[4];
    noisy_values4(side, seed, stream_offset, row, d, values, eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (d + j < side.dim) unit[row * side.dim + d + j] = values[j];
      squares += values[j] * values[j];
    }
  }
  const float row_norm = sqrtf(warp_sum(squares));
  const float inverse = 1.0f / fmaxf(row_norm, kNormFloor);
  for (int64_t d = 4 * lane; d < side.dim; d += 4 * kWarpSize) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (d + j < side.dim) unit[row * side.dim + d + j] *= inverse;
  }
  if (lane == 0) norm[row] = row_norm;
}

// One warp per row: add this sample's gradients for x, mu, sigma (fp32 rows x D accumulators).
__global__ void noisy_normalize_backward_kernel(FeatureRows side, uint64_t seed,
                                                int64_t stream_offset, const float* unit,
                                                const float* norm, const float* grad_unit,
                                                float* grad_x, float* grad_mu,
                                                float* grad_sigma) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= side.rows) return;
  const int64_t offset = row * side.dim;
  float radial = 0.0f;
  for (int64_t d = lane; d < side.dim; d += kWarpSize) radial += unit[offset + d] * grad_unit[offset + d];
  radial = warp_sum(radial);
  const float row_norm = norm[row];
  const bool has_noise = side.mu != nullptr;
  for (int64_t d = 4 * lane; d < side.dim; d += 4 * kWarpSize) {
    float eps[4] = {0, 0, 0, 0};
    if (has_noise && (side.multiply || grad_mu != nullptr))
      stream_normals4(seed, stream_offset + offset + d, eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t column = d + j;
      if (column >= side.dim) break;
      const float u = unit[offset + column], g = grad_unit[offset + column];
      const float grad_value = row_norm > kNormFloor ? (g - u * radial) / row_norm : g / kNormFloor;
      float mu = 0.0f, sigma = 0.0f;
      if (has_noise) {
        mu = side.mu[row * side.mu_row_stride + column * side.mu_col_stride];
        sigma = side.sigma[row * side.sigma_row_stride + column * side.sigma_col_stride];
      }
      if (grad_x != nullptr)
        grad_x[offset + column] +=
            has_noise && side.multiply ? grad_value * (mu + sigma * eps[j]) : grad_value;
      if (has_noise && grad_mu != nullptr) {
        const float mu_grad =
            side.multiply
                ? grad_value * load_float(side.x, side.x_dtype, row * side.x_row_stride + column)
                : grad_value;
        grad_mu[offset + column] += mu_grad;
        grad_sigma[offset + column] += mu_grad * eps[j];
      }
    }
  }
}

// One warp per row of scale * cosine: log-sum-exp, target logit, sum of logits.
__global__ void cross_entropy_stats_kernel(const float* cosine, const int64_t* target,
                                           const float* scale_ptr, int64_t rows, int64_t classes,
                                           float* lse, float* target_logit, float* logit_sum) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  const float scale = *scale_ptr;
  const float* values = cosine + row * classes;
  float row_max = -INFINITY, total = 0.0f;
  for (int64_t c = lane; c < classes; c += kWarpSize) {
    row_max = fmaxf(row_max, values[c] * scale);
    total += values[c];
  }
  row_max = warp_max(row_max);
  total = warp_sum(total);
  float exp_sum = 0.0f;
  for (int64_t c = lane; c < classes; c += kWarpSize) exp_sum += expf(values[c] * scale - row_max);
  exp_sum = warp_sum(exp_sum);
  if (lane == 0) {
    const int64_t row_target = target[row];
    const bool valid = row_target >= 0 && row_target < classes;  // validated before the call
    lse[row] = row_max + logf(exp_sum);
    target_logit[row] = valid ? values[row_target] * scale : NAN;
    logit_sum[row] = total * scale;
  }
}

// One warp per row, in place: cosine -> d loss / d cosine; scale_grad[row] = sum dlogit * cosine.
__global__ void cross_entropy_grad_kernel(float* cosine, const float* lse, const int64_t* target,
                                          const float* row_grad, const float* scale_ptr,
                                          float label_smoothing, int64_t rows, int64_t classes,
                                          float* scale_grad) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  const float scale = *scale_ptr;
  const float g = row_grad[row], row_lse = lse[row];
  const int64_t row_target = target[row];
  const float smoothing_share = label_smoothing / static_cast<float>(classes);
  float* values = cosine + row * classes;
  float scale_sum = 0.0f;
  for (int64_t c = lane; c < classes; c += kWarpSize) {
    const float probability = expf(values[c] * scale - row_lse);
    const float one_hot = c == row_target ? 1.0f - label_smoothing : 0.0f;
    const float logit_grad = g * (probability - one_hot - smoothing_share);
    scale_sum += logit_grad * values[c];
    values[c] = logit_grad * scale;
  }
  scale_sum = warp_sum(scale_sum);
  if (lane == 0) scale_grad[row] = scale_sum;
}

}  // namespace

void normal_fill(uint64_t seed, int64_t start, int64_t count, float* out, cudaStream_t stream) {
  if (count == 0) return;
  normal_fill_kernel<<<blocks_for((count + 3) / 4), kThreads, 0, stream>>>(seed, start, count,
                                                                           out);
}

void inject_forward(const void* x, Dtype x_dtype, const float* mu, const float* sigma, void* out,
                    Dtype out_dtype, uint64_t seed, InjectShape shape, cudaStream_t stream) {
  const int64_t numel = shape.rows * shape.width;
  if (numel == 0) return;
  inject_forward_kernel<<<blocks_for((numel + 3) / 4), kThreads, 0, stream>>>(
      x, x_dtype, mu, sigma, out, out_dtype, seed, shape);
}

void inject_backward(const void* grad_out, Dtype out_dtype, const void* x, Dtype x_dtype,
                     const float* mu, const float* sigma, void* grad_x, float* partial_mu,
                     float* partial_sigma, uint64_t seed, InjectShape shape,
                     int64_t rows_per_chunk, cudaStream_t stream) {
  if (shape.rows * shape.width == 0) return;
  const int64_t row_chunks = (shape.rows + rows_per_chunk - 1) / rows_per_chunk;
  const dim3 grid(static_cast<unsigned>(blocks_for((shape.width + 3) / 4)),
                  static_cast<unsigned>(row_chunks));
  inject_backward_kernel<<<grid, kThreads, 0, stream>>>(grad_out, out_dtype, x, x_dtype, mu,
                                                        sigma, grad_x, partial_mu, partial_sigma,
                                                        seed, shape, rows_per_chunk);
}

void noisy_normalize(const FeatureRows& side, uint64_t seed, int64_t stream_offset, float* unit,
                     float* norm, cudaStream_t stream) {
  if (side.rows == 0) return;
  const int64_t blocks = (side.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  noisy_normalize_kernel<<<blocks, kThreads, 0, stream>>>(side, seed, stream_offset, unit, norm);
}

void noisy_normalize_backward(const FeatureRows& side, uint64_t seed, int64_t stream_offset,
                              const float* unit, const float* norm, const float* grad_unit,
                              float* grad_x, float* grad_mu, float* grad_sigma,
                              cudaStream_t stream) {
  if (side.rows == 0) return;
  const int64_t blocks = (side.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  noisy_normalize_backward_kernel<<<blocks, kThreads, 0, stream>>>(
      side, seed, stream_offset, unit, norm, grad_unit, grad_x, grad_mu, grad_sigma);
}

void cross_entropy_stats(const float* cosine, const int64_t* target, const float* scale,
                         int64_t rows, int64_t classes, float* lse, float* target_logit,
                         float* logit_sum, cudaStream_t stream) {
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  cross_entropy_stats_kernel<<<blocks, kThreads, 0, stream>>>(cosine, target, scale, rows,
                                                              classes, lse, target_logit,
                                                              logit_sum);
}

void cross_entropy_grad(float* cosine, const float* lse, const int64_t* target,
                        const float* row_grad, const float* scale, float label_smoothing,
                        int64_t rows, int64_t classes, float* scale_grad, cudaStream_t stream) {
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  cross_entropy_grad_kernel<<<blocks, kThreads, 0, stream>>>(
      cosine, lse, target, row_grad, scale, label_smoothing, rows, classes, scale_grad);
}

}  // namespace pini::cuda
