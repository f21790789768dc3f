// Registers the CPU kernels as operators of the private namespace fusedvlm_cpu (called from
// Python as torch.ops.fusedvlm_cpu.*). The public fusedvlm:: schemas, fake kernels, autograd
// and FLOP formulas are registered in Python (kernels/*.py), so that they exist, with a torch
// fallback, on machines that cannot build this extension. torch/library.h rather than
// torch/extension.h (pybind11 and the C++ frontend) keeps the build to about a minute.
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
double fma_peak(int64_t);
std::string isa();
void set_isa(const std::string&);
std::vector<std::string> supported_isas();
}  // namespace fusedvlm

TORCH_LIBRARY(fusedvlm_cpu, m) {
  m.def("packed_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_q, Tensor cu_k, bool causal, float scale)"
        " -> (Tensor, Tensor)",
        &fusedvlm::packed_attention_fwd);
  m.def("packed_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_q,"
        " Tensor cu_k, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
        &fusedvlm::packed_attention_bwd);
  m.def("pairwise_cosine_stats(Tensor h_a, Tensor h_b, Tensor cu_seqlens, bool positive)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &fusedvlm::pairwise_cosine_stats);
  m.def("local_merge_fwd(Tensor x, Tensor weight, Tensor lf_token, Tensor? bias, bool residual, int h, int w,"
        " bool? winograd) -> Tensor",
        &fusedvlm::local_merge_fwd);
  m.def("local_merge_bwd(Tensor grad, Tensor x, Tensor weight, bool has_bias, bool residual, int h, int w,"
        " bool need_x, bool need_w, bool? winograd) -> (Tensor, Tensor, Tensor, Tensor)",
        &fusedvlm::local_merge_bwd);
  m.def("local_merge_winograd(int v, int h, int w, int c_in, int c_out) -> bool", &fusedvlm::winograd_form);
  // A CPU kernel, not a catch-all one: torch.compile traces it through its fake kernel
  // (fusedvlm/native.py). No autograd: the decode step it serves runs without gradients.
  m.def("linear(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[]? scales=None) -> Tensor");
  m.def("have_blas() -> bool", [] { return fusedvlm::have_blas(); });
  m.def("fma_peak(int iterations) -> float", &fusedvlm::fma_peak);
  m.def("isa() -> str", &fusedvlm::isa);
  m.def("set_isa(str name) -> ()", &fusedvlm::set_isa);
  m.def("supported_isas() -> str[]", &fusedvlm::supported_isas);
}

TORCH_LIBRARY_IMPL(fusedvlm_cpu, CPU, m) { m.impl("linear", &fusedvlm::linear); }
