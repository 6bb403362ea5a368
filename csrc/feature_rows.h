// One side (image or text) of the noisy cosine logits, as the row kernels of both devices see it
// (cpu/kernels.h, cuda/kernels_cuda.h): `rows` rows of `dim` features x, with unit stride along a
// row and rows x_row_stride elements apart, and optional noise whose parameters mu and sigma are
// float32 views of x's shape broadcast by strides (0 along broadcast dimensions; checks.h,
// feature_rows, builds them). X is how a device's kernels read x: `const In*` on the CPU (one
// instantiation per storage type), a pointer with its dtype on CUDA.
#pragma once

#include <cstdint>

namespace pini {

template <typename X>
struct FeatureRows {
  X x;
  int64_t x_row_stride;
  const float* mu;  // nullptr: no noise
  const float* sigma;
  int64_t mu_row_stride, mu_col_stride, sigma_row_stride, sigma_col_stride;
  int64_t rows, dim;
  bool multiply;
};

}  // namespace pini
