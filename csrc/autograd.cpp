// fused_inject's eager entry point with its autograd in C++: the `pini_native::inject` op.
//
// pini_kernels/inject.py works out the layout (rows x width, `inner` elements per parameter) and
// hands this op x, mu and sigma contiguous (mu and sigma of one shape, read as flat parameters;
// their gradients come back in that shape); the op draws nothing
// itself: it calls `pini_native::inject_forward` and, in backward, `inject_backward` through the
// dispatcher, so the CPU and CUDA kernels both run under it. What it adds is the autograd node:
// a C++ node runs backward without a Python frame or the GIL, which on small tensors costs more
// than the kernels (a (32, 512) forward+backward spent ~25 us in a Python autograd.Function).
// Under torch.compile the Python custom op `pini_kernels::inject` runs instead (inject.py).
//
// What is saved is what the Python autograd saves: x (a stand-in of its shape in add mode, whose
// gradients do not read it), mu, sigma and the seed tensor, never eps.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "buffers.h"
#include "once_differentiable.h"

namespace pini {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// out: (num_samples, *x.shape), or x.shape without `sample_dim` (one sample): no view node
// between the op and its caller, which a small tensor's backward would pay for.
Tensor call_forward(const Tensor& x, const Tensor& mu, const Tensor& sigma, const Tensor& seed,
                    int64_t num_samples, bool multiply, int64_t rows, int64_t width, int64_t inner,
                    at::ScalarType out_dtype, bool sample_dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pini_native::inject_forward", "")
                             .typed<void(const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, int64_t, bool, int64_t, int64_t, int64_t,
                                         Tensor&)>();
  std::vector<int64_t> shape;
  if (sample_dim) shape.push_back(num_samples);
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  Tensor out = new_buffer(shape, x.options().dtype(out_dtype));
  if (x.numel() > 0) {
    op.call(x, mu.to(at::kFloat), sigma.to(at::kFloat), seed, num_samples, multiply, rows, width,
            inner, out);
  }
  return out;
}

// (row_chunks, width) fp32 partial sums -> the sums in `param`'s shape and dtype, in a fixed
// order.
Tensor reduce_partial_sums(const Tensor& partial, int64_t inner, const Tensor& param) {
  Tensor sums = partial.size(0) == 1 ? partial.view({-1}) : partial.sum(0);
  if (inner != 1) sums = sums.view({-1, inner}).sum(1);
  return sums.view(param.sizes()).to(param.scalar_type());
}

class InjectFunction : public torch::autograd::Function<InjectFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& mu,
                        const Tensor& sigma, const Tensor& seed, int64_t num_samples,
                        bool multiply, int64_t rows, int64_t width, int64_t inner,
                        int64_t rows_per_chunk, at::ScalarType out_dtype, bool sample_dim) {
    // Add mode's gradients never read x: an 8-byte stand-in keeps its shape and dtype only.
    const Tensor saved_x = multiply ? x : at::empty({}, x.options()).expand(x.sizes());
    ctx->save_for_backward({saved_x, mu, sigma, seed});
    ctx->saved_data["num_samples"] = num_samples;
    ctx->saved_data["multiply"] = multiply;
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["width"] = width;
    ctx->saved_data["inner"] = inner;
    ctx->saved_data["rows_per_chunk"] = rows_per_chunk;
    return call_forward(x, mu, sigma, seed, num_samples, multiply, rows, width, inner, out_dtype,
                        sample_dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("pini_native::inject_backward", "")
            .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, int64_t, bool, int64_t, int64_t, int64_t, int64_t,
                        std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &mu = saved[1], &sigma = saved[2], &seed = saved[3];
    const int64_t num_samples = ctx->saved_data["num_samples"].toInt();
    const bool multiply = ctx->saved_data["multiply"].toBool();
    const int64_t rows = ctx->saved_data["rows"].toInt();
    const int64_t width = ctx->saved_data["width"].toInt();
    const int64_t inner = ctx->saved_data["inner"].toInt();
    const int64_t rows_per_chunk = ctx->saved_data["rows_per_chunk"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_params = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    std::optional<Tensor> grad_x, partial_mu, partial_sigma;
    if (need_x) grad_x = new_buffer(x.sizes(), x.options());
    const int64_t row_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    if (need_params) {
      partial_mu = new_buffer({row_chunks, width}, x.options().dtype(at::kFloat));
      partial_sigma = new_buffer({row_chunks, width}, x.options().dtype(at::kFloat));
    }
    Tensor mu_grad, sigma_grad;
    if (x.numel() > 0) {
      op.call(grad_outputs[0].contiguous(), x, mu.to(at::kFloat), sigma.to(at::kFloat), seed,
              num_samples, multiply, rows, width, inner, rows_per_chunk, grad_x, partial_mu,
              partial_sigma);
      if (need_params) {
        mu_grad = reduce_partial_sums(*partial_mu, inner, mu);
        sigma_grad = reduce_partial_sums(*partial_sigma, inner, sigma);
      }
    } else if (need_params) {  // an empty x: zero gradients, as torch gives
      mu_grad = at::zeros_like(mu);
      sigma_grad = at::zeros_like(sigma);
    }
    return once_differentiable({grad_x ? *grad_x : Tensor(), mu_grad, sigma_grad, Tensor(),
                                Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
                                Tensor(), Tensor()},
                               "fused_inject");
  }
};

Tensor inject_autograd(const Tensor& x, const Tensor& mu, const Tensor& sigma, const Tensor& seed,
                       int64_t num_samples, bool multiply, int64_t rows, int64_t width,
                       int64_t inner, int64_t rows_per_chunk, at::ScalarType out_dtype,
                       bool sample_dim) {
  return InjectFunction::apply(x, mu, sigma, seed, num_samples, multiply, rows, width, inner,
                               rows_per_chunk, out_dtype, sample_dim);
}

Tensor inject_no_autograd(const Tensor& x, const Tensor& mu, const Tensor& sigma,
                          const Tensor& seed, int64_t num_samples, bool multiply, int64_t rows,
                          int64_t width, int64_t inner, int64_t /*rows_per_chunk*/,
                          at::ScalarType out_dtype, bool sample_dim) {
  return call_forward(x, mu, sigma, seed, num_samples, multiply, rows, width, inner, out_dtype,
                      sample_dim);
}

// The op's schema: pini_kernels/native.py's inject_autograd passes the arguments in this order.
constexpr const char* kInjectSchema =
    "inject(Tensor x, Tensor mu, Tensor sigma, Tensor seed, int num_samples, bool multiply, "
    "int rows, int width, int inner, int rows_per_chunk, ScalarType out_dtype, "
    "bool sample_dim) -> Tensor";

TORCH_LIBRARY_FRAGMENT(pini_native, m) { m.def(kInjectSchema); }

TORCH_LIBRARY_IMPL(pini_native, Autograd, m) { m.impl("inject", &inject_autograd); }

TORCH_LIBRARY_IMPL(pini_native, CompositeExplicitAutograd, m) {
  m.impl("inject", &inject_no_autograd);
}

}  // namespace
}  // namespace pini
