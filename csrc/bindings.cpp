// Adds the CPU kernels to the one fusedvlm:: namespace as operators of their own (*_cpu, plus
// the decode step's linear and the ISA controls). The public ops (packed_attention, local_merge,
// pairwise_cosine_stats and their backwards) are defined in Python (kernels/*.py), so that they
// exist on machines that cannot build this extension; their CPU kernels call these when the
// caller chose the C++ backend. torch/library.h rather than torch/extension.h (pybind11 and the
// C++ frontend) keeps the build to about a minute.
#include <torch/library.h>

#include "common.h"

namespace fusedvlm {
std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, bool, double);
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&, bool, double);
Stats pairwise_cosine_stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
at::Tensor local_merge_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           bool, int64_t, int64_t, std::optional<bool>);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_merge_bwd(const at::Tensor&, const at::Tensor&,
                                                                           const at::Tensor&, bool, bool, int64_t,
                                                                           int64_t, bool, bool, std::optional<bool>);
bool winograd_form(int64_t, int64_t, int64_t, int64_t, int64_t);
at::Tensor linear(const at::Tensor&, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
                  std::optional<at::TensorList>);
at::Tensor decode_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
at::Tensor llama_decode_step(const at::Tensor&, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
                             const c10::List<std::optional<at::Tensor>>&, at::TensorList, at::TensorList,
                             at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                             double, c10::string_view);
double fma_peak(int64_t);
std::string isa();
void set_isa(const std::string&);
std::vector<std::string> supported_isas();
}  // namespace fusedvlm

TORCH_LIBRARY_FRAGMENT(fusedvlm, m) {
  m.def("packed_attention_fwd_cpu(Tensor q, Tensor k, Tensor v, Tensor cu_q, Tensor cu_k, bool causal, float scale)"
        " -> (Tensor, Tensor)",
        &fusedvlm::packed_attention_fwd);
  m.def("packed_attention_bwd_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_q,"
        " Tensor cu_k, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
        &fusedvlm::packed_attention_bwd);
  m.def("pairwise_cosine_stats_cpu(Tensor h_a, Tensor h_b, Tensor cu_seqlens, bool positive)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &fusedvlm::pairwise_cosine_stats);
  m.def("local_merge_fwd_cpu(Tensor x, Tensor weight, Tensor lf_token, Tensor? bias, bool residual, int h, int w,"
        " bool? winograd) -> Tensor",
        &fusedvlm::local_merge_fwd);
  m.def("local_merge_bwd_cpu(Tensor grad, Tensor x, Tensor weight, bool has_bias, bool residual, int h, int w,"
        " bool need_x, bool need_w, bool? winograd) -> (Tensor, Tensor, Tensor, Tensor)",
        &fusedvlm::local_merge_bwd);
  m.def("local_merge_winograd_cpu(int v, int h, int w, int c_in, int c_out) -> bool", &fusedvlm::winograd_form);
  // A CPU kernel, not a catch-all one: torch.compile traces it through its fake kernel
  // (fusedvlm/native.py). No autograd: the decode step it serves runs without gradients.
  m.def("linear(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[]? scales=None) -> Tensor");
  // The lean step's attention over its KV cache (csrc/decode_attention.inc); no autograd either. The
  // position is a tensor so that one compiled graph serves every position.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, float scale) -> Tensor");
  // A whole decode step of a Llama-family LLM (csrc/decode_step.inc): LeanLlama's step on the
  // CPU, called eagerly by the lean engine (no fake kernel: nothing compiles it); no autograd.
  m.def("llama_decode_step(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor?[] scales, Tensor[] norms,"
        " Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor pos, Tensor cos, Tensor sin, int num_heads, float eps,"
        " float scale, str act) -> Tensor");
  m.def("have_blas() -> bool", [] { return fusedvlm::have_blas(); });
  m.def("fma_peak(int iterations) -> float", &fusedvlm::fma_peak);
  m.def("isa() -> str", &fusedvlm::isa);
  m.def("set_isa(str name) -> ()", &fusedvlm::set_isa);
  m.def("supported_isas() -> str[]", &fusedvlm::supported_isas);
}

TORCH_LIBRARY_IMPL(fusedvlm, CPU, m) {
  m.impl("linear", &fusedvlm::linear);
  m.impl("decode_attention", &fusedvlm::decode_attention);
  m.impl("llama_decode_step", &fusedvlm::llama_decode_step);
}
