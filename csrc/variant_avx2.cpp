// The kernels for AVX2 + FMA + F16C (every x86 CPU since Haswell / Zen), see variant.h.
#include "variant.h"

#if FUSEDVLM_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FUSEDVLM_VARIANT avx2
#define FUSEDVLM_AVX2 1
#include "variant_body.inc"
#pragma GCC pop_options
#endif
