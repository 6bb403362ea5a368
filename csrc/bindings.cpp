// PyTorch binding of the native kernels: the `pini_native` operator library (schemas here, CPU
// implementations here, CUDA implementations in cuda/bindings_cuda.cpp). The Python layer
// (pini_kernels/native.py) allocates outputs and calls these ops, which have no autograd of their
// own: the op modules (pini_kernels/inject.py, logits.py, loss.py) differentiate through them.
// Two ops defined elsewhere carry a C++ autograd node for the native backends' eager calls:
// `inject` (autograd.cpp: fused_inject on contiguous tensors) and `cross_entropy` (loss_flow.cpp:
// noisy_cross_entropy, whose per-sample flow is the op `cross_entropy_flow` there). The argument
// checks, shared with the CUDA implementations, are in checks.h.
//
// Every op writes into tensors it is given (`Tensor(a!)`), so the Python side controls allocation
// (and the tests' NaN poisoning).
#include <Python.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "inject_launch.h"

namespace pini {
namespace {

using at::Tensor;
constexpr auto kCPU = c10::DeviceType::CPU;

// The seed tensor's value as the noise stream's uint64 key, read on the host (checks::seed).
uint64_t as_seed(const Tensor& seed, const Tensor& data) {
  checks::seed(seed, data.device());
  return static_cast<uint64_t>(*seed.data_ptr<int64_t>());
}

// Elements per thread below which another thread costs more than it gives: waking an OpenMP
// team costs microseconds (tens on a loaded machine), while one thread draws and writes 32k
// normals in about 25 us. ATen parallelizes its elementwise kernels from the same size.
constexpr int64_t kElementsPerThread = 32768;

// Threads for a kernel over `elements` elements: torch's thread count, fewer for small work (a
// single thread runs without an OpenMP team). The kernels' results do not depend on it.
int threads(int64_t elements) {
  const int64_t wanted = std::max<int64_t>(1, elements / kElementsPerThread);
  return static_cast<int>(std::min<int64_t>(wanted, at::get_num_threads()));
}

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
  TORCH_CHECK(false, "unsupported dtypes: input ", in, ", output ", out,
              " (expected equal float32, float16 or bfloat16 dtypes, or a half input with a "
              "float32 output)");
}

template <typename Fn>
void dispatch_in(at::ScalarType in, Fn&& fn) {
  if (in == at::kFloat) return fn(float{});
  if (in == at::kHalf) return fn(c10::Half{});
  if (in == at::kBFloat16) return fn(c10::BFloat16{});
  TORCH_CHECK(false, "unsupported dtype ", in, " (expected float32, float16 or bfloat16)");
}

void noise_cpu(const Tensor& seed, int64_t start, Tensor& out) {
  checks::noise(start, out, kCPU);
  cpu::normal_fill(as_seed(seed, out), start, out.numel(), out.data_ptr<float>(),
                   threads(out.numel()));
}

void inject_forward_cpu(const Tensor& x, const Tensor& mu, const Tensor& sigma, const Tensor& seed,
                        int64_t num_samples, bool multiply, int64_t rows, int64_t width,
                        int64_t inner, Tensor& out) {
  checks::inject_forward(x, mu, sigma, num_samples, rows, width, inner, out, kCPU);
  const uint64_t seed_value = as_seed(seed, x);
  if (x.numel() == 0) return;
  const cpu::InjectShape shape{rows, width, inner, num_samples, multiply};
  dispatch_in_out(x.scalar_type(), out.scalar_type(), [&](auto in_type, auto out_type) {
    using In = decltype(in_type);
    using Out = decltype(out_type);
    cpu::inject_forward<In, Out>(x.data_ptr<In>(), mu.data_ptr<float>(), sigma.data_ptr<float>(),
                                 out.data_ptr<Out>(), seed_value, shape,
                                 threads(num_samples * x.numel()));
  });
}

void inject_backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& mu,
                         const Tensor& sigma, const Tensor& seed, int64_t num_samples,
                         bool multiply, int64_t rows, int64_t width, int64_t inner,
                         int64_t rows_per_chunk,
                         std::optional<Tensor> grad_x, std::optional<Tensor> partial_mu,
                         std::optional<Tensor> partial_sigma) {
  checks::inject_backward(grad_out, x, mu, sigma, num_samples, multiply, rows, width, inner,
                          rows_per_chunk, grad_x, partial_mu, partial_sigma, kCPU);
  const uint64_t seed_value = as_seed(seed, grad_out);
  if (x.numel() == 0) return;
  const cpu::InjectShape shape{rows, width, inner, num_samples, multiply};
  dispatch_in_out(x.scalar_type(), grad_out.scalar_type(), [&](auto in_type, auto out_type) {
    using In = decltype(in_type);
    using Out = decltype(out_type);
    cpu::inject_backward<In, Out>(
        grad_out.data_ptr<Out>(), x.data_ptr<In>(), mu.data_ptr<float>(), sigma.data_ptr<float>(),
        grad_x ? grad_x->data_ptr<In>() : nullptr,
        partial_mu ? partial_mu->data_ptr<float>() : nullptr,
        partial_sigma ? partial_sigma->data_ptr<float>() : nullptr, seed_value, shape,
        rows_per_chunk, threads(num_samples * x.numel()));
  });
}

// The kernels' view of checked feature rows x (rows, D) and their noise parameters.
template <typename In>
cpu::FeatureRows<In> feature_rows(const Tensor& x, const checks::NoiseParams& noise,
                                  bool multiply) {
  return {x.data_ptr<In>(), x.stride(0), noise.mu, noise.sigma, noise.mu_row_stride,
          noise.mu_col_stride, noise.sigma_row_stride, noise.sigma_col_stride, x.size(0),
          x.size(1), multiply};
}

void noisy_normalize_cpu(const Tensor& x, const std::optional<Tensor>& mu,
                         const std::optional<Tensor>& sigma, const Tensor& seed,
                         int64_t stream_offset, bool multiply, Tensor& unit, Tensor& norm) {
  const auto noise = checks::noisy_normalize(x, mu, sigma, unit, norm, kCPU);
  const uint64_t seed_value = as_seed(seed, x);
  dispatch_in(x.scalar_type(), [&](auto in_type) {
    using In = decltype(in_type);
    cpu::noisy_normalize<In>(feature_rows<In>(x, noise, multiply), seed_value, stream_offset,
                             unit.data_ptr<float>(), norm.data_ptr<float>(), threads(x.numel()));
  });
}

void noisy_normalize_backward_cpu(const Tensor& x, const std::optional<Tensor>& mu,
                                  const std::optional<Tensor>& sigma, const Tensor& seed,
                                  int64_t stream_offset, bool multiply, const Tensor& unit,
                                  const Tensor& norm, const Tensor& grad_unit,
                                  std::optional<Tensor> grad_x, std::optional<Tensor> grad_mu,
                                  std::optional<Tensor> grad_sigma) {
  const auto noise = checks::noisy_normalize_backward(x, mu, sigma, unit, norm, grad_unit, grad_x,
                                                      grad_mu, grad_sigma, kCPU);
  const uint64_t seed_value = as_seed(seed, x);
  dispatch_in(x.scalar_type(), [&](auto in_type) {
    using In = decltype(in_type);
    cpu::noisy_normalize_backward<In>(
        feature_rows<In>(x, noise, multiply), seed_value, stream_offset,
        unit.data_ptr<float>(), norm.data_ptr<float>(), grad_unit.data_ptr<float>(),
        grad_x ? grad_x->data_ptr<float>() : nullptr,
        grad_mu ? grad_mu->data_ptr<float>() : nullptr,
        grad_sigma ? grad_sigma->data_ptr<float>() : nullptr, threads(x.numel()));
  });
}

void cross_entropy_stats_cpu(const Tensor& cosine, const Tensor& target, const Tensor& scale,
                             Tensor& lse, Tensor& target_logit, Tensor& logit_sum) {
  checks::cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum, kCPU);
  cpu::cross_entropy_stats(cosine.data_ptr<float>(), target.data_ptr<int64_t>(),
                           *scale.data_ptr<float>(), cosine.size(0), cosine.size(1),
                           lse.data_ptr<float>(), target_logit.data_ptr<float>(),
                           logit_sum.data_ptr<float>(), threads(cosine.numel()));
}

void cross_entropy_grad_cpu(Tensor& cosine, const Tensor& lse, const Tensor& target,
                            const Tensor& row_grad, const Tensor& scale, double label_smoothing,
                            Tensor& scale_grad) {
  checks::cross_entropy_grad(cosine, lse, target, row_grad, scale, scale_grad, kCPU);
  cpu::cross_entropy_grad(cosine.data_ptr<float>(), lse.data_ptr<float>(),
                          target.data_ptr<int64_t>(), row_grad.data_ptr<float>(),
                          *scale.data_ptr<float>(), static_cast<float>(label_smoothing),
                          cosine.size(0), cosine.size(1), scale_grad.data_ptr<float>(),
                          threads(cosine.numel()));
}

// The CUDA inject kernels' grid (inject_launch.h) as [column_threads, row_lanes, column_blocks,
// rows_per_chunk, row_chunks]: in every build, so the tests check it on any machine.
std::vector<int64_t> cuda_inject_launch(int64_t rows, int64_t width, int64_t multiprocessors) {
  TORCH_CHECK(rows >= 0 && width >= 0, "rows and width must be >= 0, got ", rows, " and ", width);
  const launch::InjectLaunch grid = launch::inject_launch(rows, width, multiprocessors);
  return {grid.column_threads, grid.row_lanes, grid.column_blocks, grid.rows_per_chunk,
          grid.row_chunks};
}

}  // namespace

TORCH_LIBRARY(pini_native, m) {
  m.def("noise(Tensor seed, int start, Tensor(a!) out) -> ()");
  m.def(
      "inject_forward(Tensor x, Tensor mu, Tensor sigma, Tensor seed, int num_samples, "
      "bool multiply, "
      "int rows, int width, int inner, Tensor(a!) out) -> ()");
  m.def(
      "inject_backward(Tensor grad_out, Tensor x, Tensor mu, Tensor sigma, Tensor seed, "
      "int num_samples, bool multiply, int rows, int width, int inner, int rows_per_chunk, "
      "Tensor(a!)? grad_x, Tensor(b!)? partial_mu, Tensor(c!)? partial_sigma) -> ()");
  m.def(
      "noisy_normalize(Tensor x, Tensor? mu, Tensor? sigma, Tensor seed, int stream_offset, "
      "bool multiply, Tensor(a!) unit, Tensor(b!) norm) -> ()");
  m.def(
      "noisy_normalize_backward(Tensor x, Tensor? mu, Tensor? sigma, Tensor seed, "
      "int stream_offset, bool multiply, Tensor unit, Tensor norm, Tensor grad_unit, "
      "Tensor(a!)? grad_x, Tensor(b!)? grad_mu, Tensor(c!)? grad_sigma) -> ()");
  m.def(
      "cross_entropy_stats(Tensor cosine, Tensor target, Tensor scale, Tensor(a!) lse, "
      "Tensor(b!) target_logit, Tensor(c!) logit_sum) -> ()");
  m.def(
      "cross_entropy_grad(Tensor(a!) cosine, Tensor lse, Tensor target, Tensor row_grad, "
      "Tensor scale, float label_smoothing, Tensor(b!) scale_grad) -> ()");
  m.def("cuda_inject_launch(int rows, int width, int multiprocessors) -> int[]",
        &cuda_inject_launch);
}

TORCH_LIBRARY_IMPL(pini_native, CPU, m) { PINI_NATIVE_IMPLS(m, cpu); }

}  // namespace pini

// `import pini_kernels._C` loads this library, whose static initializers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pini_kernels native kernels", -1,
                               nullptr};
  return PyModule_Create(&module);
}
