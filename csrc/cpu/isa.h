// Which instruction-set code paths this build of the CPU kernels has (setup.py's PINI_CPU_ARCH).
//
// PINI_CPU_X86: x86-64 intrinsics may be used where the compiled-for target has them. Off on
//   other machines (aarch64: the kernels are plain C++ the compiler vectorizes with NEON) and
//   when setup.py defines PINI_CPU_PORTABLE (PINI_CPU_ARCH=portable: the path every other
//   machine takes, built and tested on x86 because no aarch64 toolchain is at hand).
// PINI_CPU_AVX512_COPY: kernels_avx512.cpp holds a second copy of the kernels compiled for
//   AVX-512, which kernels.cpp runs where the CPU has it. It needs GCC's `#pragma GCC target`
//   (clang builds keep the baseline copy only).
#pragma once

#if defined(__x86_64__) && !defined(PINI_CPU_PORTABLE)
#define PINI_CPU_X86 1
#else
#define PINI_CPU_X86 0
#endif

#if PINI_CPU_X86 && defined(__GNUC__) && !defined(__clang__)
#define PINI_CPU_AVX512_COPY 1
#else
#define PINI_CPU_AVX512_COPY 0
#endif
