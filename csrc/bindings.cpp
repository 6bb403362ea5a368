// PyTorch binding of the native kernels: the `pini_native` operator library (schemas here, CPU
// implementations here, CUDA implementations in cuda/bindings_cuda.cpp). The Python layer
// (pini_kernels/native.py) allocates outputs and calls these ops; autograd lives in Python.
//
// Every op writes into tensors it is given (`Tensor(a!)`), so the Python side controls allocation
// (and the tests' NaN poisoning).
#include <Python.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>

#include "cpu/kernels.h"

namespace pini {
namespace {

using at::Tensor;

void check_cpu_contiguous(const Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), name, " must be a CPU tensor, got ", tensor.device());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

void check_float32(const Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, name, " must be float32, got ",
              tensor.scalar_type());
}

uint64_t as_seed(int64_t seed) { return static_cast<uint64_t>(seed); }

int threads() { return at::get_num_threads(); }

// Calls fn(In{}, Out{}) with the storage types of x and out.
template <typename Fn>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, Fn&& fn) {
  using at::kBFloat16;
  using at::kFloat;
  using at::kHalf;
  if (in == kFloat && out == kFloat) return fn(float{}, float{});
  if (in == kHalf && out == kHalf) return fn(c10::Half{}, c10::Half{});
  if (in == kBFloat16 && out == kBFloat16) return fn(c10::BFloat16{}, c10::BFloat16{});
  if (in == kHalf && out == kFloat) return fn(c10::Half{}, float{});
  if (in == kBFloat16 && out == kFloat) return fn(c10::BFloat16{}, float{});
  TORCH_CHECK(false, "unsupported dtypes: input ", in, ", output ", out);
}

template <typename Fn>
void dispatch_in(at::ScalarType in, Fn&& fn) {
  if (in == at::kFloat) return fn(float{});
  if (in == at::kHalf) return fn(c10::Half{});
  if (in == at::kBFloat16) return fn(c10::BFloat16{});
  TORCH_CHECK(false, "unsupported dtype ", in, " (expected float32, float16 or bfloat16)");
}

void noise_cpu(int64_t seed, int64_t start, Tensor& out) {
  check_cpu_contiguous(out, "out");
  check_float32(out, "out");
  TORCH_CHECK(start >= 0, "start must be >= 0, got ", start);
  cpu::normal_fill(as_seed(seed), start, out.numel(), out.data_ptr<float>(), threads());
}

cpu::InjectShape inject_shape(const Tensor& x, int64_t num_samples, bool multiply, int64_t rows,
                              int64_t width, int64_t inner) {
  TORCH_CHECK(rows * width == x.numel(), "rows * width = ", rows * width,
              " must equal x.numel() = ", x.numel());
  TORCH_CHECK(inner >= 1 && width % inner == 0, "inner = ", inner, " must divide width = ",
              width);
  TORCH_CHECK(num_samples >= 1, "num_samples must be >= 1, got ", num_samples);
  return {rows, width, inner, num_samples, multiply};
}

void check_params(const Tensor& mu, const Tensor& sigma, int64_t width, int64_t inner) {
  check_cpu_contiguous(mu, "mu");
  check_cpu_contiguous(sigma, "sigma");
  check_float32(mu, "mu");
  check_float32(sigma, "sigma");
  TORCH_CHECK(mu.numel() == width / inner && sigma.numel() == width / inner,
              "mu and sigma must have width / inner = ", width / inner, " elements, got ",
              mu.numel(), " and ", sigma.numel());
}

void inject_forward_cpu(const Tensor& x, const Tensor& mu, const Tensor& sigma, int64_t seed,
                        int64_t num_samples, bool multiply, int64_t rows, int64_t width,
                        int64_t inner, Tensor& out) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(out, "out");
  check_params(mu, sigma, width, inner);
  const auto shape = inject_shape(x, num_samples, multiply, rows, width, inner);
  TORCH_CHECK(out.numel() == num_samples * x.numel(), "out must have num_samples * x.numel() = ",
              num_samples * x.numel(), " elements, got ", out.numel());
  if (x.numel() == 0) return;
  dispatch_in_out(x.scalar_type(), out.scalar_type(), [&](auto in_type, auto out_type) {
    using In = decltype(in_type);
    using Out = decltype(out_type);
    cpu::inject_forward<In, Out>(x.data_ptr<In>(), mu.data_ptr<float>(), sigma.data_ptr<float>(),
                                 out.data_ptr<Out>(), as_seed(seed), shape, threads());
  });
}

void inject_backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& mu,
                         const Tensor& sigma, int64_t seed, int64_t num_samples, bool multiply,
                         int64_t rows, int64_t width, int64_t inner, int64_t rows_per_chunk,
                         std::optional<Tensor> grad_x, std::optional<Tensor> partial_mu,
                         std::optional<Tensor> partial_sigma) {
  check_cpu_contiguous(grad_out, "grad_out");
  // Add mode never reads x: it may be a stand-in with x's shape and dtype (stride 0).
  if (multiply) check_cpu_contiguous(x, "x");
  check_params(mu, sigma, width, inner);
  const auto shape = inject_shape(x, num_samples, multiply, rows, width, inner);
  TORCH_CHECK(rows_per_chunk >= 1, "rows_per_chunk must be >= 1");
  const int64_t row_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  TORCH_CHECK(partial_mu.has_value() == partial_sigma.has_value(),
              "partial_mu and partial_sigma come together");
  if (partial_mu) {
    for (const auto* partial : {&*partial_mu, &*partial_sigma}) {
      check_cpu_contiguous(*partial, "partial sums");
      check_float32(*partial, "partial sums");
      TORCH_CHECK(partial->numel() == row_chunks * width, "partial sums must have ",
                  row_chunks * width, " elements, got ", partial->numel());
    }
  }
  if (grad_x) {
    check_cpu_contiguous(*grad_x, "grad_x");
    TORCH_CHECK(grad_x->scalar_type() == x.scalar_type() && grad_x->numel() == x.numel(),
                "grad_x must match x");
  }
  if (x.numel() == 0) return;
  dispatch_in_out(x.scalar_type(), grad_out.scalar_type(), [&](auto in_type, auto out_type) {
    using In = decltype(in_type);
    using Out = decltype(out_type);
    cpu::inject_backward<In, Out>(
        grad_out.data_ptr<Out>(), x.data_ptr<In>(), mu.data_ptr<float>(), sigma.data_ptr<float>(),
        grad_x ? grad_x->data_ptr<In>() : nullptr,
        partial_mu ? partial_mu->data_ptr<float>() : nullptr,
        partial_sigma ? partial_sigma->data_ptr<float>() : nullptr, as_seed(seed), shape,
        rows_per_chunk, threads());
  });
}

// x: (rows, D) with unit stride along D; mu, sigma: float32 (rows, D) views (any strides).
template <typename In>
cpu::FeatureRows<In> feature_rows(const Tensor& x, const std::optional<Tensor>& mu,
                                  const std::optional<Tensor>& sigma, bool multiply) {
  TORCH_CHECK(x.device().is_cpu(), "features must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "features must be 2-D with unit stride along D");
  TORCH_CHECK(mu.has_value() == sigma.has_value(), "mu and sigma come together");
  cpu::FeatureRows<In> side{x.data_ptr<In>(), x.stride(0), nullptr, nullptr, 0, 0, 0, 0,
                            x.size(0), x.size(1), multiply};
  if (mu) {
    for (const auto* param : {&*mu, &*sigma}) {
      check_float32(*param, "mu / sigma");
      TORCH_CHECK(param->sizes() == x.sizes(), "mu / sigma must be expanded to the features' ",
                  "shape ", x.sizes(), ", got ", param->sizes());
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
  check_cpu_contiguous(buffer, name);
  check_float32(buffer, name);
  TORCH_CHECK(buffer.numel() == numel, name, " must have ", numel, " elements, got ",
              buffer.numel());
}

void noisy_normalize_cpu(const Tensor& x, const std::optional<Tensor>& mu,
                         const std::optional<Tensor>& sigma, int64_t seed, int64_t stream_offset,
                         bool multiply, Tensor& unit, Tensor& norm) {
  check_rows_buffer(unit, "unit", x.numel());
  check_rows_buffer(norm, "norm", x.size(0));
  dispatch_in(x.scalar_type(), [&](auto in_type) {
    using In = decltype(in_type);
    cpu::noisy_normalize<In>(feature_rows<In>(x, mu, sigma, multiply), as_seed(seed),
                             stream_offset, unit.data_ptr<float>(), norm.data_ptr<float>(),
                             threads());
  });
}

void noisy_normalize_backward_cpu(const Tensor& x, const std::optional<Tensor>& mu,
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
  dispatch_in(x.scalar_type(), [&](auto in_type) {
    using In = decltype(in_type);
    cpu::noisy_normalize_backward<In>(
        feature_rows<In>(x, mu, sigma, multiply), as_seed(seed), stream_offset,
        unit.data_ptr<float>(), norm.data_ptr<float>(), grad_unit.data_ptr<float>(),
        grad_x ? grad_x->data_ptr<float>() : nullptr,
        grad_mu ? grad_mu->data_ptr<float>() : nullptr,
        grad_sigma ? grad_sigma->data_ptr<float>() : nullptr, threads());
  });
}

void check_targets(const Tensor& target, int64_t rows) {
  check_cpu_contiguous(target, "target");
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.numel() == rows, "target must have ", rows, " elements");
}

float scale_value(const Tensor& scale) {
  check_cpu_contiguous(scale, "logit_scale");
  check_float32(scale, "logit_scale");
  TORCH_CHECK(scale.numel() == 1, "logit_scale must have one element");
  return *scale.data_ptr<float>();
}

// cosine: one sample's (B, C) float32 tile; target: its (B,) int64 class indices.
void check_cosine(const Tensor& cosine, const Tensor& target) {
  check_cpu_contiguous(cosine, "cosine");
  check_float32(cosine, "cosine");
  TORCH_CHECK(cosine.dim() == 2, "cosine must be (B, C)");
  check_targets(target, cosine.size(0));
}

void cross_entropy_stats_cpu(const Tensor& cosine, const Tensor& target, const Tensor& scale,
                             Tensor& lse, Tensor& target_logit, Tensor& logit_sum) {
  check_cosine(cosine, target);
  const int64_t rows = cosine.size(0), classes = cosine.size(1);
  check_rows_buffer(lse, "lse", rows);
  check_rows_buffer(target_logit, "target_logit", rows);
  check_rows_buffer(logit_sum, "logit_sum", rows);
  cpu::cross_entropy_stats(cosine.data_ptr<float>(), target.data_ptr<int64_t>(),
                           scale_value(scale), rows, classes, lse.data_ptr<float>(),
                           target_logit.data_ptr<float>(), logit_sum.data_ptr<float>(),
                           threads());
}

void cross_entropy_grad_cpu(Tensor& cosine, const Tensor& lse, const Tensor& target,
                            const Tensor& row_grad, const Tensor& scale, double label_smoothing,
                            Tensor& scale_grad) {
  check_cosine(cosine, target);
  const int64_t rows = cosine.size(0), classes = cosine.size(1);
  check_rows_buffer(lse, "lse", rows);
  check_rows_buffer(row_grad, "row_grad", rows);
  check_rows_buffer(scale_grad, "scale_grad", rows);
  cpu::cross_entropy_grad(cosine.data_ptr<float>(), lse.data_ptr<float>(),
                          target.data_ptr<int64_t>(), row_grad.data_ptr<float>(),
                          scale_value(scale), static_cast<float>(label_smoothing), rows,
                          classes, scale_grad.data_ptr<float>(), threads());
}

}  // namespace

TORCH_LIBRARY(pini_native, m) {
  m.def("noise(int seed, int start, Tensor(a!) out) -> ()");
  m.def(
      "inject_forward(Tensor x, Tensor mu, Tensor sigma, int seed, int num_samples, bool multiply, "
      "int rows, int width, int inner, Tensor(a!) out) -> ()");
  m.def(
      "inject_backward(Tensor grad_out, Tensor x, Tensor mu, Tensor sigma, int seed, "
      "int num_samples, bool multiply, int rows, int width, int inner, int rows_per_chunk, "
      "Tensor(a!)? grad_x, Tensor(b!)? partial_mu, Tensor(c!)? partial_sigma) -> ()");
  m.def(
      "noisy_normalize(Tensor x, Tensor? mu, Tensor? sigma, int seed, int stream_offset, "
      "bool multiply, Tensor(a!) unit, Tensor(b!) norm) -> ()");
  m.def(
      "noisy_normalize_backward(Tensor x, Tensor? mu, Tensor? sigma, int seed, "
      "int stream_offset, bool multiply, Tensor unit, Tensor norm, Tensor grad_unit, "
      "Tensor(a!)? grad_x, Tensor(b!)? grad_mu, Tensor(c!)? grad_sigma) -> ()");
  m.def(
      "cross_entropy_stats(Tensor cosine, Tensor target, Tensor scale, Tensor(a!) lse, "
      "Tensor(b!) target_logit, Tensor(c!) logit_sum) -> ()");
  m.def(
      "cross_entropy_grad(Tensor(a!) cosine, Tensor lse, Tensor target, Tensor row_grad, "
      "Tensor scale, float label_smoothing, Tensor(b!) scale_grad) -> ()");
}

TORCH_LIBRARY_IMPL(pini_native, CPU, m) {
  m.impl("noise", &noise_cpu);
  m.impl("inject_forward", &inject_forward_cpu);
  m.impl("inject_backward", &inject_backward_cpu);
  m.impl("noisy_normalize", &noisy_normalize_cpu);
  m.impl("noisy_normalize_backward", &noisy_normalize_backward_cpu);
  m.impl("cross_entropy_stats", &cross_entropy_stats_cpu);
  m.impl("cross_entropy_grad", &cross_entropy_grad_cpu);
}

}  // namespace pini

// `import pini_kernels._C` loads this library, whose static initializers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pini_kernels native kernels", -1,
                               nullptr};
  return PyModule_Create(&module);
}
