// Fused CPU kernels on raw pointers (OpenMP over tiles, SIMD inside). The PyTorch binding in
// csrc/bindings.cpp checks arguments, allocates and calls these. Each runs the AVX-512 copy of the
// kernels where the build has it and the CPU supports it, else the baseline copy (kernels.cpp).
//
// Layouts (pini_kernels/inject.py, BroadcastLayout): the perturbed tensor is viewed as
// rows x width, and the noise parameter of column c is c / inner; sample s of element i is stream
// element s * N + i.
#pragma once

#include <cstdint>

#include "../feature_rows.h"

namespace pini::cpu {

// The copy of the kernels this process runs: "avx512", "baseline" (the build's -march, x86-64-v3
// by default) or "portable" (PINI_CPU_ARCH=portable, or a machine other than x86-64). Chosen once,
// at the first call; the environment variable PINI_CPU_CAPABILITY=baseline forces the baseline.
const char* kernel_variant();

struct InjectShape {
  int64_t rows, width, inner, num_samples;
  bool multiply;
};

// One side (image or text) of the noisy cosine logits (../feature_rows.h), x stored as In.
template <typename In>
using FeatureRows = ::pini::FeatureRows<const In*>;

#include "kernel_declarations.inc"

}  // namespace pini::cpu

// Explicit instantiations of the templates above for the storage types the binding uses, in the
// namespace where the macro is expanded (kernels.cpp, and each copy of kernels_impl.h).
#define PINI_CPU_INSTANTIATE_INJECT(In, Out)                                                \
  template void inject_forward<In, Out>(const In*, const float*, const float*, Out*,        \
                                        uint64_t, InjectShape, int);                        \
  template void inject_backward<In, Out>(const Out*, const In*, const float*, const float*, \
                                         In*, float*, float*, uint64_t, InjectShape, int64_t, \
                                         int);
#define PINI_CPU_INSTANTIATE_ROWS(In)                                                       \
  template void noisy_normalize<In>(const FeatureRows<In>&, uint64_t, int64_t, float*,      \
                                    float*, int);                                           \
  template void noisy_normalize_backward<In>(const FeatureRows<In>&, uint64_t, int64_t,     \
                                             const float*, const float*, const float*,      \
                                             float*, float*, float*, int);
#define PINI_CPU_INSTANTIATE_KERNELS()                        \
  PINI_CPU_INSTANTIATE_INJECT(float, float)                   \
  PINI_CPU_INSTANTIATE_INJECT(c10::Half, c10::Half)           \
  PINI_CPU_INSTANTIATE_INJECT(c10::BFloat16, c10::BFloat16)   \
  PINI_CPU_INSTANTIATE_INJECT(c10::Half, float)               \
  PINI_CPU_INSTANTIATE_INJECT(c10::BFloat16, float)           \
  PINI_CPU_INSTANTIATE_ROWS(float)                            \
  PINI_CPU_INSTANTIATE_ROWS(c10::Half)                        \
  PINI_CPU_INSTANTIATE_ROWS(c10::BFloat16)
