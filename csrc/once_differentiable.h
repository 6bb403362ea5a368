// The C++ autograd nodes' counterpart of Python's torch.autograd.function.once_differentiable:
// their backward computes gradients with kernels autograd cannot see, so those gradients are not
// differentiable. With create_graph=True they come back attached to an error node: using them in
// a second differentiation raises instead of silently leaving out this op's second-order terms.
#pragma once

#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <memory>
#include <string>

namespace pini {

inline torch::autograd::variable_list once_differentiable(torch::autograd::variable_list grads,
                                                          const char* op) {
  if (!at::GradMode::is_enabled()) return grads;  // no create_graph: nothing to guard
  torch::autograd::variable_list inputs;
  inputs.reserve(grads.size());
  for (const auto& grad : grads) {
    inputs.push_back(grad.defined() ? grad.detach().requires_grad_(true) : grad);
  }
  const auto error = std::make_shared<torch::autograd::DelayedError>(
      std::string("pini_kernels: the backward of ") + op +
          " is not differentiable (its kernels are opaque to autograd); a second-order gradient "
          "through it is not supported",
      static_cast<int64_t>(inputs.size()));
  return error->apply(std::move(inputs));
}

}  // namespace pini
