// csrc/checks.h against tensors on two GPUs, without a GPU: tensors whose storage says cuda:0 or
// cuda:1 (a data pointer nothing reads), handed to the checks of every op. Each case prints one
// line, "<case>: passed" or "<case>: <the check's message>"; tests/test_native.py compiles and
// runs this and expects every mixed-device case refused.
#include <c10/core/Storage.h>
#include <c10/core/TensorImpl.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "checks.h"

namespace {

using at::Tensor;
namespace checks = pini::checks;

float scratch[4096];  // what every fake tensor's storage points at; never read or written

template <typename T>
Tensor on_gpu(int index, std::vector<int64_t> sizes) {
  int64_t numel = 1;
  for (int64_t size : sizes) numel *= size;
  c10::Storage storage(c10::Storage::use_byte_size_t(), numel * sizeof(T),
                       c10::DataPtr(scratch, c10::Device(c10::DeviceType::CUDA, index)),
                       /*allocator=*/nullptr, /*resizable=*/false);
  auto impl = c10::make_intrusive<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CUDA),
      caffe2::TypeMeta::Make<T>());
  impl->set_sizes_contiguous(sizes);
  return Tensor(std::move(impl));
}

Tensor floats(int index, std::vector<int64_t> sizes) { return on_gpu<float>(index, sizes); }

void run(const char* name, const std::function<void()>& check) {
  try {
    check();
    std::printf("%s: passed\n", name);
  } catch (const c10::Error& error) {
    std::printf("%s: %s\n", name, error.msg().c_str());
  }
}

}  // namespace

int main() {
  constexpr auto kCUDA = c10::DeviceType::CUDA;
  // fused_inject of x (4, 8) with a per-feature mu and sigma: every tensor on cuda:0 passes.
  auto inject = [&](int x_gpu, int mu_gpu, int out_gpu) {
    return [=] {
      checks::inject_forward(floats(x_gpu, {4, 8}), floats(mu_gpu, {8}), floats(0, {8}), 1, 4, 8,
                             1, floats(out_gpu, {4, 8}), kCUDA);
    };
  };
  run("inject_forward same", inject(0, 0, 0));
  run("inject_forward mu", inject(0, 1, 0));
  run("inject_forward out", inject(0, 0, 1));
  run("inject_backward partial_mu", [&] {
    checks::inject_backward(floats(0, {4, 8}), floats(0, {4, 8}), floats(0, {8}), floats(0, {8}),
                            1, true, 4, 8, 1, 4, floats(0, {4, 8}), floats(1, {8}),
                            floats(0, {8}), kCUDA);
  });
  run("noisy_normalize sigma", [&] {
    checks::noisy_normalize(floats(0, {4, 8}), floats(0, {4, 8}), floats(1, {4, 8}),
                            floats(0, {4, 8}), floats(0, {4}), kCUDA);
  });
  run("noisy_normalize norm", [&] {
    checks::noisy_normalize(floats(0, {4, 8}), std::nullopt, std::nullopt, floats(0, {4, 8}),
                            floats(1, {4}), kCUDA);
  });
  run("noisy_normalize_backward grad_x", [&] {
    checks::noisy_normalize_backward(floats(0, {4, 8}), std::nullopt, std::nullopt,
                                     floats(0, {4, 8}), floats(0, {4}), floats(0, {4, 8}),
                                     floats(1, {4, 8}), std::nullopt, std::nullopt, kCUDA);
  });
  auto stats = [&](int target_gpu, int scale_gpu, int lse_gpu) {
    return [=] {
      checks::cross_entropy_stats(floats(0, {4, 6}), on_gpu<int64_t>(target_gpu, {4}),
                                  floats(scale_gpu, {}), floats(lse_gpu, {4}), floats(0, {4}),
                                  floats(0, {4}), kCUDA);
    };
  };
  run("cross_entropy_stats same", stats(0, 0, 0));
  run("cross_entropy_stats target", stats(1, 0, 0));
  run("cross_entropy_stats logit_scale", stats(0, 1, 0));
  run("cross_entropy_stats lse", stats(0, 0, 1));
  run("cross_entropy_grad row_grad", [&] {
    checks::cross_entropy_grad(floats(0, {4, 6}), floats(0, {4}), on_gpu<int64_t>(0, {4}),
                               floats(1, {4}), floats(0, {}), floats(0, {4}), kCUDA);
  });
  run("seed", [&] { checks::seed(on_gpu<int64_t>(1, {}), c10::Device(kCUDA, 0)); });
  return 0;
}
