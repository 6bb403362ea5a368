// The CPU kernels' entry points (kernels.h). The kernels themselves are in kernels_impl.h, compiled
// here for the build's baseline target and, on x86-64, once more for AVX-512 in kernels_avx512.cpp;
// each entry point runs the AVX-512 copy where the CPU has AVX-512, else the baseline copy. So one
// binary built for x86-64-v3 runs on every x86-64-v3 CPU and is as fast as -march=native where
// AVX-512 is present (ATen's CPU kernels do the same). Only small headers here (no
// torch/extension.h), so this file compiles in seconds.
#include "kernels.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "isa.h"

#define PINI_CPU_VARIANT baseline
#include "kernels_impl.h"
#undef PINI_CPU_VARIANT

namespace pini::cpu {

#if PINI_CPU_AVX512_COPY
namespace avx512 {  // kernels_avx512.cpp: the same kernels compiled for AVX-512
#include "kernel_declarations.inc"
}  // namespace avx512
#endif

namespace {

// The baseline copy was compiled for AVX2 and FMA (x86-64-v3, the default): on an older CPU say
// so, instead of dying of an illegal instruction.
void check_baseline_runs_here() {
#if PINI_CPU_X86 && defined(__AVX2__) && defined(__FMA__)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    throw std::runtime_error(
        "pini_kernels._C was built for x86-64-v3 (AVX2, FMA) and this CPU lacks them: rebuild "
        "with PINI_CPU_ARCH=portable");
  }
#endif
}

// AVX-512 F, CD, BW, DQ and VL (x86-64-v4's set), with the OS saving the zmm registers (libgcc's
// __builtin_cpu_supports checks XCR0 too).
bool choose_avx512() {
  check_baseline_runs_here();
#if PINI_CPU_AVX512_COPY
  const char* forced = std::getenv("PINI_CPU_CAPABILITY");
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return false;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// Whether to run the AVX-512 copy: decided once per process, at the first kernel call (which also
// checks that this CPU runs the baseline copy).
bool run_avx512() {
  static const bool chosen = choose_avx512();
  return chosen;
}

}  // namespace

const char* kernel_variant() {
  if (run_avx512()) return "avx512";
  return PINI_CPU_X86 ? "baseline" : "portable";
}

// The body of each entry point: the chosen copy's kernel of the same name.
#if PINI_CPU_AVX512_COPY
#define PINI_RUN_KERNEL(kernel, ...) \
  return run_avx512() ? avx512::kernel(__VA_ARGS__) : baseline::kernel(__VA_ARGS__)
#else
#define PINI_RUN_KERNEL(kernel, ...) return run_avx512(), baseline::kernel(__VA_ARGS__)
#endif

void normal_fill(uint64_t seed, int64_t start, int64_t count, float* out, int num_threads) {
  PINI_RUN_KERNEL(normal_fill, seed, start, count, out, num_threads);
}

template <typename In, typename Out>
void inject_forward(const In* x, const float* mu, const float* sigma, Out* out, uint64_t seed,
                    InjectShape shape, int num_threads) {
  PINI_RUN_KERNEL(inject_forward, x, mu, sigma, out, seed, shape, num_threads);
}

template <typename In, typename Out>
void inject_backward(const Out* grad_out, const In* x, const float* mu, const float* sigma,
                     In* grad_x, float* partial_mu, float* partial_sigma, uint64_t seed,
                     InjectShape shape, int64_t rows_per_chunk, int num_threads) {
  PINI_RUN_KERNEL(inject_backward, grad_out, x, mu, sigma, grad_x, partial_mu, partial_sigma,
                  seed, shape, rows_per_chunk, num_threads);
}

template <typename In>
void noisy_normalize(const FeatureRows<In>& side, uint64_t seed, int64_t stream_offset,
                     float* unit, float* norm, int num_threads) {
  PINI_RUN_KERNEL(noisy_normalize, side, seed, stream_offset, unit, norm, num_threads);
}

template <typename In>
void noisy_normalize_backward(const FeatureRows<In>& side, uint64_t seed, int64_t stream_offset,
                              const float* unit, const float* norm, const float* grad_unit,
                              float* grad_x, float* grad_mu, float* grad_sigma, int num_threads) {
  PINI_RUN_KERNEL(noisy_normalize_backward, side, seed, stream_offset, unit, norm, grad_unit,
                  grad_x, grad_mu, grad_sigma, num_threads);
}

void cross_entropy_stats(const float* cosine, const int64_t* target, float scale, int64_t rows,
                         int64_t classes, float* lse, float* target_logit, float* logit_sum,
                         int num_threads) {
  PINI_RUN_KERNEL(cross_entropy_stats, cosine, target, scale, rows, classes, lse, target_logit,
                  logit_sum, num_threads);
}

void cross_entropy_grad(float* cosine, const float* lse, const int64_t* target,
                        const float* row_grad, float scale, float label_smoothing, int64_t rows,
                        int64_t classes, float* scale_grad, int num_threads) {
  PINI_RUN_KERNEL(cross_entropy_grad, cosine, lse, target, row_grad, scale, label_smoothing, rows,
                  classes, scale_grad, num_threads);
}

#undef PINI_RUN_KERNEL

PINI_CPU_INSTANTIATE_KERNELS()

}  // namespace pini::cpu
