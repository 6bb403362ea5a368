// Argument checks of the pini_native ops, one set for both implementations: the CPU ones in
// bindings.cpp and the CUDA ones in cuda/bindings_cuda.cpp call the check of their op with their
// device type (every tensor must then be on the first one's device, index included), so both reject the same arguments with the same messages, each naming the argument,
// what was expected and what came. pini_kernels/native.py never passes a bad argument; these keep
// a direct call of torch.ops.pini_native from reading or writing out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

namespace pini::checks {

using at::Tensor;
using c10::DeviceType;

// The device an op runs on: that of `tensor`, its first data argument, which must be of the
// backend's device type. Every other tensor must be on this very device, index included: a
// tensor on cuda:1 beside data on cuda:0 would be read through a pointer of another GPU.
inline c10::Device op_device(const Tensor& tensor, const char* name, DeviceType type) {
  TORCH_CHECK(tensor.device().type() == type, name, " must be a ", c10::DeviceTypeName(type),
              " tensor, got one on ", tensor.device());
  return tensor.device();
}

inline void on_device(const Tensor& tensor, const char* name, const c10::Device& device) {
  TORCH_CHECK(tensor.device() == device, name, " must be on the op's device ", device,
              ", got one on ", tensor.device());
}

// A tensor an op reads or writes: on `device` and contiguous.
inline void on_device_contiguous(const Tensor& tensor, const char* name,
                                 const c10::Device& device) {
  on_device(tensor, name, device);
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous, got shape ", tensor.sizes(),
              " with strides ", tensor.strides());
}

inline void float32(const Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, name, " must be float32, got ",
              tensor.scalar_type());
}

// A contiguous float32 tensor of `numel` elements on `device`.
inline void float32_buffer(const Tensor& buffer, const char* name, int64_t numel,
                           const c10::Device& device) {
  on_device_contiguous(buffer, name, device);
  float32(buffer, name);
  TORCH_CHECK(buffer.numel() == numel, name, " must have ", numel, " elements, got ",
              buffer.numel());
}

// The seed of every op: a one-element int64 tensor (0-d, as pini_kernels/native.py passes it),
// on the CPU for the CPU kernels (read on the host) and on the data's GPU for the CUDA kernels
// (read inside them, so that a CUDA graph replays with the value it holds then). Its int64 value
// is the noise stream's 64-bit key, seen as uint64.
inline void seed(const Tensor& seed, const c10::Device& data_device) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "seed must be a one-element int64 tensor, got ", seed.scalar_type(), " of shape ",
              seed.sizes());
  TORCH_CHECK(seed.device() == data_device, "seed must be on the data's device ", data_device,
              ", got one on ", seed.device());
}

// noise(seed, start, out): out is filled with stream elements start, start + 1, ...
inline void noise(int64_t start, const Tensor& out, DeviceType type) {
  on_device_contiguous(out, "out", op_device(out, "out", type));
  float32(out, "out");
  TORCH_CHECK(start >= 0, "start must be >= 0, got ", start);
}

// x viewed as rows x width, num_samples samples of it, and the noise parameters mu and sigma:
// width / inner float32 values each (see pini_kernels/inject.py, BroadcastLayout).
inline void inject_layout(const Tensor& x, const Tensor& mu, const Tensor& sigma,
                          int64_t num_samples, int64_t rows, int64_t width, int64_t inner,
                          const c10::Device& device) {
  TORCH_CHECK(rows >= 0 && width >= 0 && rows * width == x.numel(), "rows * width = ", rows,
              " * ", width, " must equal x.numel() = ", x.numel());
  TORCH_CHECK(inner >= 1 && width % inner == 0, "inner = ", inner, " must divide width = ",
              width);
  TORCH_CHECK(num_samples >= 1, "num_samples must be >= 1, got ", num_samples);
  for (const auto& [param, name] : {std::pair{&mu, "mu"}, std::pair{&sigma, "sigma"}}) {
    float32_buffer(*param, name, width / inner, device);
  }
}

// inject_forward(x, mu, sigma, seed, num_samples, multiply, rows, width, inner, out)
inline void inject_forward(const Tensor& x, const Tensor& mu, const Tensor& sigma,
                           int64_t num_samples, int64_t rows, int64_t width, int64_t inner,
                           const Tensor& out, DeviceType type) {
  const c10::Device device = op_device(x, "x", type);
  on_device_contiguous(x, "x", device);
  on_device_contiguous(out, "out", device);
  inject_layout(x, mu, sigma, num_samples, rows, width, inner, device);
  TORCH_CHECK(out.numel() == num_samples * x.numel(), "out must have num_samples * x.numel() = ",
              num_samples * x.numel(), " elements, got ", out.numel());
}

// inject_backward(grad_out, x, mu, sigma, seed, num_samples, multiply, rows, width, inner,
// rows_per_chunk, grad_x, partial_mu, partial_sigma). Returns the number of row chunks, the rows
// of partial_mu and partial_sigma.
inline int64_t inject_backward(const Tensor& grad_out, const Tensor& x, const Tensor& mu,
                               const Tensor& sigma, int64_t num_samples, bool multiply,
                               int64_t rows, int64_t width, int64_t inner, int64_t rows_per_chunk,
                               const std::optional<Tensor>& grad_x,
                               const std::optional<Tensor>& partial_mu,
                               const std::optional<Tensor>& partial_sigma, DeviceType type) {
  const c10::Device device = op_device(grad_out, "grad_out", type);
  on_device_contiguous(grad_out, "grad_out", device);
  // Add mode never reads x: it may be a stand-in with x's shape and dtype (stride 0).
  if (multiply) on_device_contiguous(x, "x", device);
  inject_layout(x, mu, sigma, num_samples, rows, width, inner, device);
  TORCH_CHECK(grad_out.numel() == num_samples * x.numel(),
              "grad_out must have num_samples * x.numel() = ", num_samples * x.numel(),
              " elements, got ", grad_out.numel());
  TORCH_CHECK(rows_per_chunk >= 1, "rows_per_chunk must be >= 1, got ", rows_per_chunk);
  const int64_t row_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  TORCH_CHECK(partial_mu.has_value() == partial_sigma.has_value(),
              "partial_mu and partial_sigma must be given together (gradients of mu and sigma) "
              "or both be None");
  if (partial_mu) {
    float32_buffer(*partial_mu, "partial_mu", row_chunks * width, device);
    float32_buffer(*partial_sigma, "partial_sigma", row_chunks * width, device);
  }
  if (grad_x) {
    on_device_contiguous(*grad_x, "grad_x", device);
    TORCH_CHECK(grad_x->scalar_type() == x.scalar_type() && grad_x->numel() == x.numel(),
                "grad_x must have x's dtype ", x.scalar_type(), " and ", x.numel(),
                " elements, got ", grad_x->scalar_type(), " and ", grad_x->numel());
  }
  return row_chunks;
}

// The noise parameters of one side's feature rows, as the kernels read them (no noise: nullptr).
struct NoiseParams {
  const float* mu = nullptr;
  const float* sigma = nullptr;
  int64_t mu_row_stride = 0, mu_col_stride = 0, sigma_row_stride = 0, sigma_col_stride = 0;
};

// x: (rows, D) with unit stride along D; mu and sigma: both None (no noise) or float32 views of
// x's shape on `device`, any strides (0 on broadcast dimensions).
inline NoiseParams feature_rows(const Tensor& x, const std::optional<Tensor>& mu,
                                const std::optional<Tensor>& sigma, DeviceType type) {
  const c10::Device device = op_device(x, "features", type);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1,
              "features must be 2-D (rows, D) with unit stride along D, got shape ", x.sizes(),
              " with strides ", x.strides());
  TORCH_CHECK(mu.has_value() == sigma.has_value(),
              "mu and sigma must be given together (noise) or both be None");
  if (!mu) return {};
  for (const auto& [param, name] : {std::pair{&*mu, "mu"}, std::pair{&*sigma, "sigma"}}) {
    on_device(*param, name, device);
    float32(*param, name);
    TORCH_CHECK(param->sizes() == x.sizes(), name, " must be expanded to the features' shape ",
                x.sizes(), ", got ", param->sizes());
  }
  return {mu->data_ptr<float>(), sigma->data_ptr<float>(), mu->stride(0), mu->stride(1),
          sigma->stride(0), sigma->stride(1)};
}

// noisy_normalize(x, mu, sigma, seed, stream_offset, multiply, unit, norm)
inline NoiseParams noisy_normalize(const Tensor& x, const std::optional<Tensor>& mu,
                                   const std::optional<Tensor>& sigma, const Tensor& unit,
                                   const Tensor& norm, DeviceType type) {
  const NoiseParams params = feature_rows(x, mu, sigma, type);
  float32_buffer(unit, "unit", x.numel(), x.device());
  float32_buffer(norm, "norm", x.size(0), x.device());
  return params;
}

// noisy_normalize_backward(x, mu, sigma, seed, stream_offset, multiply, unit, norm, grad_unit,
// grad_x, grad_mu, grad_sigma): the gradients are float32 accumulators of x's shape.
inline NoiseParams noisy_normalize_backward(
    const Tensor& x, const std::optional<Tensor>& mu, const std::optional<Tensor>& sigma,
    const Tensor& unit, const Tensor& norm, const Tensor& grad_unit,
    const std::optional<Tensor>& grad_x, const std::optional<Tensor>& grad_mu,
    const std::optional<Tensor>& grad_sigma, DeviceType type) {
  const NoiseParams params = noisy_normalize(x, mu, sigma, unit, norm, type);
  const c10::Device device = x.device();
  float32_buffer(grad_unit, "grad_unit", x.numel(), device);
  TORCH_CHECK(grad_mu.has_value() == grad_sigma.has_value(),
              "grad_mu and grad_sigma must be given together or both be None");
  for (const auto& [grad, name] : {std::pair{&grad_x, "grad_x"}, std::pair{&grad_mu, "grad_mu"},
                                   std::pair{&grad_sigma, "grad_sigma"}}) {
    if (grad->has_value()) float32_buffer(**grad, name, x.numel(), device);
  }
  return params;
}

// One sample's (B, C) float32 cosine tile, its (B,) int64 class indices, the one-element float32
// logit_scale, and (B,) float32 row buffers (per-row statistics or gradients).
inline void loss_tile(const Tensor& cosine, const Tensor& target, const Tensor& scale,
                      std::initializer_list<std::pair<const Tensor*, const char*>> row_buffers,
                      DeviceType type) {
  const c10::Device device = op_device(cosine, "cosine", type);
  on_device_contiguous(cosine, "cosine", device);
  float32(cosine, "cosine");
  TORCH_CHECK(cosine.dim() == 2, "cosine must be 2-D (B, C), got shape ", cosine.sizes());
  const int64_t rows = cosine.size(0);
  on_device_contiguous(target, "target", device);
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.numel() == rows, "target must have B = ", rows, " elements, got ",
              target.numel());
  on_device_contiguous(scale, "logit_scale", device);
  float32(scale, "logit_scale");
  TORCH_CHECK(scale.numel() == 1, "logit_scale must have one element, got ", scale.numel());
  for (const auto& [buffer, name] : row_buffers) float32_buffer(*buffer, name, rows, device);
}

// cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum)
inline void cross_entropy_stats(const Tensor& cosine, const Tensor& target, const Tensor& scale,
                                const Tensor& lse, const Tensor& target_logit,
                                const Tensor& logit_sum, DeviceType device) {
  loss_tile(cosine, target, scale,
            {{&lse, "lse"}, {&target_logit, "target_logit"}, {&logit_sum, "logit_sum"}}, device);
}

// cross_entropy_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad)
inline void cross_entropy_grad(const Tensor& cosine, const Tensor& lse, const Tensor& target,
                               const Tensor& row_grad, const Tensor& scale,
                               const Tensor& scale_grad, DeviceType device) {
  loss_tile(cosine, target, scale,
            {{&lse, "lse"}, {&row_grad, "row_grad"}, {&scale_grad, "scale_grad"}}, device);
}

}  // namespace pini::checks

// The implementations of the seven pini_native ops for one dispatch key: every backend names its
// functions <op>_<suffix> (noise_cpu, noise_cuda, ...), so the CPU and CUDA registrations are one
// list: `TORCH_LIBRARY_IMPL(pini_native, CPU, m) { PINI_NATIVE_IMPLS(m, cpu); }`.
#define PINI_NATIVE_IMPLS(m, suffix)                                          \
  do {                                                                        \
    (m).impl("noise", &noise_##suffix);                                       \
    (m).impl("inject_forward", &inject_forward_##suffix);                     \
    (m).impl("inject_backward", &inject_backward_##suffix);                   \
    (m).impl("noisy_normalize", &noisy_normalize_##suffix);                   \
    (m).impl("noisy_normalize_backward", &noisy_normalize_backward_##suffix); \
    (m).impl("cross_entropy_stats", &cross_entropy_stats_##suffix);           \
    (m).impl("cross_entropy_grad", &cross_entropy_grad_##suffix);             \
  } while (false)
