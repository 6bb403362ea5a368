// The PiNI loss's per-sample flow for the native backends, in C++: the `pini_native::
// cross_entropy_flow` op. pini_kernels/loss.py says what it computes (the Python flow of
// pini_kernels/per_sample.py still runs the Triton backend and the logits op); this is the same
// flow, call for call, without a Python frame per kernel: on small problems (a batch of 32
// against 37 classes) the Python loop cost more than its kernels. It calls the row and loss
// kernels through the dispatcher and at::mm for the products, so it runs on CPU and CUDA tensors
// alike.
//
// For each noise sample s: the image rows (stream of image_seed, elements s*B*D + ...) and the
// text rows (text[s] when text is (m, C, D); stream of text_seed) are noised and normalized (a
// side equal in every sample once), the (B, C) cosines come from one product, then
// - without row_grads: the row statistics (lse, target logit, sum of logits) of the logits
//   scale * cosine;
// - with row_grads (m, B): d loss / d cosine for those row weights (from the statistics computed
//   here, or from `lse` when given: backward's recompute), two products, and the row kernels'
//   backward into fp32 accumulators; a side equal in every sample sums its unit gradients (addmm)
//   and is backpropagated once. The gradients come back in their inputs' shapes, dtypes and
//   layouts (a broadcast parameter's summed back), logit_scale's summed over rows.
// The inputs are taken as the ops get them: the flow makes the kernels' view itself (unit stride
// along D, fp32 noise parameters expanded to (N, D)).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "buffers.h"
#include "once_differentiable.h"

namespace pini {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// Bits of the `needs` argument: which of the seven differentiable inputs need a gradient, in
// pini_kernels/per_sample.py's DIFFERENTIABLE_INPUTS order.
enum Need : int64_t {
  kImage = 1, kText = 2, kScale = 4, kImageMu = 8, kImageSigma = 16, kTextMu = 32,
  kTextSigma = 64,
};

void normalize(const Tensor& x, const OptionalTensor& mu, const OptionalTensor& sigma,
               const Tensor& seed, int64_t stream_offset, bool multiply, Tensor& unit,
               Tensor& norm) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pini_native::noisy_normalize", "")
          .typed<void(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                      int64_t, bool, Tensor&, Tensor&)>();
  op.call(x, mu, sigma, seed, stream_offset, multiply, unit, norm);
}

void normalize_backward(const Tensor& x, const OptionalTensor& mu, const OptionalTensor& sigma,
                        const Tensor& seed, int64_t stream_offset, bool multiply,
                        const Tensor& unit, const Tensor& norm, const Tensor& grad_unit,
                        OptionalTensor grad_x, OptionalTensor grad_mu,
                        OptionalTensor grad_sigma) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pini_native::noisy_normalize_backward", "")
          .typed<void(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                      int64_t, bool, const Tensor&, const Tensor&, const Tensor&, OptionalTensor,
                      OptionalTensor, OptionalTensor)>();
  op.call(x, mu, sigma, seed, stream_offset, multiply, unit, norm, grad_unit, grad_x, grad_mu,
          grad_sigma);
}

void cross_entropy_stats(const Tensor& cosine, const Tensor& target, const Tensor& scale,
                         Tensor& lse, Tensor& target_logit, Tensor& logit_sum) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pini_native::cross_entropy_stats", "")
                             .typed<void(const Tensor&, const Tensor&, const Tensor&, Tensor&,
                                         Tensor&, Tensor&)>();
  op.call(cosine, target, scale, lse, target_logit, logit_sum);
}

void cross_entropy_grad(Tensor& cosine, const Tensor& lse, const Tensor& target,
                        const Tensor& row_grad, const Tensor& scale, double label_smoothing,
                        Tensor& scale_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pini_native::cross_entropy_grad", "")
                             .typed<void(Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, double, Tensor&)>();
  op.call(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad);
}

// The kernels' view of a side: unit stride along D; fp32 noise parameters expanded to (N, D).
Tensor unit_stride(const Tensor& features) {
  return features.stride(-1) == 1 ? features : features.contiguous();
}

OptionalTensor kernel_param(const OptionalTensor& param, const Tensor& features) {
  if (!param.has_value() || !param->defined()) return std::nullopt;
  return param->to(at::kFloat).expand({features.size(-2), features.size(-1)});
}

// `grad` (contiguous, of `tensor`'s shape) in `tensor`'s dtype and memory layout, as
// pini_kernels/_host.py's like_input.
Tensor like_input(Tensor grad, const Tensor& tensor) {
  if (grad.scalar_type() != tensor.scalar_type()) grad = grad.to(tensor.scalar_type());
  if (tensor.is_contiguous()) return grad;
  return at::empty_like(tensor).copy_(grad);
}

// fp32 accumulator of a parameter's kernel view (N, D) -> the parameter's shape, dtype, layout.
Tensor param_grad(const Tensor& grad, const Tensor& param) {
  return like_input(grad.sizes() == param.sizes() ? grad : grad.sum_to_size(param.sizes()), param);
}

// One side of the logits (per_sample.py's Side and SideGrads).
struct Side {
  Tensor features;  // (N, D), or (m, N, D): one set of rows per sample
  OptionalTensor mu, sigma;  // fp32, (N, D) (expanded: stride 0 on broadcast dims)
  Tensor seed;
  bool per_sample;
  Tensor unit, norm;  // this sample's normalized rows and their norms
  OptionalTensor grad_x, grad_mu, grad_sigma;  // fp32 accumulators
  Tensor unit_grad;  // this sample's unit gradients, or their sum over samples (constant side)

  Side(const Tensor& x, const OptionalTensor& mu_, const OptionalTensor& sigma_,
       const Tensor& seed_)
      : features(x), mu(mu_), sigma(sigma_), seed(seed_), per_sample(x.dim() == 3) {
    const auto options = x.options().dtype(at::kFloat);
    unit = new_buffer({rows(), dim()}, options);
    norm = new_buffer({rows()}, options);
  }

  int64_t rows() const { return features.size(-2); }
  int64_t dim() const { return features.size(-1); }
  bool changes_per_sample() const { return mu.has_value() || per_sample; }
  Tensor rows_of(int64_t sample) const { return per_sample ? features[sample] : features; }
  int64_t stream_offset(int64_t sample) const { return sample * rows() * dim(); }

  void want_gradients(bool need_x, bool need_params) {
    const auto options = features.options().dtype(at::kFloat);
    if (need_x) grad_x = at::zeros(features.sizes(), options);
    if (need_params && mu.has_value()) {
      grad_mu = at::zeros({rows(), dim()}, options);
      grad_sigma = at::zeros({rows(), dim()}, options);
    }
  }

  bool has_gradients() const { return grad_x.has_value() || grad_mu.has_value(); }

  void normalize_sample(int64_t sample, bool multiply) {
    if ((changes_per_sample() || sample == 0) && rows() > 0) {
      normalize(rows_of(sample), mu, sigma, seed, stream_offset(sample), multiply, unit, norm);
    }
  }

  // Backpropagates `unit_grad` through this sample's normalization and noise.
  void backward_sample(int64_t sample, bool multiply) {
    if (rows() == 0 || !has_gradients()) return;
    OptionalTensor sample_grad_x = grad_x;
    if (per_sample && grad_x.has_value()) sample_grad_x = (*grad_x)[sample];
    normalize_backward(rows_of(sample), mu, sigma, seed, stream_offset(sample), multiply, unit,
                       norm, unit_grad, sample_grad_x, grad_mu, grad_sigma);
  }
};

Tensor empty_like_none(const Tensor& like) { return at::empty({0}, like.options()); }

std::vector<Tensor> cross_entropy_flow(
    const Tensor& image, const Tensor& text, const Tensor& logit_scale,
    const OptionalTensor& image_mu, const OptionalTensor& image_sigma,
    const OptionalTensor& text_mu, const OptionalTensor& text_sigma, const Tensor& target,
    const Tensor& image_seed, const Tensor& text_seed, int64_t num_samples, bool multiply,
    double label_smoothing, const OptionalTensor& given_lse, const OptionalTensor& row_grads,
    int64_t needs) {
  Side image_side(unit_stride(image), kernel_param(image_mu, image),
                  kernel_param(image_sigma, image), image_seed);
  Side text_side(unit_stride(text), kernel_param(text_mu, text), kernel_param(text_sigma, text),
                 text_seed);
  const Tensor scale = logit_scale.to(at::kFloat);
  const int64_t batch = image_side.rows(), classes = text_side.rows();
  const auto options = image.options().dtype(at::kFloat);
  const bool gradients = row_grads.has_value();
  const bool stats = !given_lse.has_value();
  Tensor lse = stats ? new_buffer({num_samples, batch}, options) : *given_lse;
  Tensor target_logit = stats ? new_buffer({num_samples, batch}, options) : empty_like_none(lse);
  Tensor logit_sum = stats ? new_buffer({num_samples, batch}, options) : empty_like_none(lse);
  Tensor scale_grad_rows = empty_like_none(lse);
  if (gradients) {
    scale_grad_rows = new_buffer({num_samples, batch}, options);
    image_side.want_gradients(needs & kImage, needs & (kImageMu | kImageSigma));
    text_side.want_gradients(needs & kText, needs & (kTextMu | kTextSigma));
  }
  const bool run = batch > 0 && num_samples > 0;
  Side* sides[2] = {&image_side, &text_side};
  for (Side* side : sides) {
    if (gradients) side->unit_grad = new_buffer(side->unit.sizes(), side->unit.options());
  }
  Tensor cosine = new_buffer({batch, classes}, options);
  for (int64_t sample = 0; sample < num_samples; ++sample) {
    image_side.normalize_sample(sample, multiply);
    text_side.normalize_sample(sample, multiply);
    if (batch == 0) continue;
    at::mm_out(cosine, image_side.unit, text_side.unit.t());
    Tensor sample_lse = lse[sample];
    if (stats) {
      Tensor sample_target_logit = target_logit[sample], sample_logit_sum = logit_sum[sample];
      cross_entropy_stats(cosine, target, scale, sample_lse, sample_target_logit,
                          sample_logit_sum);
    }
    if (!gradients) continue;
    Tensor sample_scale_grad = scale_grad_rows[sample];
    cross_entropy_grad(cosine, sample_lse, target, (*row_grads)[sample], scale, label_smoothing,
                       sample_scale_grad);
    // d loss / d unit rows: cosine_grad @ text_unit for the image, its transpose @ image_unit
    // for the text; a constant side adds into its sum (the first sample writes it).
    const Tensor products[2][2] = {{cosine, text_side.unit}, {cosine.t(), image_side.unit}};
    for (int index = 0; index < 2; ++index) {
      Side& side = *sides[index];
      if (!side.has_gradients()) continue;
      const Tensor &left = products[index][0], &right = products[index][1];
      if (side.changes_per_sample()) {
        at::mm_out(side.unit_grad, left, right);
        side.backward_sample(sample, multiply);
      } else if (sample == 0) {
        at::mm_out(side.unit_grad, left, right);
      } else {
        side.unit_grad.addmm_(left, right);
      }
    }
  }
  if (gradients) {
    for (Side* side : sides) {
      if (!side->changes_per_sample() && run) side->backward_sample(0, multiply);
    }
  }
  // The seven gradients in their inputs' shapes, dtypes and layouts (empty where not computed).
  std::vector<Tensor> outputs{lse, target_logit, logit_sum};
  const auto finished = [&](const OptionalTensor& grad, const OptionalTensor& input,
                            bool parameter) {
    if (!grad.has_value()) return empty_like_none(lse);
    return parameter ? param_grad(*grad, *input) : like_input(*grad, *input);
  };
  outputs.push_back(finished(image_side.grad_x, image, false));
  outputs.push_back(finished(text_side.grad_x, text, false));
  outputs.push_back(gradients && (needs & kScale)
                        ? scale_grad_rows.sum().to(logit_scale.scalar_type())
                        : empty_like_none(lse));
  outputs.push_back(finished(image_side.grad_mu, image_mu, true));
  outputs.push_back(finished(image_side.grad_sigma, image_sigma, true));
  outputs.push_back(finished(text_side.grad_mu, text_mu, true));
  outputs.push_back(finished(text_side.grad_sigma, text_sigma, true));
  return outputs;
}

// --- the loss op with its autograd (the eager entry point of pini_kernels/loss.py) ------------

// The flow through the dispatcher (so profilers and tests see each call).
std::vector<Tensor> call_flow(const Tensor& image, const Tensor& text, const Tensor& scale,
                              const OptionalTensor& image_mu, const OptionalTensor& image_sigma,
                              const OptionalTensor& text_mu, const OptionalTensor& text_sigma,
                              const Tensor& target, const Tensor& image_seed,
                              const Tensor& text_seed, int64_t num_samples, bool multiply,
                              double label_smoothing, const OptionalTensor& lse,
                              const OptionalTensor& row_grads, int64_t needs) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pini_native::cross_entropy_flow", "")
          .typed<std::vector<Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
              const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
              const Tensor&, const Tensor&, int64_t, bool, double, const OptionalTensor&,
              const OptionalTensor&, int64_t)>();
  return op.call(image, text, scale, image_mu, image_sigma, text_mu, text_sigma, target,
                 image_seed, text_seed, num_samples, multiply, label_smoothing, lse, row_grads,
                 needs);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// F.cross_entropy per row from its statistics, reduced: (1-e)(lse - x_t) + e(lse - mean(x)).
Tensor loss_of(const Tensor& lse, const Tensor& target_logit, const Tensor& logit_sum,
               int64_t classes, double smoothing, int64_t reduction) {
  Tensor rows = lse - target_logit;
  if (smoothing != 0.0) {
    rows = (1.0 - smoothing) * rows + smoothing * (lse - logit_sum / static_cast<double>(classes));
  }
  if (reduction == kReductionSum) return rows.sum();
  if (reduction == kReductionMean) return rows.mean();
  return rows;
}

// The seven gradients of a flow's outputs, undefined where ``needs`` does not ask for one.
variable_list flow_gradients(const std::vector<Tensor>& flow, int64_t needs) {
  variable_list grads(7);
  for (int index = 0; index < 7; ++index) {
    if (needs & (int64_t{1} << index)) grads[index] = flow[3 + index];
  }
  return grads;
}

class LossFunction : public torch::autograd::Function<LossFunction> {
 public:
  // Tensor arguments 0-9 (the first seven differentiable, in per_sample.py's order), then settings.
  // needs: the Need bits of the inputs that require a gradient (forward runs without grad mode,
  // so the caller works them out).
  static Tensor forward(AutogradContext* ctx, const Tensor& image, const Tensor& text,
                        const Tensor& scale, const OptionalTensor& image_mu,
                        const OptionalTensor& image_sigma, const OptionalTensor& text_mu,
                        const OptionalTensor& text_sigma, const Tensor& target,
                        const Tensor& image_seed, const Tensor& text_seed, int64_t num_samples,
                        bool multiply, int64_t reduction, double label_smoothing, int64_t needs) {
    const bool in_forward = reduction != kReductionNone && needs != 0;
    const int64_t batch = image.size(-2);  // (B, D) or (m, B, D)
    OptionalTensor row_grads;
    if (in_forward) {
      const double weight = reduction == kReductionMean && batch > 0
                                ? 1.0 / static_cast<double>(num_samples * batch)
                                : 1.0;
      row_grads = at::full({num_samples, batch}, weight, image.options().dtype(at::kFloat));
    }
    const auto flow = call_flow(image, text, scale, image_mu, image_sigma, text_mu, text_sigma,
                                target, image_seed, text_seed, num_samples, multiply,
                                label_smoothing, std::nullopt, row_grads, needs);
    ctx->saved_data["needs"] = needs;
    ctx->saved_data["in_forward"] = in_forward;
    if (in_forward) {  // backward only scales these: nothing else is kept
      ctx->save_for_backward(flow_gradients(flow, needs));
    } else {
      ctx->save_for_backward({image, text, scale, image_mu.value_or(Tensor()),
                              image_sigma.value_or(Tensor()), text_mu.value_or(Tensor()),
                              text_sigma.value_or(Tensor()), target, image_seed, text_seed,
                              flow[0]});
      ctx->saved_data["num_samples"] = num_samples;
      ctx->saved_data["multiply"] = multiply;
      ctx->saved_data["reduction"] = reduction;
      ctx->saved_data["label_smoothing"] = label_smoothing;
    }
    return loss_of(flow[0], flow[1], flow[2], text.size(-2), label_smoothing, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const int64_t needs = ctx->saved_data["needs"].toInt();
    const Tensor& grad_loss = grad_outputs[0];
    variable_list grads = ctx->get_saved_variables();
    if (ctx->saved_data["in_forward"].toBool()) {
      // d loss / d loss = 1 (loss.backward()) needs no scaling: read on the host for a CPU
      // tensor only (on a GPU that read would sync).
      const bool unit = grad_loss.device().is_cpu() && grad_loss.item<double>() == 1.0;
      if (!unit) {
        for (Tensor& grad : grads) {
          if (grad.defined()) grad = (grad * grad_loss).to(grad.scalar_type());
        }
      }
    } else {
      const auto optional = [](const Tensor& tensor) -> OptionalTensor {
        return tensor.defined() ? OptionalTensor(tensor) : std::nullopt;
      };
      const int64_t num_samples = ctx->saved_data["num_samples"].toInt();
      const int64_t batch = grads[0].size(-2);
      Tensor row_grads = grad_loss.to(at::kFloat);
      if (ctx->saved_data["reduction"].toInt() == kReductionMean) {
        row_grads = row_grads / static_cast<double>(num_samples * batch);
      }
      row_grads = row_grads.expand({num_samples, batch}).contiguous();
      const auto flow = call_flow(
          grads[0], grads[1], grads[2], optional(grads[3]), optional(grads[4]),
          optional(grads[5]), optional(grads[6]), grads[7], grads[8], grads[9], num_samples,
          ctx->saved_data["multiply"].toBool(), ctx->saved_data["label_smoothing"].toDouble(),
          grads[10], row_grads, needs);
      grads = flow_gradients(flow, needs);
    }
    grads.resize(15);  // none for target, the seeds and the settings
    return once_differentiable(std::move(grads), "noisy_cross_entropy");
  }
};

// The loss without autograd: the flow's statistics, reduced (no gradient wanted).
Tensor cross_entropy_no_grad(const Tensor& image, const Tensor& text, const Tensor& scale,
                             const OptionalTensor& image_mu, const OptionalTensor& image_sigma,
                             const OptionalTensor& text_mu, const OptionalTensor& text_sigma,
                             const Tensor& target, const Tensor& image_seed,
                             const Tensor& text_seed, int64_t num_samples, bool multiply,
                             int64_t reduction, double label_smoothing) {
  const auto flow = call_flow(image, text, scale, image_mu, image_sigma, text_mu, text_sigma,
                              target, image_seed, text_seed, num_samples, multiply,
                              label_smoothing, std::nullopt, std::nullopt, 0);
  return loss_of(flow[0], flow[1], flow[2], text.size(-2), label_smoothing, reduction);
}

Tensor cross_entropy_autograd(const Tensor& image, const Tensor& text, const Tensor& scale,
                              const OptionalTensor& image_mu, const OptionalTensor& image_sigma,
                              const OptionalTensor& text_mu, const OptionalTensor& text_sigma,
                              const Tensor& target, const Tensor& image_seed,
                              const Tensor& text_seed, int64_t num_samples, bool multiply,
                              int64_t reduction, double label_smoothing) {
  int64_t needs = 0;
  if (at::GradMode::is_enabled()) {
    const OptionalTensor inputs[7] = {image, text, scale, image_mu, image_sigma, text_mu,
                                      text_sigma};
    for (int index = 0; index < 7; ++index) {
      if (inputs[index].has_value() && inputs[index]->requires_grad()) needs |= int64_t{1} << index;
    }
  }
  if (needs == 0) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return cross_entropy_no_grad(image, text, scale, image_mu, image_sigma, text_mu, text_sigma,
                                 target, image_seed, text_seed, num_samples, multiply, reduction,
                                 label_smoothing);
  }
  return LossFunction::apply(image, text, scale, image_mu, image_sigma, text_mu, text_sigma,
                             target, image_seed, text_seed, num_samples, multiply, reduction,
                             label_smoothing, needs);
}

TORCH_LIBRARY_FRAGMENT(pini_native, m) {
  m.def(
      "cross_entropy(Tensor image, Tensor text, Tensor scale, Tensor? image_mu, "
      "Tensor? image_sigma, Tensor? text_mu, Tensor? text_sigma, Tensor target, "
      "Tensor image_seed, Tensor text_seed, int num_samples, bool multiply, int reduction, "
      "float label_smoothing) -> Tensor");
}

TORCH_LIBRARY_IMPL(pini_native, Autograd, m) { m.impl("cross_entropy", &cross_entropy_autograd); }

TORCH_LIBRARY_IMPL(pini_native, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy", &cross_entropy_no_grad);
}

TORCH_LIBRARY_FRAGMENT(pini_native, m) {
  m.def(
      "cross_entropy_flow(Tensor image, Tensor text, Tensor scale, Tensor? image_mu, "
      "Tensor? image_sigma, Tensor? text_mu, Tensor? text_sigma, Tensor target, "
      "Tensor image_seed, Tensor text_seed, int num_samples, bool multiply, "
      "float label_smoothing, Tensor? lse, Tensor? row_grads, int needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pini_native, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_flow", &cross_entropy_flow);
}

}  // namespace
}  // namespace pini
