// One build, every x86 ISA: the kernels are compiled three times, once per variant, and
// isa.cpp picks one at run time (by CPU, or FUSEDVLM_ISA; docs/design.md).
//
// Each variant is one translation unit (variant_<name>.cpp) that includes this header, then
// switches the target ISA with `#pragma GCC target` and includes variant_body.inc, which puts
// every kernel in namespace fusedvlm::<name>. The ISA is switched by pragma after the includes,
// not by -mavx2 / -mavx512f on the command line: inline functions of the torch and standard
// headers are emitted as weak symbols in every object that uses them, and the linker keeps one
// copy; compiled with -mavx512f, that copy could be an AVX-512 one that an AVX2 CPU then runs
// from the baseline code. Here every header is parsed before the pragma, so only the kernels'
// own functions carry the wider ISA (tests/test_native.py checks the library for vector
// instructions outside them). Hence also: the kernel bodies (*.inc) include nothing themselves;
// what they need is included here.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <strings.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FUSEDVLM_X86_VARIANTS 1
#else
#define FUSEDVLM_X86_VARIANTS 0
#endif

// The entry points every variant defines, declared in its namespace.
#define FUSEDVLM_DECLARE_VARIANT(V)                                                                                 \
  namespace fusedvlm::V::attention {                                                                                \
  std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,   \
                                                          const at::Tensor&, const at::Tensor&, bool, double);     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd(                                              \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,                \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, double);                                       \
  }                                                                                                                 \
  namespace fusedvlm::V::cosine {                                                                                   \
  Stats pairwise_cosine_stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);                       \
  }                                                                                                                 \
  namespace fusedvlm::V::merge {                                                                                    \
  at::Tensor local_merge_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,                               \
                             const std::optional<at::Tensor>&, bool, int64_t, int64_t, std::optional<bool>);        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_merge_bwd(                                       \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool, int64_t, int64_t, bool, bool,            \
      std::optional<bool>);                                                                                         \
  bool winograd_form(int64_t, int64_t, int64_t, int64_t, int64_t);                                                  \
  }                                                                                                                 \
  namespace fusedvlm::V::matvec {                                                                                   \
  at::Tensor linear(const at::Tensor&, at::TensorList, const c10::List<std::optional<at::Tensor>>&,               \
                    std::optional<at::TensorList>);                                                                 \
  }                                                                                                                 \
  namespace fusedvlm::V::decode {                                                                                   \
  at::Tensor decode_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double); \
  }                                                                                                                 \
  namespace fusedvlm::V::step {                                                                                     \
  at::Tensor llama_decode_step(const at::Tensor&, at::TensorList, const c10::List<std::optional<at::Tensor>>&,       \
                               const c10::List<std::optional<at::Tensor>>&, at::TensorList, at::TensorList,         \
                               at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,    \
                               double, double, c10::string_view);                                                   \
  }                                                                                                                 \
  namespace fusedvlm::V::peak {                                                                                     \
  double fma_peak(int64_t);                                                                                         \
  }
