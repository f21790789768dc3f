// The kernels for AVX-512 F/BW/DQ/VL (Skylake-SP and later Xeons, Zen 4), see variant.h. The
// AVX2 paths are compiled in too (FUSEDVLM_AVX2), for the code that has no AVX-512 form.
#include "variant.h"

#if FUSEDVLM_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#define FUSEDVLM_VARIANT avx512
#define FUSEDVLM_AVX2 1
#define FUSEDVLM_AVX512 1
#include "variant_body.inc"
#pragma GCC pop_options
#endif
