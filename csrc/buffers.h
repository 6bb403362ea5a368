// Buffers the native ops allocate themselves (autograd.cpp, loss_flow.cpp), as
// pini_kernels/_host.py's new_buffer: at::empty for a buffer that kernels write completely,
// NaN-filled when PINI_KERNELS_POISON=1 (the tests), so an element no kernel writes shows up as a
// mismatch instead of whatever the allocator left there.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace pini {

inline bool poison_outputs() {
  static const bool poison = [] {
    const char* value = std::getenv("PINI_KERNELS_POISON");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return poison;
}

inline at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor buffer = at::empty(sizes, options);
  if (poison_outputs()) buffer.fill_(std::numeric_limits<double>::quiet_NaN());
  return buffer;
}

}  // namespace pini
