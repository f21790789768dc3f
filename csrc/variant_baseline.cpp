// The kernels for the ISA the whole library is compiled for (x86-64: SSE2; elsewhere the
// compiler's default): runs on every CPU, the fallback of isa.cpp.
#include "variant.h"

#define FUSEDVLM_VARIANT baseline
#include "variant_body.inc"
