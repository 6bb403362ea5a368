// The AVX-512 copy of the CPU kernels (kernels_impl.h), which kernels.cpp runs where the CPU has
// AVX-512. Empty where the build has no such copy (see isa.h).
#include "isa.h"

#if PINI_CPU_AVX512_COPY
#define PINI_CPU_VARIANT avx512
#define PINI_CPU_VARIANT_AVX512 1
#include "kernels_impl.h"
#endif
