// CUDA implementations of the pini_native ops (schemas in ../bindings.cpp): argument checks, the
// current stream and device guard, then the launchers of kernels.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "kernels_cuda.h"

namespace pini {
namespace {

using at::Tensor;

void check_cuda_contiguous(const Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor, got ", tensor.device());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

void check_float32(const Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, name, " must be float32, got ",
              tensor.scalar_type());
}

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

void check_launch() {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "pini_native CUDA kernel launch failed: ",
              cudaGetErrorString(error));
}

void noise_cuda(int64_t seed, int64_t start, Tensor& out) {
  check_cuda_contiguous(out, "out");
  check_float32(out, "out");
  TORCH_CHECK(start >= 0, "start must be >= 0, got ", start);
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::normal_fill(static_cast<uint64_t>(seed), start, out.numel(), out.data_ptr<float>(),
                    stream_of(out));
  check_launch();
}

cuda::InjectShape inject_shape(const Tensor& x, int64_t num_samples, bool multiply, int64_t rows,
                               int64_t width, int64_t inner) {
  TORCH_CHECK(rows * width == x.numel(), "rows * width must equal x.numel()");
  TORCH_CHECK(inner >= 1 && width % inner == 0, "inner must divide width");
  TORCH_CHECK(num_samples >= 1, "num_samples must be >= 1");
  return {rows, width, inner, num_samples, multiply};
}

void check_params(const Tensor& mu, const Tensor& sigma, int64_t width, int64_t inner) {
  for (const auto* param : {&mu, &sigma}) {
    check_cuda_contiguous(*param, "mu / sigma");
    check_float32(*param, "mu / sigma");
    TORCH_CHECK(param->numel() == width / inner, "mu / sigma must have width / inner elements");
  }
}

void inject_forward_cuda(const Tensor& x, const Tensor& mu, const Tensor& sigma, int64_t seed,
                         int64_t num_samples, bool multiply, int64_t rows, int64_t width,
                         int64_t inner, Tensor& out) {
  check_cuda_contiguous(x, "x");
  check_cuda_contiguous(out, "out");
  check_params(mu, sigma, width, inner);
  const auto shape = inject_shape(x, num_samples, multiply, rows, width, inner);
  TORCH_CHECK(out.numel() == num_samples * x.numel(), "out must have num_samples * x.numel() "
              "elements");
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::inject_forward(x.data_ptr(), dtype_of(x, "x"), mu.data_ptr<float>(),
                       sigma.data_ptr<float>(), out.data_ptr(), dtype_of(out, "out"),
                       static_cast<uint64_t>(seed), shape, stream_of(x));
  check_launch();
}

void inject_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& mu,
                          const Tensor& sigma, int64_t seed, int64_t num_samples, bool multiply,
                          int64_t rows, int64_t width, int64_t inner, int64_t rows_per_chunk,
                          std::optional<Tensor> grad_x, std::optional<Tensor> partial_mu,
                          std::optional<Tensor> partial_sigma) {
  check_cuda_contiguous(grad_out, "grad_out");
  // Add mode never reads x: it may be a stand-in with x's shape and dtype (stride 0).
  if (multiply) check_cuda_contiguous(x, "x");
  check_params(mu, sigma, width, inner);
  const auto shape = inject_shape(x, num_samples, multiply, rows, width, inner);
  TORCH_CHECK(rows_per_chunk >= 1, "rows_per_chunk must be >= 1");
  const int64_t row_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  TORCH_CHECK(row_chunks <= 65535, "too many row chunks for the grid: ", row_chunks);
  TORCH_CHECK(partial_mu.has_value() == partial_sigma.has_value(),
              "partial_mu and partial_sigma come together");
  if (partial_mu) {
    for (const auto* partial : {&*partial_mu, &*partial_sigma}) {
      check_cuda_contiguous(*partial, "partial sums");
      check_float32(*partial, "partial sums");
      TORCH_CHECK(partial->numel() == row_chunks * width, "partial sums have the wrong size");
    }
  }
  if (grad_x) {
    check_cuda_contiguous(*grad_x, "grad_x");
    TORCH_CHECK(grad_x->scalar_type() == x.scalar_type() && grad_x->numel() == x.numel(),
                "grad_x must match x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::inject_backward(grad_out.data_ptr(), dtype_of(grad_out, "grad_out"), x.data_ptr(),
                        dtype_of(x, "x"), mu.data_ptr<float>(), sigma.data_ptr<float>(),
                        grad_x ? grad_x->data_ptr() : nullptr,
                        partial_mu ? partial_mu->data_ptr<float>() : nullptr,
                        partial_sigma ? partial_sigma->data_ptr<float>() : nullptr,
                        static_cast<uint64_t>(seed), shape, rows_per_chunk, stream_of(x));
  check_launch();
}

cuda::FeatureRows feature_rows(const Tensor& x, const std::optional<Tensor>& mu,
                               const std::optional<Tensor>& sigma, bool multiply) {
  TORCH_CHECK(x.is_cuda(), "features must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "features must be 2-D with unit stride along D");
  TORCH_CHECK(mu.has_value() == sigma.has_value(), "mu and sigma come together");
  cuda::FeatureRows side{x.data_ptr(), dtype_of(x, "features"), x.stride(0), nullptr, nullptr,
                         0, 0, 0, 0, x.size(0), x.size(1), multiply};
  if (mu) {
    for (const auto* param : {&*mu, &*sigma}) {
      check_float32(*param, "mu / sigma");
      TORCH_CHECK(param->is_cuda() && param->sizes() == x.sizes(),
                  "mu / sigma must be CUDA tensors expanded to the features' shape");
    }
    side.mu = mu->data_ptr<float>();
    side.sigma = sigma->data_ptr<float>();
    side.mu_row_stride = mu->stride(0);
    side.mu_col_stride = mu->stride(1);
    side.sigma_row_stride = sigma->stride(0);
    side.sigma_col_stride = sigma->stride(1);
  }
  return side;
}

void check_rows_buffer(const Tensor& buffer, const char* name, int64_t numel) {
  check_cuda_contiguous(buffer, name);
  check_float32(buffer, name);
  TORCH_CHECK(buffer.numel() == numel, name, " must have ", numel, " elements, got ",
              buffer.numel());
}

void noisy_normalize_cuda(const Tensor& x, const std::optional<Tensor>& mu,
                          const std::optional<Tensor>& sigma, int64_t seed,
                          int64_t stream_offset, bool multiply, Tensor& unit, Tensor& norm) {
  check_rows_buffer(unit, "unit", x.numel());
  check_rows_buffer(norm, "norm", x.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::noisy_normalize(feature_rows(x, mu, sigma, multiply), static_cast<uint64_t>(seed),
                        stream_offset, unit.data_ptr<float>(), norm.data_ptr<float>(),
                        stream_of(x));
  check_launch();
}

void noisy_normalize_backward_cuda(const Tensor& x, const std::optional<Tensor>& mu,
                                   const std::optional<Tensor>& sigma, int64_t seed,
                                   int64_t stream_offset, bool multiply, const Tensor& unit,
                                   const Tensor& norm, const Tensor& grad_unit,
                                   std::optional<Tensor> grad_x, std::optional<Tensor> grad_mu,
                                   std::optional<Tensor> grad_sigma) {
  check_rows_buffer(unit, "unit", x.numel());
  check_rows_buffer(norm, "norm", x.size(0));
  check_rows_buffer(grad_unit, "grad_unit", x.numel());
  for (const auto* grad : {&grad_x, &grad_mu, &grad_sigma}) {
    if (grad->has_value()) check_rows_buffer(**grad, "gradient accumulator", x.numel());
  }
  TORCH_CHECK(grad_mu.has_value() == grad_sigma.has_value(), "grad_mu and grad_sigma together");
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::noisy_normalize_backward(
      feature_rows(x, mu, sigma, multiply), static_cast<uint64_t>(seed), stream_offset,
      unit.data_ptr<float>(), norm.data_ptr<float>(), grad_unit.data_ptr<float>(),
      grad_x ? grad_x->data_ptr<float>() : nullptr,
      grad_mu ? grad_mu->data_ptr<float>() : nullptr,
      grad_sigma ? grad_sigma->data_ptr<float>() : nullptr, stream_of(x));
  check_launch();
}

void check_loss_inputs(const Tensor& cosine, const Tensor& target, const Tensor& scale) {
  check_cuda_contiguous(cosine, "cosine");
  check_float32(cosine, "cosine");
  TORCH_CHECK(cosine.dim() == 2, "cosine must be (B, C)");
  check_cuda_contiguous(target, "target");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.numel() == cosine.size(0),
              "target must be int64 with B elements");
  check_cuda_contiguous(scale, "logit_scale");
  check_float32(scale, "logit_scale");
  TORCH_CHECK(scale.numel() == 1, "logit_scale must have one element");
}

void cross_entropy_stats_cuda(const Tensor& cosine, const Tensor& target, const Tensor& scale,
                              Tensor& lse, Tensor& target_logit, Tensor& logit_sum) {
  check_loss_inputs(cosine, target, scale);
  const int64_t rows = cosine.size(0);
  check_rows_buffer(lse, "lse", rows);
  check_rows_buffer(target_logit, "target_logit", rows);
  check_rows_buffer(logit_sum, "logit_sum", rows);
  const c10::cuda::CUDAGuard guard(cosine.device());
  cuda::cross_entropy_stats(cosine.data_ptr<float>(), target.data_ptr<int64_t>(),
                            scale.data_ptr<float>(), rows, cosine.size(1), lse.data_ptr<float>(),
                            target_logit.data_ptr<float>(), logit_sum.data_ptr<float>(),
                            stream_of(cosine));
  check_launch();
}

void cross_entropy_grad_cuda(Tensor& cosine, const Tensor& lse, const Tensor& target,
                             const Tensor& row_grad, const Tensor& scale, double label_smoothing,
                             Tensor& scale_grad) {
  check_loss_inputs(cosine, target, scale);
  const int64_t rows = cosine.size(0);
  check_rows_buffer(lse, "lse", rows);
  check_rows_buffer(row_grad, "row_grad", rows);
  check_rows_buffer(scale_grad, "scale_grad", rows);
  const c10::cuda::CUDAGuard guard(cosine.device());
  cuda::cross_entropy_grad(cosine.data_ptr<float>(), lse.data_ptr<float>(),
                           target.data_ptr<int64_t>(), row_grad.data_ptr<float>(),
                           scale.data_ptr<float>(), static_cast<float>(label_smoothing), rows,
                           cosine.size(1), scale_grad.data_ptr<float>(), stream_of(cosine));
  check_launch();
}

}  // namespace

TORCH_LIBRARY_IMPL(pini_native, CUDA, m) {
  m.impl("noise", &noise_cuda);
  m.impl("inject_forward", &inject_forward_cuda);
  m.impl("inject_backward", &inject_backward_cuda);
  m.impl("noisy_normalize", &noisy_normalize_cuda);
  m.impl("noisy_normalize_backward", &noisy_normalize_backward_cuda);
  m.impl("cross_entropy_stats", &cross_entropy_stats_cuda);
  m.impl("cross_entropy_grad", &cross_entropy_grad_cuda);
}

}  // namespace pini
