// CUDA implementations of the pini_native ops (schemas in ../bindings.cpp): the argument checks of
// ../checks.h (shared with the CPU implementations), the device guard and current stream, then the
// launchers of kernels.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"
#include "../inject_launch.h"
#include "kernels_cuda.h"

namespace pini {
namespace {

using at::Tensor;
constexpr auto kCUDA = c10::DeviceType::CUDA;

cuda::Dtype dtype_of(const Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return cuda::Dtype::kFloat32;
    case at::kHalf:
      return cuda::Dtype::kFloat16;
    case at::kBFloat16:
      return cuda::Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", tensor.scalar_type());
  }
}

cudaStream_t stream_of(const Tensor& tensor) {
  return c10::cuda::getCurrentCUDAStream(tensor.device().index()).stream();
}

// The SM count of the tensor's GPU (a host query; no sync).
int64_t multiprocessors(const Tensor& tensor) {
  int count = 0;
  const cudaError_t error =
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, tensor.device().index());
  TORCH_CHECK(error == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(error));
  return count;
}

// The seed tensor as the kernels take it: a pointer they read on the device (checks::seed).
const int64_t* seed_on_device(const Tensor& seed, const Tensor& data) {
  checks::seed(seed, data.device());
  return seed.data_ptr<int64_t>();
}

void check_launch() {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "pini_native CUDA kernel launch failed: ",
              cudaGetErrorString(error));
}

// The grid's limits (launch::inject_launch keeps to them; a caller's rows_per_chunk may not).
void check_grid(const launch::InjectLaunch& launch) {
  TORCH_CHECK(launch.row_chunks <= launch::kMaxRowChunks, "rows / rows_per_chunk = ",
              launch.row_chunks, " row chunks exceed the CUDA grid's limit of ",
              launch::kMaxRowChunks, " (pini_kernels.native.cuda_inject_launch picks a valid one)");
  TORCH_CHECK(launch.column_blocks <= launch::kMaxColumnBlocks, "a row needs ",
              launch.column_blocks, " column blocks, more than the CUDA grid's limit of ",
              launch::kMaxColumnBlocks);
}

void noise_cuda(const Tensor& seed, int64_t start, Tensor& out) {
  checks::noise(start, out, kCUDA);
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::normal_fill(seed_on_device(seed, out), start, out.numel(), out.data_ptr<float>(),
                    stream_of(out));
  check_launch();
}

void inject_forward_cuda(const Tensor& x, const Tensor& mu, const Tensor& sigma, const Tensor& seed,
                         int64_t num_samples, bool multiply, int64_t rows, int64_t width,
                         int64_t inner, Tensor& out) {
  checks::inject_forward(x, mu, sigma, num_samples, rows, width, inner, out, kCUDA);
  const cuda::InjectShape shape{rows, width, inner, num_samples, multiply};
  const c10::cuda::CUDAGuard guard(x.device());
  const auto launch = launch::inject_launch(rows, width, multiprocessors(x));
  check_grid(launch);
  cuda::inject_forward(x.data_ptr(), dtype_of(x, "x"), mu.data_ptr<float>(),
                       sigma.data_ptr<float>(), out.data_ptr(), dtype_of(out, "out"),
                       seed_on_device(seed, x), shape, launch, stream_of(x));
  check_launch();
}

void inject_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& mu,
                          const Tensor& sigma, const Tensor& seed, int64_t num_samples,
                          bool multiply, int64_t rows, int64_t width, int64_t inner,
                          int64_t rows_per_chunk,
                          std::optional<Tensor> grad_x, std::optional<Tensor> partial_mu,
                          std::optional<Tensor> partial_sigma) {
  checks::inject_backward(grad_out, x, mu, sigma, num_samples, multiply, rows, width, inner,
                          rows_per_chunk, grad_x, partial_mu, partial_sigma, kCUDA);
  const auto launch = launch::inject_launch_for_chunks(rows, width, rows_per_chunk);
  check_grid(launch);
  const cuda::InjectShape shape{rows, width, inner, num_samples, multiply};
  // grad_out, not x, names the device: in add mode x may be a stand-in that no kernel reads.
  const c10::cuda::CUDAGuard guard(grad_out.device());
  cuda::inject_backward(grad_out.data_ptr(), dtype_of(grad_out, "grad_out"), x.data_ptr(),
                        dtype_of(x, "x"), mu.data_ptr<float>(), sigma.data_ptr<float>(),
                        grad_x ? grad_x->data_ptr() : nullptr,
                        partial_mu ? partial_mu->data_ptr<float>() : nullptr,
                        partial_sigma ? partial_sigma->data_ptr<float>() : nullptr,
                        seed_on_device(seed, grad_out), shape, launch, stream_of(grad_out));
  check_launch();
}

// The kernels' view of checked feature rows x (rows, D) and their noise parameters.
cuda::FeatureRows feature_rows(const Tensor& x, const checks::NoiseParams& noise, bool multiply) {
  return {{x.data_ptr(), dtype_of(x, "features")}, x.stride(0), noise.mu, noise.sigma,
          noise.mu_row_stride, noise.mu_col_stride, noise.sigma_row_stride,
          noise.sigma_col_stride, x.size(0), x.size(1), multiply};
}

void noisy_normalize_cuda(const Tensor& x, const std::optional<Tensor>& mu,
                          const std::optional<Tensor>& sigma, const Tensor& seed,
                          int64_t stream_offset, bool multiply, Tensor& unit, Tensor& norm) {
  const auto noise = checks::noisy_normalize(x, mu, sigma, unit, norm, kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::noisy_normalize(feature_rows(x, noise, multiply), seed_on_device(seed, x),
                        stream_offset, unit.data_ptr<float>(), norm.data_ptr<float>(),
                        stream_of(x));
  check_launch();
}

void noisy_normalize_backward_cuda(const Tensor& x, const std::optional<Tensor>& mu,
                                   const std::optional<Tensor>& sigma, const Tensor& seed,
                                   int64_t stream_offset, bool multiply, const Tensor& unit,
                                   const Tensor& norm, const Tensor& grad_unit,
                                   std::optional<Tensor> grad_x, std::optional<Tensor> grad_mu,
                                   std::optional<Tensor> grad_sigma) {
  const auto noise = checks::noisy_normalize_backward(x, mu, sigma, unit, norm, grad_unit, grad_x,
                                                      grad_mu, grad_sigma, kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::noisy_normalize_backward(
      feature_rows(x, noise, multiply), seed_on_device(seed, x), stream_offset,
      unit.data_ptr<float>(), norm.data_ptr<float>(), grad_unit.data_ptr<float>(),
      grad_x ? grad_x->data_ptr<float>() : nullptr,
      grad_mu ? grad_mu->data_ptr<float>() : nullptr,
      grad_sigma ? grad_sigma->data_ptr<float>() : nullptr, stream_of(x));
  check_launch();
}

void cross_entropy_stats_cuda(const Tensor& cosine, const Tensor& target, const Tensor& scale,
                              Tensor& lse, Tensor& target_logit, Tensor& logit_sum) {
  checks::cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum, kCUDA);
  const c10::cuda::CUDAGuard guard(cosine.device());
  cuda::cross_entropy_stats(cosine.data_ptr<float>(), target.data_ptr<int64_t>(),
                            scale.data_ptr<float>(), cosine.size(0), cosine.size(1),
                            lse.data_ptr<float>(), target_logit.data_ptr<float>(),
                            logit_sum.data_ptr<float>(), stream_of(cosine));
  check_launch();
}

void cross_entropy_grad_cuda(Tensor& cosine, const Tensor& lse, const Tensor& target,
                             const Tensor& row_grad, const Tensor& scale, double label_smoothing,
                             Tensor& scale_grad) {
  checks::cross_entropy_grad(cosine, lse, target, row_grad, scale, scale_grad, kCUDA);
  const c10::cuda::CUDAGuard guard(cosine.device());
  cuda::cross_entropy_grad(cosine.data_ptr<float>(), lse.data_ptr<float>(),
                           target.data_ptr<int64_t>(), row_grad.data_ptr<float>(),
                           scale.data_ptr<float>(), static_cast<float>(label_smoothing),
                           cosine.size(0), cosine.size(1), scale_grad.data_ptr<float>(),
                           stream_of(cosine));
  check_launch();
}

}  // namespace

TORCH_LIBRARY_IMPL(pini_native, CUDA, m) { PINI_NATIVE_IMPLS(m, cuda); }

}  // namespace pini
