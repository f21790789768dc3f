// Picks the kernel variant (variant.h) at run time: the widest this CPU runs, unless set_isa
// (fusedvlm.native, from FUSEDVLM_ISA) chose another, and forwards every kernel entry point to it.
#include "variant.h"

FUSEDVLM_DECLARE_VARIANT(baseline)
#if FUSEDVLM_X86_VARIANTS
FUSEDVLM_DECLARE_VARIANT(avx2)
FUSEDVLM_DECLARE_VARIANT(avx512)
#endif

namespace fusedvlm {
namespace {

enum Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

bool cpu_runs(Isa isa) {
#if FUSEDVLM_X86_VARIANTS
  // Also checks that the OS saves the wider registers (XGETBV), not only CPUID.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  return isa == kBaseline;
}

Isa widest() {
  for (Isa isa : {kAvx512, kAvx2})
    if (cpu_runs(isa)) return isa;
  return kBaseline;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{widest()};
  return isa;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : {kBaseline, kAvx2, kAvx512})
    if (cpu_runs(isa)) out.emplace_back(kIsaNames[isa]);
  return out;
}

std::string isa() { return kIsaNames[active().load()]; }

void set_isa(const std::string& name) {
  for (Isa isa : {kBaseline, kAvx2, kAvx512}) {
    if (name != kIsaNames[isa]) continue;
    std::string runs;
    for (const auto& s : supported_isas()) runs += (runs.empty() ? "" : ", ") + s;
    TORCH_CHECK_VALUE(cpu_runs(isa), "kernel variant '", name, "' needs instructions this CPU lacks; it runs: ", runs);
    active().store(isa);
    return;
  }
  TORCH_CHECK_VALUE(false, "unknown kernel variant '", name, "'; choose from baseline, avx2, avx512");
}

#if FUSEDVLM_X86_VARIANTS
#define FUSEDVLM_DISPATCH(fn, ...)                               \
  switch (active().load(std::memory_order_relaxed)) {            \
    case kAvx512:                                                \
      return avx512::fn(__VA_ARGS__);                            \
    case kAvx2:                                                  \
      return avx2::fn(__VA_ARGS__);                              \
    default:                                                     \
      return baseline::fn(__VA_ARGS__);                          \
  }
#else
#define FUSEDVLM_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal,
                                                        double scale) {
  FUSEDVLM_DISPATCH(attention::packed_attention_fwd, q, k, v, cu_q, cu_k, causal, scale)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd(const at::Tensor& grad, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const at::Tensor& cu_q, const at::Tensor& cu_k,
                                                                    bool causal, double scale) {
  FUSEDVLM_DISPATCH(attention::packed_attention_bwd, grad, q, k, v, out, lse, cu_q, cu_k, causal, scale)
}

Stats pairwise_cosine_stats(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cu, bool positive) {
  FUSEDVLM_DISPATCH(cosine::pairwise_cosine_stats, a, b, cu, positive)
}

at::Tensor local_merge_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lf,
                           const std::optional<at::Tensor>& bias, bool residual, int64_t h, int64_t w,
                           std::optional<bool> winograd) {
  FUSEDVLM_DISPATCH(merge::local_merge_fwd, x, weight, lf, bias, residual, h, w, winograd)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_merge_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                                           const at::Tensor& weight, bool has_bias,
                                                                           bool residual, int64_t h, int64_t w,
                                                                           bool need_x, bool need_w,
                                                                           std::optional<bool> winograd) {
  FUSEDVLM_DISPATCH(merge::local_merge_bwd, grad, x, weight, has_bias, residual, h, w, need_x, need_w, winograd)
}

bool winograd_form(int64_t v, int64_t h, int64_t w, int64_t c_in, int64_t c_out) {
  FUSEDVLM_DISPATCH(merge::winograd_form, v, h, w, c_in, c_out)
}

at::Tensor linear(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                  std::optional<at::TensorList> scales) {
  FUSEDVLM_DISPATCH(matvec::linear, x, weights, biases, scales)
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                            double scale) {
  FUSEDVLM_DISPATCH(decode::decode_attention, q, k, v, pos, scale)
}

at::Tensor llama_decode_step(const at::Tensor& x, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases,
                             const c10::List<std::optional<at::Tensor>>& scales, at::TensorList norms,
                             at::TensorList k_cache, at::TensorList v_cache, const at::Tensor& pos,
                             const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, double eps, double scale,
                             c10::string_view act) {
  FUSEDVLM_DISPATCH(step::llama_decode_step, x, weights, biases, scales, norms, k_cache, v_cache, pos, cos, sin,
                    num_heads, eps, scale, act)
}

double fma_peak(int64_t iterations) { FUSEDVLM_DISPATCH(peak::fma_peak, iterations) }

}  // namespace fusedvlm
