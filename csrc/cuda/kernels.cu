// CUDA kernels of the pini_native ops (see kernels_cuda.h). Small includes only: this file
// compiles in seconds, unlike one that includes torch/extension.h.
//
// A thread works on 4 consecutive elements at a time. Where the host found them aligned (a width
// divisible by 4 and pointers aligned to 4 elements; checked once per launch, and the kernels are
// compiled for both cases), one Philox call gives their 4 normals and one 16-byte (float32) or
// 8-byte (half) access loads or stores them; otherwise they are taken one by one. The seed is a
// device pointer read inside every kernel, so a captured CUDA graph replays with fresh noise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <initializer_list>

#include "../philox.h"
#include "kernels_cuda.h"

namespace pini::cuda {
namespace {

// 256 threads: 8 warps per block, enough to hide latency in these bandwidth-bound kernels.
constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
static_assert(kThreads == launch::kInjectThreads, "the inject grid assumes kThreads threads");
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

// The seed, a 0-d int64 tensor on the device, read inside the kernel (not on the host): a CUDA
// graph captured around a launch draws the noise of whatever value the tensor holds at replay.
// Every thread reads the same 8 bytes (one cached load); as uint64, the key of docs/spec.md §3.
__device__ __forceinline__ uint64_t read_seed(const int64_t* seed_ptr) {
  return static_cast<uint64_t>(__ldg(seed_ptr));
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

// --- four consecutive values: one vector access where aligned -----------------------------------
//
// "Aligned" (the host checks it once per launch, aligned4 below): every thread's first index is a
// multiple of 4 and the pointer is aligned to 4 elements, so the 4 values are one 16-byte (float32)
// or 8-byte (half) access. Otherwise the first `count` (1..4) values, one by one.

__device__ __forceinline__ void float2_pair(float2 pair, float* out) {
  out[0] = pair.x;
  out[1] = pair.y;
}

template <bool kAligned>
__device__ __forceinline__ void load4(const void* data, Dtype dtype, int64_t index, int count,
                                      float out[4]) {
  if constexpr (kAligned) {
    switch (dtype) {
      case Dtype::kFloat32: {
        const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(data) + index);
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
        return;
      }
      case Dtype::kFloat16: {
        const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __half*>(data) + index);
        float2_pair(__half22float2(*reinterpret_cast<const __half2*>(&raw.x)), out);
        float2_pair(__half22float2(*reinterpret_cast<const __half2*>(&raw.y)), out + 2);
        return;
      }
      default: {
        const uint2 raw =
            *reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(data) + index);
        float2_pair(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x)), out);
        float2_pair(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y)), out + 2);
        return;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = j < count ? load_float(data, dtype, index + j) : 0.0f;
  }
}

template <bool kAligned>
__device__ __forceinline__ void store4(void* data, Dtype dtype, int64_t index, int count,
                                       const float values[4]) {
  if constexpr (kAligned) {
    switch (dtype) {
      case Dtype::kFloat32:
        *reinterpret_cast<float4*>(static_cast<float*>(data) + index) =
            make_float4(values[0], values[1], values[2], values[3]);
        return;
      case Dtype::kFloat16: {
        uint2 raw;
        *reinterpret_cast<__half2*>(&raw.x) = __floats2half2_rn(values[0], values[1]);
        *reinterpret_cast<__half2*>(&raw.y) = __floats2half2_rn(values[2], values[3]);
        *reinterpret_cast<uint2*>(static_cast<__half*>(data) + index) = raw;
        return;
      }
      default: {
        uint2 raw;
        *reinterpret_cast<__nv_bfloat162*>(&raw.x) = __floats2bfloat162_rn(values[0], values[1]);
        *reinterpret_cast<__nv_bfloat162*>(&raw.y) = __floats2bfloat162_rn(values[2], values[3]);
        *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(data) + index) = raw;
        return;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < count) store_float(data, dtype, index + j, values[j]);
  }
}

// Stream elements first .. first + 3; kAligned: first % 4 == 0, one Philox call.
template <bool kAligned>
__device__ __forceinline__ void normals4(uint64_t seed, int64_t first, float out[4]) {
  if constexpr (kAligned) {
    normal_quad(seed, static_cast<uint64_t>(first) >> 2, out);
  } else {
    stream_normals4(seed, first, out);
  }
}

size_t element_size(Dtype dtype) { return dtype == Dtype::kFloat32 ? 4 : 2; }

// Whether 4 consecutive elements from `data` (and from every 4th element on) are one access.
bool aligned4(const void* data, Dtype dtype) {
  return data == nullptr || reinterpret_cast<uintptr_t>(data) % (4 * element_size(dtype)) == 0;
}

__global__ void __launch_bounds__(kThreads)
    normal_fill_kernel(const int64_t* seed_ptr, int64_t start, int64_t count, float* out,
                       bool aligned) {
  const uint64_t seed = read_seed(seed_ptr);
  const int64_t element = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (element >= count) return;
  const int valid = static_cast<int>(min(count - element, int64_t{4}));
  float normals[4];
  if (aligned && valid == 4) {  // start % 4 == 0 and out 16-byte aligned (checked on the host)
    normals4<true>(seed, start + element, normals);
    store4<true>(out, Dtype::kFloat32, element, 4, normals);
  } else {
    normals4<false>(seed, start + element, normals);
    store4<false>(out, Dtype::kFloat32, element, valid, normals);
  }
}

// --- fused_inject -------------------------------------------------------------------------------
//
// A block is column_threads x row_lanes threads (../inject_launch.h): thread t owns the 4 columns
// from `column` of its row lane's rows in the block's chunk. The parameter index column / inner is
// computed once per thread, the element and stream indices by multiplications and additions: no
// 64-bit division or remainder per element. The stream index of sample s of element
// row * width + column is s * rows * width + row * width + column, as before (docs/spec.md §3).

struct ThreadTile {
  int64_t column;  // first of the thread's 4 columns
  int count;       // how many of them exist (0 past the row's end)
  int row_lane;
  int row_lanes;
  int64_t row_begin, row_end;  // the block's chunk of rows
};

__device__ __forceinline__ ThreadTile thread_tile(const InjectShape& shape, int column_threads,
                                                  int64_t rows_per_chunk) {
  ThreadTile tile;
  const int column_thread = static_cast<int>(threadIdx.x) & (column_threads - 1);
  tile.row_lane = static_cast<int>(threadIdx.x) / column_threads;
  tile.row_lanes = kThreads / column_threads;
  tile.column = 4 * (static_cast<int64_t>(blockIdx.x) * column_threads + column_thread);
  tile.count = static_cast<int>(max(int64_t{0}, min(int64_t{4}, shape.width - tile.column)));
  tile.row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  tile.row_end = min(tile.row_begin + rows_per_chunk, shape.rows);
  return tile;
}

__device__ __forceinline__ void load_params4(const float* mu, const float* sigma,
                                             const InjectShape& shape, const ThreadTile& tile,
                                             float mu_values[4], float sigma_values[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t param = j < tile.count ? (tile.column + j) / shape.inner : 0;
    mu_values[j] = mu[param];
    sigma_values[j] = sigma[param];
  }
}

template <bool kAligned>
__global__ void __launch_bounds__(kThreads)
    inject_forward_kernel(const void* x, Dtype x_dtype, const float* mu, const float* sigma,
                          void* out, Dtype out_dtype, const int64_t* seed_ptr, InjectShape shape,
                          int column_threads, int64_t rows_per_chunk) {
  const uint64_t seed = read_seed(seed_ptr);
  const ThreadTile tile = thread_tile(shape, column_threads, rows_per_chunk);
  if (tile.count == 0) return;
  const int64_t numel = shape.rows * shape.width;
  float mu_values[4], sigma_values[4];
  load_params4(mu, sigma, shape, tile, mu_values, sigma_values);
  for (int64_t row = tile.row_begin + tile.row_lane; row < tile.row_end; row += tile.row_lanes) {
    const int64_t element = row * shape.width + tile.column;
    float x_values[4];
    load4<kAligned>(x, x_dtype, element, tile.count, x_values);
    int64_t stream_first = element;
    for (int64_t sample = 0; sample < shape.num_samples; ++sample, stream_first += numel) {
      float values[4];
      normals4<kAligned>(seed, stream_first, values);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float noise = mu_values[j] + sigma_values[j] * values[j];
        values[j] = shape.multiply ? x_values[j] * noise : x_values[j] + noise;
      }
      store4<kAligned>(out, out_dtype, stream_first, tile.count, values);
    }
  }
}

__device__ __forceinline__ void add_to(float4& sum, const float4 value) {
  sum.x += value.x;
  sum.y += value.y;
  sum.z += value.z;
  sum.w += value.w;
}

// Writes grad_x (summed over samples) and, when partial_mu is given, one row of parameter partial
// sums per block: its row lanes' sums added in shared memory in a fixed order (deterministic).
template <bool kAligned>
__global__ void __launch_bounds__(kThreads)
    inject_backward_kernel(const void* grad_out, Dtype out_dtype, const void* x, Dtype x_dtype,
                           const float* mu, const float* sigma, void* grad_x, float* partial_mu,
                           float* partial_sigma, const int64_t* seed_ptr, InjectShape shape,
                           int column_threads, int64_t rows_per_chunk) {
  const uint64_t seed = read_seed(seed_ptr);
  __shared__ float4 lane_mu_grad[kThreads], lane_sigma_grad[kThreads];
  const ThreadTile tile = thread_tile(shape, column_threads, rows_per_chunk);
  const int64_t numel = shape.rows * shape.width;
  const bool need_params = partial_mu != nullptr;
  const bool need_eps = need_params || shape.multiply;
  float mu_grad[4] = {0, 0, 0, 0}, sigma_grad[4] = {0, 0, 0, 0};
  if (tile.count > 0) {
    float mu_values[4], sigma_values[4];
    load_params4(mu, sigma, shape, tile, mu_values, sigma_values);
    for (int64_t row = tile.row_begin + tile.row_lane; row < tile.row_end;
         row += tile.row_lanes) {
      const int64_t element = row * shape.width + tile.column;
      // Add mode never reads x: autograd saves a one-element stand-in for it (inject.py).
      float x_values[4] = {0, 0, 0, 0}, x_grad[4] = {0, 0, 0, 0};
      if (shape.multiply) load4<kAligned>(x, x_dtype, element, tile.count, x_values);
      int64_t stream_first = element;
      for (int64_t sample = 0; sample < shape.num_samples; ++sample, stream_first += numel) {
        float grad[4], eps[4] = {0, 0, 0, 0};
        load4<kAligned>(grad_out, out_dtype, stream_first, tile.count, grad);
        if (need_eps) normals4<kAligned>(seed, stream_first, eps);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (shape.multiply) {
            x_grad[j] += grad[j] * (mu_values[j] + sigma_values[j] * eps[j]);
            mu_grad[j] += grad[j] * x_values[j];
            sigma_grad[j] += grad[j] * x_values[j] * eps[j];
          } else {
            x_grad[j] += grad[j];
            mu_grad[j] += grad[j];
            sigma_grad[j] += grad[j] * eps[j];
          }
        }
      }
      if (grad_x != nullptr) store4<kAligned>(grad_x, x_dtype, element, tile.count, x_grad);
    }
  }
  if (!need_params) return;  // the same for the whole block: no thread skips a barrier below
  lane_mu_grad[threadIdx.x] = make_float4(mu_grad[0], mu_grad[1], mu_grad[2], mu_grad[3]);
  lane_sigma_grad[threadIdx.x] =
      make_float4(sigma_grad[0], sigma_grad[1], sigma_grad[2], sigma_grad[3]);
  for (int stride = tile.row_lanes / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (tile.row_lane < stride) {  // lanes [0, stride) add lanes [stride, 2 * stride)
      const int other = threadIdx.x + stride * column_threads;
      add_to(lane_mu_grad[threadIdx.x], lane_mu_grad[other]);
      add_to(lane_sigma_grad[threadIdx.x], lane_sigma_grad[other]);
    }
  }
  if (tile.row_lane != 0 || tile.count == 0) return;
  const float4 mu_sum = lane_mu_grad[threadIdx.x], sigma_sum = lane_sigma_grad[threadIdx.x];
  const float mu_values[4] = {mu_sum.x, mu_sum.y, mu_sum.z, mu_sum.w};
  const float sigma_values[4] = {sigma_sum.x, sigma_sum.y, sigma_sum.z, sigma_sum.w};
  const int64_t offset = static_cast<int64_t>(blockIdx.y) * shape.width + tile.column;
  store4<kAligned>(partial_mu, Dtype::kFloat32, offset, tile.count, mu_values);
  store4<kAligned>(partial_sigma, Dtype::kFloat32, offset, tile.count, sigma_values);
}

// --- noisy features, normalized -----------------------------------------------------------------
//
// One warp per row; lane l owns columns 4l .. 4l + 3, then 4l + 128, ... kAligned (checked on the
// host, rows_aligned below): D and the row strides are multiples of 4 and the pointers aligned, so
// a lane's 4 columns are one vector access and one Philox call.

// v[d .. d + 3] of one row: x (+ or *) (mu + sigma * eps); 0 past the row's end.
template <bool kAligned>
__device__ __forceinline__ void noisy_values4(const FeatureRows& side, uint64_t seed,
                                              int64_t stream_offset, int64_t row, int64_t d,
                                              int count, float values[4], float eps[4]) {
  load4<kAligned>(side.x.data, side.x.dtype, row * side.x_row_stride + d, count, values);
#pragma unroll
  for (int j = 0; j < 4; ++j) eps[j] = 0.0f;
  if (side.mu == nullptr) return;
  normals4<kAligned>(seed, stream_offset + row * side.dim + d, eps);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j >= count) continue;
    const float noise = side.mu[row * side.mu_row_stride + (d + j) * side.mu_col_stride] +
                        side.sigma[row * side.sigma_row_stride + (d + j) * side.sigma_col_stride] *
                            eps[j];
    values[j] = side.multiply ? values[j] * noise : values[j] + noise;
  }
}

__device__ __forceinline__ int count4(int64_t d, int64_t dim) {
  return static_cast<int>(min(int64_t{4}, dim - d));
}

// unit = v / max(|v|, floor), norm = |v|.
template <bool kAligned>
__global__ void __launch_bounds__(kThreads)
    noisy_normalize_kernel(FeatureRows side, const int64_t* seed_ptr, int64_t stream_offset,
                           float* unit, float* norm) {
  const uint64_t seed = read_seed(seed_ptr);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= side.rows) return;
  float* unit_row = unit + row * side.dim;
  float squares = 0.0f;
  for (int64_t d = 4 * lane; d < side.dim; d += 4 * kWarpSize) {
    const int count = count4(d, side.dim);
    float values[4], eps[4];
    noisy_values4<kAligned>(side, seed, stream_offset, row, d, count, values, eps);
    store4<kAligned>(unit_row, Dtype::kFloat32, d, count, values);
#pragma unroll
    for (int j = 0; j < 4; ++j) squares += values[j] * values[j];
  }
  const float row_norm = sqrtf(warp_sum(squares));
  // Not fmaxf, which drops NaN: a NaN row stays NaN (as F.normalize's clamp_min).
  const float inverse = 1.0f / (row_norm <= kNormFloor ? kNormFloor : row_norm);
  for (int64_t d = 4 * lane; d < side.dim; d += 4 * kWarpSize) {  // the lane's own values
    const int count = count4(d, side.dim);
    float values[4];
    load4<kAligned>(unit_row, Dtype::kFloat32, d, count, values);
#pragma unroll
    for (int j = 0; j < 4; ++j) values[j] *= inverse;
    store4<kAligned>(unit_row, Dtype::kFloat32, d, count, values);
  }
  if (lane == 0) norm[row] = row_norm;
}

// Adds this sample's gradients for x, mu, sigma (fp32 rows x D accumulators; nullptr: not needed).
template <bool kAligned>
__global__ void __launch_bounds__(kThreads)
    noisy_normalize_backward_kernel(FeatureRows side, const int64_t* seed_ptr,
                                    int64_t stream_offset, const float* unit, const float* norm,
                                    const float* grad_unit,
                                    float* grad_x, float* grad_mu, float* grad_sigma) {
  const uint64_t seed = read_seed(seed_ptr);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= side.rows) return;
  const int64_t offset = row * side.dim;
  float radial = 0.0f;
  for (int64_t d = 4 * lane; d < side.dim; d += 4 * kWarpSize) {
    const int count = count4(d, side.dim);
    float u[4], g[4];
    load4<kAligned>(unit, Dtype::kFloat32, offset + d, count, u);
    load4<kAligned>(grad_unit, Dtype::kFloat32, offset + d, count, g);
#pragma unroll
    for (int j = 0; j < 4; ++j) radial += u[j] * g[j];
  }
  radial = warp_sum(radial);
  const float row_norm = norm[row];
  const bool has_noise = side.mu != nullptr;
  const bool need_x = has_noise && side.multiply && grad_mu != nullptr;
  for (int64_t d = 4 * lane; d < side.dim; d += 4 * kWarpSize) {
    const int count = count4(d, side.dim);
    float u[4], g[4], eps[4] = {0, 0, 0, 0}, x[4] = {0, 0, 0, 0}, grad_value[4];
    load4<kAligned>(unit, Dtype::kFloat32, offset + d, count, u);
    load4<kAligned>(grad_unit, Dtype::kFloat32, offset + d, count, g);
    if (has_noise && (side.multiply || grad_mu != nullptr))
      normals4<kAligned>(seed, stream_offset + offset + d, eps);
    if (need_x) load4<kAligned>(side.x.data, side.x.dtype, row * side.x_row_stride + d, count, x);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      grad_value[j] = !(row_norm <= kNormFloor) ? (g[j] - u[j] * radial) / row_norm  // NaN too
                                                 : g[j] / kNormFloor;
    if (grad_x != nullptr) {
      float accumulated[4];
      load4<kAligned>(grad_x, Dtype::kFloat32, offset + d, count, accumulated);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float noise = 1.0f;
        if (has_noise && side.multiply && j < count)
          noise = side.mu[row * side.mu_row_stride + (d + j) * side.mu_col_stride] +
                  side.sigma[row * side.sigma_row_stride + (d + j) * side.sigma_col_stride] *
                      eps[j];
        accumulated[j] += grad_value[j] * noise;
      }
      store4<kAligned>(grad_x, Dtype::kFloat32, offset + d, count, accumulated);
    }
    if (has_noise && grad_mu != nullptr) {
      float mu_sum[4], sigma_sum[4];
      load4<kAligned>(grad_mu, Dtype::kFloat32, offset + d, count, mu_sum);
      load4<kAligned>(grad_sigma, Dtype::kFloat32, offset + d, count, sigma_sum);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float mu_grad = side.multiply ? grad_value[j] * x[j] : grad_value[j];
        mu_sum[j] += mu_grad;
        sigma_sum[j] += mu_grad * eps[j];
      }
      store4<kAligned>(grad_mu, Dtype::kFloat32, offset + d, count, mu_sum);
      store4<kAligned>(grad_sigma, Dtype::kFloat32, offset + d, count, sigma_sum);
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
  // As the CPU kernel: the cosine of the largest logit, so that (cosine - it) * scale is <= 0
  // and exactly 0 at the largest at any scale (an FMA of cosine * scale - max is not).
  float value_max = -INFINITY, value_min = INFINITY, total = 0.0f;
  for (int64_t c = lane; c < classes; c += kWarpSize) {
    value_max = fmaxf(value_max, values[c]);
    value_min = fminf(value_min, values[c]);
    total += values[c];
  }
  value_max = warp_max(value_max);
  value_min = -warp_max(-value_min);
  total = warp_sum(total);
  const float extreme = scale >= 0.0f ? value_max : value_min;
  float exp_sum = 0.0f;
  for (int64_t c = lane; c < classes; c += kWarpSize) {
    exp_sum += expf((values[c] - extreme) * scale);
  }
  exp_sum = warp_sum(exp_sum);
  // fmaxf drops NaN; the sum keeps it: a NaN cosine (or scale) makes the log-sum-exp NaN.
  const float row_max = isnan(total * scale) ? NAN : extreme * scale;
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
    // A positive exponent (rounding of a huge logit scale) counts as 0; NaN stays NaN.
    const float exponent = values[c] * scale - row_lse;
    const float probability = expf(exponent > 0.0f ? 0.0f : exponent);
    const float one_hot = c == row_target ? 1.0f - label_smoothing : 0.0f;
    const float logit_grad = g * (probability - one_hot - smoothing_share);
    scale_sum += logit_grad * values[c];
    values[c] = logit_grad * scale;
  }
  scale_sum = warp_sum(scale_sum);
  if (lane == 0) scale_grad[row] = scale_sum;
}

}  // namespace

void normal_fill(const int64_t* seed, int64_t start, int64_t count, float* out,
                 cudaStream_t stream) {
  if (count == 0) return;
  const bool aligned = start % 4 == 0 && aligned4(out, Dtype::kFloat32);
  normal_fill_kernel<<<blocks_for((count + 3) / 4), kThreads, 0, stream>>>(seed, start, count, out,
                                                                           aligned);
}

namespace {

dim3 inject_grid(const launch::InjectLaunch& launch) {
  return dim3(static_cast<unsigned>(launch.column_blocks),
              static_cast<unsigned>(launch.row_chunks));
}

}  // namespace

void inject_forward(const void* x, Dtype x_dtype, const float* mu, const float* sigma, void* out,
                    Dtype out_dtype, const int64_t* seed, InjectShape shape,
                    const launch::InjectLaunch& launch, cudaStream_t stream) {
  if (shape.rows * shape.width == 0) return;
  const bool aligned = shape.width % 4 == 0 && aligned4(x, x_dtype) && aligned4(out, out_dtype);
  const auto kernel = aligned ? inject_forward_kernel<true> : inject_forward_kernel<false>;
  kernel<<<inject_grid(launch), kThreads, 0, stream>>>(
      x, x_dtype, mu, sigma, out, out_dtype, seed, shape,
      static_cast<int>(launch.column_threads), launch.rows_per_chunk);
}

void inject_backward(const void* grad_out, Dtype out_dtype, const void* x, Dtype x_dtype,
                     const float* mu, const float* sigma, void* grad_x, float* partial_mu,
                     float* partial_sigma, const int64_t* seed, InjectShape shape,
                     const launch::InjectLaunch& launch, cudaStream_t stream) {
  if (shape.rows * shape.width == 0) return;
  const bool aligned = shape.width % 4 == 0 && aligned4(grad_out, out_dtype) &&
                       (!shape.multiply || aligned4(x, x_dtype)) && aligned4(grad_x, x_dtype) &&
                       aligned4(partial_mu, Dtype::kFloat32) &&
                       aligned4(partial_sigma, Dtype::kFloat32);
  const auto kernel = aligned ? inject_backward_kernel<true> : inject_backward_kernel<false>;
  kernel<<<inject_grid(launch), kThreads, 0, stream>>>(
      grad_out, out_dtype, x, x_dtype, mu, sigma, grad_x, partial_mu, partial_sigma, seed, shape,
      static_cast<int>(launch.column_threads), launch.rows_per_chunk);
}

namespace {

// Whether the row kernels may take a lane's 4 columns as one vector access: D, the row stride
// and the stream offset multiples of 4, and every pointer aligned to 4 elements.
bool rows_aligned(const FeatureRows& side, int64_t stream_offset,
                  std::initializer_list<const float*> buffers) {
  bool aligned = side.dim % 4 == 0 && side.x_row_stride % 4 == 0 && stream_offset % 4 == 0 &&
                 aligned4(side.x.data, side.x.dtype);
  for (const float* buffer : buffers) aligned = aligned && aligned4(buffer, Dtype::kFloat32);
  return aligned;
}

int64_t row_blocks(int64_t rows) { return (rows + kWarpsPerBlock - 1) / kWarpsPerBlock; }

}  // namespace

void noisy_normalize(const FeatureRows& side, const int64_t* seed, int64_t stream_offset,
                     float* unit, float* norm, cudaStream_t stream) {
  if (side.rows == 0) return;
  const auto kernel = rows_aligned(side, stream_offset, {unit}) ? noisy_normalize_kernel<true>
                                                                : noisy_normalize_kernel<false>;
  kernel<<<row_blocks(side.rows), kThreads, 0, stream>>>(side, seed, stream_offset, unit, norm);
}

void noisy_normalize_backward(const FeatureRows& side, const int64_t* seed, int64_t stream_offset,
                              const float* unit, const float* norm, const float* grad_unit,
                              float* grad_x, float* grad_mu, float* grad_sigma,
                              cudaStream_t stream) {
  if (side.rows == 0) return;
  const bool aligned =
      rows_aligned(side, stream_offset, {unit, grad_unit, grad_x, grad_mu, grad_sigma});
  const auto kernel =
      aligned ? noisy_normalize_backward_kernel<true> : noisy_normalize_backward_kernel<false>;
  kernel<<<row_blocks(side.rows), kThreads, 0, stream>>>(
      side, seed, stream_offset, unit, norm, grad_unit, grad_x, grad_mu, grad_sigma);
}

void cross_entropy_stats(const float* cosine, const int64_t* target, const float* scale,
                         int64_t rows, int64_t classes, float* lse, float* target_logit,
                         float* logit_sum, cudaStream_t stream) {
  if (rows == 0) return;
  cross_entropy_stats_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(cosine, target, scale, rows,
                                                              classes, lse, target_logit,
                                                              logit_sum);
}

void cross_entropy_grad(float* cosine, const float* lse, const int64_t* target,
                        const float* row_grad, const float* scale, float label_smoothing,
                        int64_t rows, int64_t classes, float* scale_grad, cudaStream_t stream) {
  if (rows == 0) return;
  cross_entropy_grad_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(
      cosine, lse, target, row_grad, scale, label_smoothing, rows, classes, scale_grad);
}

}  // namespace pini::cuda
